"""DoSSR end-to-end latency and peak memory, full-size architecture with random weights (no download).

    python bench/bench_dossr.py --sizes 128 --repeats 1 --device cpu --dtype fp32 --out bench/results/dossr_cpu.json

Full size = SD 2.1-base UNet/VAE from the shipped configs + DoSSR ControlNet (cldm_v21.yaml, 8-channel
input conv split, 13 zero convs) + condition encoder (the VAE encoder, as in the official weights) + RRDBNet ×4
with 23 blocks. The prompt embedding is a fixed random (1, 77, 1024) tensor (the text encoder runs once per
prompt and is cached in real use). Each size runs in a fresh process so the peak RSS is per case; the warm-up run is
included in the process (peak RSS covers it), the timing covers ``repeats`` runs after it.
"""

import argparse
import json
import os
import subprocess
import sys

import torch

import interleave
from comfyui_diffsr.sr_common.sd21 import ieee_float32
from common import (cached_random_weights, child_result, compiled_first_run, environment, official_env, random_sd21,
                    rss_peak_mb, summary, timed, write_json)

HERE = os.path.dirname(os.path.abspath(__file__))


def random_dossr(seed=0):
    """DoSSR on ``random_sd21(seed)`` with a random ControlNet and RRDB (built once per DIFFSR_BENCH_CACHE), the
    condition encoder the VAE's own encoder; and the parameter count without the text encoder."""
    from comfyui_diffsr.dossr_core.model import DoSSRModel
    from comfyui_diffsr.dossr_core.rrdb import RRDBNet
    from comfyui_diffsr.dossr_core.weights import load_ldm_configs
    from diffusers import ControlNetModel

    sd = random_sd21(seed)
    _, controlnet_config, _ = load_ldm_configs()

    def build(device="cpu"):  # torch's generator as random_sd21 left it: the values of every earlier version
        with torch.device(device):
            controlnet = ControlNetModel(**controlnet_config, conditioning_embedding_out_channels=(16,))
            width = controlnet_config["block_out_channels"][0]
            controlnet.conv_in = torch.nn.Conv2d(controlnet_config["in_channels"], width, 3, padding=1)
            controlnet.controlnet_cond_embedding = torch.nn.Conv2d(4, width, 3, padding=1, bias=False)
            rrdb = RRDBNet(num_block=23)
        if device == "cpu":  # random RRDB weights blow up over 23 blocks; scale them so the image stays in range
            with torch.no_grad():
                for p in rrdb.parameters():
                    p.mul_(0.1)
        return torch.nn.ModuleDict({"controlnet": controlnet, "rrdb": rrdb})

    parts = cached_random_weights(f"dossr_random_parts_seed{seed}", build, lambda: build("meta"))
    controlnet, rrdb = parts["controlnet"], parts["rrdb"]
    # the official condition encoder is a frozen copy of the VAE encoder; load_dossr shares the VAE's own
    cond_encoder = torch.nn.ModuleDict({"encoder": sd.vae.encoder, "quant_conv": sd.vae.quant_conv})
    params = sum(p.numel() for m in (sd.unet, controlnet, sd.vae, rrdb) for p in m.parameters())
    model = DoSSRModel(sd.unet, controlnet.eval(), sd.vae, cond_encoder.eval(), rrdb.eval())
    return model, params


def lr_image(size):
    """The seeded 8-bit LR test image both sides use."""
    return (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255).round() / 255


