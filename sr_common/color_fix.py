"""Colour correction of an SR output against its low-quality source (StableSR's colour fix).

Both methods use it: OSEDiff (default ``adain``) and DoSSR (default ``wavelet``). Inputs are
float tensors (B, C, H, W) in [0, 1]; the result is clamped to [0, 1].
"""

import torch
import torch.nn.functional as F

COLOR_FIXES = ("adain", "wavelet", "none")


def adain_color_fix(target, source, eps=1e-5):
    """out = (t − μ_t)/σ_t · σ_s + μ_s per channel, σ = sqrt(var_unbiased + eps)."""
    def mean_std(x):
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        return flat.mean(dim=2)[..., None, None], (flat.var(dim=2) + eps).sqrt()[..., None, None]

    mean_t, std_t = mean_std(target)
    mean_s, std_s = mean_std(source)
    return ((target - mean_t) / std_t * std_s + mean_s).clamp(0.0, 1.0)


def wavelet_blur(image, radius):
    """3×3 kernel [1,2,1]ᵀ[1,2,1]/16 with dilation = radius and replicate padding (à trous)."""
    kernel = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]],
                          dtype=image.dtype, device=image.device)
    channels = image.shape[1]
    kernel = kernel[None, None].repeat(channels, 1, 1, 1)
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_decomposition(image, levels=5):
    """Returns (high, low): low = blur_16(…blur_1(image)), high = Σ_i (x_i − blur_{2^i}(x_i))."""
    high = torch.zeros_like(image)
    for i in range(levels):
        low = wavelet_blur(image, 2 ** i)
        high += image - low
        image = low
    return high, low


def wavelet_color_fix(target, source):
    """out = high(target) + low(source), clamped."""
    high, _ = wavelet_decomposition(target)
    _, low = wavelet_decomposition(source)
    return (high + low).clamp(0.0, 1.0)


def apply_color_fix(target, source, method):
    """Dispatch on ``method`` in ``COLOR_FIXES`` ("nofix" is accepted as the official name of "none")."""
    if method == "adain":
        return adain_color_fix(target, source)
    if method == "wavelet":
        return wavelet_color_fix(target, source)
    if method in ("none", "nofix"):
        return target.clamp(0.0, 1.0)
    raise ValueError(f"`color_fix` must be one of {COLOR_FIXES}, got {method!r}")
