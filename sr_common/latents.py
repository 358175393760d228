"""SD latents both methods share: image → VAE moments, the posterior sample, latent → image (tiled VAE); beside
each, the estimate of its activations (what a device needs free for it), and the UNet's (``denoiser_bytes``)."""

import torch

from .fast_modules import FusedUpsample2D, decoder_weights_for
from .sd21 import SCALING_FACTOR
from .tiling import call_pixels
from .tiled_vae import DEFAULT_MODE, decoder_activation_bytes, encoder_activation_bytes, fit_decoder_tile, tiled_forward


def encode_moments(encoder, image01, tile=None, callback=None, mode=DEFAULT_MODE):
    """The 8 moment channels (μ, log σ²) of an ``{"encoder", "quant_conv"}`` pair for an image in [0, 1], as 2x − 1;
    the encoder tiled above ``tile`` px; float32."""
    weight = encoder["quant_conv"].weight
    h = tiled_forward(encoder["encoder"], (image01 * 2 - 1).to(weight), tile, is_decoder=False, callback=callback,
                      mode=mode)
    return encoder["quant_conv"](h.to(weight.dtype)).float()


def encode_moments_bytes(encoder, image, tile=None):
    """The estimated activations of ``encode_moments(encoder, image, tile)`` (``encoder_activation_bytes``): what a
    device needs free beside the encoder's weights."""
    return encoder_activation_bytes(encoder["encoder"], *image.shape[-2:], tile, encoder["quant_conv"].weight.dtype)


def posterior_mean(moments):
    """z = 0.18215 · μ (the posterior's mode)."""
    return moments.float().chunk(2, dim=1)[0] * SCALING_FACTOR


def posterior_sample(moments, noise):
    """z = 0.18215 · (μ + exp(½·clamp(log σ², −30, 20))·n) for a standard normal ``noise`` of μ's shape."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return (mean + std * noise.to(mean.device)) * SCALING_FACTOR


def device_free_bytes(device):
    """What a computation can still take on a CUDA ``device``: its free memory plus what PyTorch's allocator holds
    unused (as ComfyUI's ``get_free_memory``); None on other devices."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def vae_decode_bytes(vae, z, tile=None):
    """The estimated activations of ``vae_decode(vae, z, tile)`` (``decoder_activation_bytes``): what a device
    needs free beside the VAE's weights."""
    return decoder_activation_bytes(vae.decoder, *z.shape[-2:], tile, vae.post_quant_conv.weight.dtype)


UNET_COPIES = 19  # OSEDiff's UNet: 18.5 at most in the meta count (tests/test_device_memory.py)
CONTROLLED_UNET_COPIES = 26  # DoSSR's ControlNet + UNet: 25.9 at most


def denoiser_bytes(unet, latent, tile, overlap, batch=1, copies=UNET_COPIES):
    """The estimated activations of ``unet``'s calls over ``latent`` (B, C, H, W) in ``blend_tiles``'s tiles:
    ``copies`` × its first block's activation (conv_in's channels over the latent px of one call, in its dtype),
    + the phase kernels its upsamplers have yet to fold (``FusedUpsample2D``)."""
    weight = unet.conv_in.weight
    pixels = latent.shape[0] * call_pixels(*latent.shape[-2:], tile, overlap, batch)
    kernels = sum(m.unfolded_kernel_bytes() for m in unet.modules() if isinstance(m, FusedUpsample2D))
    return copies * weight.shape[0] * pixels * weight.element_size() + kernels


def vae_decode(vae, z, tile=None, callback=None, mode=DEFAULT_MODE):
    """VAE_dec(z / 0.18215), nominally in [−1, 1] (not clamped), the decoder tiled above ``tile`` latent px;
    float32. The decoder's weights are in the layout that is faster on their device (``decoder_weights_for``).
    On a CUDA device in the ``bounded`` mode, ``tile`` is lowered until the decode's estimated activations fit in
    the free memory (``fit_decoder_tile``): a latent up to tile + 22 px is otherwise decoded whole, 5.3 GiB in fp16
    at 1920² px, where 2048² px in four tiles takes 1.5 GiB."""
    weight = vae.post_quant_conv.weight
    h = vae.post_quant_conv((z / SCALING_FACTOR).to(weight.dtype))
    free = device_free_bytes(weight.device)
    if free is not None and mode == "bounded":
        tile = fit_decoder_tile(vae.decoder, *h.shape[-2:], tile, weight.dtype, free)
    decoder = decoder_weights_for(vae.decoder, weight.device)
    return tiled_forward(decoder, h, tile, is_decoder=True, callback=callback, mode=mode).float()
