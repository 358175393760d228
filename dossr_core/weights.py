"""DoSSR weight files: recognise, split and convert the official checkpoint (upstream `model/cldm.py` layout).

The official ``dossr_default.ckpt`` / ``dossr_onestep.ckpt`` is a full pickled ``ControlLDM`` state
dict (maybe under ``state_dict``, maybe with ``module.`` prefixes). It is recognised by its keys:

    control_model.zero_convs.*   the latent-concat ControlNet (the only trained part)
    cond_encoder.encoder.*       the condition encoder (VAE encoder + quant_conv, own weights)
    preprocess_model.*           RRDBNet ×4 (BasicSR names)
    model.diffusion_model.*, first_stage_model.*, cond_stage_model.model.*   SD 2.1-base

plus DDPM buffers (``betas`` … and ``lambdas``, which holds η), all dropped here.
``convert_dossr`` writes only the DoSSR-specific parts as safetensors (diffusers key names), so
users pair it with their own SD 2.1-base.
"""

import io
import json
import os
from dataclasses import dataclass, field
from importlib import resources

import torch
from torch import nn

from ..sr_common.errors import NotAConfigFile, WeightFileError, releasing_tensors
from ..sr_common.known_files import (CONVERTED, DOSSR_CONVERTED_MARKERS, DOSSR_OFFICIAL_MARKERS, KNOWN,
                                     OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, canonical, describe, identify)
from ..sr_common.names import error_text, quoted_name
from ..sr_common.sd21 import NOT_OPEN_CLIP_H, SCALING_FACTOR, load_ldm_unet_vae, open_clip_to_hf
from ..sr_common.weights import (DOSSR_FORMAT, check_safetensors_output, load_module_weights, read_config_bytes,
                                 read_state_dict, safetensors_metadata, write_safetensors)

CONTROL_PREFIX = "control_model."
COND_ENCODER_PREFIX = "cond_encoder."
RRDB_PREFIX = "preprocess_model."


def shipped_config_path():
    """The SD 2.1-base DoSSR config (``cldm_v21.yaml`` equivalent) shipped in the pack."""
    return str(resources.files(__package__).joinpath("configs", "cldm_v21.yaml"))


# ---------------------------------------------------------------- architecture from the official-style yaml

CONFIG_ADVICE = ("Pass the official-style yaml the checkpoint was trained with as --config (in ComfyUI: the loader's "
                 "config), or none for SD 2.1's.")


