"""OSEDiff one-step super-resolution, step by step (Wu et al., NeurIPS 2024; upstream cswry/OSEDiff).

LQ image → bicubic ×scale → VAE encoder with LoRA → one UNet step at t = 999 →
x0 = (z − √(1−ᾱ)·ε)/√ᾱ → VAE decoder → colour fix.
"""

import functools
from dataclasses import InitVar, dataclass, field

import torch

from ..sr_common import image as img
from ..sr_common.color_fix import color_reference, fix_colors
from ..sr_common.errors import OptionError, releasing_tensors
from ..sr_common.latents import (denoiser_bytes, encode_moments, encode_moments_bytes, posterior_mean,
                                 posterior_sample, vae_decode, vae_decode_bytes)
from ..sr_common.options import check_flag, check_number
from ..sr_common.sd21 import NetworksOnSD21, PromptCache, scaled_linear_betas
from ..sr_common.tiled_vae import DEFAULT_MODE
from ..sr_common.tiling import DEFAULT_TILES, blend_tiles, needs_tiling
from .weights import apply_osediff_unet, lq_encoder

TIMESTEP = 999


def alpha_bar(t):
    """ᾱ_t of SD's scaled-linear schedule, float32 as diffusers' DDPMScheduler computes it."""
    return torch.cumprod(1.0 - scaled_linear_betas(torch.float32), dim=0)[t]


@dataclass
class OSEDiffModel(NetworksOnSD21):
    """SD 2.1-base with the OSEDiff LoRA merged: ``unet`` (LoRA + new conv_in), ``lq_encoder``
    (VAE encoder + quant_conv with LoRA), and the frozen ``vae`` whose decoder turns x0 into pixels
    (``decoder_owned``: see ``fast_vae_decoder``'s ``in_place``)."""

    unet: torch.nn.Module
    lq_encoder: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    prompt_cache: PromptCache = field(default_factory=PromptCache)
    decoder_owned: InitVar[bool] = False

    def modules(self):
        return [self.unet, self.lq_encoder, self.vae, self.text_encoder]

    def compile(self, **options):
        """``torch.compile`` (``options``) the UNet in place, the one network step (the VAE runs tile by tile in
        stages of varying shape): the same function; each new input shape compiles first."""
        self.unet.compile(**options)
        return self


@releasing_tensors
def build_osediff(sd21, ckpt, *, consume=False):
    """OSEDiff from loaded SD 2.1-base parts and an OSEDiff checkpoint dict (see ``weights.read_osediff``).

    The LoRA is merged into copies of the UNet and the VAE encoder, and ``sd21`` keeps its weights (its VAE decoder
    gets channels-last ones: same function). With ``consume`` the caller hands ``sd21`` over: where its UNet is this
    process's own memory (``sd21.unet_owned``: a file read into memory or converted at load), the LoRA goes into it
    in place, which saves a 3.5 GB copy at full size; likewise the VAE encoder (``sd21.vae_owned``; the frozen one
    is not needed, so ``vae.encoder`` becomes the LQ encoder). Weights memory-mapped from their file are still
    merged into a copy (faster than writing into the mapping)."""
    unet = apply_osediff_unet(sd21.unet, ckpt, in_place=consume and sd21.unet_owned)
    encoder = lq_encoder(sd21.vae, ckpt, in_place=consume and sd21.vae_owned)
    return OSEDiffModel(unet, encoder, sd21.vae, sd21.text_encoder, sd21.tokenizer, decoder_owned=sd21.vae_owned)


@dataclass
class Plan:
    """How to get a run's output back from what the networks gave: the crop, then the final size."""

    crop: tuple          # (H, W) to crop the decoded output to
    output_size: tuple   # (W, H) of the final output


MAX_ASPECT_ENLARGED = 4  # small inputs are enlarged to a long side of at most 4 · process_size / upscale
MAX_PROCESS_SIZE = 4096  # the largest process_size taken (a node's input, a command's option, Options)


