"""Faster drop-ins for diffusers blocks at inference: same function, same state-dict keys.

``FusedUpsample2D``: nearest ×2 upsampling followed by a 3×3 convolution, computed without the
upsampled tensor. With u = nearest×2(x), every output pixel of conv3×3(u) at row 2i + a (a ∈ {0, 1}) sees only two
rows of x: a = 0 sees x[i−1] with w[0] and x[i] with w[1] + w[2]; a = 1 sees x[i] with w[0] + w[1]
and x[i+1] with w[2] (zero padding of u is zero padding of x). The same holds for columns, so each
of the four output phases (a, b) is a 2×2 convolution of x: 16 multiply-adds per input pixel and
channel pair instead of 36 (2.25× fewer in the VAE decoder's three upsamplers, about a third of its
work), and the 4× larger upsampled input is never written. Equal to the plain modules up to float
rounding (the folded kernel sums are formed in float64, once per weight; in float32 on a device without float64).

``LeanResnetBlock2D``: a diffusers ``ResnetBlock2D`` whose SiLUs run in place on the fresh GroupNorm
output, whose time embedding and skip are added in place to the fresh convolution outputs, and that
skips the division by an ``output_scale_factor`` of 1. Bit-identical; on CPU the VAE at 512² spends
about a second per image on those extra full-size passes.

``GemmConv2d``: a 3×3 convolution (stride 1 or 2) on CPU as matrix products. Over few pixels and many channels
(the UNet's and ControlNet's 1280-channel levels) as one product, out = unfold(x)ᵀ · W[C_out, C_in·9]ᵀ + b, where
oneDNN's direct convolution is 1.5–3× slower (measured on 2 cores at 8²–16² with 1280–2560 input channels; 4× for
the stride-2 downsampler); the upsampler's 2×2 phase convolutions likewise. Over many pixels with wide channels
(stride 1, C_in·C_out / (C_in + C_out) ≥ 150, activations up to 16 MB: the UNet's and ControlNet's 320- and
640-channel levels, the VAE's 512-channel ones at 64²) by Winograd's F(2×2, 3×3) (Lavin & Gray 2016): each 2×2
output tile is Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A of its 4×4 input tile d, i.e. 16 products of (pixels/4, C_in)·(C_in, C_out)
instead of 9 of (pixels, C_in)·(C_in, C_out): 2.25× fewer multiply-adds, 1.5–1.7× faster than oneDNN's direct
convolution on 2 cores in isolation at those widths, 3–6 % on a whole ControlNet + UNet step (narrower, the tile
transforms' memory traffic outweighs it; on larger activations it ate the gain). The transforms' coefficients are
0, ±½, ±1: the result differs from the direct convolution by float rounding only (about as much as two direct
algorithms differ). The kernels are formed in every call (a few ms), not kept: kept, those of a whole UNet and VAE
would take a gigabyte.

``OneDNNLinear`` and ``SplitGEGLU``: on a CPU other than Intel's, in float32, every matrix product above and every
linear layer goes through oneDNN's matmul (``linear``) instead of the default BLAS (MKL), 10–40 % faster on an AMD
EPYC (Zen 4, where MKL does not use its best kernels); on an Intel Xeon MKL ran this network's products with ≥ 1024
rows 3–8 % faster and a whole ControlNet + UNet step about 4 % faster (oneDNN won only at ≤ 256 rows, within the
step's noise), so there the products stay MKL's. The GEGLU's projection runs as two products (value and gate, each
written contiguous) with the GELU and the product in place, so no half-width copies are made.
"""

import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

from .devices import widest_float


_ONEDNN_LINEAR = []  # [True/False] once decided: do the CPU float32 products go through oneDNN's linear op?


