"""The official fixtures on a CUDA device, in float32 and in the reduced precisions the nodes and commands offer there
(fp16 is their default on CUDA). Skipped without CUDA: run by bench/device_check.sh on a GPU machine.
``DIFFSR_TEST_DEVICE=cpu`` runs them on the CPU instead (a dry run of this file)."""

import copy
import os
import sys

import pytest
import torch

from comfyui_diffsr.dossr_core.model import load_dossr
from comfyui_diffsr.dossr_core.pipeline import Options as DoSSROptions, dossr_upscale
from comfyui_diffsr.osediff_core.pipeline import build_osediff
from comfyui_diffsr.osediff_core.weights import read_osediff
from comfyui_diffsr.sr_common.sd21 import ieee_float32, load_sd21
from comfyui_diffsr.sr_common.tiled_vae import tiled_forward

from conftest import psnr
from test_nodes import dossr_sampled, own_tiny_sd21, pack, run  # noqa: F401 (pack: the nodes on the host stand-ins)
from test_dossr_pipeline import CASES as DOSSR_CASES, CKPT, TEXT_HEADS, YAML, fixture_noise, lr_image
from test_osediff_parity import (CASES as OSEDIFF_CASES, FIX as OSEDIFF_FIX, expected, precision_cases, run_case,
                                 tiny_folder)

