"""Process memory of the OSEDiff nodes in the real ComfyUI as the `dtype` widget changes between runs.

Runs in the ComfyUI venv with a ComfyUI checkout (never committed) on PYTHONPATH, on a full SD 2.1-base file and an
OSEDiff weight file, on the device ComfyUI picks (``--cpu``: the CPU):

    PYTHONPATH=$COMFYUI_DIR $COMFY_VENV/bin/python bench/bench_node_memory.py \
        --ckpt v2-1_512-ema-pruned.safetensors --osediff osediff.pkl [--dtypes fp32,bf16,fp32,bf16] [--out F.json]

Loads the base and OSEDiff as the loader nodes do, then runs OSEDiff Upscale (64→256 px) once per entry of
``--dtypes``; after each run it records the resident memory of the process (all, its own, mapped files' pages),
the bytes of float32 weights kept aside for exact casts (``nodes.host``), the device memory in use and the output's
distance to the first run.
"""

import argparse
import importlib
import time

import torch

from common import environment, import_pack_as_comfyui, psnr_db, rss_peak_mb, write_json

GIB = 1024 ** 3


def memory_gib():
    """Resident memory of this process: all, its own (anonymous) and mapped files' pages (reclaimable), GiB."""
    names = {"VmRSS": "resident_gib", "RssAnon": "anon_gib", "RssFile": "file_gib"}
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {name: int(fields[key].split()[0]) / 2**20 for key, name in names.items()}


def kept_aside_gib(host):
    return sum(t.numel() * t.element_size() for entries in list(host._exact.values()) for t in entries.values()
               if torch.is_tensor(t)) / GIB


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--osediff", required=True)
    parser.add_argument("--dtypes", default="fp32,bf16,fp32,bf16")
    parser.add_argument("--size", type=int, default=64, help="input side (×4 output)")
    parser.add_argument("--cpu", action="store_true", help="ComfyUI's --cpu")
    parser.add_argument("--out")
    args = parser.parse_args()

    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = args.cpu
    import comfy.model_management as mm

    pack = import_pack_as_comfyui().__name__
    host, sd21_mod, nodes = (importlib.import_module(f"{pack}.{name}") for name in (
        "nodes.host", "sr_common.sd21", "nodes.osediff"))
    device = mm.get_torch_device()
    steps = [{"step": "start", **memory_gib()}]
    start = time.perf_counter()
    sd21 = sd21_mod.load_sd21(args.ckpt)
    steps.append({"step": "SD 2.1-base loaded", **memory_gib(), "s": time.perf_counter() - start})
    start = time.perf_counter()
    model = nodes.load_osediff(sd21, args.osediff)
    steps.append({"step": "OSEDiff loaded", **memory_gib(), "s": time.perf_counter() - start})
    image = torch.rand(1, args.size, args.size, 3, generator=torch.Generator().manual_seed(0))
    first = None
    for dtype in args.dtypes.split(","):
        start = time.perf_counter()
        with torch.inference_mode():
            (out,) = nodes.OSEDiffUpscale.execute(model=model, image=image, prompt="", upscale=4.0,
                                                  process_size=4 * args.size, color_fix="adain", tile_latent=96,
                                                  tile_overlap=32, dtype=dtype).args
        first = out if first is None else first
        steps.append({"step": f"OSEDiff Upscale {dtype}", "s": time.perf_counter() - start,
                      **memory_gib(), "kept_aside_gib": kept_aside_gib(host),
                      "device_allocated_gib": torch.cuda.memory_allocated() / GIB if device.type == "cuda" else 0.0,
                      "psnr_to_first_db": psnr_db(out, first)})
        print(steps[-1], flush=True)
    result = {"bench": "node_memory", "environment": environment(device, torch.float32), "size": args.size,
              "steps": steps, "peak_resident_gib": rss_peak_mb() / 1024}
    if args.out:
        write_json(result, args.out)
    else:
        print(result)


if __name__ == "__main__":
    main()
