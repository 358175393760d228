"""Benchmark helpers: full-size SD 2.1-base built from the shipped configs with random weights."""

import asyncio
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch

from interleave import peak_rss_mb, percentiles

summary = percentiles  # one home: the interleaved results have the same fields
rss_peak_mb = peak_rss_mb  # peak RSS of this process (MiB), as the interleaved workers report it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the CLI does (cli/common.py run_main)


def official_env(checkout, thp=False):
    """The environment the official code runs in: its checkout importable; as it ships (PyTorch's default
    allocator), or with the transparent huge pages our commands use when ``thp`` (a like-for-like run)."""
    env = dict(os.environ, PYTHONPATH=checkout)
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    if thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    return env


def import_pack_as_comfyui():
    """The pack as ComfyUI imports it (a checkout of ComfyUI on PYTHONPATH): from its folder, under a name of the
    host's choosing, its entry point awaited."""
    spec = importlib.util.spec_from_file_location("diffsr_pack_under_test", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    asyncio.run(module.comfy_entrypoint())
    return module


def fixture_weights():
    """The module tests/fixture_weights.py (random-weight checkpoints), loaded from its file: tests/ is not a
    package."""
    spec = importlib.util.spec_from_file_location("fixture_weights", os.path.join(ROOT, "tests", "fixture_weights.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cached_random_weights(name, build, build_empty):
    """``build()``'s module (random weights), kept as ``$DIFFSR_BENCH_CACHE/<name>.safetensors`` with torch's global
    generator state after the build: a later call builds ``build_empty()`` (meta device, no initialisation) and fills
    it from that file, read into this process's own memory as ``load_single_file(in_memory=True)`` reads, with the
    same values bit for bit and the generator left where the build left it. DIFFSR_BENCH_CACHE unset: ``build()``."""
    from comfyui_diffsr.sr_common.weights import load_module_weights, read_state_dict, write_safetensors

    folder = os.environ.get("DIFFSR_BENCH_CACHE")
    if not folder:
        return build()
    path = os.path.join(folder, f"{name}.safetensors")
    if os.path.isfile(path):
        state = read_state_dict(path, mmap=False)
        rng_state = state.pop("torch_rng_state").clone()  # a tensor of its own (a view of the buffer crashes it)
        module = build_empty()
        load_module_weights(module, state, name, path)
        torch.set_rng_state(rng_state)
        return module
    module = build()
    write_safetensors({**module.state_dict(), "torch_rng_state": torch.get_rng_state()}, path, replace=True)
    return module


def random_sd21(seed=0):
    """SD 2.1-base architecture from the pack's configs, random weights (no download), owned by this process as a
    file the ``osediff`` command reads is (the LoRA merged in place, the decoder reordered in place); built once
    per DIFFSR_BENCH_CACHE (``cached_random_weights``)."""
    from comfyui_diffsr.sr_common.sd21 import SD21, models_from_config, load_tokenizer, shipped_config_dir

    def build(random_init=True):
        if random_init:
            torch.manual_seed(seed)
        return torch.nn.ModuleDict(zip(("unet", "vae", "text_encoder"),
                                       models_from_config(shipped_config_dir(), random_init=random_init)))

    parts = cached_random_weights(f"sd21_random_seed{seed}", build, lambda: build(random_init=False))
    return SD21(parts["unet"].eval(), parts["vae"].eval(), parts["text_encoder"].eval(),
                load_tokenizer(os.path.join(shipped_config_dir(), "tokenizer")),
                unet_owned=True, vae_owned=True)


def random_osediff(seed=0):
    """OSEDiff on ``random_sd21`` with a random official-layout checkpoint (LoRA A and B random), the SD 2.1 parts
    handed over (the LoRA merged in place)."""
    from comfyui_diffsr.osediff_core.pipeline import build_osediff

    sd = random_sd21(seed)
    return build_osediff(sd, fixture_weights().random_osediff_checkpoint(sd.unet, sd.vae), consume=True)


def timed(fn, repeats, sync=None, warmup=1):
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; seconds per run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return times


def compiled_first_run(model, run, sync=None):
    """``model.compile()``, then seconds of the first ``run()`` (compilation included), under inference mode."""
    model.compile()
    with torch.inference_mode():
        return timed(run, 1, sync, warmup=0)[0]


def psnr_db(a, b, peak=1.0):
    """10·log10(peak² / MSE) in float64 on the CPU; inf for equal tensors."""
    mse = torch.mean((a.double().cpu() - b.double().cpu()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def environment(device, dtype):
    return {"device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda" else
            platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def child_result(cmd, **kwargs):
    """The JSON a benchmark's child process prints last (``subprocess.run`` keyword arguments pass through); its
    stderr is this process's, so a child that fails shows its own traceback."""
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, **kwargs)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_json(result, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
