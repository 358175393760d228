"""What a weight file is, from its keys alone (spandrel's way), so that a loader given the wrong file names the file
it got and where that file goes.

``KNOWN_FILES`` is an ordered list: the files this pack reads and the ones users have beside them in the same
folders (other SD models, LoRAs, ControlNets, upscale models). Each entry is recognised by keys only it has; the
first match wins, so a more specific entry comes before a more general one. Containers are unwrapped first
(``canonical``). A loader still checks the whole layout of the file it expects; this only names the others.
"""

import re
from dataclasses import dataclass
from typing import Callable

import torch

from .weights import DAPE_FORMAT, DOSSR_FORMAT, OSEDIFF_FORMAT, converted_kind

# the LDM layout of single-file SD checkpoints
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
# the text encoder in the other layouts SD 2 files have: OpenCLIP's as Stability AI's generative-models (sgm) saves
# it, and transformers' own as converters from a diffusers folder wrote it (SD 1.x's files have that layout too)
SGM_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."
TRANSFORMERS_CLIP_PREFIX = "cond_stage_model.transformer."
TEXT_ENCODER_PREFIXES = (OPEN_CLIP_PREFIX, SGM_OPEN_CLIP_PREFIX, TRANSFORMERS_CLIP_PREFIX)
# DoSSR: the official ControlLDM checkpoint, and the converted one (diffusers names) without its metadata
DOSSR_OFFICIAL_MARKERS = ("control_model.zero_convs.", "cond_encoder.encoder.")
DOSSR_CONVERTED_MARKERS = ("controlnet.controlnet_down_blocks.", "cond_encoder.encoder.", "rrdb.conv_first.")
OSEDIFF_KEYS = ("state_dict_unet", "state_dict_vae", "rank_unet")  # what tells an osediff.pkl
RAM_PREFIXES = ("visual_encoder.", "tagging_head.", "vision_multi.", "tag_encoder.", "text_decoder.")
LORA_PARTS = (".lora_up.", ".lora_down.", ".lora_A.", ".lora_B.", ".lora.up.", ".lora.down.")


@dataclass(frozen=True)
class KnownFile:
    kind: str
    what: str  # a noun phrase: "the RAM checkpoint (ram_swin_large_14m.pth)"
    use: str  # where the file goes instead
    detect: Callable[[dict], bool] = lambda sd: False
    sd_model: bool = False  # a Stable Diffusion model or a part of one: the SD 2.1-base loader's own advice fits

    def describe(self):
        return f"{self.what}; {self.use}" if self.use else self.what


def _has_all(*prefixes):
    return lambda sd: all(any(k.startswith(p) for k in sd) for p in prefixes)


def _has_any(*prefixes):
    return lambda sd: any(k.startswith(prefixes) for k in sd)


def _contains_any(*parts):
    return lambda sd: any(p in k for k in sd for p in parts)


def _of_family(family):
    return lambda sd: sd_family(sd) == family


def unwrap_ram(obj):
    """The RAM state dict inside ``obj`` (``ram_swin_large_14m.pth`` is ``{'model': state_dict, ...}``) or None."""
    if not isinstance(obj, dict):
        return None
    inner = obj.get("model") if isinstance(obj.get("model"), dict) else obj
    if any(isinstance(k, str) and k.startswith("visual_encoder.") for k in inner) and "label_embed" in inner:
        return inner
    return None


def is_loralib_file(obj):
    """A flat dict of loralib tensors (``<module>.lora_A`` / ``<module>.lora_B``, no ``.weight``), as DAPE.pth."""
    keys = [k for k in obj if isinstance(k, str)] if isinstance(obj, dict) else []
    return bool(keys) and len(keys) == len(obj) and all(k.endswith((".lora_A", ".lora_B")) for k in keys)


LAST_NORM_BIAS = re.compile(re.escape(UNET_PREFIX) + r"output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias$")
# the same norm in diffusers' names: output block 3k + j + 2 is up block k, attention j (11: up_blocks.3.attentions.2)
LAST_UP_NORM_BIAS = re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.0\.norm1\.bias$")
# the families a UNet's number of input channels tells (SD 2.1-base's takes the 4 latent channels)
UNET_INPUT_FAMILIES = {9: "inpainting", 5: "depth", 7: "x4-upscaler"}


def spread_says_v_prediction(norm_bias):
    """ComfyUI's rule (comfy/supported_models.py SD20): a v-prediction SD2 model has a large spread (std > 0.09) in
    the first transformer norm bias of the UNet's last output block. Only of floating-point weights: integers (an
    int8-quantised file) are no weights, and their spread is the quantisation's (the loaders refuse them by name)."""
    return (torch.is_tensor(norm_bias) and norm_bias.is_floating_point() and norm_bias.numel() > 1
            and norm_bias.float().std().item() > 0.09)


