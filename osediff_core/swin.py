"""Swin Transformer image encoder as RAM uses it (inference only, no drop-path, no checkpointing).

The shape of the network (patch size, embedding width, stage depths, heads, window, MLP ratio)
is read from a state dict, so the official Swin-L (384 px, window 12, depths 2/2/18/2, width
192) and small test networks load with the same code. Parameter names follow the official
``SwinTransformer`` so its state dicts load without renaming. Output: the mean token followed by
every last-stage token, (B, 1 + N, C).
"""

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..sr_common.errors import WeightFileError


def _window_of(table_rows):
    side = math.isqrt(int(table_rows))
    if side * side != table_rows or side % 2 == 0:
        raise WeightFileError(f"relative_position_bias_table has {table_rows} rows, which is not (2·window−1)².")
    return (side + 1) // 2


def swin_config(state, prefix="visual_encoder.", image_size=384):
    """Architecture of the Swin encoder stored under ``prefix`` in ``state`` (a dict of tensors)."""
    proj = state.get(prefix + "patch_embed.proj.weight")
    if proj is None:
        raise WeightFileError(f"No {prefix}patch_embed.proj.weight: not a Swin image encoder.")
    depths = []
    pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.blocks\.(\d+)\.")
    for key in state:
        m = pattern.match(key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            while len(depths) <= stage:
                depths.append(0)
            depths[stage] = max(depths[stage], block + 1)
    if not depths or 0 in depths:
        raise WeightFileError(f"Swin encoder under {prefix!r} has missing stages (depths {depths}).")
    heads = [int(state[f"{prefix}layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
             for i in range(len(depths))]
    embed = int(proj.shape[0])
    fc1 = state[prefix + "layers.0.blocks.0.mlp.fc1.weight"]
    return {
        "image_size": int(image_size),
        "patch_size": int(proj.shape[-1]),
        "embed_dim": embed,
        "depths": depths,
        "num_heads": heads,
        "window_size": _window_of(state[prefix + "layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]),
        "mlp_ratio": fc1.shape[0] / embed,
        "patch_norm": True,  # RAM's Swin always has it: a file without patch_embed.norm is incomplete
    }


def _relative_index(window):
    # built on the CPU explicitly, also inside a ``torch.device("meta")`` context
    r = torch.arange(window, device="cpu")
    coords = torch.stack(torch.meshgrid(r, r, indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]  # (w², w²)


def _shift_mask(resolution, window, shift):
    """Additive mask (num_windows, w², w²): 0 within a region, −100 across regions of the rolled map."""
    labels = torch.zeros(resolution, resolution, device="cpu")
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    n = 0
    for hs in cuts:
        for ws in cuts:
            labels[hs, ws] = n
            n += 1
    windows = _to_windows(labels[None, :, :, None], window).reshape(-1, window * window)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0, device="cpu"), torch.tensor(0.0, device="cpu"))


def _to_windows(x, window):
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def _from_windows(windows, window, h, w):
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.reshape(b, h // window, w // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


class WindowAttention(nn.Module):
    def __init__(self, dim, window, heads):
        super().__init__()
        self.heads = heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("rel_index", None, persistent=False)
        self.reset_buffers()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def reset_buffers(self):
        self.rel_index = _relative_index(self.window).reshape(-1)

    def forward(self, x, mask=None):
        n_win, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n_win, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * (dim // self.heads) ** -0.5
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.rel_index].reshape(tokens, tokens, -1).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.reshape(n_win // nw, nw, self.heads, tokens, tokens) + mask[None, :, None]
            attn = attn.reshape(n_win, self.heads, tokens, tokens)
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(n_win, tokens, dim)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim, resolution, heads, window, shift, mlp_ratio):
        super().__init__()
        if resolution <= window:  # the whole map is one window; no shift (as the official)
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.register_buffer("shift_mask", None, persistent=False)
        self.reset_buffers()

    def reset_buffers(self):
        self.shift_mask = _shift_mask(self.resolution, self.window, self.shift) if self.shift else None

    def forward(self, x):
        b, length, c = x.shape
        r, w, s = self.resolution, self.window, self.shift
        y = self.norm1(x).reshape(b, r, r, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(_to_windows(y, w).reshape(-1, w * w, c),
                      None if self.shift_mask is None else self.shift_mask.to(y.dtype))
        y = _from_windows(y.reshape(-1, w, w, c), w, r, r)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(b, length, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim, resolution):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        b, _, c = x.shape
        r = self.resolution
        x = x.reshape(b, r, r, c)
        # channel order: (even row, even col), (odd, even), (even, odd), (odd, odd)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class Stage(nn.Module):
    def __init__(self, dim, resolution, depth, heads, window, mlp_ratio, merge):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio)
            for i in range(depth))
        self.downsample = PatchMerging(dim, resolution) if merge else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim, norm):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim) if norm else None

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        return x if self.norm is None else self.norm(x)


class SwinEncoder(nn.Module):
    def __init__(self, image_size=384, patch_size=4, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
                 window_size=12, mlp_ratio=4.0, patch_norm=True):
        super().__init__()
        self.image_size = image_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim, patch_norm)
        resolution = image_size // patch_size
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            self.layers.append(Stage(embed_dim * 2**i, resolution // 2**i, depth, heads, window_size, mlp_ratio,
                                     merge=i < len(depths) - 1))
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)

    def forward(self, x):
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"Swin encoder expects {self.image_size}×{self.image_size} input, got {tuple(x.shape)}.")
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return torch.cat([x.mean(1, keepdim=True), x], dim=1)
