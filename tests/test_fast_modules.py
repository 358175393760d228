"""The fast drop-ins (fused nearest ×2 + 3×3 convolution, lean resnet block) equal the plain diffusers modules."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

from comfyui_diffsr.sr_common import fast_modules as fm
from comfyui_diffsr.sr_common.fast_modules import (FusedUpsample2D, GemmConv2d, LeanResnetBlock2D, OneDNNLinear,
                                                     SplitGEGLU, decoder_weights_for, fast_modules, fast_vae_decoder,
                                                     phase_kernels, upsample2x_conv3x3)
from comfyui_diffsr.sr_common.latents import vae_decode


def plain(x, conv):
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("shape", [(1, 8, 5, 7), (3, 4, 1, 1), (2, 16, 12, 9), (1, 64, 3, 4)])  # last: a product
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_nearest_then_conv(shape, channels_last):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], 6, 3, padding=1)
    x = torch.randn(shape)
    if channels_last:
        x, conv = x.contiguous(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out, ref = upsample2x_conv3x3(x, phase_kernels(conv.weight), conv.bias), plain(x, conv)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last and shape[-1] > 1 else
                             torch.contiguous_format)


def test_bfloat16_close():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(1, 8, 6, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        out, ref = upsample2x_conv3x3(x, phase_kernels(conv.weight), conv.bias).float(), plain(x.float(), conv.float())
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_decoder_and_unet_same_function(tiny_unet_vae):
    """Swapping the blocks keeps the state dict and the outputs (VAE decoder, UNet with odd skip sizes)."""
    unet, vae = tiny_unet_vae
    fast_dec, fast_unet = fast_vae_decoder(copy.deepcopy(vae.decoder)), fast_modules(copy.deepcopy(unet))
    for fast in (fast_dec, fast_unet):
        assert any(isinstance(m, FusedUpsample2D) for m in fast.modules())
        assert any(isinstance(m, LeanResnetBlock2D) for m in fast.modules())
        assert not any(type(m) in (ResnetBlock2D, Upsample2D) for m in fast.modules())
        assert not any(type(m) is torch.nn.Conv2d and m.kernel_size == (3, 3) and m.padding == (1, 1)
                       for m in fast.modules())
    from diffusers.models.activations import GEGLU

    assert any(isinstance(m, SplitGEGLU) for m in fast_unet.modules())
    assert not any(type(m) in (GEGLU, torch.nn.Linear) for m in fast_unet.modules())
    assert any(isinstance(m, GemmConv2d) and m.stride == (2, 2) for m in fast_unet.modules())
    assert fast_dec.state_dict().keys() == vae.decoder.state_dict().keys()
    assert fast_unet.state_dict().keys() == unet.state_dict().keys()
    torch.manual_seed(0)
    z = torch.randn(1, vae.config.latent_channels, 9, 13)
    zu = torch.randn(1, unet.config.in_channels, 12, 20)
    emb = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(fast_dec(z), vae.decoder(z), rtol=1e-4, atol=1e-4)
        t = torch.tensor([999])
        torch.testing.assert_close(fast_unet(zu, t, encoder_hidden_states=emb).sample,
                                   unet(zu, t, encoder_hidden_states=emb).sample, rtol=1e-4, atol=1e-4)


def test_decoder_weights_take_the_layout_of_their_device(tiny_unet_vae):
    """The decoder's 3×3 weights are channels-last on the CPU and contiguous on a GPU (each layout measured faster
    there); ``vae_decode`` puts a decoder that comes back from a GPU in the CPU's layout again, same output."""
    vae = copy.deepcopy(tiny_unet_vae[1])
    fast_vae_decoder(vae.decoder)
    convs = [p for p in vae.decoder.parameters() if p.dim() == 4 and p.shape[-1] == 3]
    z = torch.randn(1, vae.config.latent_channels, 9, 13, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = vae_decode(vae, z)
        assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
        decoder_weights_for(vae.decoder, torch.device("cuda"))  # the layout it gets on a GPU (no GPU needed)
        assert all(p.is_contiguous() for p in convs)
        after = vae_decode(vae, z)
    assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    assert torch.equal(after, before)


def test_other_output_size_falls_back():
    torch.manual_seed(0)
    from diffusers.models.upsampling import Upsample2D

    up = Upsample2D(4, use_conv=True)
    fused = FusedUpsample2D(up)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, output_size=(11, 9)), up(x, output_size=(11, 9)))