def run_case(size, repeats, steps, device, dtype, weights=None, serve=False, compile=False):
    from comfyui_diffsr.dossr_core.model import load_dossr
    from comfyui_diffsr.dossr_core.pipeline import Options, dossr_upscale

    if weights:  # the official-layout checkpoint the official side saved: identical weights, text encoder included
        model = load_dossr(weights)
        unique = {id(p): p for m in model.modules() if m is not model.text_encoder for p in m.parameters()}
        params = sum(p.numel() for p in unique.values())
        embeds = None
    else:
        model, params = random_dossr()
        embeds = torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(1))
    model.to(device, dtype)
    image = lr_image(size)
    options = Options(steps=steps)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    first_run_s = compiled_first_run(model, lambda: dossr_upscale(model, image, prompt_embeds=embeds, options=options),
                                     sync) if compile else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if serve:
        with torch.inference_mode():
            interleave.serve(lambda: dossr_upscale(model, image, prompt_embeds=embeds, options=options), sync)
        return None
    with torch.inference_mode():
        times = timed(lambda: dossr_upscale(model, image, prompt_embeds=embeds, options=options), repeats, sync)
    result = {"case": f"{size}->{size * 4}", "steps": steps, "params_without_text_encoder": params,
              **summary(times), "peak_rss_mb": rss_peak_mb(), "compile": compile, "first_run_s": first_run_s}
    if device.type == "cuda":
        result.update(interleave.cuda_peaks())
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128], help="LR sizes (output ×4)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="model.compile() (torch.compile of the ControlNet and "
                   "UNet); the first run, compilation included, is reported as first_run_s")
    p.add_argument("--out", default=os.path.join(HERE, "results", "dossr_cpu.json"))
    p.add_argument("--compare-official", default=None, help="local checkout of AMD-AIG-AIMA/DoSSR (128 px only)")
    p.add_argument("--official-python", default=sys.executable, help="python of the official code's venv")
    p.add_argument("--official-thp", action="store_true",
                   help="give the official code the transparent huge pages our commands use (like-for-like); "
                        "default: the official code as it ships")
    p.add_argument("--_case", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--sequential", action="store_true",
                   help="with --compare-official: the official, then ours (one process at a time). Default: both "
                        "loaded, interleaved run by run (bench/interleave.py)")
    p.add_argument("--_weights", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    from comfyui_diffsr.sr_common.sd21 import PRECISIONS

    dtype = PRECISIONS[args.dtype]
    device = torch.device(args.device)
    if args._case is not None:
        result = run_case(args._case, args.repeats, args.steps, device, dtype, args._weights, args._serve, args.compile)
        if result is not None:
            print(json.dumps(result))
        return
    if args.compare_official:
        compare_official(args, device, dtype)
        return
    cases = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--_case", str(size), "--repeats", str(args.repeats), "--steps",
               str(args.steps), "--device", args.device, "--dtype", args.dtype, *(["--compile"] if args.compile else [])]
        cases.append(child_result(cmd))
    write_json({"method": "dossr", **environment(device, dtype), "cases": cases}, args.out)


def compare_official(args, device, dtype):
    """The official code builds and saves the random weights; both sides then run on that .ckpt and LR image,
    interleaved run by run (or one after the other with --sequential)."""
    import tempfile

    from PIL import Image

    from comfyui_diffsr.sr_common.image import tensor_to_uint8

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        lr = os.path.join(tmp, "lr.png")
        Image.fromarray(tensor_to_uint8(lr_image(128))).save(lr)
        ckpt = os.path.join(tmp, "dossr_random.ckpt")
        env = official_env(args.compare_official, args.official_thp)
        official_cmd = [args.official_python, os.path.join(HERE, "official_dossr.py"), "--upstream",
                        args.compare_official, "--lr", lr, "--save-ckpt", ckpt, "--steps", str(args.steps),
                        "--repeats", str(args.repeats), "--device", args.device]
        ours_cmd = [sys.executable, __file__, "--_case", "128", "--_weights", ckpt, "--repeats", str(args.repeats),
                    "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype,
                    *(["--compile"] if args.compile else [])]
        if args.sequential:
            official = child_result(official_cmd, env=env)
            ours = child_result(ours_cmd)
        else:
            subprocess.run(official_cmd + ["--only-save"], check=True, stdout=subprocess.DEVNULL, env=env)
            workers = [interleave.Worker("ours", ours_cmd + ["--_serve"]),
                       interleave.Worker("official", official_cmd + ["--reuse-ckpt", "--serve"], env=env)]
            timed_runs = interleave.interleaved(workers, args.repeats)
            ours, official = ({"case": "128->512", "steps": args.steps, "interleaved": True, **timed_runs[name]}
                              for name in ("ours", "official"))
    write_json({"method": "dossr", **environment(device, dtype), "cases": [ours], "official": [official],
                "official_thp": args.official_thp,
                "ratio_ours_to_official": {"128->512": ours["median_s"] / official["median_s"]},
                "load_avg_1_5_15min": {"before": load_before, "after": os.getloadavg()}}, args.out)


if __name__ == "__main__":
    with ieee_float32():  # float32 as the commands and nodes compute it on a GPU
        main()