def cpu_vendor():
    """The CPU vendor's string ('GenuineIntel', 'AuthenticAMD', …): from /proc/cpuinfo on Linux, else the last word
    of ``platform.processor()`` (Windows ends it with the vendor); '' when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    words = platform.processor().replace(",", " ").split()
    return words[-1] if words else ""


def _onednn_linear_op():
    """``torch.ops.mkldnn._linear_pointwise`` (the op Inductor uses for CPU linear layers) where this build has it,
    it computes F.linear and the CPU is not Intel's (there MKL is as fast or faster; decided once, on first use),
    else None."""
    if not _ONEDNN_LINEAR:
        op = (getattr(torch.ops.mkldnn, "_linear_pointwise", None)
              if torch.backends.mkldnn.is_available() and cpu_vendor() != "GenuineIntel" else None)
        works = False
        if op is not None:
            x, w, b = (torch.linspace(-1, 1, n).reshape(shape) for n, shape in ((6, (2, 3)), (12, (4, 3)), (4, (4,))))
            try:
                works = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-6)
            except (RuntimeError, TypeError):
                works = False
        _ONEDNN_LINEAR.append(works)
    return torch.ops.mkldnn._linear_pointwise if _ONEDNN_LINEAR[0] else None


def linear(x, weight, bias=None):
    """x · Wᵀ + b: oneDNN's matmul for float32 on a CPU other than Intel's, without autograd (faster than the default
    BLAS there, see the module docstring), else ``F.linear``. Same function; the sums may be rounded in another
    order. Under ``torch.compile`` always ``F.linear``: Inductor picks the CPU's kernel itself, and lowers the oneDNN
    op only for frozen weights (else "weight must be a graph constant").

    ``F.linear`` is given x as a matrix (N·…, C_in): of a 3-D x that is not contiguous (``conv_as_matmul``'s) or
    without b, it makes one product of the batch or one per item by whether W requires grad, and the two round
    bfloat16 differently; a parameter's view does under ``no_grad`` (the commands), not under ``inference_mode``
    (ComfyUI), so the same weights gave a node and a command outputs 1/255 apart."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_grad_enabled() and not is_compiling()):
        op = _onednn_linear_op()
        if op is not None:
            return op(x, weight.contiguous(), bias, "none", [], "")
    if x.dim() > 2:
        return F.linear(x.reshape(-1, x.shape[-1]), weight, bias).unflatten(0, x.shape[:-1])
    return F.linear(x, weight, bias)


def conv_as_matmul(x, weight, kernel, stride=1, bias=None):
    """conv2d(x, W, b, stride) without padding as one matrix product: out[n, :, p] = W[C_out, C_in·k²] ·
    unfold(x)[n, :, p] + b, returned as a contiguous (N, C_out, H_out, W_out) tensor."""
    n, _, h, w = x.shape
    h_out, w_out = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    cols = F.unfold(x, kernel, stride=stride).transpose(1, 2)  # (N, H_out·W_out, C_in·k²)
    out = linear(cols, weight.reshape(weight.shape[0], -1), bias)  # (N, H_out·W_out, C_out)
    return out.transpose(1, 2).reshape(n, weight.shape[0], h_out, w_out).contiguous()


def few_pixels_many_channels(x, pixels):
    """True on CPU when ``pixels`` (output positions, whole batch) ≤ C_in / 2: there a convolution is faster as a
    matrix product (``conv_as_matmul``) than oneDNN's direct convolution (measured on 2 cores)."""
    return x.dim() == 4 and x.device.type == "cpu" and 2 * pixels <= x.shape[1]


def _fold(w, dim):
    """Taps of a 3-tap kernel along ``dim`` as seen by the two phases: (w0, w1 + w2) and (w0 + w1, w2)."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


FOLD_CHANNELS = 64  # output channels folded at once in float64 (phase_kernels)


def phase_kernels(weight):
    """(C_out, C_in, 3, 3) → (4·C_out, C_in, 2, 2): the 2×2 kernel of each output phase (a, b), a-major. Folded in
    float64 (float32 on a device without it: ``widest_float``), ``FOLD_CHANNELS`` output channels at a time: 25 MiB
    beside the kernels for a 1280-channel UNet weight, where folding it at once held 500 MiB (at every fold: the first
    run, and after each move between devices)."""
    c_out, c_in = weight.shape[:2]
    kernels = weight.new_empty((4, c_out, c_in, 2, 2))
    wide = widest_float(weight.device)
    for start in range(0, c_out, FOLD_CHANNELS):
        rows = _fold(weight[start:start + FOLD_CHANNELS].to(wide), 2)
        for phase, kernel in enumerate(k for r in rows for k in _fold(r, 3)):
            kernels[phase, start:start + FOLD_CHANNELS] = kernel
    return kernels.flatten(0, 1)


def upsample2x_conv3x3(x, kernels, bias=None):
    """conv3×3(nearest×2(x), weight, bias, padding=1) as four 2×2 convolutions of x, given the
    ``phase_kernels(weight)``.

    y = conv2×2(pad₁(x), phase kernels) has (H+1)×(W+1) positions; phase (a, b) of the output is
    y_ab[a:a+H, b:b+W], so out[2i+a, 2j+b] = y_ab[i+a, j+b]. The two phases of a row are computed together.
    """
    n, _, h, w = x.shape
    c_out = kernels.shape[0] // 4
    padded = F.pad(x, (1, 1, 1, 1))
    as_matmul = few_pixels_many_channels(x, n * (h + 1) * (w + 1))
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = torch.empty((n, c_out, 2 * h, 2 * w), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    phases = out.unflatten(3, (w, 2)).unflatten(2, (h, 2))  # (n, c, h, a, w, b)
    for a in (0, 1):  # one row of phases at a time: y holds half the output's size, not all of it
        rows = kernels[2 * a * c_out:2 * (a + 1) * c_out]
        y = (conv_as_matmul(padded, rows, 2) if as_matmul else F.conv2d(padded, rows)).unflatten(1, (2, c_out))
        for b in (0, 1):
            phases[:, :, :, a, :, b] = y[:, b, :, a:a + h, b:b + w]
        del y
    if bias is not None:
        out += bias.view(1, -1, 1, 1)
    return out


WINOGRAD_MIN_WIDTH = 150  # C_in·C_out / (C_in + C_out) from which F(2×2, 3×3) was faster (break-even ≈ 140)
WINOGRAD_MAX_ELEMENTS = 4 * 2**20  # elements per activation (16 MB in float32) up to which it paid

_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_kernels(weight):
    """(C_out, C_in, 3, 3) → (16, C_out, C_in): U[4i + j] = (G g Gᵀ)[i, j] = (G ⊗ G)[4i + j] · vec(g), one product
    of the (16, 9) matrix G ⊗ G with all kernels; formed per call (a few ms: kept, the kernels of a whole UNet and
    VAE would take a gigabyte)."""
    g = torch.tensor(_WINOGRAD_G, dtype=weight.dtype, device=weight.device)
    c_out, c_in = weight.shape[:2]
    return torch.mm(torch.kron(g, g), weight.reshape(c_out * c_in, 9).t()).view(16, c_out, c_in)


def _input_transform(d0, d1, d2, d3, out):
    """Bᵀ applied along one axis: (d0 − d2, d1 + d2, d2 − d1, d1 − d3), written into out[0..3]."""
    torch.sub(d0, d2, out=out[0])
    torch.add(d1, d2, out=out[1])
    torch.sub(d2, d1, out=out[2])
    torch.sub(d1, d3, out=out[3])
    return out


def winograd_conv3x3(x, kernels, bias=None):
    """conv2d(x, W, b, padding=1) by Winograd F(2×2, 3×3), given ``winograd_kernels(W)``: V = Bᵀ d B of every 4×4
    input tile (stride 2), M[ij] = V[ij] · U[ij]ᵀ (16 products; b added to M[11], which Aᵀ·A carries to all four
    outputs once), out tile = Aᵀ M A with Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]. Returned channels-last."""
    n, c, h, w = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    # zero padding 1 (and one more row / column for odd sizes), channels last: (n, 2th + 2, 2tw + 2, c)
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 2 * tw + 1 - w, 1, 2 * th + 1 - h))
    rows = _input_transform(*(padded[:, k:k + 2 * th:2] for k in range(4)),
                            torch.empty(4, n, th, 2 * tw + 2, c, dtype=x.dtype, device=x.device))
    v = torch.empty(4, 4, n, th, tw, c, dtype=x.dtype, device=x.device)
    for i in range(4):
        _input_transform(*(rows[i][:, :, k:k + 2 * tw:2] for k in range(4)), v[i])
    del rows
    v = v.view(16, n * th * tw, c)
    m = [linear(v[k], kernels[k], bias if k == 5 else None).view(n, th, tw, -1) for k in range(16)]
    del v
    out = torch.empty(n, th, 2, tw, 2, m[0].shape[-1], dtype=x.dtype, device=x.device)
    for a in (0, 1):  # Aᵀ along the rows (in place in the m of row 0 or row 3), then along the columns
        r = [m[k].add_(m[4 + k]).add_(m[8 + k]) if a == 0 else m[12 + k].neg_().add_(m[4 + k]).sub_(m[8 + k])
             for k in range(4)]
        torch.add(r[0].add_(r[1]), r[2], out=out[:, :, a, :, 0])
        torch.sub(r[1].sub_(r[2]), r[3], out=out[:, :, a, :, 1])
    out = out.view(n, 2 * th, 2 * tw, -1)[:, :h, :w].permute(0, 3, 1, 2)
    return out.contiguous(memory_format=torch.channels_last)


def winograd_pays(x, out_channels):
    """Whether F(2×2, 3×3) beats the direct convolution on ``x``: wide channels, C_in·C_out / (C_in + C_out) ≥
    ``WINOGRAD_MIN_WIDTH``, and input and output of at most ``WINOGRAD_MAX_ELEMENTS`` each (past the CPU's cache the
    tile transforms' memory traffic ate the gain: none on the VAE decoder's 128²×512 levels)."""
    in_channels, pixels = x.shape[1], x.shape[0] * x.shape[2] * x.shape[3]
    return (in_channels * out_channels >= WINOGRAD_MIN_WIDTH * (in_channels + out_channels)
            and max(in_channels, out_channels) * pixels <= WINOGRAD_MAX_ELEMENTS)


def is_compiling():
    """Whether ``torch.compile`` is tracing the call: ``torch.compiler.is_compiling`` (PyTorch 2.3 on), else the
    ``torch._dynamo`` function it replaced."""
    check = getattr(torch.compiler, "is_compiling", None)
    return check() if check is not None else torch._dynamo.is_compiling()


class FusedUpsample2D(nn.Module):
    """Drop-in for a diffusers ``Upsample2D`` (nearest ×2, 3×3 conv); keeps its ``conv`` (same state-dict keys).
    The phase kernels are folded once and kept until the weight is written to, moved or cast (under
    ``torch.compile``, folded in every call of the compiled graph instead)."""

    def __init__(self, upsample):
        super().__init__()
        self.channels = upsample.channels
        self.conv = upsample.conv
        self._kernels = (None, None)

    def _apply(self, fn, *args, **kwargs):
        self.forget_kernels()  # .to(), .half(), .cuda() … give the weight new data
        return super()._apply(fn, *args, **kwargs)

    def forget_kernels(self):
        """Drop the folded kernels (folded again at the next call): for a host that moved ``conv`` alone, as
        ComfyUI's partial unload does layer by layer, so that they do not stay in memory it counts as freed."""
        self._kernels = (None, None)

    def unfolded_kernel_bytes(self):
        """The bytes the phase kernels (4·C_out, C_in, 2, 2) will take when folded; 0 while they are kept."""
        weight = self.conv.weight
        return 0 if self._kernels[1] is not None else 16 * weight.shape[0] * weight.shape[1] * weight.element_size()

    def phase_kernels(self):
        weight = self.conv.weight
        if is_compiling():  # inside torch.compile: folded in the graph, no Python-side cache
            return phase_kernels(weight)
        try:
            version = weight._version  # bumped by every in-place write (load_state_dict, a LoRA merge)
        except RuntimeError:  # an inference tensor has no version counter
            version = None
        key = (weight.data_ptr(), version)
        if self._kernels[0] != key:
            with torch.no_grad():
                self._kernels = (key, phase_kernels(weight))
        return self._kernels[1]

    def forward(self, hidden_states, output_size=None, *args, **kwargs):
        h, w = hidden_states.shape[-2:]
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
            return self.conv(hidden_states)
        return upsample2x_conv3x3(hidden_states, self.phase_kernels(), self.conv.bias)


