"""OSEDiff equals the official code: fixtures made by the official inference (tools/make_osediff_fixtures.py)."""

import json
import os

import PIL
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from comfyui_diffsr.osediff_core.pipeline import Options, build_osediff, osediff_upscale, preprocess
from comfyui_diffsr.osediff_core.weights import read_osediff
from comfyui_diffsr.sr_common.color_fix import color_reference, fix_colors
from comfyui_diffsr.sr_common.image import pil_to_tensor
from comfyui_diffsr.sr_common.sd21 import load_sd21

from conftest import DATA, copy_tiny_sd21, cpu_float16, half_channels_last, psnr
from osediff_sizing import squashed_by_lanczos

FIX = os.path.join(DATA, "osediff")
CASES = json.load(open(os.path.join(FIX, "cases.json")))["cases"]


def tiny_folder(tmp):
    """The stored tiny diffusers folder plus the tokenizer the pack ships (identical files, stored once)."""
    return copy_tiny_sd21(os.path.join(tmp, "tiny_sd21"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    sd = load_sd21(tiny_folder(str(tmp_path_factory.mktemp("osediff"))))
    return build_osediff(sd, read_osediff(os.path.join(FIX, "osediff_tiny.pkl")))


def run_case(model, case):
    image = pil_to_tensor(Image.open(os.path.join(FIX, case["input"])))
    options = Options(upscale=case["upscale"], process_size=case["process_size"],
                      official_sizing=case["sizing"] == "official", color_fix=case["color_fix"],
                      sample_mode=case["sample_mode"], seed=case["seed"], tile_latent=case["tile_latent"],
                      tile_overlap=case["tile_overlap"], vae_tile_encode=case["vae_tile_encode"],
                      vae_tile_decode=case["vae_tile_decode"], vae_tile_mode=case.get("vae_tile_mode", "bounded"))
    return osediff_upscale(model, image, prompt=case["prompt"], options=options)


def min_psnr(case):
    """What each case must reach: measured 79.7-80.3 dB against the official float output ("exact" sizing; the
    fp16 it is stored in rounds it there), which a timestep off by one, ε off by 1 % or the latent scale 0.18
    fail (37.5-41.8, 57.0-61.7 and 49.3-55.2 dB over the 6 cases; 26-63 dB with the 32-channel networks of earlier
    fixtures), as do a bias or time embedding added twice or dropped at one level (21-49 dB). Against the official
    8-bit PNGs PSNR moves with a few flipped roundings (71.7-92.1 dB here over runs, i40x48_x1_nofix equal;
    70.3-88.1 with the 32-channel networks; with the earlier weights one case was 66.6 dB and 3 levels apart when the
    same fixtures were made again in another session), so those cases are held to 60 dB."""
    return 75 if case["sizing"] == "exact" else 60


def levels_off(out, case):
    """Against the official 8-bit PNG: the share of values that land on another level than the official one, and
    the largest distance in levels. Measured: 0–0.03 % and ≤ 3 levels (3 in b24x40_raise), 0.40 % for e40x32_untiled
    in one run (71.7 dB: this case moves with the thread count); with the 32-channel networks of earlier fixtures
    0–0.16 %, ≤ 2 levels, and 0.35 % for e40x32_latent_tiled; 0.99 % against the fixtures of the earlier weights.
    A 10× error in adain's ε (1e-5 → 1e-4) moves 3.3–5.9 % of the values of the adain cases (at 60.4–62.9 dB, which
    the 60 dB PSNR bound lets through). The official PNGs themselves moved by up to 3 levels when made again in
    another session (tests/data/osediff/README.md), so the largest distance is held to 4, one over the measured."""
    ours = (out.clamp(0, 1) * 255).round()
    official = (pil_to_tensor(Image.open(os.path.join(FIX, case["output"]))) * 255).round()
    distance = (ours - official).abs()
    return (distance >= 1).float().mean().item(), int(distance.max())


LEVELS_OFF_CAP = 0.01  # the share of values off by a level an official case may have: 2.5× the largest measured


def expected(case):
    if case["sizing"] == "exact":
        return load_file(os.path.join(FIX, case["tensors"]))["out_float"].float()
    return pil_to_tensor(Image.open(os.path.join(FIX, case["output"])))


def squashed(case):
    """Whether official sizing shrinks this case's LQ to a multiple of 8 (PIL LANCZOS) after the bicubic x upscale."""
    (width, height), up, ps = case["input_size"], case["upscale"], case["process_size"]
    return case["sizing"] == "official" and squashed_by_lanczos(width, height, ps, up)


def test_the_cases_squashed_by_lanczos_are_those_whose_lq_the_fixtures_store():
    """tools/make_osediff_fixtures.py stores the official LQ (``<case>_lq.png``) of the cases the same function
    (tests/osediff_sizing.py) calls squashed, from which they run before Pillow 13."""
    stored = {c["name"] for c in CASES if os.path.exists(os.path.join(FIX, f"{c['name']}_lq.png"))}
    assert {c["name"] for c in CASES if squashed(c)} == stored == {"b24x40_raise", "c21x27_wavelet_sample", "c21x27_x2"}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_official(model, case):
    """A case squashed by LANCZOS runs, before Pillow 13 (which needs Python 3.11), from the LQ that Pillow 13 made
    (stored as ``<case>_lq.png``), at ×1: the fixtures have Pillow 13's LANCZOS, from which older Pillow's differs by
    up to 2 levels (c21x27_x2: 29 dB after the random model), as the official code's output does. From Pillow 13
    on, the stored LQ is checked to be the one the pack makes."""
    if squashed(case):
        stored = f"{case['name']}_lq.png"
        if int(PIL.__version__.split(".")[0]) < 13:
            case = dict(case, input=stored, upscale=1)
        else:
            lq, _ = preprocess(pil_to_tensor(Image.open(os.path.join(FIX, case["input"]))), upscale=case["upscale"],
                               process_size=case["process_size"], official_sizing=True)
            assert torch.equal(lq, pil_to_tensor(Image.open(os.path.join(FIX, stored))))
    out = run_case(model, case)
    ref = expected(case)
    assert tuple(out.shape[-2:]) == (case["output_size"][1], case["output_size"][0])
    assert psnr(out, ref) >= min_psnr(case), f"{case['name']}: {psnr(out, ref):.2f} dB"
    if case["sizing"] == "official":
        share, largest = levels_off(out, case)
        assert share <= LEVELS_OFF_CAP and largest <= 4, (share, largest)


def test_official_sizing_shrinks_with_lanczos_under_any_pillow():
    """The official LQ of a size that is not a multiple of 8 after the ×upscale: PIL bicubic ×upscale, then PIL
    LANCZOS down to a multiple of 8, here against the installed Pillow itself (before Pillow 13, whose LANCZOS the
    fixtures have, the parity cases that cover it run from the LQ that Pillow 13 made)."""
    case = next(c for c in CASES if c["name"] == "c21x27_x2")
    assert squashed(case)
    pil = Image.open(os.path.join(FIX, case["input"])).convert("RGB")
    up = case["upscale"]
    pil = pil.resize((pil.width * up, pil.height * up), Image.BICUBIC)
    pil = pil.resize((pil.width - pil.width % 8, pil.height - pil.height % 8), Image.LANCZOS)
    lq, _ = preprocess(pil_to_tensor(Image.open(os.path.join(FIX, case["input"]))), upscale=up,
                       process_size=case["process_size"], official_sizing=True)
    assert torch.equal(lq, pil_to_tensor(pil))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_matches_official_with_winograd_and_onednn_everywhere(model, every_fast_path):
    """The tiny networks are too narrow for the Winograd rule; with it lifted, every stride-1 3×3 convolution not
    taken as one product runs by F(2×2, 3×3) (LoRA-merged encoder and UNet, decoder), every product by oneDNN's
    matmul, and the float cases still match the official output."""
    exact = [c for c in CASES if c["sizing"] == "exact"]
    assert exact
    with torch.inference_mode():
        for case in exact:
            out = run_case(model, case)
            assert psnr(out, expected(case)) >= min_psnr(case), f"{case['name']}: {psnr(out, expected(case)):.2f} dB"
    assert len(every_fast_path["winograd"]) > 50 and len(every_fast_path["products"]) > 5000


@pytest.mark.parametrize("name", ["a32_adain", "a32_wavelet"])
def test_modes_agree_where_sizes_allow(model, name):
    """No raise and sizes already multiples of 8: --official-sizing gives the exact mode's output but for the
    official code's 8-bit truncations before and after the colour fix, bit for bit (both modes run the same
    operations on the same floats here).

    Against the exact mode's output itself the PSNR is that of the truncations, not of any difference in the
    networks' run: 51.0 dB for a32_adain, 50.9 expected (in levels²: the second truncation's bias ½ squared and
    its variance 1/12, and the first's variance 1/12 times the square of adain's gain, which takes out its bias:
    1.54 / 1.94 / 0.97 on the channels of this draw), 52.0 for a32_wavelet (51.9 expected at gain 1); 51.7 / 52.0
    with the 32-channel networks of earlier fixtures. So the former bound of 50 dB on it sat a draw's gain under
    the truncations, and passed a rounding for the first truncation or both, or the first dropped (51.2, 53.8,
    53.1 dB), each of which this test fails."""
    case = next(c for c in CASES if c["name"] == name)
    official = run_case(model, case)
    unfixed = run_case(model, dict(case, sizing="exact", color_fix="nofix"))
    image = pil_to_tensor(Image.open(os.path.join(FIX, case["input"])))
    lq, _ = preprocess(image, upscale=case["upscale"], process_size=case["process_size"])
    truncated = torch.floor(unfixed * 255) / 255
    fixed = fix_colors(truncated, color_reference(lq, case["color_fix"]), case["color_fix"])
    assert torch.equal(official, torch.floor(fixed * 255) / 255)


def test_latent_is_tiled_only_past_the_area_of_a_tile(model):
    """The official rule tiles the latent where its area passes tile², not where a side passes tile: e40x32's
    20 × 16 latent at 18-latent tiles (a side past 18, but 320 ≤ 18²) runs whole and gives the official untiled
    output (tiled in 16-latent tiles, it is 19.4 dB from it; 18.9 with the 32-channel networks of earlier
    fixtures)."""
    case = next(c for c in CASES if c["name"] == "e40x32_untiled")
    out = run_case(model, dict(case, tile_latent=18, tile_overlap=8))
    assert psnr(out, expected(case)) >= min_psnr(case), f"{psnr(out, expected(case)):.2f} dB"


@pytest.mark.parametrize("name", ["c21x27_exact_sample", "c21x27_x2"])
def test_the_prompt_function_reads_the_upscaled_lq(model, name):
    """``prompt_fn`` (DAPE, in the command) gets the LQ the networks get, before its padding: as the official
    ``get_validation_prompt`` tags the image it has upscaled (and, with official sizing, shrunk). The tiny tagger
    gives the LR input and its ×4 the same tags, so no output shows which one it read."""
    case = next(c for c in CASES if c["name"] == name)
    image = pil_to_tensor(Image.open(os.path.join(FIX, case["input"])))
    read = []
    options = Options(upscale=case["upscale"], process_size=case["process_size"],
                      official_sizing=case["sizing"] == "official", color_fix=case["color_fix"])
    osediff_upscale(model, image, prompt_fn=lambda lq: read.append(lq.clone()) or case["prompt"], options=options)
    lq, _ = preprocess(image, upscale=case["upscale"], process_size=case["process_size"],
                       official_sizing=case["sizing"] == "official")
    assert len(read) == 1 and torch.equal(read[0], lq)


def test_tiled_vae_close_to_untiled(model):
    """Our tiled VAE (margins exchanged, whole-image GroupNorm statistics) against the untiled VAE.

    The official tiled VAE (used with --official-sizing, checked against its fixture above) is far
    less faithful on these random-weight models: its per-tile attention and approximate statistics
    give about 15 dB here.
    """
    case = dict(next(c for c in CASES if c["name"] == "f64x48_untiled"), sizing="exact")
    untiled = run_case(model, case)
    tiled = run_case(model, dict(case, vae_tile_encode=64, vae_tile_decode=8, vae_tile_mode="exact"))
    assert psnr(tiled, untiled) >= 35, f"{psnr(tiled, untiled):.2f} dB"  # measured 118.1 dB


def test_lora_matters(model, tmp_path):
    """The fixture is not blind: without the LoRA the output is far from the official one."""
    ckpt = read_osediff(os.path.join(FIX, "osediff_tiny.pkl"))
    for part in ("state_dict_unet", "state_dict_vae"):
        ckpt[part] = {k: (v * 0 if ".lora_B." in k else v) for k, v in ckpt[part].items()}
    plain = build_osediff(load_sd21(tiny_folder(str(tmp_path))), ckpt)
    case = next(c for c in CASES if c["name"] == "a32_adain")
    assert psnr(run_case(plain, case), expected(case)) < 40


@pytest.mark.parametrize("name", ["a32_adain", "c21x27_exact_sample", "f64x48_vae_tiled"])
def test_command_build_matches_official(tmp_path, name):
    """The model as the ``osediff`` command builds it (the base read into memory, the LoRA merged into the UNet and
    the VAE encoder in place, the decoder reordered to channels-last in its own memory) against the official output."""
    sd = load_sd21(tiny_folder(str(tmp_path)), in_memory=True)
    assert sd.unet_owned and sd.vae_owned
    model = build_osediff(sd, read_osediff(os.path.join(FIX, "osediff_tiny.pkl")), consume=True)
    assert model.unet is sd.unet and model.lq_encoder["encoder"] is sd.vae.encoder
    case = next(c for c in CASES if c["name"] == name)
    out = run_case(model, case)
    assert psnr(out, expected(case)) >= min_psnr(case), f"{name}: {psnr(out, expected(case)):.2f} dB"


def precision_cases():
    """The cases the reduced-precision tests run: untiled, tiled VAE, and latent-tiled with 12-latent tiles. With the
    fixture's 8-latent tiles the tiny UNet's 1×1 level normalised GroupNorm groups of 2 values in the 64-channel
    networks of earlier fixtures (4 now: 128 channels, 32 groups), near the sign of their difference, which fp16
    rounding flips where the two nearly tie: a measure of that draw of weights, not of the precision (fp16 38.5 dB
    there, 43.3 with the earlier weights; 62.0 / 65.1 with 12-latent tiles). With the wider networks the fixture's
    tiles give 65.9 dB in fp16, 12-latent tiles 66.1."""
    named = {c["name"]: c for c in CASES}
    return [named["a32_adain"], named["f64x48_vae_tiled"],
            dict(named["g37x29_exact_latent_tiled"], tile_latent=12, tile_overlap=6)]


@pytest.mark.parametrize("dtype, min_db", [pytest.param(torch.float16, 46, marks=cpu_float16), (torch.bfloat16, 34.5)])
def test_reduced_precision_close_to_float32(model, tmp_path, dtype, min_db):
    """The networks in fp16 (the CUDA default) or bf16 against float32 (``precision_cases``); the output stays float32.
    Measured on these random tiny weights: fp16 50.2 / 52.4 / 65.5 dB (its networks channels-last,
    ``half_channels_last``; contiguous, 16 times slower on the CPU: 50.3 / 52.8 / 66.1), bf16 36.5 / 36.7 / 47.9 dB
    (48.9 / 46.4 / 62.0 and 31.1 / 29.7 / 44.4 with the narrower networks of earlier fixtures, held to 42 and 28 then;
    the bounds keep those margins below the lowest; random weights amplify rounding: bench/precision.py measures the
    full-size networks)."""
    low = build_osediff(load_sd21(tiny_folder(str(tmp_path))), read_osediff(os.path.join(FIX, "osediff_tiny.pkl")))
    low.to(dtype=dtype)
    if dtype == torch.float16:
        half_channels_last(*low.modules())
    assert {p.dtype for m in low.modules() for p in m.parameters()} == {dtype}
    for case in precision_cases():
        name = case["name"]
        reference, out = run_case(model, case), run_case(low, case)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert min_db <= psnr(out, reference) < 80, f"{name}: {psnr(out, reference):.2f} dB"
