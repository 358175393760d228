"""Colour correction of an SR output against its low-quality source (StableSR's colour fix).

Both methods use it: OSEDiff (default ``adain``) and DoSSR (default ``wavelet``). Inputs are
float tensors (B, C, H, W) in [0, 1]; the result is clamped to [0, 1].
"""

import torch
import torch.nn.functional as F

COLOR_FIXES = ("adain", "wavelet", "none")
ADAIN_EPS = 1e-5  # StableSR's calc_mean_std: σ = sqrt(var_unbiased + eps)
WAVELET_LEVELS = 5  # blur radii 1, 2, 4, 8, 16


def _mean_std(x):
    """Per-channel (μ, σ) of (B, C, H, W), σ = sqrt(var_unbiased + ADAIN_EPS), shaped (B, C, 1, 1)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return flat.mean(dim=2)[..., None, None], (flat.var(dim=2) + ADAIN_EPS).sqrt()[..., None, None]


def wavelet_blur(image, radius):
    """3×3 kernel [1,2,1]ᵀ[1,2,1]/16 with dilation = radius and replicate padding (à trous)."""
    kernel = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]],
                          dtype=image.dtype, device=image.device)
    channels = image.shape[1]
    kernel = kernel[None, None].repeat(channels, 1, 1, 1)
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_decomposition(image):
    """Returns (high, low): low = blur_16(…blur_1(image)), high = Σ_i (x_i − blur_{2^i}(x_i))."""
    high = torch.zeros_like(image)
    for i in range(WAVELET_LEVELS):
        low = wavelet_blur(image, 2 ** i)
        high += image - low
        image = low
    return high, low


def on_host_if_out_of_memory(fn, *args):
    """``fn(*args)`` on the device of its tensors; again with every tensor on the CPU when the device runs out of
    memory (the wavelet fix of a large image needs a few image-sized tensors at once)."""
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        host = lambda a: tuple(host(x) for x in a) if isinstance(a, tuple) else a.cpu() if torch.is_tensor(a) else a
        return fn(*host(args))


def color_reference(source, method):
    """What the colour fix ``method`` keeps of ``source``: its per-channel (μ, σ) for adain, its low
    frequencies for wavelet, nothing for none. Taken early, it lets a pipeline free the source image. On the
    device of ``source``, or the CPU if that runs out of memory."""
    return on_host_if_out_of_memory(_color_reference, source, method)


def _color_reference(source, method):
    check_color_fix(method)
    if method == "adain":
        return _mean_std(source)
    if method == "wavelet":
        return wavelet_decomposition(source)[1]
    return None


def fix_colors(target, reference, method):
    """The colour fix ``method`` of ``target`` against ``reference = color_reference(source, method)``; in place
    on one new image (the formulas above, same operations in the same order). On the device of ``target``, or the
    CPU if that runs out of memory (``target`` is left as it is either way)."""
    return on_host_if_out_of_memory(_fix_colors, target, reference, method)


def _fix_colors(target, reference, method):
    check_color_fix(method)
    if method == "adain":  # (t − μ_t)/σ_t · σ_s + μ_s per channel (``_mean_std``)
        mean_t, std_t = _mean_std(target)
        device = target.device  # a generator of its own keeps what it captures after a failure: not the image
        mean_s, std_s = (r.to(device) for r in reference)
        return (target - mean_t).div_(std_t).mul_(std_s).add_(mean_s).clamp_(0.0, 1.0)
    if method == "wavelet":  # high(target) + low(source); a low(source) taken on the CPU (out of memory) joins it
        high, _ = wavelet_decomposition(target)
        return high.add_(reference.to(target.device)).clamp_(0.0, 1.0)
    return target.clamp(0.0, 1.0)


def apply_color_fix(target, source, method):
    """``target`` with ``source``'s colours by ``method`` (``color_reference`` then ``fix_colors``; "nofix" is
    accepted as the official name of "none")."""
    return fix_colors(target, color_reference(source, method), method)


def check_color_fix(method):
    if method not in COLOR_FIXES + ("nofix",):
        raise ValueError(f"`color_fix` must be one of {COLOR_FIXES}, got {method!r}")