def forget_folded_kernels(model):
    """Drop the folded kernels of every ``FusedUpsample2D`` in ``model`` (folded again at their next call)."""
    for module in model.modules():
        if isinstance(module, FusedUpsample2D):
            module.forget_kernels()


class LeanResnetBlock2D(nn.Module):
    """Drop-in for a diffusers ``ResnetBlock2D`` without up/down-sampling or scale-shift time embedding, with
    SiLU; keeps its submodules (same state-dict keys):

        h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb));  out = (shortcut(x) + conv2(silu(norm2(h)))) / s

    (the time embedding only with the "default" norm, as the VAE's "group" blocks ignore it).

    Every pointwise step writes into a tensor nothing else holds (the SiLUs only without autograd, which
    needs their inputs), and there is no division when s = 1."""

    def __init__(self, resnet):
        super().__init__()
        for name in ("norm1", "conv1", "time_emb_proj", "norm2", "dropout", "conv2", "conv_shortcut"):
            setattr(self, name, getattr(resnet, name))
        self.in_channels, self.out_channels = resnet.in_channels, resnet.out_channels
        self.output_scale_factor, self.skip_time_act = resnet.output_scale_factor, resnet.skip_time_act
        self.time_embedding_norm = resnet.time_embedding_norm

    def forward(self, input_tensor, temb=None, *args, **kwargs):
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(input_tensor), inplace=inplace))
        if self.time_emb_proj is not None:
            temb = self.time_emb_proj(temb if self.skip_time_act else F.silu(temb))[:, :, None, None]
        if temb is not None and self.time_embedding_norm == "default":
            h += temb
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=inplace)))
        h += input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        if self.output_scale_factor != 1:
            h /= self.output_scale_factor
        return h


