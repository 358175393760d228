"""Tiled VAE encode/decode with GroupNorm statistics shared across tiles.

A re-implementation of the tiled VAE the official OSEDiff code uses ("Ultimate VAE Tile
Optimization"): the image (or latent) is cut into tiles with a margin (32 px for the encoder,
11 latent px for the decoder); all tiles advance together through the network, and every
GroupNorm normalises with mean/var averaged over the tiles, weighted by tile area, so the
tiles agree on their statistics and no seams appear. The mid-block attention runs per tile.
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


def tiled_forward(net, x, tile, is_decoder, callback=None):
    """Run a VAE ``Encoder`` (image → moments, /8) or ``Decoder`` (latent → image, ×8) in tiles.

    Untiled (plain ``net(x)``) when max(H, W) ≤ tile + 2·pad, as the official hook.
    ``callback(done, total)`` is called after each op over all tiles.
    """
    pad = DECODER_PAD if is_decoder else ENCODER_PAD
    height, width = x.shape[-2:]
    if tile is None or tile <= 0 or max(height, width) <= tile + 2 * pad:
        return net(x)
    factor = 8 if is_decoder else 1 / 8
    in_boxes, out_boxes = split_tiles(height, width, tile, pad, factor)
    tiles = [x[:, :, b[2]:b[3], b[0]:b[1]] for b in in_boxes]
    residuals = [None] * len(tiles)
    ops = network_ops(net, is_decoder)
    for index, (kind, module) in enumerate(ops):
        if kind == "norm":
            stats = [_group_var_mean(t.float() if t.dtype == torch.float16 else t, module.num_groups) for t in tiles]
            pixels = torch.tensor([t.shape[2] * t.shape[3] for t in tiles], dtype=torch.float32, device=x.device)
            pixels = pixels / pixels.max()
            share = (pixels / pixels.sum()).view(-1, 1, 1)
            var = (torch.stack([s[0] for s in stats]) * share).sum(0)
            mean = (torch.stack([s[1] for s in stats]) * share).sum(0)
            tiles = [_apply_group_norm(t, module, mean, var) for t in tiles]
        elif kind == "silu":
            tiles = [F.silu(t) for t in tiles]
        elif kind == "call":
            tiles = [module(t) for t in tiles]
        elif kind == "store_res":
            residuals = [t if module is None else module(t) for t in tiles]
        elif kind == "add_res":
            tiles = [t + r for t, r in zip(tiles, residuals)]
            residuals = [None] * len(tiles)
        elif kind == "attn":
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
