"""OSEDiff load time against the time to read its files from disk (issue target: load ≤ 2 × read).

    python bench/bench_load.py --base v2-1_512-ema-pruned.safetensors --weights osediff.pkl \
        --out bench/results/load_cpu.json

Each measurement runs in a fresh process after the page cache is dropped: the whole cache where permitted (root:
``/proc/sys/vm/drop_caches``), else that of the two files (``posix_fadvise``; the JSON says which). Dropping only the
two files leaves other cached files in memory, and the load (which allocates 5–8 GB where the read allocates nothing)
then waits for the kernel to reclaim them: on this 24 GB VM with 5 GB of another model cached, the fp16 load took
11–13 s against 3.9 s with free memory. ``page_cache`` in the JSON: ``all``, ``files`` or ``kept`` (not permitted).
- ``read_s``: reading every byte of both files;
- ``import_s``: importing torch, diffusers and transformers, with the model classes diffusers imports lazily on
  first use (0.4 s on this VM, counted in ``load_s`` before 2026-12-02), not part of the load;
- ``load_s``: ``load_sd21(in_memory=True)`` + ``read_osediff`` + ``build_osediff(consume=True)``, as the ``osediff``
  command does (a single file read into memory, the LoRA merged into its UNet and VAE encoder in place; the ComfyUI
  loader maps the file and merges into new tensors, so its SD 2.1-base stays usable, uncopied), ready to run;
- ``touch_s``: in a fresh process, the first write of as much new memory as the loaded model's float32 weights
  (the floor of any load that must produce them; on this VM the cost of new memory varied 1.2–6.3 s for 5.2 GB
  from one run to the next, which moves ``load_s`` with it);
- ``reload_s``: the same loader call again in that process through a per-file cache (the ComfyUI nodes'
  ``nodes.host.cached`` semantics: one instance per file while in use), which must not reload anything.
"""

import argparse
import json
import os
import sys
import time

from common import child_result, environment, rss_peak_mb, write_json


def drop_page_cache(paths, everything=True):
    """Evict the page cache: all of it where permitted and ``everything``, else the files. Returns what was
    dropped: 'all', 'files' or 'kept' (not permitted)."""
    if everything:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "all"
        except OSError:
            pass
    try:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "files"
    except OSError:
        return "kept"


def read_all(paths):
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass
    return time.perf_counter() - start


def touch_case(nbytes):
    """Seconds to first write ``nbytes`` of new memory, as the loader gets it (``fresh_float32_cpu``)."""
    from comfyui_diffsr.sr_common.weights import fresh_float32_cpu

    buffer = fresh_float32_cpu(nbytes // 4)
    start = time.perf_counter()
    buffer.fill_(0)
    return {"touch_s": time.perf_counter() - start}


def load_case(base, weights):
    start = time.perf_counter()
    import torch
    import diffusers.loaders.single_file_utils  # noqa: F401  (imported by the loader)
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401  (diffusers imports them lazily)
    from transformers import CLIPTextModel  # noqa: F401

    from comfyui_diffsr.osediff_core.pipeline import build_osediff
    from comfyui_diffsr.osediff_core.weights import read_osediff
    from comfyui_diffsr.sr_common.sd21 import load_sd21

    import_s = time.perf_counter() - start
    cache = {}

    def loader():
        if weights not in cache:
            cache[weights] = build_osediff(load_sd21(base, in_memory=True), read_osediff(weights), consume=True)
        return cache[weights]

    start = time.perf_counter()
    model = loader()
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    again = loader()
    reload_s = time.perf_counter() - start
    assert again is model
    unique = {id(p): p for m in model.modules() for p in m.parameters()}  # OSEDiffModel.modules(): its networks,
    params = sum(p.numel() for p in unique.values())  # which share the VAE encoder when merged in place
    return {"import_s": import_s, "load_s": load_s, "reload_s": reload_s, "params": params,
            "float32_bytes": params * 4,
            "peak_rss_mb": rss_peak_mb(), "torch_threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="SD 2.1-base single file or diffusers folder")
    p.add_argument("--weights", required=True, help="osediff.pkl")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--keep-other-cache", action="store_true",
                   help="drop only the two files from the page cache (the load then competes with other cached files)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "load.json"))
    p.add_argument("--_case", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_touch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._case or args._touch is not None:
        print(json.dumps(load_case(args.base, args.weights) if args._case else touch_case(args._touch)))
        return
    files = [args.weights] + ([args.base] if os.path.isfile(args.base) else
                              [os.path.join(r, f) for r, _, fs in os.walk(args.base) for f in fs])
    def case(*flags):
        return child_result([sys.executable, __file__, "--base", args.base, "--weights", args.weights, *flags])

    reads, loads, touches, dropped = [], [], [], set()
    for _ in range(args.repeats):
        dropped.add(drop_page_cache(files, not args.keep_other_cache))
        reads.append(read_all(files))
        dropped.add(drop_page_cache(files, not args.keep_other_cache))
        loads.append(case("--_case"))
        dropped.add(drop_page_cache(files, not args.keep_other_cache))
        touches.append(case("--_touch", str(loads[-1]["float32_bytes"]))["touch_s"])
    import torch

    result = {"method": "osediff_load", **environment(torch.device("cpu"), torch.float32),
              "bytes": sum(os.path.getsize(f) for f in files), "page_cache": "/".join(sorted(dropped)),
              "read_s": min(reads), "load_s": min(x["load_s"] for x in loads),
              "reload_s": max(x["reload_s"] for x in loads), "touch_s": touches, "runs": loads}
    result["load_over_read"] = result["load_s"] / result["read_s"]
    result["load_over_read_plus_touch"] = result["load_s"] / (result["read_s"] + min(touches))
    write_json(result, args.out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