class GemmConv2d(nn.Conv2d):
    """Drop-in for a 3×3, padding-1, stride-1 or -2 ``nn.Conv2d`` (same parameters, same state-dict keys). On CPU:
    ``conv_as_matmul`` of the padded input when the output has N·H·W ≤ C_in / 2 positions; else, in float32 without
    autograd, at stride 1 and where ``winograd_pays``, ``winograd_conv3x3`` (not under ``torch.compile``: its in-place
    steps would break the graph at every such convolution); else the convolution."""

    @classmethod
    def of(cls, conv):
        new = cls(conv.in_channels, conv.out_channels, 3, stride=conv.stride, padding=1, bias=conv.bias is not None,
                  device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        return new

    def forward(self, x):
        stride = self.stride[0]
        if x.dim() == 4 and few_pixels_many_channels(
                x, x.shape[0] * ((x.shape[2] - 1) // stride + 1) * ((x.shape[3] - 1) // stride + 1)):
            return conv_as_matmul(F.pad(x, (1, 1, 1, 1)), self.weight, 3, stride, self.bias)
        if (stride == 1 and x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and not torch.is_grad_enabled() and not is_compiling()
                and winograd_pays(x, self.out_channels)):
            return winograd_conv3x3(x, winograd_kernels(self.weight), self.bias)
        return super().forward(x)


class OneDNNLinear(nn.Linear):
    """Drop-in for an ``nn.Linear`` (same parameters, same state-dict keys) computed by ``linear``."""

    @classmethod
    def of(cls, layer):
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        new.weight, new.bias = layer.weight, layer.bias
        return new

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class SplitGEGLU(nn.Module):
    """Drop-in for a diffusers ``GEGLU`` (keeps its ``proj``, same state-dict keys): with W = [W_v; W_g],
    out = (x·W_vᵀ + b_v) ⊙ GELU(x·W_gᵀ + b_g), each product a fresh contiguous tensor, GELU and ⊙ in place
    (without autograd; with it, as the original)."""

    def __init__(self, geglu):
        super().__init__()
        self.proj = geglu.proj

    def forward(self, hidden_states, *args, **kwargs):
        weight, bias = self.proj.weight, self.proj.bias
        if torch.is_grad_enabled():
            value, gate = F.linear(hidden_states, weight, bias).chunk(2, dim=-1)
            return value * F.gelu(gate)
        half = weight.shape[0] // 2
        value = linear(hidden_states, weight[:half], None if bias is None else bias[:half])
        gate = linear(hidden_states, weight[half:], None if bias is None else bias[half:])
        return value.mul_(torch.ops.aten.gelu_(gate))


def _upsample_fusable(module):
    from diffusers.models.upsampling import Upsample2D

    conv = getattr(module, "conv", None)
    return (isinstance(module, Upsample2D) and module.use_conv and not module.use_conv_transpose
            and module.interpolate and module.norm is None and isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1)


def _resnet_leanable(module):
    from diffusers.models.resnet import ResnetBlock2D

    return (isinstance(module, ResnetBlock2D) and module.upsample is None and module.downsample is None
            and module.time_embedding_norm != "scale_shift" and isinstance(module.nonlinearity, nn.SiLU))


def _plain_conv3x3(module):
    return (type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.stride in ((1, 1), (2, 2))
            and module.padding == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros")


def _geglu(module):
    from diffusers.models.activations import GEGLU

    return type(module) is GEGLU and type(module.proj) in (nn.Linear, OneDNNLinear)


def fast_modules(model):
    """Replace, in place, every fusable diffusers ``Upsample2D`` in ``model`` by ``FusedUpsample2D``, every plain
    ``ResnetBlock2D`` by ``LeanResnetBlock2D``, every plain 3×3 ``Conv2d`` (stride 1 or 2) by ``GemmConv2d``, every
    ``GEGLU`` by ``SplitGEGLU`` and every plain ``Linear`` by ``OneDNNLinear``. Children are replaced before their
    parents, so a replaced block holds the replaced layers."""
    _onednn_linear_op()  # decided here (probe and CPU vendor), outside any torch.compile trace
    for parent in reversed(list(model.modules())):
        for name, child in list(parent.named_children()):
            if _upsample_fusable(child):
                setattr(parent, name, FusedUpsample2D(child))
            elif _resnet_leanable(child):
                setattr(parent, name, LeanResnetBlock2D(child))
            elif _plain_conv3x3(child):
                setattr(parent, name, GemmConv2d.of(child))
            elif _geglu(child):
                setattr(parent, name, SplitGEGLU(child))
            elif type(child) is nn.Linear:
                setattr(parent, name, OneDNNLinear.of(child))
    return model


def decoder_memory_format(device):
    """The VAE decoder's weight layout on ``device``: channels-last on the CPU, where its large-image convolutions
    run about 15–25 % faster in it; contiguous elsewhere: on an H200 in fp16, channels-last made the decoder 21 %
    slower at 512² and 51 % at 1024² (``bench/results/decoder_modules_cuda_fp16.json``)."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def decoder_weights_for(decoder, device):
    """``decoder`` with its 4-D weights in ``decoder_memory_format(device)``, reordered (new memory, same values)
    where they are not: a decoder built on the CPU and moved to a GPU, or moved back."""
    layout = decoder_memory_format(device)
    if any(p.dim() == 4 and not p.is_contiguous(memory_format=layout) for p in decoder.parameters()):
        with torch.no_grad():
            decoder.to(memory_format=layout)
    return decoder


def fast_vae_decoder(decoder, in_place=False):
    """``fast_modules(decoder)`` with its weights in the layout of their device (``decoder_weights_for``:
    channels-last on the CPU; same function). ``in_place``: on the CPU each weight is reordered inside its own memory
    instead of copied to new memory (0.6 s less at full size on this VM, and the old copy is not left behind in a
    loader's buffer), for weights this process owns and nothing else reads (``SD21.vae_owned``)."""
    fast_modules(decoder)
    device = next(decoder.parameters()).device
    if not in_place or decoder_memory_format(device) != torch.channels_last:
        return decoder_weights_for(decoder, device)
    with torch.no_grad():
        for param in decoder.parameters():
            if param.dim() == 4 and param.is_contiguous() and not param.is_contiguous(
                    memory_format=torch.channels_last):
                reorder_channels_last_in_place(param)
    return decoder


def reorder_channels_last_in_place(param):
    """Rewrite a contiguous (O, I, H, W) parameter's memory in (O, H, W, I) order and give it channels-last strides:
    same values, same memory (one weight-sized temporary)."""
    out_ch, in_ch, height, width = param.shape
    nhwc = param.data.view(out_ch, height, width, in_ch)
    nhwc.copy_(param.data.permute(0, 2, 3, 1).contiguous())
    param.data = nhwc.permute(0, 3, 1, 2)
