"""The DoSSR ``ControlLDM`` on diffusers modules, and loading it from weight files (upstream `model/cldm.py`).

    RRDBNet ×4 ─► start ─┬─► condition encoder (mode) ─► c ─────────────┐
                         └─► SD VAE encoder (sample)  ─► x̂₀           ▼
    x_t ─► ControlNet(x_t, c, τ, ctx) ─► 12 skip + 1 mid residuals ─► SD UNet(x_t, τ, ctx) ─► ε̂
"""

import os
from dataclasses import InitVar, dataclass, field

import torch
from torch import nn

from ..sr_common.errors import WeightFileError, releasing_tensors
from ..sr_common.names import quoted_name
from ..sr_common.sd21 import (SD21, NetworksOnSD21, PromptCache, check_sd21, load_sd21, load_tokenizer,
                              shipped_config_dir)
from .rrdb import rrdb_from_state_dict
from .weights import (base_from_official, build_cond_encoder, build_controlnet, load_ldm_configs, parts_from_converted,
                      parts_from_official, read_weights, shipped_config_path)

DEFAULT_PROMPT = "clean, high-resolution, 8k"


@dataclass
class DoSSRModel(NetworksOnSD21):
    """All networks of one DoSSR model. Call contract of the parts:

    - ``rrdb``: (B, 3, h, w) RGB in [0, 1] → (B, 3, 4h, 4w) (unclamped);
    - ``cond_encoder["encoder"]`` → ``["quant_conv"]``: image in [−1, 1] → 8 moment channels; the VAE's own
      ``encoder`` and ``quant_conv`` modules when the weights are the same (see ``share_vae_encoder``);
    - ``controlnet`` / ``unet``: diffusers modules, see ``predict_eps``;
    - ``vae``: SD 2.1 ``AutoencoderKL``; ``text_encoder``/``tokenizer`` may be None when the prompt
      embedding is given precomputed (``decoder_owned``: see ``fast_vae_decoder``'s ``in_place``).
    """

    unet: torch.nn.Module
    controlnet: torch.nn.Module
    vae: torch.nn.Module
    cond_encoder: torch.nn.Module
    rrdb: torch.nn.Module
    text_encoder: torch.nn.Module = None
    tokenizer: object = None
    prompt_cache: PromptCache = field(default_factory=PromptCache)
    decoder_owned: InitVar[bool] = False

    def modules(self):
        """The distinct networks: the condition encoder only when it is not the VAE's own encoder (then it comes
        with the VAE)."""
        cond_encoder = None if self.cond_encoder["encoder"] is self.vae.encoder else self.cond_encoder
        return [m for m in (self.unet, self.controlnet, self.vae, cond_encoder, self.rrdb, self.text_encoder)
                if m is not None]

    def compile(self, **options):
        """``torch.compile`` (``options``) the ControlNet and the UNet in place, the networks of every step (the VAE
        runs tile by tile in stages of varying shape, and the RRDB once): the same function; each new input shape
        compiles first."""
        self.controlnet.compile(**options)
        self.unet.compile(**options)
        return self


def share_vae_encoder(cond_encoder, vae):
    """The VAE's own ``encoder`` + ``quant_conv`` as the condition encoder when ``cond_encoder`` has exactly
    their weights (the official condition encoder is a frozen copy of the VAE encoder), else ``cond_encoder``.

    Sharing the modules lets the pipeline encode the image once for both c and x̂₀ (same output, bit for bit).
    """
    vae_encoder = nn.ModuleDict({"encoder": vae.encoder, "quant_conv": vae.quant_conv})
    own, theirs = cond_encoder.state_dict(), vae_encoder.state_dict()
    same = own.keys() == theirs.keys() and all(
        v.shape == theirs[k].shape and v.dtype == theirs[k].dtype and v.device == theirs[k].device
        and torch.equal(v, theirs[k]) for k, v in own.items())
    return vae_encoder if same else cond_encoder


