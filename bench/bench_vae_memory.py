"""Peak memory and time of the tiled VAE modes, full-size SD 2.1 VAE architecture with random weights.

    python bench/bench_vae_memory.py --sizes 1024 2048 --modes bounded exact --decode-tile 64 \\
        --encode-tile 512 --out bench/results/vae_memory_cpu.json

For every size S, mode and direction, a fresh process builds the VAE alone (seeded; the UNet and text
encoder would dominate the peak) and runs ``tiled_forward`` once: the decoder on a random S/8 latent
(through ``post_quant_conv``), the encoder on a random S×S image in [−1, 1]. It reports the peak RSS
(``ru_maxrss``), the RSS once the VAE and the input are built, the size of the input and output tensors (which grow
with the image whatever the tiling), and the time.
"""

import argparse
import json
import os
import sys

import torch

from interleave import cuda_peaks
from common import child_result, environment, rss_peak_mb, summary, timed, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
DIRECTIONS = ("decode", "encode")


def random_vae(seed=0):
    """The SD 2.1-base VAE from the pack's config, random weights (no download)."""
    from diffusers import AutoencoderKL

    from comfyui_diffsr.sr_common.sd21 import shipped_config_dir

    from comfyui_diffsr.sr_common.fast_modules import fast_vae_decoder

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(shipped_config_dir(), "vae"))).eval()
    fast_vae_decoder(vae.decoder)  # as the pipelines run it
    return vae


def run_case(direction, size, mode, tile, repeats, warmup, device, dtype):
    from comfyui_diffsr.sr_common.tiled_vae import tiled_forward

    vae = random_vae().to(device, dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        if direction == "decode":
            net, is_decoder = vae.decoder, True
            x = vae.post_quant_conv(torch.randn(1, 4, size // 8, size // 8, generator=generator).to(device, dtype))
        else:
            net, is_decoder = vae.encoder, False
            x = (torch.rand(1, 3, size, size, generator=generator) * 2 - 1).to(device, dtype)
        built_mb = rss_peak_mb()
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        last = {}

        def run():
            last.clear()  # the previous output is freed first
            last["out"] = tiled_forward(net, x, tile, is_decoder, mode=mode)

        times = timed(run, repeats, sync, warmup)
    io_mb = sum(t.numel() * t.element_size() for t in (x, last["out"])) / 2**20
    result = {"direction": direction, "size": size, "mode": mode, "tile": tile, **summary(times),
              "peak_rss_mb": rss_peak_mb(), "rss_after_build_mb": built_mb, "input_output_mb": io_mb}
    if device.type == "cuda":
        result.update(cuda_peaks())
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="image side S (latent S/8)")
    p.add_argument("--modes", nargs="+", default=["bounded", "exact"], choices=["bounded", "exact", "official"])
    p.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS)
    p.add_argument("--decode-tile", type=int, default=64, help="latent px")
    p.add_argument("--encode-tile", type=int, default=512, help="image px")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=0, help="untimed runs first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--out", default=os.path.join(HERE, "results", "vae_memory.json"))
    p.add_argument("--_case", nargs=3, default=None, metavar=("DIRECTION", "SIZE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    from comfyui_diffsr.sr_common.sd21 import PRECISIONS

    dtype = PRECISIONS[args.dtype]
    device = torch.device(args.device)
    tiles = {"decode": args.decode_tile, "encode": args.encode_tile}
    if args._case is not None:
        direction, size, mode = args._case
        print(json.dumps(run_case(direction, int(size), mode, tiles[direction], args.repeats, args.warmup, device,
                                  dtype)))
        return
    cases = []
    for direction in args.directions:
        for size in args.sizes:
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--_case", direction, str(size), mode, "--decode-tile",
                       str(args.decode_tile), "--encode-tile", str(args.encode_tile), "--repeats", str(args.repeats),
                       "--warmup", str(args.warmup), "--device", args.device, "--dtype", args.dtype]
                cases.append(child_result(cmd))
                print(json.dumps(cases[-1]), file=sys.stderr)
    write_json({"method": "tiled_vae", **environment(device, dtype), "cases": cases}, args.out)


if __name__ == "__main__":
    main()
