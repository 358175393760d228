"""Tiled VAE encode/decode with GroupNorm statistics shared across tiles.

The image (or latent) is cut into tiles with a margin (32 px for the encoder, 11 latent px for
the decoder). Three modes:

- ``exact``: at every GroupNorm the tiles exchange their margins (each tile's margin is
  refilled from the neighbouring tiles' cores) and normalise with the exact statistics of the whole
  image; the mid-block attention runs over the whole image. Only the 1–2 convolutions between two
  exchanges see a tile border, and their error stays inside the margin, so the result matches the
  untiled network closely while each convolution runs on one tile at a time. All tiles advance
  together, so the activations of the whole image are alive at once.
- ``official``: the algorithm of the official OSEDiff code ("Ultimate VAE Tile Optimization"):
  every GroupNorm uses mean/var averaged over the tiles weighted by padded tile area, margins are
  never exchanged, and the attention runs per tile. Used for parity with published results.
  All tiles advance together, as in ``exact``.
- ``bounded`` (the default, ``DEFAULT_MODE``): the latent stage (the decoder's conv_in and mid block, the
  encoder's mid block and output convs) runs whole on the latent, so its GroupNorms and its attention are
  exact; above it, one tile at a time to the end of the network (decoder) or to the latent (encoder), so peak
  memory is set by the tile size plus a few 512-channel tensors at 1/8 resolution (8 floats per image pixel
  each), not by the full-resolution activations. Margins are never exchanged. The GroupNorm statistics above
  the latent stage come from a pass over its input subsampled to one tile's size and two passes over the
  tiles (see ``_bounded_forward``): about 1.5–2× the time of ``exact``. A latent larger than
  ``whole_latent_stage`` allows (at the default tiles: past 4096² px for the encoder, 7168² px for the
  decoder) runs its latent stage one tile at a time too, with the same statistics and the attention per tile,
  so memory stays bounded at any size.

An fp16 network whose output overflows (``inf``/``NaN``) is run again in float32 (``tiled_forward``).

Works on diffusers ``Encoder``/``Decoder`` modules of any depth.
"""

import copy
import functools
import math
import warnings

import torch
import torch.nn.functional as F

from .devices import widest_float
from .tiling import TILE_FLOORS

DEFAULT_MODE = "bounded"
ENCODER_PAD = 32
DECODER_PAD = 11
LATENT_STAGE_TILES = 16
LATENT_STAGE_MIN_AREA = 256 * 256


def whole_latent_stage(latent_area, tile_latent):
    """Whether ``bounded`` runs the latent stage whole: up to 16 tiles' area, where its 512-channel tensors hold no
    more than one pixel tile's 128-channel ones (512·L² ≤ 128·(8T)²), and always up to a 256² latent (2048² px,
    128 MB per float32 tensor). Beyond it, the whole-latent attention would also cost O(L⁴)."""
    return latent_area <= max(LATENT_STAGE_MIN_AREA, LATENT_STAGE_TILES * tile_latent ** 2)


def _resnet_ops(block):
    return [("store_res", block.conv_shortcut), ("norm", block.norm1), ("silu", None), ("call", block.conv1),
            ("norm", block.norm2), ("silu", None), ("call", block.conv2), ("add_res", None)]


def _attention_ops(attn):
    return [("store_res", None), ("norm", attn.group_norm), ("attn", attn), ("add_res", None)]