def check_sizing(upscale, process_size, official_sizing=False,
                 names=("`upscale`", "`process_size`", "`official_sizing`")):
    """Refuse sizing options the nodes and commands do not take, naming them as ``names`` (a command's options):
    an ``upscale`` outside 1 … 8 (``image.check_upscale``), a process size outside 0 … MAX_PROCESS_SIZE (past that,
    ``enlarge_small`` takes a small image to gigapixels: minutes, then out of memory), a fractional ``upscale`` with
    ``official_sizing`` (whose sizes are ×int(upscale), as the official code's); any of the wrong type."""
    img.check_upscale(upscale, names[0])
    check_number(process_size, names[1], integer=True, takes=f"an integer from 0 to {MAX_PROCESS_SIZE}")
    check_flag(official_sizing, names[2])
    if not 0 <= process_size <= MAX_PROCESS_SIZE:
        raise OptionError(f"{names[1]} must be between 0 and {MAX_PROCESS_SIZE}, got {process_size}")
    if official_sizing and upscale != int(upscale):
        raise OptionError(f"{names[2]} takes an integer {names[0]} (the official code does), got {upscale:g}")


def enlarge_small(image, *, upscale=4, process_size=512, official_sizing=False):
    """Step 1 of ``preprocess``: ``image``, or, where a side is below process_size // upscale, the image enlarged
    (PIL bicubic) so that its short side reaches it, the size truncated by ``int()`` as the official code, but never
    so far that the long side passes 4 · process_size // upscale (very thin images would otherwise ask for gigapixels;
    with ``official_sizing`` such an image is refused instead). Sizing options the nodes and commands do not take are
    refused (``check_sizing``)."""
    check_sizing(upscale, process_size, official_sizing)
    height, width = image.shape[-2:]
    minimum = process_size // upscale
    if width >= minimum and height >= minimum:
        return image
    factor = minimum / min(width, height)
    longest = MAX_ASPECT_ENLARGED * minimum
    if factor * max(width, height) > longest:
        if official_sizing:
            raise img.ImageInputError(
                f"A {width}x{height} image is too thin for --official-sizing at process size {process_size}: "
                f"raising its short side to {minimum} px would make it {int(factor * max(width, height))} px "
                "long. Drop --official-sizing (the exact sizing enlarges it less), or lower --process-size.")
        factor = max(1.0, longest / max(width, height))
    return img.resize(image, (int(factor * width), int(factor * height))) if factor > 1 else image


def upscaled_size(lq, upscale, official_sizing=False):
    """Step 2's size (W, H) for ``enlarge_small``'s ``lq``: ``scaled_size``, or with ``official_sizing`` each side
    times int(upscale), as the official code."""
    if official_sizing:
        return lq.shape[-1] * int(upscale), lq.shape[-2] * int(upscale)
    return img.scaled_size(lq.shape[-1], lq.shape[-2], upscale)


def preprocess(image, *, upscale=4, process_size=512, official_sizing=False):
    """The upscaled LQ (1, 3, H, W) in [0, 1] and the size plan.

    1. ``enlarge_small``: an image with a side below process_size // upscale is enlarged.
    2. PIL bicubic ×upscale (``upscaled_size``).
    3. official_sizing: shrink to a multiple of 8 with LANCZOS and keep that size.
       Otherwise the networks see the image padded to a multiple of 8 and the output is cropped
       back and, if step 1 enlarged it, resized to exactly round(upscale × input).
    """
    img.check_image(image)
    lq = enlarge_small(image, upscale=upscale, process_size=process_size, official_sizing=official_sizing)
    height, width = image.shape[-2:]
    target = img.scaled_size(width, height, upscale)
    lq = img.resize(lq, upscaled_size(lq, upscale, official_sizing))
    if official_sizing:
        h8, w8 = lq.shape[-2] - lq.shape[-2] % 8, lq.shape[-1] - lq.shape[-1] % 8
        if h8 < 8 or w8 < 8:
            raise img.ImageInputError(f"Image too small for --official-sizing: {width}x{height} at x{upscale}.")
        lq = img.resize(lq, (w8, h8), "lanczos")
        return lq, Plan((h8, w8), (w8, h8))
    return lq, Plan((lq.shape[-2], lq.shape[-1]), target)


