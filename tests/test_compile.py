"""``model.compile()`` and ``--compile``: the compiled networks give the eager output; a failing compiler is one
clear line. The graphs are captured by TorchDynamo as with any backend; ``aot_eager`` stands in for inductor (which
needs minutes of C++ compilation here) and runs the captured graphs as they are. Inductor's speed and numerics are
measured by ``bench/device_check.sh`` on a GPU."""

import os
import tempfile

import pytest
import torch
from PIL import Image
from torch import nn

from comfyui_diffsr.dossr_core.model import DoSSRModel, load_dossr
from comfyui_diffsr.dossr_core.pipeline import Options as DoSSROptions
from comfyui_diffsr.dossr_core.pipeline import dossr_upscale
from comfyui_diffsr.osediff_core.pipeline import Options, OSEDiffModel, build_osediff, osediff_upscale
from comfyui_diffsr.osediff_core.weights import read_osediff
from comfyui_diffsr.sr_common import fast_modules
from comfyui_diffsr.sr_common.sd21 import load_sd21

from conftest import DATA, DOSSR, DOSSR_CONFIG, OSEDIFF, copy_tiny_sd21, psnr



@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo keeps compiled code per Python function across modules and backends: start and end clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def tiny_base():
    with tempfile.TemporaryDirectory() as tmp:
        yield copy_tiny_sd21(os.path.join(tmp, "tiny_sd21"))


@pytest.fixture
def plain_cpu_linear(monkeypatch):
    """F.linear in eager mode too, as under torch.compile (``fast_modules.linear``), on any CPU: the eager and
    compiled outputs are then computed by the same kernels (on a CPU other than Intel's, eager takes oneDNN's op)."""
    monkeypatch.setattr(fast_modules, "_ONEDNN_LINEAR", [False])


def counting_backend(calls):
    def backend(graph, example_inputs):
        calls.append(len(graph.graph.nodes))
        return graph.forward  # the captured graph, run as it is
    return backend


def test_compiled_osediff_gives_the_eager_output(tiny_base, plain_cpu_linear):
    model = build_osediff(load_sd21(tiny_base), read_osediff(OSEDIFF))
    image = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(1))
    options = Options(process_size=64, tile_latent=8, tile_overlap=4)  # latent tiles: several UNet calls
    eager = osediff_upscale(model, image, options=options)
    calls = []
    model.compile(backend=counting_backend(calls))
    with torch.inference_mode():
        compiled = osediff_upscale(model, image, options=options)
        again = osediff_upscale(model, image, options=options)
    # the whole UNet is one graph, compiled once: no graph break (FusedUpsample2D's kernel cache would make one
    # and a recompile on the next call) and no recompile for the other tiles or the second image
    assert len(calls) == 1 and calls[0] > 50, calls
    assert psnr(compiled, eager) > 100 and torch.equal(compiled, again)
    assert isinstance(model, OSEDiffModel) and model.unet.conv_in.weight.dtype == torch.float32


def test_compiled_dossr_gives_the_eager_output(plain_cpu_linear):
    model = load_dossr(DOSSR, config=DOSSR_CONFIG)
    image = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(2))
    options = DoSSROptions(steps=2)
    eager = dossr_upscale(model, image, prompt_embeds=torch.zeros(1, 77, model.unet.config.cross_attention_dim),
                          options=options)
    calls = []
    assert isinstance(model.compile(backend=counting_backend(calls)), DoSSRModel)
    with torch.inference_mode():
        compiled = dossr_upscale(model, image,
                                 prompt_embeds=torch.zeros(1, 77, model.unet.config.cross_attention_dim),
                                 options=options)
        again = dossr_upscale(model, image,
                              prompt_embeds=torch.zeros(1, 77, model.unet.config.cross_attention_dim),
                              options=options)
    assert len(calls) == 2, calls  # the ControlNet and the UNet, one graph each, compiled once for every step
    assert psnr(compiled, eager) > 100 and torch.equal(compiled, again)


def test_under_compile_the_cpu_kernels_are_left_to_the_compiler(monkeypatch):
    """Eager float32 on a CPU other than Intel's runs linear layers by oneDNN's op and wide 3×3 convolutions by
    Winograd; traced by torch.compile both are the plain ops, in one graph. Inductor lowers the oneDNN op only for
    frozen weights ("weight must be a graph constant": --compile failed on AMD CPUs), and Winograd's in-place steps
    broke the graph at each convolution."""
    monkeypatch.setattr(fast_modules, "_ONEDNN_LINEAR", [True])  # as decided on an AMD CPU
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        pytest.skip("this PyTorch has no oneDNN linear op")
    conv = fast_modules.GemmConv2d.of(nn.Conv2d(320, 320, 3, padding=1))
    linear = fast_modules.OneDNNLinear.of(nn.Linear(320, 320))
    x = torch.randn(1, 320, 16, 16, generator=torch.Generator().manual_seed(0))
    assert fast_modules.winograd_pays(x, 320)

    def run(x):
        return linear(conv(x).permute(0, 2, 3, 1))

    graphs = []

    def backend(graph, example_inputs):
        graphs.append([str(node.target) for node in graph.graph.nodes])
        return graph.forward

    with torch.inference_mode():
        eager = run(x)
        compiled = torch.compile(run, backend=backend)(x)
    assert len(graphs) == 1 and not [t for t in graphs[0] if "mkldnn" in t], graphs
    assert psnr(compiled, eager, peak=eager.abs().max().item()) > 100


def test_compile_flag_and_a_failing_compiler(tiny_base, tmp_path, monkeypatch, capsys, plain_cpu_linear):
    from comfyui_diffsr.cli.osediff import main

    src = os.path.join(DATA, "osediff", "in_32x32.png")
    args = [src, "--base", tiny_base, "--weights", OSEDIFF, "--process-size", "64", "--device", "cpu"]
    assert main(args + ["-o", str(tmp_path / "eager")]) == 0
    real, calls = OSEDiffModel.compile, []
    monkeypatch.setattr(OSEDiffModel, "compile",
                        lambda self, **kw: real(self, backend=counting_backend(calls)))
    assert main(args + ["-o", str(tmp_path / "compiled"), "--compile"]) == 0
    assert calls
    a, b = (Image.open(tmp_path / d / "in_32x32.png") for d in ("eager", "compiled"))
    assert a.tobytes() == b.tobytes()

    def broken(graph, example_inputs):
        raise OSError("no C++ compiler found")

    torch._dynamo.reset()
    monkeypatch.setattr(OSEDiffModel, "compile", lambda self, **kw: real(self, backend=broken))
    assert main(args + ["-o", str(tmp_path / "broken"), "--compile"]) == 2
    err = capsys.readouterr().err
    assert "torch.compile failed" in err and "no C++ compiler" in err and "without --compile" in err, err
