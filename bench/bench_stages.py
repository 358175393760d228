"""Where one upscale's time goes, network by network (full-size architectures, random weights, 128→512):

    python bench/bench_stages.py --method osediff --device cuda --dtype fp16 --out bench/results/stages_cuda.json

Forward hooks on each network the pipeline runs (OSEDiff: the LQ encoder, the UNet, the VAE decoder; DoSSR: the
RRDB, the VAE encoder, the ControlNet, the UNet, the VAE decoder) synchronise the device and take the time before
and after each call; ``other_s`` is the rest of the run (resizing, colour fix, copies between host and device,
Python). At 128→512 no network is tiled, so each runs as one call. ``--profile`` also runs one upscale under ``torch.profiler`` and reports the operators
that took the most time and, on a GPU, the time it spent in kernels against the run's wall time (far below it, the
run waits on kernel launches rather than on arithmetic).
"""

import argparse
import os
import time

import torch

from comfyui_diffsr.sr_common.sd21 import PRECISIONS, ieee_float32
from common import environment, summary, write_json
from precision import dossr_runner, osediff_runner

HERE = os.path.dirname(os.path.abspath(__file__))


def networks(model, method):
    """name → the network module the pipeline calls."""
    named = {"lq_encoder": model.lq_encoder["encoder"]} if method == "osediff" else {
        "rrdb": model.rrdb, "vae_encoder": model.cond_encoder["encoder"], "controlnet": model.controlnet}
    return {**named, "unet": model.unet, "vae_decoder": model.vae.decoder}


def timed_stages(modules, run, repeats, sync):
    """Median seconds per network per run, calls per run, and the median whole run (``run()`` ``repeats`` times)."""
    spent, calls, started, wall = {n: [] for n in modules}, {n: 0 for n in modules}, {}, []

    def before(name):
        def hook(*_):
            sync()
            started[name] = time.perf_counter()
        return hook

    def after(name):
        def hook(*_):
            sync()
            spent[name][-1] += time.perf_counter() - started[name]
            calls[name] += 1
        return hook

    handles = [h for name, m in modules.items()
               for h in (m.register_forward_pre_hook(before(name)), m.register_forward_hook(after(name)))]
    try:
        for _ in range(repeats):
            for name in modules:
                spent[name].append(0.0)
            sync()
            start = time.perf_counter()
            run()
            sync()
            wall.append(time.perf_counter() - start)
    finally:
        for h in handles:
            h.remove()
    stages = {name: summary(times)["median_s"] for name, times in spent.items()}
    return {"wall": summary(wall), "stages_s": stages, "other_s": summary(wall)["median_s"] - sum(stages.values()),
            "calls_per_run": {name: n / repeats for name, n in calls.items()}}


def kernel_profile(run, device, rows=15):
    """One ``run()`` under torch.profiler: the device's kernel time against the wall time, and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    device_us = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
    events = prof.key_averages()
    top = sorted(events, key=device_us if device.type == "cuda" else (lambda e: e.self_cpu_time_total),
                 reverse=True)[:rows]
    result = {"wall_s": wall, "top": [{"op": e.key, "calls": e.count, "device_ms": device_us(e) / 1e3,
                                       "cpu_ms": e.self_cpu_time_total / 1e3} for e in top]}
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # not the ops around them
        result["kernel_s"] = sum(device_us(e) for e in kernels) / 1e6
        result["launches"] = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["osediff", "dossr"], nargs="+", default=["osediff", "dossr"])
    p.add_argument("--size", type=int, default=128, help="LQ size (output ×4)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(PRECISIONS), default="fp16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--profile", action="store_true", help="also the kernel time and top operators of one run")
    p.add_argument("--out", default=os.path.join(HERE, "results", "stages.json"))
    args = p.parse_args()
    device, dtype = torch.device(args.device), PRECISIONS[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = {"bench": "stages", **environment(device, dtype), "case": f"{args.size}->{args.size * 4}"}
    for method in args.method:
        result[method] = method_stages(method, args, device, dtype, sync)
        if device.type == "cuda":  # the method's networks were freed on return
            torch.cuda.empty_cache()
    write_json(result, args.out)


def method_stages(method, args, device, dtype, sync):
    """``timed_stages`` of one method's upscale at ``args.size`` (and its ``kernel_profile`` with ``--profile``)."""
    model, upscale = (osediff_runner if method == "osediff" else dossr_runner)(args.size)
    model.to(device, dtype)
    run = lambda: upscale(model)
    with torch.inference_mode():
        run()  # warm-up: kernels chosen, the prompt encoded and cached
        stages = timed_stages(networks(model, method), run, args.repeats, sync)
        if args.profile:
            stages["profile"] = kernel_profile(run, device)
    return stages


if __name__ == "__main__":
    with ieee_float32():  # float32 as the commands and nodes compute it on a GPU
        main()
