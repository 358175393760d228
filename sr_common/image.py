"""Image conversions and resizes with PIL semantics, shared by both methods.

Images inside the pack are float32 tensors (B, C, H, W) in [0, 1]. A tensor whose values are
all multiples of 1/255 is treated as 8-bit: it is resized through PIL's 8-bit RGB path, which is
what the official code does to the PNG it reads. Any other float image is resized with PIL's
float ("F") mode, the same filter without the 8-bit rounding.
"""

import math
import mmap

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ImageInputError, OptionError
from .options import check_number

RESAMPLE = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


def pil_to_tensor(image):
    """PIL image → (1, 3, H, W) float32 in [0, 1] (RGB; ``convert('RGB')`` as the official)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255.0


def resized_alpha(alpha, size):
    """An alpha (B, 1, h, w) in [0, 1] resized bicubically to ``size`` (H, W), in float32, and clamped."""
    return F.interpolate(alpha.float(), size=tuple(size), mode="bicubic", align_corners=False).clamp(0, 1)


def with_upscaled_alpha(image, alpha):
    """(B, 3, H, W) and an alpha (B, 1, h, w) in [0, 1] → (B, 4, H, W): the alpha ``resized_alpha`` to the image's
    size (the networks see only the RGB)."""
    return torch.cat([image, resized_alpha(alpha.to(image.device), image.shape[-2:]).to(image.dtype)], dim=1)


def tensor_to_uint8(image):
    """(1, C, H, W) in [0, 1] → (H, W, C) uint8, rounded."""
    return image[0].clamp(0, 1).mul(255).permute(1, 2, 0).cpu().float().round().to(torch.uint8).numpy()


def is_8bit(image):
    """True when every value is k/255 for an integer k, to 1e-4 of a level (the image came from an 8-bit file)."""
    scaled = image.detach().float() * 255.0
    return bool(((scaled - scaled.round()).abs() <= 1e-4).all())


def check_image(image):
    """Validate a (B, C, H, W) float image; raise ``ImageInputError`` naming the problem."""
    if not torch.is_tensor(image) or image.dim() != 4:
        raise ImageInputError(f"Expected an image tensor of shape (B, C, H, W), got {getattr(image, 'shape', type(image))}.")
    if image.shape[1] != 3:
        raise ImageInputError(f"Expected 3 colour channels, got {image.shape[1]}; convert grayscale/RGBA to RGB first.")
    if image.shape[2] < 1 or image.shape[3] < 1:
        raise ImageInputError(f"Image has no pixels: {tuple(image.shape)}.")
    if not torch.isfinite(image).all():
        raise ImageInputError("Image contains NaN or Inf values; fix the node or file that produced it.")


def _pil_images(image, eight_bit):
    """One image (3, H, W) in [0, 1] as ``resize`` hands it to PIL: one RGB image on the 8-bit path (rounded to 8
    bits), else one mode-F image per channel."""
    if eight_bit:
        array = (image.permute(1, 2, 0).cpu().float() * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
        return [Image.fromarray(array)]
    return [Image.fromarray(plane.cpu().float().numpy()) for plane in image]


def _from_pil(arrays, eight_bit):
    """``_pil_images``' results, as arrays, back to (3, H, W) float32 in [0, 1]."""
    if eight_bit:
        return torch.from_numpy(arrays[0].copy()).permute(2, 0, 1).float() / 255.0
    return torch.stack([torch.from_numpy(array.copy()) for array in arrays])


def resize(image, size, method="bicubic"):
    """Resize (B, 3, H, W) in [0, 1] to ``size`` = (W, H) exactly as ``PIL.Image.resize`` would.

    8-bit images go through PIL's RGB path (rounded to 8 bits, as the official code); other
    float images through PIL's float path per channel. The result is a contiguous tensor, also at the same size:
    convolutions pick their memory layout, and so their rounding, by their input's strides, which differ between a
    file read (``pil_to_tensor``) and a ComfyUI IMAGE (channels last).
    """
    width, height = size
    if (image.shape[-1], image.shape[-2]) == (width, height):
        return image.clone(memory_format=torch.contiguous_format)
    eight_bit = is_8bit(image)
    out = [_from_pil([np.asarray(im.resize((width, height), RESAMPLE[method])) for im in _pil_images(one, eight_bit)],
                     eight_bit) for one in image]
    return torch.stack(out).to(image.device)


ENLARGE_STRIP = 64  # rows of the horizontal pass at a time in enlarged_lines