def load_ldm_configs(path=None):
    """The (unet, controlnet, vae) diffusers configs (``diffusers_configs``) of an official-style ControlLDM yaml
    (its ``params``, or ``model.params``), read as any config (``read_config_bytes``: no FIFO, at most 1 MB): a file
    that is not such a yaml is refused naming what it lacks."""
    import yaml

    path = path or shipped_config_path()
    try:
        text = io.StringIO(read_config_bytes(path).decode("utf-8"))
        text.name = path  # PyYAML names the file in its errors
        config = yaml.safe_load(text)
    except NotAConfigFile as e:
        raise NotAConfigFile(f"{e} {CONFIG_ADVICE}") from e
    except UnicodeDecodeError as e:
        raise WeightFileError(f"{quoted_name(path)} is not a DoSSR/ControlLDM config: it is not a text file. "
                              f"{CONFIG_ADVICE}") from e
    except OSError as e:
        raise WeightFileError(f"Cannot read the DoSSR config {quoted_name(path)}: {error_text(e)}") from e
    except yaml.YAMLError as e:
        raise WeightFileError(f"The DoSSR config {quoted_name(path)} is not valid YAML: {_yaml_error_line(e)}. Correct "
                              f"the file there. {CONFIG_ADVICE}") from e
    model = config.get("model", config) if isinstance(config, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    needed = ("control_stage_config", "unet_config", "first_stage_config")
    if not isinstance(params, dict) or any(k not in params for k in needed):
        raise WeightFileError(f"{quoted_name(path)} is not a DoSSR/ControlLDM config: expected `params` with "
                              f"{list(needed)}.")
    try:
        return diffusers_configs(params)
    except (KeyError, TypeError, AttributeError) as e:  # a part's `params` missing, or a field missing or not a number
        what = f"lacks {e}" if isinstance(e, KeyError) else f"has a field of the wrong kind ({e})"
        raise WeightFileError(f"The DoSSR config {quoted_name(path)} {what}. {CONFIG_ADVICE}") from e


def _yaml_error_line(error):
    """A PyYAML error on one line (its own text takes several): what is wrong and where, lines and columns counted
    from 1 as editors count them."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or problem is None:  # a character YAML does not allow: its position is in the text
        return " ".join(str(error).split())
    line = f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    start, context = getattr(error, "context_mark", None), getattr(error, "context", None)
    if start is not None and context:
        line += f" ({context} from line {start.line + 1}, column {start.column + 1})"
    return line


def _unet_like_config(p):
    """diffusers UNet keyword arguments shared by the UNet and the ControlNet, from ldm ``openaimodel`` params."""
    block_out = [p["model_channels"] * m for m in p["channel_mult"]]
    attention = [2 ** i in p["attention_resolutions"] for i in range(len(block_out))]
    if p.get("num_head_channels", -1) not in (-1, None):
        heads = [c // p["num_head_channels"] for c in block_out]
    else:
        heads = p["num_heads"]
    return {
        "in_channels": p["in_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "block_out_channels": block_out,
        "layers_per_block": p["num_res_blocks"],
        "cross_attention_dim": p["context_dim"],
        "attention_head_dim": heads,
        "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": p.get("transformer_depth", 1),
    }


def diffusers_configs(params):
    """(unet, controlnet, vae) diffusers config dicts for the ldm params of a ControlLDM yaml."""
    unet_params = params["unet_config"]["params"]
    control_params = params["control_stage_config"]["params"]
    unet = _unet_like_config(unet_params)
    attention = [t == "CrossAttnDownBlock2D" for t in unet["down_block_types"]]
    unet.update(out_channels=unet_params.get("out_channels", unet_params["in_channels"]),
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)])
    controlnet = _unet_like_config(control_params)
    controlnet["conditioning_channels"] = control_params["hint_channels"]
    dd = params["first_stage_config"]["params"]["ddconfig"]
    block_out = [dd["ch"] * m for m in dd["ch_mult"]]
    vae = {"in_channels": dd["in_channels"], "out_channels": dd["out_ch"], "latent_channels": dd["z_channels"],
           "down_block_types": ["DownEncoderBlock2D"] * len(block_out),
           "up_block_types": ["UpDecoderBlock2D"] * len(block_out),
           "block_out_channels": block_out, "layers_per_block": dd["num_res_blocks"],
           "scaling_factor": params.get("scale_factor", SCALING_FACTOR)}
    return unet, controlnet, vae


# ---------------------------------------------------------------- recognising files

def detect(sd, path=None):
    """'official' (full ControlLDM ckpt) or 'converted' (``convert_dossr`` output), by ``known_files``' keys; else
    raise naming what it is (``path``: the file, for ``describe``)."""
    if KNOWN["dossr"].detect(sd):
        return "official"
    if KNOWN["dossr-converted"].detect(sd):
        return "converted"
    has_control, has_cond_encoder = (any(k.startswith(p) for k in sd) for p in (CONTROL_PREFIX, COND_ENCODER_PREFIX))
    if identify(sd, path) is CONVERTED[DOSSR_FORMAT]:  # by its metadata
        what = "an incomplete converted DoSSR file (its ControlNet, condition encoder or RRDB is missing)"
    elif has_cond_encoder and not has_control:
        what = "a DoSSR-like checkpoint without the ControlNet (`control_model.*` missing), so it cannot restore images"
    elif has_cond_encoder:
        what = "an incomplete DoSSR checkpoint (no zero convolutions `control_model.zero_convs.*`)"
    else:
        what = describe(sd, path)
    raise WeightFileError(f"{what}. DoSSR's weights are dossr_default.ckpt / dossr_onestep.ckpt from the DoSSR release "
                          "or a file made by `diffsr convert dossr` (looked for "
                          f"{' + '.join(p + '*' for p in DOSSR_OFFICIAL_MARKERS)}, or "
                          f"{' + '.join(p + '*' for p in DOSSR_CONVERTED_MARKERS)} when converted).")


def read_weights(path):
    """(state dict, kind, safetensors metadata) of a DoSSR weight file, refusing other files clearly."""
    sd = read_state_dict(path)
    if not isinstance(sd, dict):
        raise WeightFileError(f"{quoted_name(os.path.basename(os.fspath(path)))} holds a {type(sd).__name__}, not a "
                              "state dict.")
    sd = canonical(sd)
    try:
        kind = detect(sd, path)
    except WeightFileError as e:
        raise WeightFileError(f"{quoted_name(os.path.basename(os.fspath(path)))} is not a DoSSR weight file: it is "
                              f"{e}") from None
    return sd, kind, safetensors_metadata(path) or {}


# ---------------------------------------------------------------- the DoSSR-specific parts

@dataclass
class DoSSRParts:
    """ControlNet (diffusers keys, input conv split), condition encoder (diffusers ``Encoder`` +
    ``quant_conv`` keys), RRDB (BasicSR keys) and the configs needed to build them."""

    controlnet: dict
    cond_encoder: dict
    rrdb: dict
    controlnet_config: dict
    vae_config: dict
    info: dict = field(default_factory=dict)


def _with_prefix(sd, prefix, new=""):
    return {new + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def split_controlnet_conv_in(state, in_channels):
    """The 8-channel input conv on cat([x, c]) → ``conv_in`` on x (keeps the bias) plus a bias-free
    ``controlnet_cond_embedding`` on c; conv_in(x) + cond(c) equals the original conv on the concatenation."""
    weight = state.pop("conv_in.weight")
    state["conv_in.weight"] = weight[:, :in_channels].contiguous()
    state["controlnet_cond_embedding.weight"] = weight[:, in_channels:].contiguous()
    return state


def parts_from_official(sd, configs):
    """Split the official ckpt's DoSSR parts into diffusers layout (ldm → diffusers via diffusers' converters);
    ``configs``: its yaml's (``load_ldm_configs``)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint, convert_ldm_vae_checkpoint

    _, controlnet_config, vae_config = configs
    control = _with_prefix(sd, CONTROL_PREFIX)
    width = control.get("input_blocks.0.0.weight")
    expected_in = controlnet_config["in_channels"] + controlnet_config["conditioning_channels"]
    if width is None or width.shape[1] != expected_in:
        raise WeightFileError(f"The ControlNet input conv has shape {None if width is None else tuple(width.shape)}; "
                              f"DoSSR's takes {expected_in} channels (noisy latent + condition latent).")
    rrdb = _with_prefix(sd, RRDB_PREFIX)
    if not rrdb:
        raise WeightFileError("The DoSSR checkpoint has no RRDB pre-processor (`preprocess_model.*`): it is "
                              "incomplete. Use dossr_default.ckpt / dossr_onestep.ckpt from the DoSSR release.")
    try:
        controlnet = convert_controlnet_checkpoint(control, {"layers_per_block": controlnet_config["layers_per_block"]})
        controlnet = split_controlnet_conv_in({k: v for k, v in controlnet.items() if v is not None},
                                              controlnet_config["in_channels"])
        cond = _with_prefix(sd, COND_ENCODER_PREFIX)  # already "encoder.*" + "quant_conv.*" in ldm names
        cond_encoder = {k: v for k, v in convert_ldm_vae_checkpoint(cond, vae_config).items()
                        if k.startswith(("encoder.", "quant_conv."))}
        vae_encoder = {k: v for k, v in convert_ldm_vae_checkpoint(_with_prefix(sd, VAE_PREFIX, VAE_PREFIX),
                                                                   vae_config).items()
                       if k.startswith(("encoder.", "quant_conv."))} if any(k.startswith(VAE_PREFIX) for k in sd) else {}
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise WeightFileError(f"Cannot convert the DoSSR ControlNet / condition encoder keys ({type(e).__name__}: "
                              f"{e}): the checkpoint is damaged or incomplete. Use dossr_default.ckpt / "
                              "dossr_onestep.ckpt from the DoSSR release.") from e
    info = {}
    if vae_encoder:
        info["cond_encoder_equals_vae_encoder"] = all(
            k in vae_encoder and torch.equal(v, vae_encoder[k]) for k, v in cond_encoder.items())
    return DoSSRParts(controlnet, cond_encoder, rrdb, controlnet_config, vae_config, info)