def diffusers_unet_is_v_prediction(state):
    """``spread_says_v_prediction`` for a UNet state dict in diffusers' names (the last up block's last attention)."""
    found = sorted((int(m[1]), int(m[2]), k) for k in state for m in [LAST_UP_NORM_BIAS.search(k)] if m)
    return bool(found) and spread_says_v_prediction(state[found[-1][2]])


def _unet_is_sd1(sd):
    """SD 1.x's UNet, as ComfyUI's detection tells it (comfy/model_detection.py): its transformers project with 1×1
    convolutions (SD 2.x's with linear layers), and its cross-attention reads CLIP-L's 768 wide context."""
    for key, value in sd.items():
        if isinstance(key, str) and key.startswith(UNET_PREFIX) and torch.is_tensor(value):
            if (key.endswith(".proj_in.weight") and value.dim() == 4) or (
                    key.endswith(".attn2.to_k.weight") and value.shape[-1] == 768):
                return True
    return False


def sd_family(sd):
    """The Stable Diffusion family of an LDM-layout state dict, told by its UNet as ComfyUI and diffusers tell it:
    'sd2', 'sd2-v', 'sd1', 'sdxl', 'sd2-unclip', one of ``UNET_INPUT_FAMILIES`` or 'other-input' (a UNet taking other
    inputs than the 4 latent channels), 'no-text-encoder' (a UNet without a text encoder in any of
    ``TEXT_ENCODER_PREFIXES``), 'no-vae', or None when it has no LDM UNet."""
    keys = [k for k in sd if isinstance(k, str)]
    first_conv = sd.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
    if torch.is_tensor(first_conv) and first_conv.dim() == 4 and first_conv.shape[1] != 4:
        return UNET_INPUT_FAMILIES.get(first_conv.shape[1], "other-input")
    class_embedding = any(k.startswith(f"{UNET_PREFIX}label_emb.") for k in keys)
    # SD 2.1 unCLIP: the CLIP image embedding enters as a class embedding, beside the OpenCLIP text encoder
    if any(k.startswith("embedder.model.visual.") for k in keys) or (
            class_embedding and any(k.startswith(OPEN_CLIP_PREFIX) for k in keys)):
        return "sd2-unclip"
    # SDXL's sgm embedders are two (CLIP-L or OpenCLIP-bigG, with a class embedding); SD 2's one, OpenCLIP-H
    if class_embedding or any(k.startswith("conditioner.embedders.") and not k.startswith(SGM_OPEN_CLIP_PREFIX)
                              for k in keys):
        return "sdxl"
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        return None
    if _unet_is_sd1(sd):
        return "sd1"
    if not any(k.startswith(TEXT_ENCODER_PREFIXES) for k in keys):
        return "no-text-encoder"
    norm_biases = sorted((int(m.group(1)), k) for k in keys for m in [LAST_NORM_BIAS.match(k)] if m)
    if norm_biases and spread_says_v_prediction(sd[norm_biases[-1][1]]):
        return "sd2-v"
    return "sd2" if any(k.startswith(VAE_PREFIX) for k in keys) else "no-vae"


class FlatStateDict(dict):
    """A state dict as ``canonical`` returns it, its containers unwrapped: ``canonical`` takes it as it is, so that a
    file is unwrapped once however often it is looked at (by a reader, then by ``describe`` naming it)."""


def canonical(obj):
    """The flat state dict inside a container (a ``FlatStateDict``): Lightning's ``state_dict``, BasicSR's
    ``params_ema``/``params``, the dict value of a dict's only key (any key: ``{"model": state_dict}``, as RAM's file;
    not an OSEDiff file's own, ``OSEDIFF_KEYS``: such a file holds one part), a ``module.`` prefix (DataParallel);
    its string keys only (a weight file has no others). A value is taken as it is: the tensors are not copied."""
    if isinstance(obj, FlatStateDict):
        return obj
    for container in ("state_dict", "params_ema", "params"):
        if isinstance(obj.get(container), dict):
            obj = obj[container]
            break
    else:  # ComfyUI's rule (comfy/utils.py load_torch_file): one key whose value is a dict; any other value is kept
        if len(obj) == 1 and isinstance(next(iter(obj.values())), dict) and next(iter(obj)) not in OSEDIFF_KEYS:
            obj = next(iter(obj.values()))
    obj = {k: v for k, v in obj.items() if isinstance(k, str)}
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return FlatStateDict(obj)


