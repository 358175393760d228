"""Do the pack's decoder rewrites pay on this device? The SD 2.1 VAE decoder (full size, random weights) three ways:

    python bench/bench_decoder_modules.py --device cuda --dtype fp16 --latents 64 128 \\
        --out bench/results/decoder_modules_cuda.json

- ``diffusers``: diffusers' decoder as it is (nearest ×2 then 3×3 convolution in every ``Upsample2D``);
- ``channels_last``: the same modules with channels-last weights;
- ``fast``: ``fast_vae_decoder``, as the pipelines run it (``FusedUpsample2D``: the ×2 upsampler as four 2×2
  convolutions and an interleave, ``LeanResnetBlock2D``, ``GemmConv2d`` on the CPU; the weights in
  ``decoder_weights_for`` the device's layout: channels-last on the CPU, contiguous on a GPU).

Each variant decodes the same random latent, untiled, ``--repeats`` times after a warm-up; the JSON gives the time
percentiles, the peak CUDA memory and the distance of each output from the ``diffusers`` one (PSNR on [−1, 1],
peak 2, and the largest difference), so a variant that is faster only because it computes something else shows.
"""

import argparse
import copy
import os

import torch

from comfyui_diffsr.sr_common.fast_modules import decoder_weights_for
from comfyui_diffsr.sr_common.sd21 import PRECISIONS
from common import environment, psnr_db, summary, timed, write_json

HERE = os.path.dirname(os.path.abspath(__file__))


def decoder_variants(seed=0):
    """name → the same random SD 2.1 VAE decoder (with its post_quant_conv in front), rewritten or not."""
    from diffusers import AutoencoderKL

    from comfyui_diffsr.sr_common.fast_modules import fast_vae_decoder
    from comfyui_diffsr.sr_common.sd21 import shipped_config_dir

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(shipped_config_dir(), "vae"))).eval()
    plain = torch.nn.Sequential(vae.post_quant_conv, vae.decoder)
    return {"diffusers": plain,
            "channels_last": copy.deepcopy(plain).to(memory_format=torch.channels_last),
            "fast": torch.nn.Sequential(copy.deepcopy(vae.post_quant_conv),
                                        fast_vae_decoder(copy.deepcopy(vae.decoder)))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", type=int, nargs="+", default=[64, 128], help="latent side (output ×8)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(PRECISIONS), default="fp16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--out", default=os.path.join(HERE, "results", "decoder_modules.json"))
    args = p.parse_args()
    device, dtype = torch.device(args.device), PRECISIONS[args.dtype]
    cuda = device.type == "cuda"
    variants = {name: net.to(device, dtype) for name, net in decoder_variants().items()}
    decoder_weights_for(variants["fast"][1], device)
    cases = []
    with torch.inference_mode():
        for side in args.latents:
            z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(side)).to(device, dtype)
            reference = None
            for name, net in variants.items():
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                out = {}
                times = timed(lambda: out.update(x=net(z)), args.repeats, torch.cuda.synchronize if cuda else None,
                              args.warmup)
                case = {"variant": name, "latent": side, "output": side * 8, **summary(times)}
                if cuda:
                    case["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
                if reference is None:
                    reference = out["x"].float().clamp(-1, 1).cpu()
                else:
                    result = out["x"].float().clamp(-1, 1).cpu()
                    case.update(psnr_vs_diffusers_db=psnr_db(result, reference, peak=2.0),
                                max_abs_vs_diffusers=(result - reference).abs().max().item())
                cases.append(case)
                print(case, flush=True)
    write_json({"method": "vae_decoder_modules", **environment(device, dtype), "cases": cases}, args.out)


if __name__ == "__main__":
    main()