def predict_eps(model, x, tau, c_latent, context):
    """ε̂ = UNet(x, τ, ctx; + ControlNet(x, c, τ, ctx) residuals at strength 1.0), returned as float32.

    ``x`` and ``c_latent`` are (B, 4, h, w); ``context`` (1 or B, 77, D). The networks run in the
    model's dtype; everything around them stays float32.
    """
    dtype = model.dtype
    batch = x.shape[0]
    timestep = torch.full((batch,), int(tau), dtype=torch.long, device=x.device)
    context = context.to(device=x.device, dtype=dtype).expand(batch, -1, -1)
    sample = x.to(dtype)
    down, mid = model.controlnet(sample, timestep, encoder_hidden_states=context,
                                 controlnet_cond=c_latent.to(device=x.device, dtype=dtype), conditioning_scale=1.0,
                                 return_dict=False)
    eps = model.unet(sample, timestep, encoder_hidden_states=context, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid, return_dict=False)[0]
    return eps.float()


@releasing_tensors
def load_dossr(weights, base=None, *, config=None, base_config=None, text_heads=None):
    """A ``DoSSRModel`` (float32, CPU, eval) from DoSSR weights and, where needed, an SD 2.1-base.

    ``weights``: the official ``.ckpt`` (whose own SD 2.1 parts serve as base when ``base`` is None)
    or a ``convert_dossr`` safetensors file (then ``base`` is required). ``base``: an already loaded
    ``SD21`` (shared, not modified), a diffusers folder or a single-file SD 2.1-base (``base_config``: its diffusers config folder, for non-standard sizes).
    ``config``: official-style yaml giving the ControlNet/UNet/VAE architecture of an official ckpt
    (default: the shipped SD 2.1 ``cldm_v21.yaml``). ``text_heads``: attention heads of the ckpt's
    OpenCLIP text tower when it is not width/64.
    """
    # the small files first, so that a wrong one is refused before the DoSSR weights (GBs) are read: the base, the yaml
    checked = check_sd21(base, base_config) if base is not None and not isinstance(base, SD21) else None
    configs = load_ldm_configs(config) if config is not None else None
    sd, kind, metadata = read_weights(weights)
    name = os.path.basename(os.fspath(weights))
    if kind != "official" and base is None:
        raise WeightFileError(f"{quoted_name(name)} is a converted DoSSR file (ControlNet, condition encoder, RRDB "
                              "only); pass the SD 2.1-base with --base (stable-diffusion-2-1-base folder or "
                              "v2-1_512-ema-pruned.safetensors), or use the official .ckpt.")
    if kind == "official" and configs is None:
        configs = load_ldm_configs()
    try:
        parts = parts_from_official(sd, configs) if kind == "official" else parts_from_converted(sd, metadata)
        yaml = (config or shipped_config_path()) if kind == "official" else None
        controlnet = build_controlnet(parts.controlnet_config, parts.controlnet, yaml)
        cond_encoder = build_cond_encoder(parts.vae_config, parts.cond_encoder, yaml)
        rrdb = rrdb_from_state_dict(parts.rrdb)
        own_base = base_from_official(sd, configs, text_heads) if base is None else None
    except WeightFileError as e:
        raise WeightFileError(f"{quoted_name(name)}: {e}") from e
    if base is not None:
        sd21 = base if isinstance(base, SD21) else load_sd21(base, base_config, checked=checked)
        unet, vae, text_encoder, tokenizer = sd21.unet, sd21.vae, sd21.text_encoder, sd21.tokenizer
        vae_owned = sd21.vae_owned
    else:
        vae_owned = False
        unet, vae, text_encoder = own_base
        tokenizer = load_tokenizer(os.path.join(shipped_config_dir(), "tokenizer")) if text_encoder is not None else None
    del sd
    if unet.config.cross_attention_dim != controlnet.config.cross_attention_dim:
        raise WeightFileError(f"The base UNet (context {unet.config.cross_attention_dim}) does not match the DoSSR "
                              f"ControlNet of {quoted_name(name)} (context {controlnet.config.cross_attention_dim}); "
                              "DoSSR needs SD 2.1-base.")
    return DoSSRModel(unet.eval(), controlnet, vae.eval(), share_vae_encoder(cond_encoder, vae), rrdb, text_encoder,
                      tokenizer, decoder_owned=vae_owned)