NOT_SD21 = "it is a base model, and not the one OSEDiff and DoSSR are built on (SD 2.1-base: 512 px, epsilon)"
PART_OF_SD = "it is a part of a base model (the base is the whole v2-1_512-ema-pruned checkpoint or diffusers folder)"
DAPE_NODE = "Load DAPE (RAM + LoRA)"
OSEDIFF_USE = "pass it as the OSEDiff weights (Load OSEDiff in ComfyUI, or `diffsr osediff --weights`)"
CONVERTED = {
    OSEDIFF_FORMAT: KnownFile("osediff-converted", "a converted OSEDiff file (`diffsr convert osediff`)", OSEDIFF_USE),
    DAPE_FORMAT: KnownFile("dape-converted", "a converted DAPE tagger (RAM with the DAPE LoRA already merged, "
                           "`diffsr convert dape`)", f"pass it alone: in {DAPE_NODE} as ram_or_converted with dape "
                           "'none', in the commands as --dape (or --weights of `diffsr dape`) without --ram"),
    DOSSR_FORMAT: KnownFile("dossr-converted", "a converted DoSSR file (`diffsr convert dossr`)",
                            "use it with Load DoSSR in ComfyUI, or `diffsr dossr --weights`"),
}
# in order: the first whose keys match names the file
KNOWN_FILES = (
    KnownFile("osediff", "an OSEDiff weight file (osediff.pkl)", OSEDIFF_USE,
              lambda sd: any(k in sd for k in OSEDIFF_KEYS)),
    KnownFile("ram", "the RAM checkpoint (ram_swin_large_14m.pth)",
              f"pass it as the RAM weights of DAPE, with DAPE.pth: in {DAPE_NODE} as ram_or_converted with DAPE.pth "
              "as dape, in the commands as --ram with --dape", lambda sd: unwrap_ram(sd) is not None),
    KnownFile("dape", "a DAPE LoRA file (DAPE.pth)",
              f"pass it as the DAPE LoRA, with the RAM checkpoint: in {DAPE_NODE} as dape, in the commands as --dape "
              "with --ram", lambda sd: is_loralib_file(sd) and _has_any(*RAM_PREFIXES)(sd)),
    KnownFile("dossr", "a DoSSR checkpoint (dossr_default.ckpt / dossr_onestep.ckpt)",
              "use it with Load DoSSR in ComfyUI, or `diffsr dossr --weights`", _has_all(*DOSSR_OFFICIAL_MARKERS)),
    KnownFile("dossr-converted", CONVERTED[DOSSR_FORMAT].what, CONVERTED[DOSSR_FORMAT].use,
              _has_all(*DOSSR_CONVERTED_MARKERS)),
    KnownFile("hint-controlnet", "an image-hint ControlNet (it has `input_hint_block`), not DoSSR's latent ControlNet",
              "it goes to ComfyUI's Load ControlNet Model", _contains_any("input_hint_block.")),
    KnownFile("controlldm", "a ControlLDM checkpoint without DoSSR's condition encoder (`cond_encoder.*` missing)", "",
              _has_any("control_model.")),
    KnownFile("diffusers-controlnet", "a diffusers ControlNet (`controlnet_cond_embedding`), not DoSSR's checkpoint",
              "it goes to ComfyUI's Load ControlNet Model", _has_any("controlnet_cond_embedding.")),
    KnownFile("sdxl", "an SDXL checkpoint", NOT_SD21, _of_family("sdxl"), sd_model=True),
    KnownFile("sd1", "a Stable Diffusion 1.x checkpoint", NOT_SD21, _of_family("sd1"), sd_model=True),
    KnownFile("sd2-v", "a Stable Diffusion 2.x 768 v-prediction checkpoint", NOT_SD21,
              _of_family("sd2-v"), sd_model=True),
    KnownFile("inpainting", "an inpainting model (its UNet takes 9 input channels: the latent, a mask and the masked "
              "image)", NOT_SD21, _of_family("inpainting"), sd_model=True),
    KnownFile("depth", "a depth-to-image model (its UNet takes 5 input channels: the latent and a depth map)", NOT_SD21,
              _of_family("depth"), sd_model=True),
    KnownFile("x4-upscaler", "the Stable Diffusion x4 upscaler (its UNet takes 7 input channels: the latent and the "
              "low-resolution image)", NOT_SD21, _of_family("x4-upscaler"), sd_model=True),
    KnownFile("other-input", "a Stable Diffusion model whose UNet takes other inputs than the 4 latent channels",
              NOT_SD21, _of_family("other-input"), sd_model=True),
    KnownFile("sd2-unclip", "a Stable Diffusion 2.1 unCLIP model (conditioned on a CLIP image embedding)", NOT_SD21,
              _of_family("sd2-unclip"), sd_model=True),
    KnownFile("no-text-encoder", "a Stable Diffusion UNet/VAE without the OpenCLIP text encoder "
              "('cond_stage_model.model.*')", PART_OF_SD, _of_family("no-text-encoder"), sd_model=True),
    KnownFile("no-vae", "a Stable Diffusion UNet and text encoder without the VAE ('first_stage_model.*')", PART_OF_SD,
              _of_family("no-vae"), sd_model=True),
    KnownFile("sd2", "a Stable Diffusion 2.x checkpoint",
              "it is a base model: Load SD 2.1-base (DiffSR) in ComfyUI, or --base in the commands",
              _of_family("sd2"), sd_model=True),
    KnownFile("no-unet", "Stable Diffusion parts without the UNet ('model.diffusion_model.*')", PART_OF_SD,
              _has_any(VAE_PREFIX, "cond_stage_model.", "conditioner."), sd_model=True),
    # a VAE alone (ComfyUI's models/vae: vae-ft-mse-840000-ema-pruned, or diffusers' vae/ folder's file)
    KnownFile("sd-vae", "a Stable Diffusion VAE alone", "it goes to ComfyUI's Load VAE",
              _has_all("encoder.conv_in.", "decoder.conv_in.", "post_quant_conv."), sd_model=True),
    # the unet/ and text_encoder/ weights of a diffusers folder, given without the folder
    KnownFile("diffusers-unet", "the UNet of a diffusers folder alone", PART_OF_SD,
              _has_all("conv_in.", "down_blocks.", "mid_block.", "up_blocks."), sd_model=True),
    KnownFile("clip-text-encoder", "a CLIP text encoder alone (transformers' layout, 'text_model.*')", PART_OF_SD,
              _has_any("text_model.embeddings.", "text_model.encoder."), sd_model=True),
    KnownFile("sd-lora", "a LoRA for Stable Diffusion", "it goes to ComfyUI's Load LoRA", _contains_any(*LORA_PARTS)),
    KnownFile("loralib", "a loralib LoRA file (lora_A/lora_B tensors) for an unknown model",
              "DAPE.pth is one, for RAM's visual_encoder/tagging_head", is_loralib_file),
    # Real-ESRGAN/BasicSR ("new arch") and the original ESRGAN layout, as spandrel's ESRGAN detect
    KnownFile("esrgan", "an ESRGAN-style upscale model", "it goes to ComfyUI's Load Upscale Model",
              lambda sd: _has_all("conv_first.", "body.", "conv_last.")(sd)
              or _has_all("model.0.", "model.1.sub.")(sd)),
)
KNOWN = {known.kind: known for known in KNOWN_FILES}
# a folder of one model, by the class its config.json names: what it is, and where it goes where that is not the
# SD 2.1-base loader
FOLDER_MODELS = {
    "UNet2DConditionModel": "a Stable Diffusion UNet alone",
    "AutoencoderKL": KNOWN["sd-vae"].what,
    "CLIPTextModel": "a CLIP text encoder alone",
    "CLIPTextModelWithProjection": "a CLIP text encoder alone",
    "ControlNetModel": f"a ControlNet; {KNOWN['diffusers-controlnet'].use} (the weight file in it, in "
                       "models/controlnet)",
}


