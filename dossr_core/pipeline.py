"""DoSSR super-resolution of one image, step by step (Cui et al., NeurIPS 2024; upstream AMD-AIG-AIMA/DoSSR).

LR → RRDBNet ×4 → start ─► c = 0.18215·mode(E_cond(2·start − 1)),  x̂₀ = 0.18215·sample(E_vae(2·start − 1))
→ DoS-SDE from τ = 499 (x_N = α_N x̂₀ + σ_N z) to τ = 0 → VAE decode of the final state → colour fix
against start → (other scales) LANCZOS resize.

Differences from the official script, all opt-in or invisible at official sizes: any LR size
(start is padded to a multiple of 64 px and cropped back; the official needs LR sides that are
multiples of 16, where no padding happens), tiled network evaluation and tiled VAE for large
images, fp16/bf16 networks (sampler arithmetic stays float32/float64).
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..sr_common import image as img
from ..sr_common.color_fix import apply_color_fix, check_color_fix
from ..sr_common.errors import releasing_tensors
from ..sr_common.latents import (CONTROLLED_UNET_COPIES, denoiser_bytes, encode_moments, encode_moments_bytes,
                                 posterior_mean, posterior_sample, vae_decode, vae_decode_bytes)
from ..sr_common.options import check_number
from ..sr_common.sd21 import SCALING_FACTOR, checked_context
from ..sr_common.tiled_vae import DEFAULT_MODE
from ..sr_common.tiling import DEFAULT_TILES, blend_tiles, needs_tiling
from .model import DEFAULT_PROMPT, predict_eps
from .sampling import sample_dossr
from .schedule import make_grid

LATENT_MULTIPLE = 8   # the UNet's three downsamples
PIXEL_MULTIPLE = 64   # = LATENT_MULTIPLE × the VAE's 8


class NoiseSource:
    """Every random draw of a run, by name: "posterior", "init", "step_0", "step_1", ….

    Draws come from a CPU ``torch.Generator`` seeded with ``seed`` in the order they are asked for
    (the official order: posterior sample, initial noise, one per step), or from ``noise`` (a dict
    of tensors, e.g. a noise file) which then must hold every name. ``drawn`` keeps what was used.
    """

    def __init__(self, seed=0, noise=None):
        self.generator = torch.Generator("cpu").manual_seed(int(seed))
        self.noise = noise
        self.drawn = {}

    def __call__(self, name, shape):
        shape = tuple(shape)
        if self.noise is not None:
            if name not in self.noise:
                raise ValueError(f"The noise file has no `{name}` tensor (it needs 'posterior', 'init' and "
                                 f"'step_0' … one per step); it has {sorted(self.noise)}.")
            value = self.noise[name].float()
            if tuple(value.shape) != shape:
                raise ValueError(f"Noise `{name}` has shape {tuple(value.shape)} but this run needs {shape} "
                                 "(a different image size or padding).")
        else:
            value = torch.randn(shape, generator=self.generator, dtype=torch.float32)
        self.drawn[name] = value
        return value


@dataclass
class Options:
    steps: int = 5
    color_fix: str = "wavelet"
    upscale: float = 4          # 1 to 8 (image.check_upscale)
    seed: int = 42
    order: int = 3
    gamma: float = 1.0          # experimental: < 1 moves towards the deterministic ODE (1 = official)
    tile_latent: int = DEFAULT_TILES.tile_latent  # tiles only above tile² (0 = never tile)
    tile_overlap: int = DEFAULT_TILES.tile_overlap
    tile_batch: int = 1
    vae_tile_encode: int = DEFAULT_TILES.vae_tile_encode  # image px (0 = off)
    vae_tile_decode: int = DEFAULT_TILES.vae_tile_decode  # latent px (0 = off)
    vae_tile_mode: str = DEFAULT_MODE  # see sr_common.tiled_vae: bounded (memory) | exact (= untiled, memory grows)


def check_options(o):
    """Refuse ``Options`` the nodes and commands do not give, before any work: a colour fix, scale or tiles they do
    not take, a number of the wrong type (``order``'s value is refused where it is read)."""
    check_color_fix(o.color_fix)
    img.check_upscale(o.upscale)
    for name in ("steps", "seed", "order", "tile_latent", "tile_overlap", "tile_batch", "vae_tile_encode",
                 "vae_tile_decode"):
        check_number(getattr(o, name), f"`{name}`", integer=True)
    check_number(o.gamma, "`gamma`")
    if o.tile_latent and (o.tile_latent < LATENT_MULTIPLE or o.tile_latent % LATENT_MULTIPLE):
        raise ValueError(f"`tile_latent` must be 0 (off) or a multiple of {LATENT_MULTIPLE}, got {o.tile_latent}")
    if o.tile_latent and o.tile_overlap >= o.tile_latent:
        raise ValueError(f"`tile_overlap` must be smaller than `tile_latent`, got {o.tile_overlap} >= {o.tile_latent}")


def vae_moments(model, start, tile=None, callback=None, mode=DEFAULT_MODE):
    """The moments of the SD VAE encoder for ``start`` in [0, 1]."""
    return encode_moments({"encoder": model.vae.encoder, "quant_conv": model.vae.quant_conv}, start, tile, callback,
                          mode)


def condition_latent(model, start, tile=None, callback=None, mode=DEFAULT_MODE):
    """c = 0.18215 · mode(E_cond(2·start − 1))."""
    return posterior_mean(encode_moments(model.cond_encoder, start, tile, callback, mode))


def shares_vae_encoder(model):
    """True when the condition encoder is the VAE encoder itself (``dossr_core.model.share_vae_encoder``)."""
    return (model.cond_encoder["encoder"] is model.vae.encoder
            and model.cond_encoder["quant_conv"] is model.vae.quant_conv)


def condition_encoder_network(model):
    """The network that holds the condition encoder: the VAE when it is the VAE's own encoder."""
    return model.vae if shares_vae_encoder(model) else model.cond_encoder


def start_latents(model, padded, noise, tile=None, stage=lambda name: None, mode=DEFAULT_MODE):
    """(c, x̂₀) of the padded ×4 image: c = 0.18215 · mode(E_cond), x̂₀ a posterior sample of E_vae (the first
    random draw); one encoder pass for both when the condition encoder is the VAE encoder."""
    moments = vae_moments(model, padded, tile, stage("vae_encoder"), mode)
    c_latent = (posterior_mean(moments) if shares_vae_encoder(model)
                else condition_latent(model, padded, tile, stage("cond_encoder"), mode))
    mean_shape = (moments.shape[0], moments.shape[1] // 2, *moments.shape[2:])
    return c_latent, posterior_sample(moments, noise("posterior", mean_shape))


def text_context(model, prompt=DEFAULT_PROMPT, prompt_embeds=None):
    """The (1, 77, 1024) text context: given, or the SD 2.1 text encoder on the prompt (cached)."""
    context = (prompt_embeds if prompt_embeds is not None else model.prompt_embedding(prompt)).float()
    return checked_context(context, model.unet)


def make_eps_model(model, c_latent, context, o, callback=None):
    """``eps(x, tau)`` for the sampler: one ControlNet + UNet call, or Gaussian-blended latent tiles
    (the condition latent is cut with the same tiles; the update itself stays global and exact). Partials, not
    closures: a failed run's frames are cleared, but a frame keeps its function, and a closure what it captured."""
    height, width = c_latent.shape[-2:]
    if not needs_tiling(height, width, o.tile_latent):
        return functools.partial(untiled_eps, model, c_latent, context)
    return functools.partial(tiled_eps, model, c_latent, context, o, callback)


def untiled_eps(model, c_latent, context, x, tau):
    """``predict_eps`` of the whole latent ``x``."""
    return predict_eps(model, x, tau, c_latent, context)


def tiled_eps(model, c_latent, context, o, callback, x, tau):
    """``predict_eps`` over Gaussian-blended tiles of ``x`` and ``c_latent`` (``blend_tiles``)."""
    both = torch.cat([x, c_latent], dim=1)
    return blend_tiles(functools.partial(tile_eps, model, tau, context), both, o.tile_latent, o.tile_overlap,
                       batch=o.tile_batch, callback=callback)


def tile_eps(model, tau, context, tiles):
    """``predict_eps`` of ``tiles``, the latent tiles (4 channels) and the condition's below them (4 more)."""
    return predict_eps(model, tiles[:, :4], tau, tiles[:, 4:], context)


def decode(model, x, tile=None, callback=None, mode=DEFAULT_MODE):
    """(VAE_dec(x / 0.18215) + 1) / 2 in float32 (not clamped)."""
    model.load_stage([model.vae], vae_decode_bytes(model.vae, x, tile))
    return vae_decode(model.vae, x, tile, callback, mode).add_(1).div_(2)


@releasing_tensors
@torch.no_grad()
def dossr_upscale(model, image, *, prompt=DEFAULT_PROMPT, prompt_embeds=None, options=None, noise=None,
                  callback=None, trace=None):
    """Super-resolve one LR image (1, 3, h, w) in [0, 1] → (1, 3, H, W) float in [0, 1].

    H × W = 4h × 4w for ``upscale`` 4, else ceil(upscale·h) × ceil(upscale·w) by LANCZOS from the 4×
    result (quantised to 8 bits first, as the official). ``noise``: dict with "posterior", "init",
    "step_0", … overriding every random draw (else drawn from ``options.seed``).
    ``callback(stage, done, total)`` reports progress; raising from it cancels. ``trace``, a dict,
    receives the intermediates (start, c_latent, x_hat0, context, states, decoded, noise). A failed
    call (out of memory, an interrupt, any error) holds none of the tensors it made
    (``releasing_tensors``): a notebook keeps its error.
    """
    o = options or Options()
    img.check_image(image)
    if image.shape[0] != 1:
        raise ValueError(f"`image` must be a single image (batch 1), got batch {image.shape[0]}")
    # 1. text context: given, or the SD 2.1 text encoder on the prompt (cached)
    context = text_context(model, prompt, prompt_embeds)
    # 2. the sampler's final state from the image (dossr_sample: RRDB, latents, DoS-SDE)
    x, start = dossr_sample(model, context, image=image, options=o, noise=noise, callback=callback, trace=trace)
    # 3. decode and crop the padding away
    decoded = decode(model, x, o.vae_tile_decode, _stage(callback, "decode"), o.vae_tile_mode)
    decoded = decoded[..., :start.shape[-2], :start.shape[-1]]
    if trace is not None:
        trace["decoded"] = decoded.cpu()
    # 4. colour fix, other scales
    return fixed_and_resized(decoded, start, o.upscale, o.color_fix)


def _stage(callback, name):
    """``callback(name, done, total)`` as the ``(done, total)`` callback of one stage (None without a callback)."""
    return (lambda done, total: callback(name, done, total)) if callback else None


def dossr_sample(model, context, *, image=None, latent=None, options=None, noise=None, callback=None, trace=None):
    """Step 2 of ``dossr_upscale`` for one input and its text ``context``: (x, start), x the final state of the
    sampler (a scaled latent), start the colour reference (and its size the output's, before other scales).

    From an LR ``image`` (1, 3, h, w), as the official: start = clamp(RRDB ×4); padded to a multiple of 64 px,
    c = 0.18215 · mode(E_cond) and x̂₀ a posterior sample of E_vae; x covers the padded image.
    From ``latent`` instead (a standard unscaled SD latent at the output size, e.g. VAE Encode of an image another
    model upscaled): x̂₀ = 0.18215 · latent (replicate-padded to a multiple of 8), start = VAE_dec(x̂₀) cropped,
    c = 0.18215 · mode(E_cond(VAE_dec(x̂₀))); x cropped back to the latent's size.
    ``noise``, ``callback`` and ``trace`` as in ``dossr_upscale``.
    """
    o = options or Options()
    check_options(o)
    grid = make_grid(o.steps)
    device, dtype = model.device, model.dtype
    noise_source = NoiseSource(o.seed, noise)
    if latent is None:
        # 1. pre-process: RRDB ×4 on the LR in [0, 1], clamped ("start": condition and colour reference)
        model.load_stage([model.rrdb])
        start = model.rrdb(image.to(device=device, dtype=dtype)).float().clamp(0, 1)
        if callback:
            callback("rrdb", 1, 1)
        # 2. pad start to a multiple of 64 px (latent multiple of 8); cropped back after decoding
        padded, _ = img.pad_to_multiple(start, PIXEL_MULTIPLE)
        model.load_stage([model.vae, condition_encoder_network(model)],
                         encode_moments_bytes(model.cond_encoder, padded, o.vae_tile_encode))
        # 3. condition latent c (mode) and LR latent x̂₀ (posterior sample: the first random draw)
        c_latent, x_hat0 = start_latents(model, padded, noise_source, o.vae_tile_encode,
                                         lambda name: _stage(callback, name), o.vae_tile_mode)
    else:
        # 1.-3. from a latent: x̂₀ given; start and c from its decode
        height, width = latent.shape[-2:]
        x_hat0 = F.pad(latent.to(device=device, dtype=torch.float32) * SCALING_FACTOR,
                       (0, -width % LATENT_MULTIPLE, 0, -height % LATENT_MULTIPLE), mode="replicate")
        padded = decode(model, x_hat0, o.vae_tile_decode, _stage(callback, "decode"), o.vae_tile_mode).clamp(0, 1)
        start = padded[..., :8 * height, :8 * width]
        model.load_stage([condition_encoder_network(model)],
                         encode_moments_bytes(model.cond_encoder, padded, o.vae_tile_encode))
        c_latent = condition_latent(model, padded, o.vae_tile_encode, _stage(callback, "cond_encoder"),
                                    o.vae_tile_mode)
    # 4. DoS-SDE sampling from τ = 499 to 0; the final state is decoded. Partials, not closures: a failed run's
    # frames are cleared, but a frame keeps its function, and a closure what it captured (the states, the draws)
    states = []
    model.load_stage([model.unet, model.controlnet], denoiser_bytes(model.unet, x_hat0, o.tile_latent, o.tile_overlap,
                                                                    o.tile_batch, CONTROLLED_UNET_COPIES))
    eps_model = make_eps_model(model, c_latent, context.to(device), o, _stage(callback, "tile"))
    x = sample_dossr(eps_model, x_hat0, grid, functools.partial(noise_on, noise_source, device), order=o.order,
                     gamma=o.gamma, callback=functools.partial(
                         step_done, states if trace is not None else None, callback, grid.num_steps))
    if latent is not None:
        x = x[..., :latent.shape[-2], :latent.shape[-1]]
    if trace is not None:
        trace.update(start=start.cpu(), c_latent=c_latent.cpu(), x_hat0=x_hat0.cpu(), context=context.cpu(),
                     states=[s.cpu() for s in states], noise=dict(noise_source.drawn))
    return x, start


def noise_on(noise_source, device, name, shape):
    """``noise_source``'s draw ``name`` of ``shape`` on ``device``."""
    return noise_source(name, shape).to(device)


def step_done(states, callback, num_steps, info):
    """After each sampler step: its state appended to ``states`` (None: not kept), then ``callback("sample", done,
    num_steps)``."""
    if states is not None:
        states.append(info["x"])
    if callback:
        callback("sample", info["i"] + 1, num_steps)


def fixed_and_resized(decoded, start, upscale, color_fix):
    """Step 4 of ``dossr_upscale``: the decoded ×4 image colour-fixed against ``start`` on the device (wavelet:
    high frequencies of the result + low frequencies of start), then on the host for scales other than 4 quantised
    to 8 bits (truncating) and LANCZOS-resized to ceil(upscale/4 · size), as the official; clamped to [0, 1]."""
    out = apply_color_fix(decoded, start, color_fix).cpu()
    if upscale != 4:
        height, width = output_size(*start.shape[-2:], upscale)
        out = img.resize(torch.floor(out * 255) / 255, (width, height), "lanczos")
    return out.clamp(0, 1)


def output_size(height, width, upscale):
    """(H', W') of the output from the ×4 image's (H, W): ceil(upscale/4 · size), as the official resize (for an LR
    input of h × w: ceil(upscale · h) × ceil(upscale · w))."""
    return math.ceil(upscale * height / 4), math.ceil(upscale * width / 4)


def save_noise(noise, path, replace=False):
    """Write the draws of a run (``trace['noise']``) as a safetensors noise file for ``--noise-file`` (a file there
    replaced only when ``replace``, once the new one is written)."""
    from ..sr_common.weights import write_safetensors

    write_safetensors({k: v.float().cpu() for k, v in noise.items()}, path, replace=replace)


def load_noise(path):
    """A noise file ({'posterior', 'init', 'step_0', …} → tensor); refuses files without those names."""
    from ..sr_common.errors import ImageInputError, WeightFileError
    from ..sr_common.names import quoted_name
    from ..sr_common.weights import read_state_dict

    try:
        noise = read_state_dict(path)
    except WeightFileError as e:  # its advice is about weights
        raise ImageInputError(f"Cannot read the noise file {quoted_name(path)} ({str(e).split('. ')[0]}); give a file "
                              "that --save-noise wrote.") from e
    if not isinstance(noise, dict) or "init" not in noise or "posterior" not in noise:
        raise ImageInputError(f"{quoted_name(path)} is not a DoSSR noise file: it needs tensors 'posterior', 'init', "
                              "'step_0', …; give a file that --save-noise wrote.")
    return noise
