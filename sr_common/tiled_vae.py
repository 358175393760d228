"""Tiled VAE encode/decode with GroupNorm statistics shared across tiles.

The image (or latent) is cut into tiles with a margin (32 px for the encoder, 11 latent px for
the decoder) and all tiles advance together through the network. Two modes:

- ``exact`` (default): at every GroupNorm the tiles exchange their margins (each tile's margin is
  refilled from the neighbouring tiles' cores) and normalise with the exact statistics of the whole
  image; the mid-block attention runs over the whole image. Only the 1–2 convolutions between two
  exchanges see a tile border, and their error stays inside the margin, so the result matches the
  untiled network closely while each convolution runs on one tile at a time.
- ``official``: the algorithm of the official OSEDiff code ("Ultimate VAE Tile Optimization"):
  every GroupNorm uses mean/var averaged over the tiles weighted by padded tile area, margins are
  never exchanged, and the attention runs per tile. Used for parity with published results.

Works on diffusers ``Encoder``/``Decoder`` modules of any depth.
"""

import math

import torch
import torch.nn.functional as F

ENCODER_PAD = 32
DECODER_PAD = 11


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


def network_ops(net, is_decoder):
    """The forward pass of a diffusers VAE ``Encoder`` or ``Decoder`` as a flat list of ops."""
    ops = [("call", net.conv_in)]
    if is_decoder:
        ops += _mid_ops(net.mid_block)
        for block in net.up_blocks:
            for resnet in block.resnets:
                ops += _resnet_ops(resnet)
            for up in block.upsamplers or []:
                ops.append(("call", up))
    else:
        for block in net.down_blocks:
            for resnet in block.resnets:
                ops += _resnet_ops(resnet)
            for down in block.downsamplers or []:
                ops.append(("call", down))
        ops += _mid_ops(net.mid_block)
    ops += [("norm", net.conv_norm_out), ("silu", None), ("call", net.conv_out)]
    return ops


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


def tiled_forward(net, x, tile, is_decoder, callback=None, mode="exact"):
    """Run a VAE ``Encoder`` (image → moments, /8) or ``Decoder`` (latent → image, ×8) in tiles.

    Untiled (plain ``net(x)``) when max(H, W) ≤ tile + 2·pad, as the official hook.
    ``callback(done, total)`` is called after each op over all tiles.
    """
    if mode not in ("exact", "official"):
        raise ValueError(f"`mode` must be 'exact' or 'official', got {mode!r}")
    pad = DECODER_PAD if is_decoder else ENCODER_PAD
    height, width = x.shape[-2:]
    if tile is None or tile <= 0 or max(height, width) <= tile + 2 * pad:
        return net(x)
    factor = 8 if is_decoder else 1 / 8
    in_boxes, out_boxes = split_tiles(height, width, tile, pad, factor)
    # cores: a partition of the input, in input coordinates
    cores = [[int(round(v / factor)) for v in ob] for ob in out_boxes]
    tiles = [x[:, :, b[2]:b[3], b[0]:b[1]] for b in in_boxes]
    residuals = [None] * len(tiles)
    ops = network_ops(net, is_decoder)
    exact = mode == "exact"
    grid = _Grid(in_boxes, cores, height, width)
    for index, (kind, module) in enumerate(ops):
        if kind == "norm":
            if exact:
                tiles = grid.exchange(tiles)
                mean, var = grid.exact_stats(tiles, module.num_groups)
            else:
                mean, var = _official_stats(tiles, module.num_groups, x.device)
            tiles = [_apply_group_norm(t, module, mean, var) for t in tiles]
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
                tiles = grid.cut(full, tiles)
            else:
                tiles = [_attention(module, t) for t in tiles]
        if callback is not None:
            callback(index + 1, len(ops))
    out_h, out_w = int(height * factor), int(width * factor)
    result = torch.zeros((x.shape[0], tiles[0].shape[1], out_h, out_w), dtype=tiles[0].dtype, device=x.device)
    for t, ib, ob in zip(tiles, in_boxes, out_boxes):
        scaled = [int(v * factor) for v in ib]
        ys, xs = ob[2] - scaled[2], ob[0] - scaled[0]
        result[:, :, ob[2]:ob[3], ob[0]:ob[1]] = t[:, :, ys:ys + ob[3] - ob[2], xs:xs + ob[1] - ob[0]]
    return result


def _official_stats(tiles, groups, device):
    """Per-tile biased var/mean averaged with weights ∝ padded tile area (the official approximation)."""
    stats = [_group_var_mean(t.float() if t.dtype == torch.float16 else t, groups) for t in tiles]
    pixels = torch.tensor([t.shape[2] * t.shape[3] for t in tiles], dtype=torch.float32, device=device)
    pixels = pixels / pixels.max()
    share = (pixels / pixels.sum()).view(-1, 1, 1)
    var = (torch.stack([s[0] for s in stats]) * share).sum(0)
    mean = (torch.stack([s[1] for s in stats]) * share).sum(0)
    return mean, var


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
            oy, ox = round(ib[2] * s), round(ib[0] * s)
            full[:, :, y0:y1, x0:x1] = t[:, :, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        return full

    def cut(self, full, like):
        s = full.shape[-1] / self.width
        return [full[:, :, round(ib[2] * s):round(ib[3] * s), round(ib[0] * s):round(ib[1] * s)] for ib in self.in_boxes]

    def exchange(self, tiles):
        """Refill every tile's margin from the neighbouring cores."""
        return self.cut(self.assemble(tiles), tiles)

    def exact_stats(self, tiles, groups):
        """Mean and biased variance per (batch, group) over the whole image (the cores), in float64."""
        s = self._scale(tiles[0], self.in_boxes[0])
        total = total_sq = count = 0
        for t, ib, core in zip(tiles, self.in_boxes, self.cores):
            y0, y1, x0, x1 = (round(v * s) for v in (core[2], core[3], core[0], core[1]))
            oy, ox = round(ib[2] * s), round(ib[0] * s)
            part = t[:, :, y0 - oy:y1 - oy, x0 - ox:x1 - ox].double()
            part = part.reshape(part.shape[0], groups, -1)
            total = total + part.sum(-1)
            total_sq = total_sq + (part * part).sum(-1)
            count += part.shape[-1]
        mean = total / count
        return mean.float(), (total_sq / count - mean * mean).clamp_min(0).float()


def _apply_group_norm(x, norm, mean, var):
    b, c = x.shape[:2]
    groups = norm.num_groups
    shape = (b, groups) + (1,) * (x.dim() - 1)
    xg = x.reshape(b, groups, -1, *x.shape[2:])
    out = (xg - mean.reshape(shape).to(x.dtype)) / torch.sqrt(var.reshape(shape) + norm.eps).to(x.dtype)
    out = out.reshape(x.shape)
    if norm.weight is not None:
        out = out * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    return out
