"""Memory soak: 20 OSEDiff upscales through the library and 20 node executes in one process must not grow
the resident set beyond noise (RSS read from /proc/self/statm after a warm-up)."""

import gc
import os

import pytest
import torch

from comfyui_diffsr.osediff_core.pipeline import Options, osediff_upscale

from test_bad_images import osediff_model, pack, tiny_folder, upscale_node  # noqa: F401 (fixtures)

RUNS = 20
NOISE_MB = 30
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm")


def rss_mb():
    gc.collect()
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(run, label):
    for seed in range(3):  # warm-up: allocator pools, oneDNN primitives, prompt cache
        run(seed)
    start = rss_mb()
    for seed in range(RUNS):
        run(seed)
    end = rss_mb()
    print(f"\nsoak {label}: RSS {start:.1f} MB after warm-up, {end:.1f} MB after {RUNS} runs "
          f"(growth {end - start:+.1f} MB)")
    assert end - start < NOISE_MB, f"{label}: RSS grew by {end - start:.1f} MB over {RUNS} runs"


def test_library_upscales_do_not_grow_memory(osediff_model):  # noqa: F811
    options = Options(process_size=64)

    def run(seed):
        image = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(seed))
        out = osediff_upscale(osediff_model, image, options=options)
        assert out.shape == (1, 3, 80, 96)

    soak(run, "osediff_upscale")


def test_node_executes_do_not_grow_memory(pack):  # noqa: F811
    def run(seed):
        image = torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(seed))
        assert upscale_node(pack, image).shape == (1, 80, 96, 3)

    soak(run, "OSEDiff_Upscale node")