def parts_from_converted(sd, metadata):
    """The parts of a ``convert_dossr`` file (configs from its metadata)."""
    if metadata.get("format") != DOSSR_FORMAT:
        raise WeightFileError(f"Converted DoSSR file without the expected metadata (format {DOSSR_FORMAT!r}); "
                              "convert the official .ckpt again with `diffsr convert dossr`.")
    try:
        configs = [json.loads(metadata[key]) for key in ("controlnet_config", "vae_config")]
        info = json.loads(metadata.get("info", "{}"))
    except (KeyError, ValueError) as e:
        raise WeightFileError(f"Converted DoSSR file with damaged metadata ({type(e).__name__}: {e}); convert the "
                              "official .ckpt again with `diffsr convert dossr`.") from e
    return DoSSRParts(_with_prefix(sd, "controlnet."), _with_prefix(sd, "cond_encoder."), _with_prefix(sd, "rrdb."),
                      *configs, info)


@releasing_tensors
def convert_dossr(src, dst, config=None, dtype=None):
    """Write the DoSSR-specific parts of an official ckpt (ControlNet, condition encoder, RRDB) as safetensors.

    The SD 2.1-base parts are left out (the user's own SD 2.1-base is used with the converted file).
    Returns the ``info`` dict (e.g. whether the condition encoder equals the VAE encoder).
    """
    check_safetensors_output(dst)  # before the ckpt (5 GB) is read, as the yaml (a few KB)
    configs = load_ldm_configs(config)
    sd, kind, _ = read_weights(src)
    if kind != "official":
        raise WeightFileError(f"{quoted_name(os.path.basename(os.fspath(src)))} is already a converted DoSSR file: use "
                              "it as it is (--weights, or the Load DoSSR node); only the official .ckpt is converted.")
    parts = parts_from_official(sd, configs)
    yaml = config or shipped_config_path()  # written only if it loads: a yaml of another size must be passed now
    build_controlnet(parts.controlnet_config, parts.controlnet, yaml)  # (the file stores its configs)
    build_cond_encoder(parts.vae_config, parts.cond_encoder, yaml)
    write_converted(parts, dst, source=os.path.basename(os.fspath(src)), dtype=dtype)
    return parts.info