def _mid_ops(mid):
    ops = _resnet_ops(mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        ops += _attention_ops(attn) + _resnet_ops(resnet)
    return ops


def latent_and_pixel_ops(net, is_decoder):
    """A diffusers VAE ``Encoder`` or ``Decoder`` as two flat op lists: the ops at latent resolution (the
    decoder's conv_in and mid block; the encoder's mid block and output) and the ops above it."""
    if is_decoder:
        latent = [("call", net.conv_in)] + _mid_ops(net.mid_block)
        pixel = []
        for block in net.up_blocks:
            for resnet in block.resnets:
                pixel += _resnet_ops(resnet)
            for up in block.upsamplers or []:
                pixel.append(("call", up))
        pixel += [("norm", net.conv_norm_out), ("silu", None), ("call", net.conv_out)]
        return latent, pixel
    pixel = [("call", net.conv_in)]
    for block in net.down_blocks:
        for resnet in block.resnets:
            pixel += _resnet_ops(resnet)
        for down in block.downsamplers or []:
            pixel.append(("call", down))
    latent = _mid_ops(net.mid_block) + [("norm", net.conv_norm_out), ("silu", None), ("call", net.conv_out)]
    return latent, pixel


def network_ops(net, is_decoder):
    """The forward pass of a diffusers VAE ``Encoder`` or ``Decoder`` as a flat list of ops."""
    latent, pixel = latent_and_pixel_ops(net, is_decoder)
    return latent + pixel if is_decoder else pixel + latent


def _group_var_mean(x, groups):
    b, c = x.shape[:2]
    return torch.var_mean(x.reshape(b, groups, -1), dim=2, unbiased=False)


def _attention(attn, x):
    """Self-attention of a VAE mid block on a normalised (B, C, H, W) tile, without the residual."""
    b, c, h, w = x.shape
    tokens = x.reshape(b, c, h * w).transpose(1, 2)
    q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
    heads = attn.heads
    q, k, v = (t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(b, h * w, -1)
    out = attn.to_out[0](out)
    return out.transpose(1, 2).reshape(b, c, h, w)


def _best_tile_size(lower, upper):
    """Round ``lower`` up to a multiple of 32, 16, 8, 4 or 2 that is still ≤ ``upper``."""
    divider = 32
    while divider >= 2:
        if lower % divider == 0:
            return lower
        candidate = lower - lower % divider + divider
        if candidate <= upper:
            return candidate
        divider //= 2
    return lower


def split_tiles(height, width, tile, pad, factor):
    """Input boxes (with ``pad`` margin) and output boxes (scaled by ``factor``) as [x0, x1, y0, y1]."""
    n_h = max(math.ceil((height - 2 * pad) / tile), 1)
    n_w = max(math.ceil((width - 2 * pad) / tile), 1)
    tile_h = _best_tile_size(math.ceil((height - 2 * pad) / n_h), tile)
    tile_w = _best_tile_size(math.ceil((width - 2 * pad) / n_w), tile)
    inputs, outputs = [], []
    for i in range(n_h):
        for j in range(n_w):
            box = [pad + j * tile_w, min(pad + (j + 1) * tile_w, width),
                   pad + i * tile_h, min(pad + (i + 1) * tile_h, height)]
            out = [box[0] if box[0] > pad else 0, box[1] if box[1] < width - pad else width,
                   box[2] if box[2] > pad else 0, box[3] if box[3] < height - pad else height]
            outputs.append([int(v * factor) for v in out])
            inputs.append([max(0, box[0] - pad), min(width, box[1] + pad),
                           max(0, box[2] - pad), min(height, box[3] + pad)])
    return inputs, outputs


DECODER_PEAK_COPIES = 4  # see decoder_activation_bytes
ENCODER_PEAK_COPIES = 6  # see encoder_activation_bytes
DECODER_TILE_FLOOR = TILE_FLOORS["vae_tile_decode"]  # latent px


def largest_piece(height, width, tile, is_decoder):
    """(h, w), in input px, of the largest piece ``tiled_forward`` runs at once on an (height, width) input: the
    whole input when it fits one tile (run untiled), else the largest tile with its margins."""
    pad = DECODER_PAD if is_decoder else ENCODER_PAD
    if not is_decoder and tile:
        tile = max(8, tile // 8 * 8)
    if tile is None or tile <= 0 or max(height, width) <= tile + 2 * pad:
        return height, width
    boxes, _ = split_tiles(height, width, tile, pad, 8 if is_decoder else 1 / 8)
    return max(b[3] - b[2] for b in boxes), max(b[1] - b[0] for b in boxes)


def encoder_activation_bytes(encoder, height, width, tile, dtype):
    """Estimated peak activations of the ``bounded`` encode of an (height, width) px image at ``tile``:
    ``ENCODER_PEAK_COPIES`` tensors of C channels (those of its first block, 128 in SD's VAE) at the largest
    piece's resolution. Counted on the meta device, the encoder holds 5 of them untiled and 3.4–4.7 tiled
    (tests/test_device_memory.py)."""
    h, w = largest_piece(height, width, tile, is_decoder=False)
    channels = encoder.conv_in.out_channels
    return ENCODER_PEAK_COPIES * channels * h * w * torch.empty((), dtype=dtype).element_size()


def decoder_activation_bytes(decoder, height, width, tile, dtype):
    """Estimated peak activations of the ``bounded`` decode of an (height, width) latent at ``tile``:
    ``DECODER_PEAK_COPIES`` tensors of C channels at the full resolution of the largest piece (8h × 8w px), C the
    channels entering the last up block (256 in SD's VAE). Counted on the meta device, the decoder holds about 3 of
    them untiled and 2 tiled (tests/test_device_memory.py); the H200 held about one more at 512→2048, most likely the
    convolutions' workspace."""
    h, w = largest_piece(height, width, tile, is_decoder=True)
    channels = decoder.up_blocks[-1].resnets[0].in_channels
    return DECODER_PEAK_COPIES * channels * 64 * h * w * torch.empty((), dtype=dtype).element_size()


def fit_decoder_tile(decoder, height, width, tile, dtype, free_bytes):
    """The largest decoder tile from ``tile`` down (latent px, in steps of 8 to ``DECODER_TILE_FLOOR``) whose
    ``decoder_activation_bytes`` fit in ``free_bytes``; the floor when none does. A tile of 0 or None (never tile)
    is kept."""
    if not tile or tile <= DECODER_TILE_FLOOR:
        return tile
    for candidate in range(tile, DECODER_TILE_FLOOR - 1, -8):
        if decoder_activation_bytes(decoder, height, width, candidate, dtype) <= free_bytes:
            return candidate
    return DECODER_TILE_FLOOR


def tiled_forward(net, x, tile, is_decoder, callback=None, mode=DEFAULT_MODE):
    """Run a VAE ``Encoder`` (image → moments, /8) or ``Decoder`` (latent → image, ×8) in tiles.

    Untiled (plain ``net(x)``) when max(H, W) ≤ tile + 2·pad, as the official hook.
    ``callback(done, total)`` is called after each op over all tiles (``exact``, ``official``) or
    after each tile of each pass (``bounded``).

    An fp16 network whose output is not finite (its activations passed fp16's ±65504 somewhere: a black or
    speckled image) is run again on a float32 copy of itself, which returns float32; ``net`` is left as it is.
    """
    out = _tiled_forward(net, x, tile, is_decoder, callback, mode)
    if out.dtype != torch.float16 or torch.isfinite(out).all():
        return out
    warnings.warn(f"The fp16 VAE {'decoder' if is_decoder else 'encoder'} overflowed on this input; running it again "
                  "in float32.", RuntimeWarning, stacklevel=2)
    return _tiled_forward(copy.deepcopy(net).float(), x.float(), tile, is_decoder, callback, mode)


def _tiled_forward(net, x, tile, is_decoder, callback, mode):
    if mode not in ("exact", "official", "bounded"):
        raise ValueError(f"`mode` must be 'exact', 'official' or 'bounded', got {mode!r}")
    pad = DECODER_PAD if is_decoder else ENCODER_PAD
    height, width = x.shape[-2:]
    if tile is None or tile <= 0 or max(height, width) <= tile + 2 * pad:
        return net(x)
    factor = 8 if is_decoder else 1 / 8
    if not is_decoder:  # encoder tiles of whole latent pixels (the official sizes are multiples of 8 already)
        tile = max(8, tile // 8 * 8)
    in_boxes, out_boxes = split_tiles(height, width, tile, pad, factor)
    # cores: a partition of the input, in input coordinates
    cores = [[int(round(v / factor)) for v in ob] for ob in out_boxes]
    if mode == "bounded":
        latent_area = height * width if is_decoder else (height // 8) * (width // 8)
        if not whole_latent_stage(latent_area, tile if is_decoder else tile / 8):
            return _bounded_forward(network_ops(net, is_decoder), x, tile + 2 * pad, in_boxes, out_boxes, cores,
                                    factor, callback)
        latent_ops, pixel_ops = latent_and_pixel_ops(net, is_decoder)
        if is_decoder:
            x = _run_ops(latent_ops, x, _own_stats)
        out = _bounded_forward(pixel_ops, x, tile + 2 * pad, in_boxes, out_boxes, cores, factor, callback)
        return out if is_decoder else _run_ops(latent_ops, out, _own_stats)
    tiles = [x[:, :, b[2]:b[3], b[0]:b[1]] for b in in_boxes]
    residuals = [None] * len(tiles)
    ops = network_ops(net, is_decoder)
    exact = mode == "exact"
    grid = _Grid(in_boxes, cores, height, width)
    for index, (kind, module) in enumerate(ops):
        if kind == "norm":
            if exact:
                tiles = grid.exchange(tiles)
                mean, denom = grid.exact_stats(tiles, module)
            else:
                mean, denom = _official_stats(tiles, module, x.device)
            tiles = [_normalise(t, module, mean, denom) for t in tiles]
        elif kind == "silu":
            tiles = [F.silu(t) for t in tiles]
        elif kind == "call":
            tiles = [module(t) for t in tiles]
        elif kind == "store_res":
            if exact:
                tiles = grid.exchange(tiles)
            residuals = [t if module is None else module(t) for t in tiles]
        elif kind == "add_res":
            tiles = [t + r for t, r in zip(tiles, residuals)]
            residuals = [None] * len(tiles)
        elif kind == "attn":
            if exact:
                full = _attention(module, grid.assemble(tiles))
                tiles = grid.cut(full)
            else:
                tiles = [_attention(module, t) for t in tiles]
        if callback is not None:
            callback(index + 1, len(ops))
    result = output_like(tiles[0], x, factor)
    for t, ib, ob in zip(tiles, in_boxes, out_boxes):
        paste_tile(result, t, ib, ob, factor)
    return result


def output_like(tile_out, x, factor):
    """The zero output tensor: channels and dtype of a tile's output, size of ``x`` scaled by ``factor``."""
    shape = (x.shape[0], tile_out.shape[1], int(x.shape[-2] * factor), int(x.shape[-1] * factor))
    return torch.zeros(shape, dtype=tile_out.dtype, device=x.device)


def paste_tile(result, tile_out, in_box, out_box, factor):
    """Write the part of a tile's output that lies in its output box ``out_box`` into ``result``."""
    scaled = [int(v * factor) for v in in_box]
    ys, xs = out_box[2] - scaled[2], out_box[0] - scaled[0]
    result[:, :, out_box[2]:out_box[3], out_box[0]:out_box[1]] = \
        tile_out[:, :, ys:ys + out_box[3] - out_box[2], xs:xs + out_box[1] - out_box[0]]


def _official_stats(tiles, norm, device):
    """Per-tile biased var/mean averaged with weights ∝ padded tile area (the official approximation);
    returns (μ, σ² + ε)."""
    stats = [_group_var_mean(t.float() if t.dtype == torch.float16 else t, norm.num_groups) for t in tiles]
    pixels = torch.tensor([t.shape[2] * t.shape[3] for t in tiles], dtype=torch.float32, device=device)
    pixels = pixels / pixels.max()
    share = (pixels / pixels.sum()).view(-1, 1, 1)
    var = (torch.stack([s[0] for s in stats]) * share).sum(0)
    mean = (torch.stack([s[1] for s in stats]) * share).sum(0)
    return mean, var + norm.eps


class _Grid:
    """Where each tile (with margin) and its core (a partition of the image) lie, at any resolution."""

    def __init__(self, in_boxes, cores, height, width):
        self.in_boxes, self.cores, self.height, self.width = in_boxes, cores, height, width

    def _scale(self, tile, box):
        return tile.shape[-1] / (box[1] - box[0])

    def assemble(self, tiles):
        """The full feature map made of every tile's core."""
        s = self._scale(tiles[0], self.in_boxes[0])
        full = tiles[0].new_zeros(tiles[0].shape[:2] + (round(self.height * s), round(self.width * s)))
        for t, ib, core in zip(tiles, self.in_boxes, self.cores):
            y0, y1, x0, x1 = (round(v * s) for v in (core[2], core[3], core[0], core[1]))
            full[:, :, y0:y1, x0:x1] = _core(t, ib, core, s)
        return full

    def cut(self, full):
        """The tiles (input boxes, margins included) of a whole-image tensor at any scale of the grid."""
        s = full.shape[-1] / self.width
        return [full[:, :, round(ib[2] * s):round(ib[3] * s), round(ib[0] * s):round(ib[1] * s)] for ib in self.in_boxes]

    def exchange(self, tiles):
        """Refill every tile's margin from the neighbouring cores."""
        return self.cut(self.assemble(tiles))

    def exact_stats(self, tiles, norm):
        """(μ, σ² + ε) per (batch, group) over the whole image (the cores), from their ``_GroupMoments``."""
        s = self._scale(tiles[0], self.in_boxes[0])
        moments = _GroupMoments.zero()
        for t, ib, core in zip(tiles, self.in_boxes, self.cores):
            moments = moments + _GroupMoments.of(_core(t, ib, core, s), norm.num_groups)
        return moments.stats(norm.eps)


def _bounded_forward(ops, x, extent, in_boxes, out_boxes, cores, factor, callback):
    """One tile at a time; GroupNorm k of tile i normalises with a mean μ and σ² + ε from three passes:

    0. the input subsampled with strides ⌈H / extent⌉, ⌈W / extent⌉ (so it fits one padded tile) runs whole
       through the network; its statistics (μ̃ₖ, σ̃ₖ²) are recorded;
    1. every tile runs with (μ̃ₖ, σ̃ₖ²) and records its own statistics (mᵢₖ, vᵢₖ) over the whole tile
       and the moments of its core; the cores' moments sum to this pass's whole-image (μ̄ₖ, σ̄ₖ²);
    2. every tile runs again, with its own statistics (m′ᵢₖ, v′ᵢₖ) in this pass moved as pass 1 measured
       between the tile and the whole image, and its core is written to the output:
           μ = m′ᵢₖ + μ̄ₖ − mᵢₖ,    σ² + ε = (v′ᵢₖ + ε)·(σ̄ₖ² + ε) / (vᵢₖ + ε).

    The correction keeps each tile's normalisation tied to its own activations: normalising pass 2
    with the fixed estimate (μ̄ₖ, σ̄ₖ²) alone drifts from layer to layer and can diverge at depth.

    Each pass's statistics are a partial, not a closure: a failed run's frames are cleared, but a frame keeps its
    function, and a closure what it captured (the statistics, the input).
    """
    norms = [module for kind, module in ops if kind == "norm"]
    total = 1 + 2 * len(in_boxes)
    done = 0

    def report():
        nonlocal done
        done += 1
        if callback is not None:
            callback(done, total)

    step_h, step_w = (math.ceil(side / extent) for side in x.shape[-2:])  # per side: thin inputs stay whole
    shrunk = []
    _run_ops(ops, x[:, :, step_h // 2::step_h, step_w // 2::step_w], functools.partial(_pass0_stats, shrunk))
    report()

    whole = [_GroupMoments.zero() for _ in norms]
    own = {}
    for i, (ib, core) in enumerate(zip(in_boxes, cores)):
        _run_ops(ops, _tile_of(x, ib), functools.partial(_pass1_stats, shrunk, whole, own, i, ib, core))
        report()
    whole = [moments.stats(norm.eps) for moments, norm in zip(whole, norms)]

    result = None
    for i, (ib, ob) in enumerate(zip(in_boxes, out_boxes)):
        out = _run_ops(ops, _tile_of(x, ib), functools.partial(_pass2_stats, whole, own, i))
        if result is None:
            result = output_like(out, x, factor)
        paste_tile(result, out, ib, ob, factor)
        report()
    return result


def _tile_of(x, box):
    """The part of ``x`` inside ``box`` (x0, x1, y0, y1)."""
    return x[:, :, box[2]:box[3], box[0]:box[1]]


def _pass0_stats(shrunk, k, norm, t):
    """Pass 0 of ``_bounded_forward``: GroupNorm k's own (μ̃ₖ, σ̃ₖ² + ε), appended to ``shrunk``."""
    shrunk.append(_own_stats(k, norm, t))
    return shrunk[k]


def _pass1_stats(shrunk, whole, own, i, in_box, core, k, norm, t):
    """Pass 1 of ``_bounded_forward`` on tile i: its own statistics kept in ``own[i, k]``, its core's moments added
    to ``whole[k]``; it normalises with pass 0's ``shrunk[k]``."""
    own[i, k] = _own_stats(k, norm, t)
    part = _core(t, in_box, core)
    if part.numel():  # a core can round to nothing deep in the encoder when the tile is tiny
        whole[k] = whole[k] + _GroupMoments.of(part, norm.num_groups)
    return shrunk[k]


def _pass2_stats(whole, own, i, k, norm, t):
    """Pass 2 of ``_bounded_forward`` on tile i: μ = m′ᵢₖ + μ̄ₖ − mᵢₖ, σ² + ε = (v′ᵢₖ + ε)·(σ̄ₖ² + ε) / (vᵢₖ + ε)."""
    mean, denom = _own_stats(k, norm, t)
    return mean + whole[k][0] - own[i, k][0], denom * whole[k][1] / own[i, k][1]


def _own_stats(k, norm, t):
    """(μ, σ² + ε) of the tensor being normalised, as a plain GroupNorm."""
    return _GroupMoments.of(t, norm.num_groups).stats(norm.eps)


def _run_ops(ops, t, norm_stats):
    """One tensor through ``ops``; GroupNorm number k normalises with ``norm_stats(k, module, t)`` = (μ, σ² + ε).
    A norm or a residual sum writes in place into a tensor of its own (``owned``): never the input, nor a tensor
    stored as the residual, so that no more than one full-size copy is alive at a time."""
    residual, k, owned = None, 0, False
    for kind, module in ops:
        if kind == "norm":
            mean, denom = norm_stats(k, module, t)
            t = _normalise(t, module, mean, denom, in_place=owned)
            k, owned = k + 1, True
        elif kind == "silu":
            t = F.silu(t, inplace=True)  # always right after a norm, whose output nothing else holds
        elif kind == "call":
            t, owned = module(t), True
        elif kind == "store_res":
            if module is None:
                residual, owned = t, False
            else:
                residual = module(t)
        elif kind == "add_res":
            t, residual, owned = t.add_(residual) if owned else t + residual, None, True
        elif kind == "attn":
            t, owned = _attention(module, t), True
    return t


def _normalise(x, norm, mean, denom, in_place=False):
    """GroupNorm with given per-(batch, group) μ and σ² + ε, as one per-channel affine map a·x + b (written over
    ``x`` when ``in_place``), a and b formed in float64 (``widest_float`` of the device)."""
    b, c = x.shape[:2]
    per_group = c // norm.num_groups
    scale = denom.rsqrt().repeat_interleave(per_group, dim=1)
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if norm.weight is not None:
        weight, bias = (p.to(widest_float(x.device)) for p in (norm.weight, norm.bias))
        scale, shift = scale * weight, shift * weight + bias
    return torch.addcmul(shift.to(x.dtype).view(b, c, 1, 1), x, scale.to(x.dtype).view(b, c, 1, 1),
                         out=x if in_place else None)


FLOAT_COPY_BYTES = 256 * 2**20


def _channel_var_mean(t):
    """Biased per-channel (var, mean) over (H, W), float32 (float64 of a float64 ``t``). A half-precision ``t`` is
    widened to float32 a few channels at a time (pieces of at most ``FLOAT_COPY_BYTES``): a float32 copy of a whole
    tile would hold twice its memory, the decoder's peak in fp16. Each channel's statistics are the same either
    way."""
    if t.dtype in (torch.float32, torch.float64):
        return torch.var_mean(t, dim=(2, 3), unbiased=False)
    step = max(1, FLOAT_COPY_BYTES // (4 * t[:, :1].numel()))
    pieces = [torch.var_mean(part.float(), dim=(2, 3), unbiased=False) for part in t.split(step, dim=1)]
    return torch.cat([var for var, _ in pieces], dim=1), torch.cat([mean for _, mean in pieces], dim=1)


def _core(t, in_box, core, s=None):
    """The part of ``t`` (a tile cut at ``in_box`` of the input, at resolution ``s``: by default the tile's own
    width over the box's) inside ``core``."""
    s = t.shape[-1] / (in_box[1] - in_box[0]) if s is None else s
    y0, y1, x0, x1 = (round(v * s) for v in (core[2], core[3], core[0], core[1]))
    oy, ox = round(in_box[2] * s), round(in_box[0] * s)
    return t[:, :, y0 - oy:y1 - oy, x0 - ox:x1 - ox]


class _GroupMoments:
    """Pixel count n, Σx and Σx² per (batch, group), in float64 (``widest_float`` of the device: float32 on one
    without float64); moments of disjoint regions add up."""

    def __init__(self, count, total, total_sq):
        self.count, self.total, self.total_sq = count, total, total_sq

    @classmethod
    def zero(cls):
        return cls(0, 0.0, 0.0)

    @classmethod
    def of(cls, t, groups):
        """The moments of a (B, C, H, W) tensor, from per-channel var/mean (no float64 copy of ``t``)."""
        var, mean = (v.to(widest_float(t.device)) for v in _channel_var_mean(t))
        pixels = t.shape[2] * t.shape[3]
        return cls(pixels * (t.shape[1] // groups), _group_sums(mean, pixels, groups),
                   _group_sums(var + mean * mean, pixels, groups))

    def __add__(self, other):
        return _GroupMoments(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    def stats(self, eps):
        """μ = Σx / n and σ² + ε = Σx² / n − μ² + ε."""
        mean = self.total / self.count
        return mean, (self.total_sq / self.count - mean * mean).clamp_min(0) + eps


def _group_sums(per_channel, pixels, groups):
    """Σ over each group's channels of ``per_channel`` (B, C) · ``pixels``: (B, groups)."""
    return (per_channel * pixels).reshape(per_channel.shape[0], groups, -1).sum(-1)