def _resnet(**kwargs):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    resnet = ResnetBlock2D(groups=4, eps=1e-6, **kwargs).eval()
    for p in resnet.parameters():  # non-trivial norms and biases
        p.data.normal_(0, 0.3)
    return resnet


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=8, out_channels=8, temb_channels=None),  # VAE mid block
    dict(in_channels=8, out_channels=12, temb_channels=None, time_embedding_norm="group"),  # VAE, 1×1 shortcut
    dict(in_channels=8, out_channels=12, temb_channels=16),  # UNet
    dict(in_channels=8, out_channels=8, temb_channels=16, output_scale_factor=2.0, skip_time_act=True),
])
def test_lean_resnet_bit_identical(kwargs):
    resnet = _resnet(**kwargs)
    lean = LeanResnetBlock2D(resnet)
    assert lean.state_dict().keys() == resnet.state_dict().keys()
    x = torch.randn(2, 8, 6, 5)
    temb = torch.randn(2, 16) if kwargs["temb_channels"] else None
    if kwargs.get("time_embedding_norm") == "group":
        temb = torch.randn(2, 12, 1, 1)  # ignored, as in the VAE's up and down blocks
    with torch.inference_mode():
        out = lean(x, temb)
        assert torch.equal(out, resnet(x, temb))
    x_grad, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    weight = out.clone()
    (lean(x_grad, temb) * weight).sum().backward()  # with autograd the SiLUs stay out of place
    (resnet(x_ref, temb) * weight).sum().backward()
    torch.testing.assert_close(x_grad.grad, x_ref.grad)


def test_upsampler_refolds_after_the_weight_changes():
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    up = Upsample2D(4, use_conv=True)
    fused = FusedUpsample2D(copy.deepcopy(up))
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), up(x))
        kernels = fused.phase_kernels()
        assert fused.phase_kernels() is kernels  # folded once
        up.conv.weight.mul_(-2.0)
        fused.load_state_dict(up.state_dict())  # an in-place write
        torch.testing.assert_close(fused(x), up(x))
        up.conv.weight.add_(1.0)
        fused.conv.weight.add_(1.0)
        torch.testing.assert_close(fused(x), up(x))
        fused.double()  # a cast
        torch.testing.assert_close(fused(x.double()), up.double()(x.double()))


@pytest.mark.parametrize("shape", [(1, 64, 4, 4), (2, 64, 3, 5), (1, 8, 6, 6)])  # matrix product, twice, conv
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stride", [1, 2])
def test_gemm_conv_equals_conv(shape, dtype, stride):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], 12, 3, stride=stride, padding=1).to(dtype)
    gemm = GemmConv2d.of(conv)
    assert gemm.state_dict().keys() == conv.state_dict().keys() and gemm.weight is conv.weight
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        out, ref = gemm(x), conv(x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    assert out.shape == ref.shape and out.dtype == ref.dtype


def test_decoder_reordered_in_place_keeps_its_memory_and_values(tiny_unet_vae):
    """``in_place``: each 3×3 weight keeps its memory (a loader's buffer), gets channels-last strides and the same
    values; the decoder computes what the copied channels-last one does."""
    _, vae = tiny_unet_vae
    copied, reordered = copy.deepcopy(vae.decoder), copy.deepcopy(vae.decoder)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in reordered.named_parameters()}
    fast_vae_decoder(copied)
    fast_vae_decoder(reordered, in_place=True)
    weights = [(n, p) for n, p in reordered.named_parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert weights
    for name, param in weights:
        assert param.is_contiguous(memory_format=torch.channels_last) and not param.is_contiguous()
        assert param.data_ptr() == before[name][0] and torch.equal(param, before[name][1])
    z = torch.randn(1, vae.config.latent_channels, 9, 13)
    with torch.no_grad():
        assert torch.equal(reordered(z), copied(z))
    fast_vae_decoder(reordered, in_place=True)  # again (a second model on the same base): nothing changes
    assert all(p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]) for n, p in reordered.named_parameters())


def test_gemm_conv_takes_the_product_for_few_pixels(monkeypatch):
    """The rule: output positions (whole batch) ≤ C_in / 2 → matrix product, else the convolution."""
    calls = []
    monkeypatch.setattr(fm, "conv_as_matmul", lambda *a: calls.append(a[0].shape) or torch.zeros(1))
    conv = GemmConv2d.of(torch.nn.Conv2d(64, 8, 3, stride=2, padding=1))
    with torch.no_grad():
        conv(torch.randn(2, 64, 8, 8))  # 2·4·4 = 32 ≤ 32
        assert calls == [(2, 64, 10, 10)]
        conv(torch.randn(2, 64, 9, 8))  # 2·5·4 = 40 > 32
        assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemm_conv_rounds_alike_whether_its_weights_require_grad_or_not(dtype):
    """The product over few pixels (``conv_as_matmul``: a transposed unfold) is bit-identical for weights that are
    parameters run under ``no_grad`` (the commands) and weights made under ``inference_mode`` (ComfyUI's casts):
    F.linear of the 3-D view rounded bfloat16 otherwise by whether the weight's view required grad, and the same
    image upscaled by a node and by the command differed by 1/255 in some pixels (torch 2.1.2 on a Zen 4 CPU)."""
    for seed in range(20):
        torch.manual_seed(seed)
        conv = GemmConv2d.of(torch.nn.Conv2d(128, 96, 3, padding=1)).to(dtype)
        with torch.inference_mode():
            frozen = copy.deepcopy(conv).requires_grad_(False)
        x = torch.randn(1, 128, 4, 3, dtype=dtype)
        with torch.no_grad():
            as_command = conv(x)
        with torch.inference_mode():
            as_node = frozen(x)
        assert torch.equal(as_command, as_node), seed