def identify(obj, path=None):
    """The ``KnownFile`` that ``obj`` (a loaded weight file; ``path``: the file, whose metadata may say it is one the
    pack converted) is, or None."""
    kind = converted_kind(path) if path is not None else None
    if kind:
        return CONVERTED[kind]
    if not isinstance(obj, dict):
        return None
    sd = canonical(obj)
    return next((known for known in KNOWN_FILES if known.detect(sd)), None)


def describe(obj, path=None):
    """What a loaded weight file is and where it goes, for error messages: "the RAM checkpoint (…); pass it as …"."""
    known = identify(obj, path)
    if known is not None:
        return known.describe()
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}, not a dict of tensors"
    keys = sorted(canonical(obj))
    if not keys:
        return "a dict without named tensors"
    return f"an unknown file (keys: {keys[:6]}{' …' if len(keys) > 6 else ''})"


def _is_class_name(name):
    return isinstance(name, str) and name.isidentifier()


def describe_model_folder(config):
    """What a folder of one model is (a config.json, no pipeline's model_index.json), for error messages: the class
    its ``config`` names (diffusers' ``_class_name``, transformers' ``architectures``; a name that is no identifier
    names none) and, for ``FOLDER_MODELS``, what that is."""
    config = config if isinstance(config, dict) else {}
    architectures = config.get("architectures")
    if _is_class_name(config.get("_class_name")):
        library, names = "diffusers", [config["_class_name"]]
    else:
        library = "transformers"
        names = [n for n in architectures if _is_class_name(n)] if isinstance(architectures, list) else []
    if not names:
        return "a folder with a config.json naming no diffusers or transformers class (one model, not a pipeline)"
    what = f"a {library} {', '.join(names)} folder (one model, by its config.json)"
    return f"{what}: {FOLDER_MODELS[names[0]]}" if names[0] in FOLDER_MODELS else what