def _widened_columns(im, width, columns):
    """PIL's horizontal bicubic pass of ``im`` to ``width`` at ``columns`` only, ``ENLARGE_STRIP`` rows at a time."""
    parts = []
    for top in range(0, im.height, ENLARGE_STRIP):
        strip = im.crop((0, top, im.width, min(top + ENLARGE_STRIP, im.height)))
        parts.append(np.asarray(strip.resize((width, strip.height), Image.BICUBIC))[:, columns])
    return np.concatenate(parts)


def enlarged_lines(image, size, rows, columns):
    """``resize(image, size)`` (bicubic) at ``rows`` × ``columns`` only, (B, 3, len(rows), len(columns)): the same
    numbers without forming the enlarged image; for an enlargement (no side of ``size`` below the image's).

    PIL enlarges in two passes, each stored rounded (to 8 bits on the 8-bit path): first the horizontal one, which
    makes each row from that row alone, then the vertical one, each column from that column alone (Pillow 13 runs the
    vertical pass first where the height shrinks, which an enlargement never does). So the horizontal pass runs on a
    few rows at a time and keeps only ``columns``; the vertical one on those columns, at the full height as in the
    whole.
    """
    width, height = size
    if width < image.shape[-1] or height < image.shape[-2]:
        raise ValueError(f"enlarged_lines enlarges; {image.shape[-1]}x{image.shape[-2]} to {width}x{height} is not")
    rows, columns = np.asarray(rows), np.asarray(columns)
    eight_bit = is_8bit(image)  # the whole image's path, for every strip
    out = []
    for one in image:
        narrow = [Image.fromarray(_widened_columns(im, width, columns)) for im in _pil_images(one, eight_bit)]
        out.append(_from_pil([np.asarray(im.resize((len(columns), height), Image.BICUBIC))[rows] for im in narrow],
                             eight_bit))
    return torch.stack(out)


LANCZOS_SUPPORT = 3  # Pillow's LANCZOS filter reaches 3 pixels, times the shrink, each side of a source position


def shrink_reads(length, size, indices):
    """The pixels of a line of ``length`` that PIL's LANCZOS shrink to ``size`` reads for its pixels ``indices``,
    sorted: those within 3 · length / size of each one's source position (i + 0.5) · length / size, as Pillow's
    ``precompute_coeffs`` bounds them, and one more each side (its float rounding)."""
    scale = length / size
    centers = (np.asarray(indices, dtype=np.float64) + 0.5) * scale
    first = np.clip(np.floor(centers - LANCZOS_SUPPORT * scale) - 1, 0, length - 1).astype(np.int64)
    last = np.clip(np.ceil(centers + LANCZOS_SUPPORT * scale) + 1, 0, length - 1).astype(np.int64)
    return np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last)]))


def zeros_taken_when_written(shape):
    """float32 zeros of ``shape`` that take memory only where they are written: an anonymous private memory map,
    whose pages the system gives (zeroed) when first written; reading an unwritten page takes none. On Linux the
    map declines transparent huge pages, so a write takes 4 KiB, not 2 MiB. MemoryError where the system refuses
    the map."""
    count = math.prod(shape)
    private = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}  # Windows: the paging file's
    try:
        memory = mmap.mmap(-1, count * 4, **private)
    except OSError as error:  # an anonymous map fails for want of memory or address space
        raise MemoryError(f"Cannot map {count * 4} bytes: {error}") from error
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(memory, dtype=torch.float32).view(shape)


def pad_to_multiple(image, multiple):
    """Pad right/bottom to a multiple of ``multiple`` (reflect; replicate where a side is too small).

    Returns the padded image and the original (H, W), to crop the result back to.
    """
    height, width = image.shape[-2:]
    pad_h = (-height) % multiple
    pad_w = (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return image, (height, width)
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(image, (0, pad_w, 0, pad_h), mode=mode), (height, width)


MIN_UPSCALE, MAX_UPSCALE = 1, 8  # the scales taken: both methods' ``Options``, the commands' --upscale, the nodes


def check_upscale(upscale, name="`upscale`"):
    """Refuse a scale outside MIN_UPSCALE … MAX_UPSCALE (NaN too) or not a number, naming it as ``name`` (a command's
    option): past 8 a photo grows to gigapixels (OSEDiff runs its networks at that size), below 1 the output shrinks
    (0: a division by zero deep inside)."""
    check_number(upscale, name, takes=f"a number from {MIN_UPSCALE} to {MAX_UPSCALE}")
    if not MIN_UPSCALE <= upscale <= MAX_UPSCALE:
        raise OptionError(f"{name} must be between {MIN_UPSCALE} and {MAX_UPSCALE}, got {upscale:g}")


def scaled_size(width, height, scale):
    """round(scale·W) × round(scale·H), at least 1 pixel each (round half up)."""
    return max(1, int(math.floor(width * scale + 0.5))), max(1, int(math.floor(height * scale + 0.5)))