@pytest.fixture
def non_intel_cpu(monkeypatch):
    """The decision of ``linear`` made afresh as on a CPU other than Intel's (oneDNN's matmul where the build has it)."""
    monkeypatch.setattr(fm, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(fm, "_ONEDNN_LINEAR", [])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_onednn_linear_is_used_on_cpu(non_intel_cpu, monkeypatch):
    """On a oneDNN build and a CPU other than Intel's, the CPU float32 products go through oneDNN's matmul (the probe
    passes), else F.linear."""
    assert fm._onednn_linear_op() is not None
    calls = []
    monkeypatch.setattr(fm.F, "linear", lambda *a: calls.append("F.linear") or torch.zeros(1))
    with torch.no_grad():
        fm.linear(torch.randn(3, 4), torch.randn(5, 4))
        assert calls == []
        fm.linear(torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(5, 4, dtype=torch.bfloat16))
        assert calls == ["F.linear"]
    fm.linear(torch.randn(3, 4), torch.randn(5, 4))  # autograd on: F.linear
    assert calls == ["F.linear"] * 2


def test_intel_cpus_keep_mkl(monkeypatch):
    """On an Intel CPU MKL ran this network's products as fast or faster: F.linear there, decided once."""
    monkeypatch.setattr(fm, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(fm, "_ONEDNN_LINEAR", [])
    assert fm._onednn_linear_op() is None and fm._ONEDNN_LINEAR == [False]
    calls = []
    monkeypatch.setattr(fm.F, "linear", lambda *a: calls.append("F.linear") or torch.zeros(1))
    with torch.no_grad():
        fm.linear(torch.randn(3, 4), torch.randn(5, 4))
    assert calls == ["F.linear"]


def test_cpu_vendor(monkeypatch):
    """/proc/cpuinfo's vendor_id on Linux; else the last word of platform.processor() (Windows: '…, GenuineIntel')."""
    import builtins

    vendor = fm.cpu_vendor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            assert f"vendor_id\t: {vendor}\n" in f.read() or not vendor
    real_open = builtins.open

    def no_cpuinfo(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    monkeypatch.setattr(fm.platform, "processor", lambda: "AMD64 Family 25 Model 33 Stepping 0, AuthenticAMD")
    assert fm.cpu_vendor() == "AuthenticAMD"
    monkeypatch.setattr(fm.platform, "processor", lambda: "")
    assert fm.cpu_vendor() == ""


@pytest.mark.parametrize("shape", [(7, 16), (2, 9, 16), "transposed"])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_linear(non_intel_cpu, shape, bias):
    torch.manual_seed(0)
    assert fm._onednn_linear_op() is not None or not torch.backends.mkldnn.is_available()
    layer = torch.nn.Linear(16, 24, bias=bias)
    fast = OneDNNLinear.of(layer)
    assert fast.state_dict().keys() == layer.state_dict().keys() and fast.weight is layer.weight
    x = torch.randn(3, 16, 5).transpose(1, 2) if shape == "transposed" else torch.randn(shape)
    with torch.no_grad():
        out, ref = fast(x), layer(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    x_grad = x.clone().requires_grad_()
    fast(x_grad).sum().backward()  # autograd: F.linear, gradients flow
    assert x_grad.grad is not None and layer.weight.grad is not None


def test_split_geglu_equals_geglu(non_intel_cpu):
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    geglu = GEGLU(16, 12)
    split = SplitGEGLU(geglu)
    assert split.state_dict().keys() == geglu.state_dict().keys() and split.proj is geglu.proj
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        out, ref = split(x), geglu(x)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(split(x), geglu(x))  # autograd on: the original computation


@pytest.mark.parametrize("shape", [(1, 16, 8, 8), (2, 8, 7, 5), (1, 24, 1, 1), (1, 32, 9, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_equals_conv_to_rounding(shape, bias):
    """F(2×2, 3×3) is the convolution: its distance from a float64 reference is float32 rounding, of the size of the
    direct convolution's own (odd sizes, batch 2, a 1×1 image, with and without bias)."""
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(24, shape[1], 3, 3) * 0.2
    b = torch.randn(24) if bias else None
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    with torch.no_grad():
        out = fm.winograd_conv3x3(x, fm.winograd_kernels(w), b)
    direct = F.conv2d(x, w, b, padding=1)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    scale = ref.abs().max().item()
    assert (out.double() - ref).abs().max() <= max(4 * (direct.double() - ref).abs().max().item(), 1e-6 * scale)


def test_winograd_kernels_are_g_g_gt():
    """U[4i + j] = (G g Gᵀ)[i, j] with G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]], for one 3×3 kernel."""
    g = torch.arange(9.0).reshape(1, 1, 3, 3)
    G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    assert torch.equal(fm.winograd_kernels(g).reshape(4, 4), G @ g[0, 0] @ G.T)


def test_winograd_rule():
    def pays(c_in, c_out, size):
        return fm.winograd_pays(torch.empty(1, c_in, size, size, device="meta"), c_out)

    assert pays(320, 320, 64) and pays(512, 256, 64) and pays(1280, 640, 32) and pays(640, 640, 32)
    assert not pays(256, 256, 64) and not pays(128, 128, 64) and not pays(1280, 3, 64)  # too narrow
    assert not pays(512, 512, 128) and not pays(256, 512, 128)  # activations past 16 MB


def test_gemm_conv_takes_winograd_for_wide_channels(monkeypatch):
    """Many pixels, wide channels, stride 1, CPU float32 without autograd → Winograd, with the current weight;
    stride 2, bfloat16 or autograd → the convolution."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(320, 320, 3, padding=1)
    gemm = GemmConv2d.of(conv)
    x = torch.randn(1, 320, 24, 24)
    calls = []
    real = fm.winograd_conv3x3
    monkeypatch.setattr(fm, "winograd_conv3x3", lambda *a: calls.append(a[1]) or real(*a))
    with torch.no_grad():
        torch.testing.assert_close(gemm(x), conv(x), rtol=1e-4, atol=1e-4)
        conv.weight.mul_(-1.0)  # an in-place write
        torch.testing.assert_close(gemm(x), conv(x), rtol=1e-4, atol=1e-4)
        assert len(calls) == 2
        strided = GemmConv2d.of(torch.nn.Conv2d(320, 320, 3, stride=2, padding=1))
        strided(x)
        gemm.to(torch.bfloat16)(x.bfloat16())
    gemm.float()(x)  # autograd on
    assert len(calls) == 2


def test_convolutions_that_are_not_plain_3x3_stay_as_they_are():
    """Only zero-padded, ungrouped, undilated 3×3 convolutions become ``GemmConv2d`` (which pads with zeros over all
    input channels): a reflect-padded, a grouped and a dilated one are kept, and the network computes the same."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
                              torch.nn.Conv2d(8, 8, 3, padding=1, groups=4),
                              torch.nn.Conv2d(8, 8, 3, padding=1, dilation=1),
                              torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2))
    x = torch.randn(1, 8, 9, 7)
    with torch.no_grad():
        ref = net(x)
        fast_modules(net)
        assert [type(m) for m in net] == [torch.nn.Conv2d, torch.nn.Conv2d, GemmConv2d, torch.nn.Conv2d]
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


def test_a_strided_conv_over_many_pixels_is_the_convolution():
    """Stride 2 with wide channels over too many pixels for one product: the Winograd rule would pay on this input,
    but F(2×2, 3×3) computes stride 1, so the strided convolution (the UNet's 320-channel downsampler) stays direct."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(320, 320, 3, stride=2, padding=1)
    x = torch.randn(1, 320, 40, 40)
    assert fm.winograd_pays(x, 320)
    with torch.no_grad():
        torch.testing.assert_close(GemmConv2d.of(conv)(x), conv(x), rtol=1e-4, atol=1e-4)


def test_a_move_or_cast_drops_the_folded_kernels_and_counts_them_again():
    """Kept, the phase kernels count 0 in ``unfolded_kernel_bytes``; after a cast (as after any move) they are dropped
    at once and count as the (4·C_out, C_in, 2, 2) kernels of the new weight, until the next call folds them."""
    torch.manual_seed(0)
    fused = FusedUpsample2D(Upsample2D(4, use_conv=True, out_channels=6))
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        fused(x)
        assert fused.unfolded_kernel_bytes() == 0
        fused.double()
        assert fused._kernels == (None, None)
        folded = phase_kernels(fused.conv.weight)
        assert folded.shape == (24, 4, 2, 2)
        assert fused.unfolded_kernel_bytes() == folded.numel() * folded.element_size()
        fused(x.double())
        assert fused.unfolded_kernel_bytes() == 0
