"""A device without float64 (Apple's MPS): the pipelines form no float64 tensor on it and stay close to their float64
results. The CPU is taken for such a device (``conftest.cpu_without_float64``)."""

import pytest
import torch

from comfyui_diffsr.dossr_core.model import load_dossr
from comfyui_diffsr.dossr_core.pipeline import Options as DoSSROptions, dossr_upscale
from comfyui_diffsr.osediff_core.pipeline import Options, build_osediff, osediff_upscale
from comfyui_diffsr.osediff_core.weights import read_osediff
from comfyui_diffsr.sr_common.devices import widest_float
from comfyui_diffsr.sr_common.sd21 import load_sd21
from comfyui_diffsr.sr_common.tiling import gaussian_tile_weights

from conftest import DOSSR, DOSSR_CONFIG, OSEDIFF, copy_tiny_sd21, cpu_without_float64, psnr


def test_widest_float_of_each_device():
    assert [widest_float(d) for d in ("cpu", "cuda", "cuda:1", "meta")] == [torch.float64] * 4
    assert [widest_float(torch.device(d)) for d in ("mps", "xpu", "privateuseone")] == [torch.float32] * 3


def test_float32_tile_weights_are_the_float64_ones_rounded():
    weights = gaussian_tile_weights(12, 10)
    assert weights.dtype == torch.float64 and weights[6, 4] == weights.max()
    assert torch.equal(gaussian_tile_weights(12, 10, torch.float32), weights.float())


@pytest.fixture(scope="module")
def osediff(tmp_path_factory):
    sd = load_sd21(copy_tiny_sd21(tmp_path_factory.mktemp("osediff") / "tiny_sd21"))
    return build_osediff(sd, read_osediff(OSEDIFF))


# measured 118–119 dB (exact, bounded) and 82 dB (official: the official sizing's 8-bit output, a few values a
# level off)
OSEDIFF_MIN_DB = {"exact": 100, "bounded": 100, "official": 70}


@pytest.mark.parametrize("mode", OSEDIFF_MIN_DB)
def test_osediff_with_latent_and_vae_tiles_forms_no_float64(osediff, mode):
    """With latent tiles and VAE tiles in each VAE tile mode, on the CPU taken for a device without float64."""
    image = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(0))  # a 16×32 latent
    options = Options(upscale=4, process_size=128, official_sizing=mode == "official", color_fix="adain",
                      tile_latent=16, tile_overlap=8, vae_tile_encode=64, vae_tile_decode=8, vae_tile_mode=mode)
    wide = osediff_upscale(osediff, image, prompt="a cat", options=options)
    with cpu_without_float64(osediff):
        narrow = osediff_upscale(osediff, image, prompt="a cat", options=options)
    assert psnr(narrow, wide) >= OSEDIFF_MIN_DB[mode]


@pytest.fixture(scope="module")
def dossr():
    return load_dossr(DOSSR, config=DOSSR_CONFIG, text_heads=2)  # the tiny OpenCLIP tower has 2 heads


@pytest.mark.parametrize("mode", ["exact", "bounded"])
def test_dossr_with_latent_and_vae_tiles_forms_no_float64(dossr, mode):
    """The sampler with latent tiles and VAE tiles, on the CPU taken for a device without float64."""
    lr = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(0))  # a 16×32 latent
    options = DoSSROptions(steps=2, seed=1, tile_latent=16, tile_overlap=8, vae_tile_encode=64, vae_tile_decode=8,
                           vae_tile_mode=mode)
    wide = dossr_upscale(dossr, lr, options=options)
    with cpu_without_float64(dossr):
        narrow = dossr_upscale(dossr, lr, options=options)
    assert psnr(narrow, wide) >= 110, mode  # measured 131 dB