def write_converted(parts, dst, source, dtype=None):
    """``parts`` as a converted DoSSR safetensors file (``controlnet.``/``cond_encoder.``/``rrdb.`` keys, the
    configs and ``info`` in its metadata, read back by ``parts_from_converted``)."""
    tensors = {}
    for prefix, state in (("controlnet.", parts.controlnet), ("cond_encoder.", parts.cond_encoder),
                          ("rrdb.", parts.rrdb)):
        for k, v in state.items():
            tensors[prefix + k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    write_safetensors(tensors, dst, metadata={
        "format": DOSSR_FORMAT, "controlnet_config": json.dumps(parts.controlnet_config),
        "vae_config": json.dumps(parts.vae_config), "info": json.dumps(parts.info), "source": source})


# ---------------------------------------------------------------- building modules

CONFIG_FIX = "For a non-SD-2.1 model pass its official yaml with --config"


def _load(module, state, what):
    """``module`` (built on the meta device) filled with ``state`` (``load_module_weights``), in eval mode."""
    load_module_weights(module, state, what, fix=CONFIG_FIX)
    return module.eval()


def _architecture_error(what, error, yaml=None):
    """The refusal of a ``what`` that cannot be built from a converted file's stored config or, given ``yaml``, from
    the yaml an official ckpt is read with."""
    if yaml is not None:
        return WeightFileError(f"The {what} of the DoSSR config {quoted_name(os.path.basename(os.fspath(yaml)))} "
                               f"cannot be built ({type(error).__name__}: {error}). {CONFIG_ADVICE}")
    return WeightFileError(f"The stored {what} architecture cannot be built ({type(error).__name__}: {error}): the "
                           "file is damaged. Convert the official .ckpt again with `diffsr convert dossr`.")


def empty_controlnet(config):
    """diffusers ``ControlNetModel`` on the meta device whose ``conv_in`` sees the noisy latent and whose
    ``controlnet_cond_embedding`` is a bias-free 3×3 conv on the 4-channel condition latent."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        net = ControlNetModel(**config, conditioning_embedding_out_channels=(16,))
        width = config["block_out_channels"][0]
        net.conv_in = nn.Conv2d(config["in_channels"], width, 3, padding=1)
        net.controlnet_cond_embedding = nn.Conv2d(config["conditioning_channels"], width, 3, padding=1, bias=False)
    return net


def build_controlnet(config, state, yaml=None):
    """``empty_controlnet(config)`` with the weights of ``state`` (``yaml``: where ``config`` came from, for errors;
    None: a converted file's metadata)."""
    try:
        net = empty_controlnet(config)
    except (TypeError, KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        raise _architecture_error("ControlNet", e, yaml) from e
    return _load(net, state, "ControlNet")


def build_cond_encoder(vae_config, state, yaml=None):
    """Condition encoder: diffusers VAE ``Encoder`` + 1×1 ``quant_conv`` (2z → 2z), as a ModuleDict (``yaml`` as in
    ``build_controlnet``)."""
    from diffusers.models.autoencoders.vae import Encoder

    try:
        z2 = 2 * vae_config["latent_channels"]
        with torch.device("meta"):
            net = nn.ModuleDict({
                "encoder": Encoder(in_channels=vae_config["in_channels"], out_channels=vae_config["latent_channels"],
                                   down_block_types=vae_config["down_block_types"],
                                   block_out_channels=vae_config["block_out_channels"],
                                   layers_per_block=vae_config["layers_per_block"], double_z=True),
                "quant_conv": nn.Conv2d(z2, z2, 1)})
    except (TypeError, KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        raise _architecture_error("condition encoder", e, yaml) from e
    return _load(net, state, "condition encoder")


def text_encoder_from_open_clip(sd, num_heads=None):
    """transformers ``CLIPTextModel`` (penultimate layer + ln_final) from an OpenCLIP text tower, sized from
    its tensors. ``num_heads`` cannot be read from the tensors: OpenCLIP uses width // 64 (16 for ViT-H)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    prefix = OPEN_CLIP_PREFIX
    for key in ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight"):
        if prefix + key not in sd:  # read before open_clip_to_hf checks the rest
            raise WeightFileError(f"The text encoder lacks {prefix + key!r}; {NOT_OPEN_CLIP_H}")
    width = sd[prefix + "token_embedding.weight"].shape[1]
    blocks = 1 + max(int(k[len(prefix + "transformer.resblocks."):].split(".")[0]) for k in sd
                     if k.startswith(prefix + "transformer.resblocks."))
    config = CLIPTextConfig(vocab_size=sd[prefix + "token_embedding.weight"].shape[0], hidden_size=width,
                            intermediate_size=sd[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                            num_hidden_layers=blocks - 1, num_attention_heads=num_heads or max(1, width // 64),
                            max_position_embeddings=sd[prefix + "positional_embedding"].shape[0], hidden_act="gelu",
                            layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
                            projection_dim=width)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    return _load(model, open_clip_to_hf(sd, blocks - 1, prefix), "text encoder")


def base_from_official(sd, configs, text_heads=None):
    """SD 2.1-base UNet, VAE and text encoder from the base parts inside an official DoSSR ckpt (``configs``: its
    yaml's, ``load_ldm_configs``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    missing = [p for p in (UNET_PREFIX, VAE_PREFIX) if not any(k.startswith(p) for k in sd)]
    if missing:
        raise WeightFileError(f"The DoSSR checkpoint lacks the SD 2.1 parts {missing}; pass --base "
                              "(stable-diffusion-2-1-base folder or v2-1_512-ema-pruned.safetensors).")
    unet_config, _, vae_config = configs
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
    load_ldm_unet_vae(sd, unet, vae, fix=CONFIG_FIX)
    text_encoder = None
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in sd):
        text_encoder = text_encoder_from_open_clip(sd, text_heads)
    return unet.eval(), vae.eval(), text_encoder
