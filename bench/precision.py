"""Each reduced-precision path against our float32 output (issue target on the GPU: ≥ 40 dB PSNR), with full-size
architectures and random weights, 128→512.

    python bench/precision.py --device cuda --out bench/results/precision_cuda.json
    python bench/precision.py --device cpu --dtypes bf16 --methods osediff --out bench/results/precision_cpu.json

One float32 model per method is built on the CPU and kept there. Its float32 output on ``--device`` is the
reference (``fp32_s``: that first, cold run), and each ``--dtypes`` entry runs on a copy cast to that dtype, with
``+compile`` also ``torch.compile``d (``seconds``: after one warm-up run, which compiles; bench_osediff.py and
bench_dossr.py give the latency figures). Random weights amplify rounding (the tiny OSEDiff's output with its
networks in fp16 is 50–66 dB from its float32 one on the CPU, in bf16 36–48 dB, over the three cases of
test_reduced_precision_close_to_float32 in tests/test_osediff_parity.py), so trained weights should do better than
these figures.
"""

import argparse
import copy
import os
import time

import torch

from bench_dossr import lr_image, random_dossr
from comfyui_diffsr.sr_common.sd21 import PRECISIONS, ieee_float32
from common import environment, psnr_db, random_osediff, write_json

HERE = os.path.dirname(os.path.abspath(__file__))


def osediff_runner(size):
    from comfyui_diffsr.osediff_core.pipeline import osediff_upscale

    model = random_osediff()
    image = lr_image(size)
    return model, lambda m: osediff_upscale(m, image, prompt="")


def dossr_runner(size):
    from comfyui_diffsr.dossr_core.pipeline import Options, dossr_upscale

    model, _ = random_dossr()
    image = lr_image(size)
    embeds = torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(1))
    return model, lambda m: dossr_upscale(m, image, prompt_embeds=embeds, options=Options(steps=5, seed=0))


def timed_output(run, model, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = run(model)
    sync()
    return out.float().cpu(), time.perf_counter() - start


def measure(method, size, device, dtypes):
    """{"fp32_s": ..., dtype: {"psnr_db", "seconds", "finite"}, ...} for one method."""
    master, run = {"osediff": osediff_runner, "dossr": dossr_runner}[method](size)
    on_device = master if device.type == "cpu" else copy.deepcopy(master).to(device, torch.float32)
    reference, seconds = timed_output(run, on_device, device)
    del on_device
    result = {"case": f"{size}->{size * 4}", "fp32_s": seconds}
    for name in dtypes:
        dtype, _, compiled = name.partition("+")
        low = copy.deepcopy(master).to(device, PRECISIONS[dtype])
        if compiled:
            torch._dynamo.reset()  # a fresh cache for each copy (their forwards share code objects)
            low.compile()
        timed_output(run, low, device)  # warm-up (kernel selection; compilation)
        out, seconds = timed_output(run, low, device)
        del low
        result[name] = {"psnr_db": psnr_db(reference, out), "seconds": seconds, "finite": bool(torch.isfinite(out).all())}
        print(method, name, result[name], flush=True)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", choices=["fp16", "bf16", "fp32+compile", "fp16+compile", "bf16+compile"],
                   default=["fp16", "bf16"], help="+compile: model.compile() (torch.compile of the diffusion networks)")
    p.add_argument("--methods", nargs="+", choices=["osediff", "dossr"], default=["osediff", "dossr"])
    p.add_argument("--size", type=int, default=128, help="LQ size (output ×4)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "precision.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    result = {"bench": "precision", **environment(device, torch.float32),
              **{m: measure(m, args.size, device, args.dtypes) for m in args.methods}}
    write_json(result, args.out)


if __name__ == "__main__":
    with ieee_float32():  # float32 as the commands and nodes compute it on a GPU
        main()
