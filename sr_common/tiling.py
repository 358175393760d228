"""Latent tiling with Gaussian blending (mixture-of-diffusers style), shared by both methods."""

import math
from dataclasses import dataclass

import numpy as np
import torch

from .devices import widest_float


@dataclass(frozen=True)
class Tiles:
    """Tile sizes (0 = never tile): the networks' latent tile and overlap (latent px), the VAE encoder's (image px)
    and decoder's (latent px). The defaults are the official OSEDiff ones, which both methods use."""

    tile_latent: int = 96
    tile_overlap: int = 32
    vae_tile_encode: int = 1024
    vae_tile_decode: int = 224


DEFAULT_TILES = Tiles()


TILE_WEIGHT_VAR = 0.01  # the official Gaussian's variance, relative to the tile size squared


def gaussian_tile_weights(tile_h, tile_w, dtype=torch.float64):
    """w(y, x) = g_h(y)·g_w(x), g_n(i) = exp(−(i − m)² / (n² · 2·var)) / sqrt(2π·var), var = ``TILE_WEIGHT_VAR``.

    As the official code: m = (n − 1)/2 along the width but m = n/2 along the height. Computed in float64; a
    ``dtype`` of float32 rounds the result (no float64 tensor is made).
    """
    def gauss(n, mid):
        i = np.arange(n, dtype=np.float64)
        return (np.exp(-(i - mid) ** 2 / (n * n) / (2 * TILE_WEIGHT_VAR))
                / math.sqrt(2 * math.pi * TILE_WEIGHT_VAR))

    weights = np.outer(gauss(tile_h, tile_h / 2), gauss(tile_w, (tile_w - 1) / 2))
    return torch.from_numpy(weights if dtype == torch.float64 else weights.astype(np.float32))


def tile_offsets(size, tile, overlap):
    """Start offsets along one axis: i·(tile − overlap) for all but the last tile, which ends flush at ``size``.

    The count is the smallest n with (n − 1)(tile − overlap) + tile ≥ size.
    """
    if tile >= size:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"`tile_overlap` must be smaller than the tile size, got {overlap} >= {tile}")
    count = 1
    while (count - 1) * stride + tile < size:
        count += 1
    return [i * stride for i in range(count - 1)] + [size - tile]


