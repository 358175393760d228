"""RRDBNet ×4 (ESRGAN / Real-ESRGAN generator) with BasicSR parameter names, sized from a state dict.

DoSSR's pre-processor is RealESRNet_x4plus (multi-step model) or RealESRGAN_x4plus (one-step model):
conv_first → 23 RRDBs (3 residual dense blocks of 5 convs each) → conv_body (+ skip) →
2 × (nearest ×2, conv_up, LeakyReLU) → conv_hr → conv_last. Input and output are RGB in [0, 1].
It runs channels-last (weights and activations): its many thin convolutions on concatenated features
are about 1.4× faster on CPU that way than in the contiguous layout.
"""

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..sr_common.errors import WeightFileError
from ..sr_common.tiled_vae import output_like, paste_tile, split_tiles
from ..sr_common.weights import load_module_weights


TAIL_TILE, TAIL_MARGIN = 128, 2  # px of the ×4 tail's input (see RRDBNet.tiled_tail)


class ResidualDenseBlock(nn.Module):
    """x_k = lrelu(conv_k([x, x_1, …, x_{k−1}])), k = 1..4; out = x + 0.2·conv5([x, x_1, …, x_4])."""

    def __init__(self, num_feat, num_grow_ch):
        super().__init__()
        for k in range(1, 6):
            setattr(self, f"conv{k}", nn.Conv2d(num_feat + (k - 1) * num_grow_ch,
                                                num_feat if k == 5 else num_grow_ch, 3, 1, 1))

    def forward(self, x):
        features = [x]
        for k in range(1, 5):
            features.append(F.leaky_relu(getattr(self, f"conv{k}")(torch.cat(features, 1)), 0.2))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Three dense blocks in a residual: out = x + 0.2·rdb3(rdb2(rdb1(x)))."""

    def __init__(self, num_feat, num_grow_ch):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN ×4 generator (``num_feat`` 64, ``num_block`` 23, ``num_grow_ch`` 32 for Real-ESRGAN)."""

    def __init__(self, num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32):
        super().__init__()
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        # a channels-last copy with its own strides: ``contiguous`` keeps a single image whose batch stride is not
        # C·H·W (a file read by ``pil_to_tensor``), which PyTorch then convolves in the contiguous layout, and so
        # rounds otherwise than a ComfyUI IMAGE
        feat = self.conv_first(x.clone(memory_format=torch.channels_last))
        feat = feat + self.conv_body(self.body(feat))
        return self.tiled_tail(feat)

    def tail(self, feat):
        """The ×4 part: conv_last(lrelu(conv_hr(lrelu(conv_up2(↑2 lrelu(conv_up1(↑2 feat))))))), ↑2 nearest."""
        inplace = not torch.is_grad_enabled()  # each LeakyReLU's input is a convolution's output nothing else holds
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2, inplace)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2, inplace)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2, inplace))

    def tiled_tail(self, feat):
        """``tail(feat)`` in tiles of ``TAIL_TILE`` input px with a ``TAIL_MARGIN`` px margin, contiguous: the same
        output with tensors of one tile's size, where the whole tail holds several 64-channel images at 4× (each
        0.5 GB in fp16 for a 512² input). A tile's border reaches 1 px into its ×4 output through conv_up1 (at 2×:
        2 px at 4×) and 1 px each through conv_up2, conv_hr and conv_last: 5 px, within the margin's 8."""
        height, width = feat.shape[-2:]
        if max(height, width) <= TAIL_TILE + 2 * TAIL_MARGIN:
            return self.tail(feat).contiguous()
        result = None
        for in_box, out_box in zip(*split_tiles(height, width, TAIL_TILE, TAIL_MARGIN, 4)):
            out = self.tail(feat[:, :, in_box[2]:in_box[3], in_box[0]:in_box[1]])
            if result is None:
                result = output_like(out, feat, 4)
            paste_tile(result, out, in_box, out_box, 4)
        return result


RRDB_KEYS = ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_up1.weight",
             "conv_up2.weight", "conv_hr.weight", "conv_last.weight")


def rrdb_from_state_dict(sd):
    """An ``RRDBNet`` sized from the tensors of a BasicSR-named ×4 state dict, weights loaded."""
    missing = [k for k in RRDB_KEYS if k not in sd]
    if missing:
        raise WeightFileError(f"Not an RRDBNet ×4 (BasicSR names) state dict: missing {missing}.")
    num_feat, num_in_ch = sd["conv_first.weight"].shape[:2]
    num_grow_ch = sd["body.0.rdb1.conv1.weight"].shape[0]
    num_block = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"body\.(\d+)\.", k)))
    num_out_ch = sd["conv_last.weight"].shape[0]
    if any(k.startswith(("conv_up3", "upconv")) for k in sd) or sd["conv_first.weight"].shape[1] != 3:
        raise WeightFileError("Only the ×4 RRDBNet (RealESRNet/RealESRGAN_x4plus layout) is supported.")
    with torch.device("meta"):
        net = RRDBNet(num_in_ch, num_out_ch, num_feat, num_block, num_grow_ch)
    load_module_weights(net, sd, "RRDB", fix="Use the RRDB of the official DoSSR checkpoint")
    return net.eval()
