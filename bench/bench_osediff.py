"""OSEDiff end-to-end latency and peak memory, full-size SD 2.1-base architecture with random weights.

    python bench/bench_osediff.py --sizes 128 512 --device cpu --dtype fp32 --out bench/results/osediff_cpu.json
    python bench/bench_osediff.py --sizes 128 --compare-official /path/to/OSEDiff --official-python /venv/bin/python

Each size runs in a fresh process so the peak memory is per case. ``--compare-official`` saves the
same random weights as a diffusers folder + ``osediff.pkl``, times the official ``OSEDiff_test``
forward from a local checkout (its own venv) on the same input, and reports the ratio. Both stay
loaded and take turns run by run (bench/interleave.py); ``--sequential`` runs one after the other
instead, for sizes where the two do not fit in memory together.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch

import interleave
from comfyui_diffsr.osediff_core.pipeline import Options
from comfyui_diffsr.sr_common.sd21 import ieee_float32
from common import (child_result, compiled_first_run, environment, fixture_weights, official_env, random_osediff,
                    random_sd21, rss_peak_mb, summary, timed, write_json)

HERE = os.path.dirname(os.path.abspath(__file__))


def run_case(size, repeats, device, dtype, tile_batch, warmup=1, serve=False, vae_tiles=None, compile=False):
    from comfyui_diffsr.osediff_core.pipeline import Options, osediff_upscale
    from comfyui_diffsr.sr_common.sd21 import move_module

    model = random_osediff().to(device, dtype)
    embeds = model.prompt_embedding("")  # as the osediff command: the one prompt encoded once, then the text
    move_module(model.text_encoder, "cpu")  # encoder leaves the device
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    options = Options(upscale=4, tile_batch=tile_batch, **(vae_tiles or {}))
    upscale = lambda: osediff_upscale(model, image, prompt_embeds=embeds, options=options)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    first_run_s = compiled_first_run(model, upscale, sync) if compile else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if serve:
        with torch.inference_mode():
            interleave.serve(upscale, sync)
        return None
    with torch.inference_mode():
        times = timed(upscale, repeats, sync, warmup)
    result = {"case": f"{size}->{size * 4}", **(vae_tiles or {}), **summary(times), "peak_rss_mb": rss_peak_mb(),
              "compile": compile, "first_run_s": first_run_s}
    if device.type == "cuda":
        result.update(interleave.cuda_peaks())
    return result


def save_text_encoder(text_encoder, folder):
    """``save_pretrained``, with the ``text_model.`` key prefix that published SD 2.1 folders have: transformers >= 5
    saves CLIPTextModel without it, and the official code's transformers 4 would then leave its text encoder random."""
    from safetensors.torch import load_file, save_file

    text_encoder.save_pretrained(folder)
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}, path,
              metadata={"format": "pt"})