def posterior_latent(moments, sample_mode="mean", seed=0):
    """z = 0.18215 · μ, or with ``sample_mode="sample"`` a posterior sample whose n ~ N(0, I) comes from a CPU
    generator seeded with ``seed``."""
    if sample_mode == "mean":
        return posterior_mean(moments)
    if sample_mode != "sample":
        raise ValueError(f"`sample_mode` must be 'mean' or 'sample', got {sample_mode!r}")
    noise = torch.randn((moments.shape[0], moments.shape[1] // 2, *moments.shape[2:]),
                        generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)
    return posterior_sample(moments, noise)


def encode_lq(encoder, lq, *, sample_mode="mean", seed=0, tile=None, tile_mode=DEFAULT_MODE, callback=None):
    """Scaled latent of the LQ: LoRA VAE encoder (tiled above ``tile`` px) → quant_conv → posterior."""
    return posterior_latent(encode_moments(encoder, lq, tile, callback, tile_mode), sample_mode, seed)


def lq_latent(model, lq, *, sample_mode="mean", seed=0, tile=None, tile_mode=DEFAULT_MODE, callback=None):
    """Step 2 on ``model``'s device: the upscaled LQ padded to a multiple of 8 (reflect), then ``encode_lq``."""
    padded, _ = img.pad_to_multiple(lq, 8)
    model.load_stage([model.lq_encoder], encode_moments_bytes(model.lq_encoder, padded, tile))
    return encode_lq(model.lq_encoder, padded.to(model.device), sample_mode=sample_mode, seed=seed, tile=tile,
                     tile_mode=tile_mode, callback=callback)


def predict_eps(unet, z, prompt_embeds, *, tile=96, overlap=32, tile_batch=1, callback=None):
    """ε̂ = UNet(z, t=999, prompt); tiled with Gaussian blending when the latent area exceeds tile²."""
    timestep = torch.tensor([TIMESTEP], device=z.device, dtype=torch.long)
    embeds = prompt_embeds.to(device=z.device, dtype=unet.conv_in.weight.dtype)
    if not needs_tiling(z.shape[-2], z.shape[-1], tile):
        return unet_eps(unet, timestep, embeds, z).float()
    # a partial, not a closure: a failed run's frames are cleared, but a frame keeps its function (and a closure
    # what it captured)
    return blend_tiles(functools.partial(unet_eps, unet, timestep, embeds), z, tile, overlap, batch=tile_batch,
                       callback=callback)


def unet_eps(unet, timestep, embeds, tiles):
    """The UNet's ε̂ of ``tiles`` (B, 4, h, w) at ``timestep`` with ``embeds`` (1, 77, D), in the UNet's dtype."""
    return unet(tiles.to(embeds.dtype), timestep, encoder_hidden_states=embeds.expand(tiles.shape[0], -1, -1)).sample


def one_step_x0(z, eps):
    """x0 = (z − √(1 − ᾱ_t)·ε) / √ᾱ_t at t = TIMESTEP (999), in float32."""
    a = alpha_bar(TIMESTEP)
    return (z.float() - (1 - a) ** 0.5 * eps.float()) / a ** 0.5


def one_step(model, z, prompt_embeds, *, tile=96, overlap=32, tile_batch=1, callback=None):
    """Steps 3 and 4 on ``model``'s device: ε̂ = UNet(z, t=999, prompt), then ``one_step_x0``."""
    model.load_stage([model.unet], denoiser_bytes(model.unet, z, tile, overlap, tile_batch))
    z = z.to(model.device)
    eps = predict_eps(model.unet, z, prompt_embeds, tile=tile, overlap=overlap, tile_batch=tile_batch,
                      callback=callback)
    return one_step_x0(z, eps)


def decode_latent(vae, x0, *, tile=None, tile_mode=DEFAULT_MODE, callback=None):
    """VAE decode of x0 / 0.18215 (decoder tiled above ``tile`` latent px), clamped to [−1, 1]."""
    return vae_decode(vae, x0, tile, callback, tile_mode).clamp_(-1, 1)


def decoded_image(model, x0, crop, *, tile=None, tile_mode=DEFAULT_MODE, callback=None):
    """Step 5 on ``model``'s device: ``decode_latent`` mapped to [0, 1] and cropped to ``crop`` (H, W): the
    padding of step 2 off."""
    model.load_stage([model.vae], vae_decode_bytes(model.vae, x0, tile))
    decoded = decode_latent(model.vae, x0.to(model.device), tile=tile, tile_mode=tile_mode, callback=callback)
    return decoded.mul_(0.5).add_(0.5)[..., :crop[0], :crop[1]]


@dataclass
class Options:
    upscale: float = 4  # 1 to 8 (check_sizing)
    process_size: int = 512  # 0 to MAX_PROCESS_SIZE (check_sizing)
    official_sizing: bool = False
    color_fix: str = "adain"
    sample_mode: str = "mean"
    seed: int = 0
    tile_latent: int = DEFAULT_TILES.tile_latent
    tile_overlap: int = DEFAULT_TILES.tile_overlap
    vae_tile_encode: int = DEFAULT_TILES.vae_tile_encode
    vae_tile_decode: int = DEFAULT_TILES.vae_tile_decode
    vae_tile_mode: str = DEFAULT_MODE  # see sr_common.tiled_vae; "official" is used with official_sizing
    tile_batch: int = 1


def check_options(o):
    """Refuse ``Options`` the nodes and commands do not give, before any work: the sizing (``check_sizing``), an
    integer field of another type (the others are refused where they are read, by name)."""
    check_sizing(o.upscale, o.process_size, o.official_sizing)
    for name in ("seed", "tile_latent", "tile_overlap", "vae_tile_encode", "vae_tile_decode", "tile_batch"):
        check_number(getattr(o, name), f"`{name}`", integer=True)


@releasing_tensors
@torch.no_grad()
def osediff_upscale(model, image, *, prompt="", prompt_embeds=None, prompt_fn=None, options=None, callback=None):
    """Super-resolve one image (1, 3, H, W) in [0, 1] → (1, 3, H', W') float in [0, 1].

    The prompt is ``prompt_embeds`` (1, 77, D) if given, else ``prompt_fn(lq)`` (e.g. DAPE on the
    upscaled LQ) if given, else ``prompt``. ``callback(stage, done, total)`` reports progress.
    A failed call (out of memory, an interrupt, any error) holds none of the tensors it made
    (``releasing_tensors``): a notebook keeps its error.
    """
    o = options or Options()
    check_options(o)
    stage = (lambda name: (lambda done, total: callback(name, done, total))) if callback else (lambda name: None)
    device = model.device
    # 1. pre-process: raise small inputs, bicubic ×scale, /8 (pad, or shrink with --official-sizing)
    lq, plan = preprocess(image.float().cpu(), upscale=o.upscale, process_size=o.process_size,
                          official_sizing=o.official_sizing)
    lq = lq.to(device)  # from here to the colour fix on the device, no round trip to the host
    # what the colour fix needs of the upscaled LQ, and the prompt; then only its padded copy is kept (lq_latent pads
    # no further)
    reference = color_reference(lq, o.color_fix)
    if prompt_embeds is None:
        prompt_embeds = model.prompt_embedding(prompt_fn(lq) if prompt_fn is not None else prompt)
    padded, _ = img.pad_to_multiple(lq, 8)
    del lq
    # 2. encode with the LoRA VAE encoder
    # the official tiled VAE with --official-sizing; otherwise bounded or exact tiles (see tiled_vae)
    tile_mode = "official" if o.official_sizing else o.vae_tile_mode
    z = lq_latent(model, padded, sample_mode=o.sample_mode, seed=o.seed, tile=o.vae_tile_encode, tile_mode=tile_mode,
                  callback=stage("encode"))
    del padded
    # 3., 4. ε at t = 999 with the prompt embedding, x0 in closed form
    x0 = one_step(model, z, prompt_embeds, tile=o.tile_latent, overlap=o.tile_overlap, tile_batch=o.tile_batch,
                  callback=stage("unet"))
    # 5. decode, crop the padding off
    out = decoded_image(model, x0, plan.crop, tile=o.vae_tile_decode, tile_mode=tile_mode, callback=stage("decode"))
    # 6. colour fix against the upscaled LQ, then back to the host and the requested size
    if o.official_sizing:
        # the official code quantises (truncating) before and after the colour fix
        out = torch.floor(out.clamp(0, 1) * 255) / 255
        out = fix_colors(out, reference, o.color_fix)
        return (torch.floor(out.clamp(0, 1) * 255) / 255).cpu()
    return fixed_and_resized(out, reference, plan, o.color_fix)


def fixed_and_resized(image, reference, plan, color_fix):
    """Step 6 (but with official sizing): ``image`` (the decoded, cropped output) colour-fixed against ``reference``
    (``color_reference`` of the upscaled LQ), on the host, at ``plan.output_size`` (bicubic when it differs)."""
    out = fix_colors(image, reference, color_fix).cpu()
    if (out.shape[-1], out.shape[-2]) != plan.output_size:
        out = img.resize(out, plan.output_size, "bicubic").clamp(0, 1)
    return out