CUDA = torch.device(os.environ.get("DIFFSR_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
OSEDIFF_NAMES = ["a32_adain", "c21x27_exact_sample", "e40x32_latent_tiled", "f64x48_vae_tiled",
                 "g37x29_exact_latent_tiled"]


@pytest.fixture(autouse=True)
def float32_as_the_commands_and_nodes_compute_it():
    """IEEE float32 (TF32 off on Ampere and later GPUs), as the commands and nodes run."""
    with ieee_float32():
        yield


@pytest.fixture(scope="module")
def osediff_cpu(tmp_path_factory):
    sd = load_sd21(tiny_folder(str(tmp_path_factory.mktemp("cuda_osediff"))))
    return build_osediff(sd, read_osediff(os.path.join(OSEDIFF_FIX, "osediff_tiny.pkl")))


@pytest.mark.parametrize("name", OSEDIFF_NAMES)
def test_osediff_float32_on_cuda_matches_official(osediff_cpu, name):
    model = copy.deepcopy(osediff_cpu).to(CUDA)
    case = next(c for c in OSEDIFF_CASES if c["name"] == name)
    out = run_case(model, case)
    assert out.device.type == "cpu" and out.dtype == torch.float32
    assert psnr(out, expected(case)) >= 50, f"{name}: {psnr(out, expected(case)):.2f} dB"


@pytest.mark.parametrize("dtype, min_db", [(torch.float16, 42), (torch.bfloat16, 28)])
def test_osediff_reduced_precision_on_cuda(osediff_cpu, dtype, min_db):
    """Cases and thresholds as on the CPU (tests/test_osediff_parity.py): random tiny weights amplify rounding."""
    model = copy.deepcopy(osediff_cpu).to(CUDA, dtype)
    for case in precision_cases():
        name = case["name"]
        reference, out = run_case(osediff_cpu, case), run_case(model, case)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert min_db <= psnr(out, reference) < 80, f"{name}: {psnr(out, reference):.2f} dB"


@pytest.mark.skipif(CUDA.type == "cpu", reason="inductor on the CPU compiles for minutes (tests/test_compile.py "
                    "covers the capture there)")
@pytest.mark.parametrize("dtype, min_db", [(torch.float32, 60), (torch.float16, 42)])
def test_osediff_compiled_with_inductor_on_cuda(osediff_cpu, dtype, min_db):
    """``model.compile()`` as ``--compile`` does (inductor, Triton kernels) against the eager float32 output."""
    torch._dynamo.reset()
    model = copy.deepcopy(osediff_cpu).to(CUDA, dtype).compile()
    for name in ("a32_adain",):  # one shape: one compilation
        case = next(c for c in OSEDIFF_CASES if c["name"] == name)
        with torch.inference_mode():
            reference, out = run_case(osediff_cpu, case), run_case(model, case)
        assert torch.isfinite(out).all() and psnr(out, reference) >= min_db, f"{name}: {psnr(out, reference):.2f} dB"
    torch._dynamo.reset()


@pytest.mark.parametrize("case", DOSSR_CASES, ids=[c["name"] for c in DOSSR_CASES])
def test_dossr_float32_on_cuda_matches_official(case):
    from safetensors.torch import load_file

    d = load_file(os.path.join(os.path.dirname(CKPT), case["tensors"]))
    model = load_dossr(CKPT, config=YAML, text_heads=TEXT_HEADS).to(CUDA)
    out = dossr_upscale(model, lr_image(case["input"]), noise=fixture_noise(d, case["steps"]),
                        options=DoSSROptions(steps=case["steps"], color_fix=case["color_fix_type"],
                                             upscale=case["sr_scale"]))
    assert out.device.type == "cpu"
    official = lr_image(case["output_png"])
    assert psnr(torch.floor(out.clamp(0, 1) * 255) / 255, official) >= 50


def test_networks_offloaded_between_stages_give_the_same_image():
    """With no free memory reported, ``OffloadWhenShort`` moves every network of another stage to the CPU before
    each stage, and each comes back for its own: the same image, and only the VAE is left on the device."""
    from comfyui_diffsr.sr_common.offload import OffloadWhenShort

    lr = lr_image("lr_w32h32.png")
    model = load_dossr(CKPT, config=YAML, text_heads=TEXT_HEADS).to(CUDA)
    roomy = dossr_upscale(model, lr, options=DoSSROptions(steps=2, seed=1))
    model.stage_loader = OffloadWhenShort(CUDA, free_bytes=lambda: 0)
    for _ in range(2):  # the second run brings back what the first one moved off
        short = dossr_upscale(model, lr, options=DoSSROptions(steps=2, seed=1))
        assert torch.equal(short, roomy)
        on_device = [m for m in model.modules() if model.stage_loader.on_device(m)]
        assert on_device == [model.vae] or CUDA.type == "cpu"


@pytest.mark.parametrize("dtype, min_db", [(torch.bfloat16, 38), (torch.float16, 54)])
def test_dossr_reduced_precision_on_cuda(dtype, min_db):
    lr = lr_image("lr_w32h32.png")
    reference = dossr_upscale(load_dossr(CKPT, config=YAML, text_heads=TEXT_HEADS), lr,
                              options=DoSSROptions(steps=5, seed=1))
    model = load_dossr(CKPT, config=YAML, text_heads=TEXT_HEADS).to(CUDA, dtype)
    out = dossr_upscale(model, lr, options=DoSSROptions(steps=5, seed=1))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert min_db <= psnr(out, reference) < 80


def test_fp16_vae_overflow_on_cuda(tiny_unet_vae):
    """The float32 rerun of an overflowing fp16 VAE (tests/test_tiled_vae_bounded.py) with CUDA kernels."""
    decoder = copy.deepcopy(tiny_unet_vae[1].decoder)
    with torch.no_grad():
        decoder.conv_in.weight.mul_(1e5)
        decoder.conv_in.bias.mul_(1e5)
        half = decoder.to(CUDA, torch.float16)
        z = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(0)).to(CUDA, torch.float16)
        reference = tiled_forward(copy.deepcopy(half).float(), z.float(), 8, True)
        with pytest.warns(RuntimeWarning, match="overflowed"):
            out = tiled_forward(half, z, 8, True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(out, reference, atol=1e-4)


def test_node_dtype_switches_on_cuda(pack, monkeypatch):  # noqa: F811
    """The nodes on a CUDA device (ComfyUI's torch device): OSEDiff Upscale in fp32, fp16, fp32, fp16. Each fp32 run
    equals the first (the merged UNet recomputed on the CPU from the SD 2.1 weights and the LoRA, the shared VAE and
    text encoder cast from their kept float32 weights), each fp16 run the first fp16 run, which is the pipeline's
    output from the same files cast to fp16. (This input's fp16 output is 57.4 dB from float32 on the CPU, 51.7 with
    the narrower networks of earlier fixtures. A 20×24 input was 36 dB on an H200 and 55.4 dB on the CPU with the
    earlier weights, 32.3 dB on the CPU with the narrower networks: its 5×6 latent reaches the tiny UNet's deepest
    level as 1×1, where each GroupNorm group held 2 values (64 channels, 32 groups) and normalised to the sign of
    their difference, which fp16 rounding flips where the two nearly tie. Its groups now hold 4 values (128
    channels) and it is 54.4 dB on the CPU; not measured on a GPU since.)"""
    _, nodes = pack
    monkeypatch.setattr(sys.modules["comfy.model_management"], "get_torch_device", lambda: CUDA)
    (model,) = run(nodes["OSEDiff_Loader"], sd21=own_tiny_sd21(), weights="osediff_tiny.pkl")
    image = torch.rand(1, 40, 48, 3, generator=torch.Generator().manual_seed(8))
    args = dict(model=model, image=image, prompt="", upscale=2.0, process_size=32, color_fix="adain", tile_latent=96,
                tile_overlap=32)
    outs = []
    with torch.inference_mode():
        for dtype in ("fp32", "fp16", "fp32", "fp16"):
            outs += run(nodes["OSEDiff_Upscale"], **args, dtype=dtype)
            assert {p.device.type for p in model.unet.parameters()} == {CUDA.type}
    assert torch.equal(outs[2], outs[0]) and torch.equal(outs[3], outs[1])
    pipeline = sys.modules["custom_nodes_x_diffsr_pack.osediff_core.pipeline"]
    weights = sys.modules["custom_nodes_x_diffsr_pack.osediff_core.weights"]
    checkpoint = weights.read_osediff(os.path.join(OSEDIFF_FIX, "osediff_tiny.pkl"))
    options = pipeline.Options(upscale=2.0, process_size=32, color_fix="adain", tile_latent=96, tile_overlap=32)
    with torch.inference_mode():  # as the nodes ran (own_tiny_sd21's weights are inference tensors)
        fp16 = pipeline.build_osediff(own_tiny_sd21(), checkpoint).to(CUDA, torch.float16)
        expected_fp16 = pipeline.osediff_upscale(fp16, image.permute(0, 3, 1, 2), options=options).permute(0, 2, 3, 1)
    assert psnr(outs[1], expected_fp16) >= 60
    assert 33 <= psnr(outs[1], outs[0]) < 80


def test_osediff_loaded_on_a_base_a_run_left_on_the_device_is_built_in_cpu_memory(pack):  # noqa: F811
    """An fp32 run (ComfyUI's choice on GTX 10xx/16xx cards) leaves the shared SD 2.1 UNet and VAE on the GPU; an
    OSEDiff loaded on that base afterwards is merged in CPU memory, where ComfyUI's memory manager expects a new
    model, not in GPU memory it does not count, with the same weights as on a base in CPU memory."""
    _, nodes = pack
    (reference,) = run(nodes["OSEDiff_Loader"], sd21=own_tiny_sd21(), weights="osediff_tiny.pkl")
    sd21 = own_tiny_sd21()
    sd21.unet.to(CUDA), sd21.vae.to(CUDA)
    (model,) = run(nodes["OSEDiff_Loader"], sd21=sd21, weights="osediff_tiny.pkl")
    for ours, theirs in ((model.unet, reference.unet), (model.lq_encoder, reference.lq_encoder)):
        assert {p.device.type for p in ours.parameters()} == {"cpu"}
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert {p.device for p in sd21.unet.parameters()} == {sd21.vae.encoder.conv_in.weight.device}  # left as it was
    assert sd21.unet.conv_in.weight.device.type == CUDA.type


def test_float32_weights_on_the_device_are_built_into_cpu_networks():
    """Float32 tensors on the device (a Load Checkpoint model ComfyUI keeps on the GPU) are copied to CPU memory,
    as tensors of another dtype are converted: the networks are built on the CPU and own their tensors."""
    from comfyui_diffsr.sr_common.weights import load_module_weights

    state = {"weight": torch.randn(3, 2, device=CUDA), "bias": torch.randn(3, device=CUDA)}
    module = torch.nn.Linear(2, 3)
    assert load_module_weights(module, state, "net") is (CUDA.type != "cpu")
    assert module.weight.device.type == "cpu" and torch.equal(module.weight, state["weight"].cpu())


def test_colour_fix_takes_a_reference_that_fell_back_to_the_cpu(monkeypatch):
    """Out of device memory, the colour reference is taken on the CPU; the fix on the device then takes it."""
    from comfyui_diffsr.sr_common import color_fix

    target, source = (torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(i)).to(CUDA) for i in (0, 1))
    expected = {m: color_fix.apply_color_fix(target, source, m).cpu() for m in ("adain", "wavelet")}
    real = color_fix._color_reference

    def out_of_memory_on_the_device(image, *args):
        if image.device.type != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(image, *args)

    monkeypatch.setattr(color_fix, "_color_reference", out_of_memory_on_the_device)
    for method, reference in expected.items():
        out = color_fix.apply_color_fix(target, source, method)
        assert out.device == target.device and torch.allclose(out.cpu(), reference, atol=1e-5), method


@pytest.mark.parametrize("method", ["osediff", "dossr"])
def test_commands_take_the_text_encoder_off_the_device_after_the_one_prompt(monkeypatch, tmp_path, method):
    """With one prompt for every image, the osediff and dossr commands encode it once, then move the text encoder
    to the CPU: its device memory (0.68 GB in fp16 at full size) goes to the tiles. With DAPE (a prompt per image)
    it stays on the device."""
    import comfyui_diffsr.cli.osediff as osediff_cli
    import comfyui_diffsr.dossr_core.pipeline as dossr_pipeline
    from comfyui_diffsr.cli.dossr import main as dossr_main
    from test_dossr_pipeline import FIX as DOSSR_FIX

    seen = []
    owner, name = (osediff_cli, "osediff_upscale") if method == "osediff" else (dossr_pipeline, "dossr_upscale")
    upscale = getattr(owner, name)

    def spy(model, *args, **kwargs):  # where the networks are after a run (each goes to the device for its stage)
        out = upscale(model, *args, **kwargs)
        seen.append((model.unet.conv_in.weight.device.type, next(model.text_encoder.parameters()).device.type))
        return out

    monkeypatch.setattr(owner, name, spy)  # the dossr command imports it from there when it runs
    out = ["-o", str(tmp_path / "out"), "--device", CUDA.type]
    if method == "osediff":
        common = [os.path.join(OSEDIFF_FIX, "in_21x27.png"), *out, "--base", tiny_folder(str(tmp_path / "base")),
                  "--weights", os.path.join(OSEDIFF_FIX, "osediff_tiny.pkl"), "--process-size", "64"]
        assert osediff_cli.main(common + ["--prompt", "a cat"]) == 0
        dape = os.path.join(os.path.dirname(OSEDIFF_FIX), "dape")
        assert osediff_cli.main(common + ["--overwrite", "--ram", os.path.join(dape, "ram_tiny.pth"), "--dape",
                                          os.path.join(dape, "dape_tiny.pth")]) == 0
        assert seen == [(CUDA.type, "cpu"), (CUDA.type, CUDA.type)]
    else:
        assert dossr_main([os.path.join(DOSSR_FIX, "lr_w32h16.png"), *out, "--weights", CKPT, "--config", YAML,
                           "--steps", "1"]) == 0
        assert seen == [(CUDA.type, "cpu")]


def test_dossr_decode_compares_a_crop_on_the_gpu_with_the_sampler_s_latent(pack):
    """Under --gpu-only ComfyUI's KSampler leaves its LATENT on the GPU (comfy/sample.py: intermediate_device). Cropped
    to its padding, DoSSR VAE Decode compared it with the sampler's latent on the CPU: RuntimeError ('Expected all
    tensors to be on the same device') for a crop it refuses. Now refused by name; a crop of the unchanged latent
    moved there decodes as the sampler's."""
    _, nodes = pack
    import nodes as comfy_nodes  # tests/comfy_stubs/nodes.py: ComfyUI's latent nodes

    crop = comfy_nodes.LatentCrop().crop
    _, latent, _, decode = dossr_sampled(nodes, torch.rand(1, 24, 25, 3))
    changed = dict(latent, samples=(latent["samples"] * 0.5).to(CUDA))
    with pytest.raises(ValueError, match="cropped and changed by another node"):
        decode(crop(changed, 104, 96, 0, 0)[0])
    moved = dict(latent, samples=latent["samples"].to(CUDA))
    assert torch.equal(decode(crop(moved, 104, 96, 0, 0)[0]), decode(latent))