def save_for_official(folder):
    """The random weights the official code will load: diffusers folder + osediff.pkl."""
    from comfyui_diffsr.sr_common.sd21 import shipped_config_dir

    sd = random_sd21()
    base = os.path.join(folder, "sd21")
    sd.unet.save_pretrained(os.path.join(base, "unet"))
    sd.vae.save_pretrained(os.path.join(base, "vae"))
    save_text_encoder(sd.text_encoder, os.path.join(base, "text_encoder"))
    shutil.copytree(os.path.join(shipped_config_dir(), "tokenizer"), os.path.join(base, "tokenizer"))
    os.makedirs(os.path.join(base, "scheduler"), exist_ok=True)
    with open(os.path.join(shipped_config_dir(), "scheduler", "scheduler_config.json")) as f:
        sched = f.read()
    with open(os.path.join(base, "scheduler", "scheduler_config.json"), "w") as f:
        f.write(sched)
    torch.save(fixture_weights().random_osediff_checkpoint(sd.unet, sd.vae), os.path.join(folder, "osediff.pkl"))
    return base, os.path.join(folder, "osediff.pkl")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512], help="LQ sizes (output ×4)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (0 for the large cases)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--tile-batch", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="model.compile() (torch.compile of the UNet); the first "
                   "run, compilation included, is reported as first_run_s")
    p.add_argument("--vae-tile-encode", type=int, default=Options.vae_tile_encode, help="image px (0 = off)")
    p.add_argument("--vae-tile-decode", type=int, default=Options.vae_tile_decode, help="latent px (0 = off)")
    p.add_argument("--vae-tile-mode", choices=["bounded", "exact"], default=Options.vae_tile_mode)
    p.add_argument("--compare-official", default=None, help="local checkout of cswry/OSEDiff")
    p.add_argument("--official-python", default=sys.executable, help="python of the official code's venv")
    p.add_argument("--official-thp", action="store_true",
                   help="give the official code the transparent huge pages our commands use (like-for-like); "
                        "default: the official code as it ships")
    p.add_argument("--sequential", action="store_true",
                   help="with --compare-official: ours, then the official (one process at a time; for the sizes "
                        "where both models do not fit in memory together). Default: interleaved run by run")
    p.add_argument("--out", default=os.path.join(HERE, "results", "osediff.json"))
    p.add_argument("--_case", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    from comfyui_diffsr.sr_common.sd21 import PRECISIONS

    dtype = PRECISIONS[args.dtype]
    device = torch.device(args.device)
    if args._case is not None:
        vae_tiles = {"vae_tile_encode": args.vae_tile_encode, "vae_tile_decode": args.vae_tile_decode,
                     "vae_tile_mode": args.vae_tile_mode}
        result = run_case(args._case, args.repeats, device, dtype, args.tile_batch, args.warmup, args._serve, vae_tiles,
                          args.compile)
        if result is not None:
            print(json.dumps(result))
        return
    ours_cmd = lambda size: [sys.executable, __file__, "--_case", str(size), "--repeats", str(args.repeats),
                             "--device", args.device, "--dtype", args.dtype, "--tile-batch", str(args.tile_batch),
                             "--warmup", str(args.warmup), "--vae-tile-encode", str(args.vae_tile_encode),
                             "--vae-tile-decode", str(args.vae_tile_decode), "--vae-tile-mode", args.vae_tile_mode,
                             *(["--compile"] if args.compile else [])]
    result = {"method": "osediff", **environment(device, dtype)}
    if args.compare_official and not args.sequential:
        result["cases"], result["official"] = compare_interleaved(args, ours_cmd)
    else:
        result["cases"] = [child_result(ours_cmd(size)) for size in args.sizes]
        write_json(result, args.out)  # ours is kept even if the official side fails
        if args.compare_official:
            result["official"] = compare_sequential(args)
    if args.compare_official:
        result["official_thp"] = args.official_thp
        result["ratio_ours_to_official"] = {c["case"]: c["median_s"] / o["median_s"]
                                            for c, o in zip(result["cases"], result["official"])}
        result["load_avg_1_5_15min_after"] = os.getloadavg()
    write_json(result, args.out)


def official_cmd(args, base, pkl, size):
    return [args.official_python, os.path.join(HERE, "official_osediff.py"), "--upstream", args.compare_official,
            "--base", base, "--weights", pkl, "--size", str(size), "--repeats", str(args.repeats), "--warmup",
            str(args.warmup), "--device", args.device, "--dtype", args.dtype]


def compare_interleaved(args, ours_cmd):
    """Both loaded at once, runs taken in turn (bench/interleave.py); per size: ours, official."""
    cases, official = [], []
    with tempfile.TemporaryDirectory() as tmp:
        base, pkl = save_for_official(tmp)
        env = official_env(args.compare_official, args.official_thp)
        for size in args.sizes:
            workers = [interleave.Worker("ours", ours_cmd(size) + ["--_serve"]),
                       interleave.Worker("official", official_cmd(args, base, pkl, size) + ["--serve"], env=env)]
            timed_runs = interleave.interleaved(workers, args.repeats, args.warmup)
            for name, out in (("ours", cases), ("official", official)):
                out.append({"case": f"{size}->{size * 4}", "interleaved": True, **timed_runs[name]})
    return cases, official


def compare_sequential(args):
    official = []
    with tempfile.TemporaryDirectory() as tmp:
        base, pkl = save_for_official(tmp)
        env = official_env(args.compare_official, args.official_thp)
        for size in args.sizes:
            official.append(child_result(official_cmd(args, base, pkl, size), env=env))
    return official


if __name__ == "__main__":
    with ieee_float32():  # float32 as the commands and nodes compute it on a GPU
        main()