def latent_tiles(height, width, tile, overlap):
    """Square tiles of side T = min(tile, h, w) as (y0, x0, T) over the latent, row-major by height.

    On a thin latent T can fall below the overlap (the official loop never ends there); the
    overlap is then reduced to T // 2.
    """
    side = min(tile, height, width)
    overlap = min(overlap, side // 2) if overlap >= side else overlap
    return [(y, x, side) for y in tile_offsets(height, side, overlap) for x in tile_offsets(width, side, overlap)]


def needs_tiling(height, width, tile):
    """The official rule: tile only when the latent area exceeds tile² (tile as requested)."""
    return tile is not None and tile > 0 and height * width > tile * tile


def call_pixels(height, width, tile, overlap, batch=1):
    """Latent px that one call of ``fn`` in ``blend_tiles`` runs (untiled: the whole latent)."""
    if not needs_tiling(height, width, tile):
        return height * width
    tiles = latent_tiles(height, width, tile, overlap)
    return min(batch, len(tiles)) * tiles[0][2] ** 2


def blend_tiles(fn, latent, tile, overlap, *, batch=1, callback=None):
    """Apply ``fn`` (B, C, T, T) → (B, C', T, T) tile by tile and blend with Gaussian weights.

    Tiles are cut from ``latent`` (B, C, H, W); ``batch`` tiles go through ``fn`` in one call.
    ``callback(done, total)`` runs after every call (progress and cancellation). The weighted sums
    are accumulated in float32 from float64 weights, as the official code does (float32 weights on a device
    without float64: ``widest_float``).
    """
    _, _, height, width = latent.shape
    tiles = latent_tiles(height, width, tile, overlap)
    side = tiles[0][2]
    wide = widest_float(latent.device)
    weights = gaussian_tile_weights(side, side, wide).to(latent.device)
    out = None
    contributors = torch.zeros((1, 1, height, width), dtype=torch.float32, device=latent.device)
    for start in range(0, len(tiles), batch):
        group = tiles[start:start + batch]
        inputs = torch.cat([latent[:, :, y:y + s, x:x + s] for y, x, s in group], dim=0)
        outputs = fn(inputs).float().split(latent.shape[0], dim=0)
        if out is None:
            out = torch.zeros((latent.shape[0], outputs[0].shape[1], height, width), dtype=torch.float32,
                              device=latent.device)
        for (y, x, s), result in zip(group, outputs):
            region = out[:, :, y:y + s, x:x + s]
            region.copy_((region.to(wide) + result.to(wide) * weights).float())
            weights_region = contributors[:, :, y:y + s, x:x + s]
            weights_region.copy_((weights_region.to(wide) + weights).float())
        if callback is not None:
            callback(min(start + batch, len(tiles)), len(tiles))
    return out / contributors


# on out-of-memory: a tile of 0 (never tile) starts at its default, then every tile halves down to its floor
TILE_FLOORS = {"tile_latent": 16, "vae_tile_encode": 128, "vae_tile_decode": 16}


def smaller_tiles(tiles, defaults):
    """Every tile size halved (to a multiple of 8, not below its floor; a 0 becomes ``defaults[name]``); None when
    none can shrink any more."""
    out = {k: defaults[k] if v <= 0 else max(TILE_FLOORS[k], v // 16 * 8) for k, v in tiles.items()}
    return None if out == tiles else out


# what running out of device memory raises: torch.OutOfMemoryError from PyTorch 2.5 on (any device), which
# torch.cuda.OutOfMemoryError names there too; before 2.5 only the CUDA allocator raised it (since 1.13)
OutOfMemory = torch.cuda.OutOfMemoryError
# what the CPU allocator's refusal says (a RuntimeError, not an OutOfMemoryError): on Linux and macOS, on Windows
CPU_ALLOCATION_FAILED = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


class WeightsOutOfMemory(OutOfMemory):
    """Out of memory while a stage's weights moved to the device (``NetworksOnSD21.load_stage``): smaller tiles
    cannot help, so ``with_oom_retry`` raises it at once. An ``OutOfMemory`` still, so a host that frees its models
    on out-of-memory (ComfyUI) does so."""


def is_out_of_memory(error, oom=OutOfMemory):
    """Whether ``error`` is ``oom``, or an allocation the CPU allocator refused (the kernel refuses one that could
    never fit, e.g. an untiled stage of a large image: PyTorch raises a plain RuntimeError naming the allocator)."""
    return isinstance(error, oom) or cpu_allocation_failed(error)


def cpu_allocation_failed(error):
    """Whether ``error`` is the CPU allocator refusing an allocation (``CPU_ALLOCATION_FAILED``)."""
    return isinstance(error, RuntimeError) and any(words in str(error) for words in CPU_ALLOCATION_FAILED)


def overlap_within(tile, overlap):
    """The latent tile overlap kept at least 8 below ``tile`` (0 without tiling): what a tile halved on
    out-of-memory can take."""
    return min(overlap, max(tile - 8, 0))


def with_oom_retry(run, tiles, defaults, *, oom=OutOfMemory, free=torch.cuda.empty_cache, notify=None):
    """``run(**tiles)``; on out-of-memory (``is_out_of_memory``) run again with ``smaller_tiles`` (after ``free()``
    and ``notify(smaller)``) until none can shrink, then raise it (the CPU allocator's as ``OutOfMemory``). Out of
    memory for the weights (``WeightsOutOfMemory``) is raised at once."""
    while True:
        try:
            return run(**tiles)
        except Exception as error:
            if not is_out_of_memory(error, oom) or isinstance(error, WeightsOutOfMemory):
                raise
            smaller = smaller_tiles(tiles, defaults)
            if smaller is None:
                if isinstance(error, oom):
                    raise
                raise OutOfMemory(str(error)) from None
        free()  # out of the except block: its traceback held the failed attempt's tensors
        if notify is not None:
            notify(smaller)
        tiles = smaller
