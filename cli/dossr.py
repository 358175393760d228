"""``dossr``: super-resolution ×4 of image files with DoSSR (domain-shift SDE, 5 steps by default)."""

import os
import sys

import torch

from ..dossr_core.model import DEFAULT_PROMPT
from ..dossr_core.schedule import T1
from ..sr_common.color_fix import COLOR_FIXES
from ..sr_common.errors import DiffSRError
from ..sr_common.image import MAX_UPSCALE, MIN_UPSCALE, check_upscale
from ..sr_common.names import quoted_name
from ..sr_common.offload import OffloadWhenShort
from ..sr_common.sd21 import move_module, network_dtype
from .common import (NAME_MAX, CommandParser, add_compile_arg, add_device_args, add_input_args, add_output_args,
                     add_seed_arg, add_tile_args, check_tile_args, find_images, pick_device, plan_outputs, run_main,
                     upscale_all, with_smaller_tiles_on_oom)


def build_parser():
    p = CommandParser(prog="dossr", description="DoSSR diffusion super-resolution (x4; other scales by "
                      "resizing the x4 result).")
    add_input_args(p)
    p.add_argument("-o", "--output", required=True,
                   help="output folder (one file named after each input, .png unless --format)")
    p.add_argument("--weights", required=True,
                   help="dossr_default.ckpt / dossr_onestep.ckpt, or its converted .safetensors (needs --base)")
    p.add_argument("--base", default=None, help="SD 2.1-base (diffusers folder or v2-1_512-ema-pruned file); "
                   "default: the SD 2.1 parts inside the official .ckpt")
    p.add_argument("--base-config", default=None, help="diffusers config folder for a single-file base of "
                   "non-standard size")
    p.add_argument("--config", default=None, help="official-style ControlLDM yaml for the .ckpt (default: SD 2.1 "
                   "cldm_v21.yaml shipped in the pack)")
    p.add_argument("--steps", type=int, default=5,
                   help="sampling steps (default 5, for dossr_default; 1 for dossr_onestep)")
    add_seed_arg(p, 42, "seed of every random draw")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt (default %(default)r, the official one)")
    prompt.add_argument("--prompt-embeds", default=None, help="safetensors with a precomputed (1, 77, 1024) "
                        "'prompt_embeds' tensor, in place of --prompt (skips the text encoder)")
    p.add_argument("--color-fix", choices=COLOR_FIXES, default="wavelet",
                   help="colour correction against the RRDB x4 image (default wavelet, the official)")
    p.add_argument("--upscale", type=float, default=4,
                   help=f"output scale, {MIN_UPSCALE} to {MAX_UPSCALE} (model works at x4; others resize; default 4)")
    add_tile_args(p)
    p.add_argument("--noise-file", default=None, help="safetensors with 'posterior', 'init', 'step_0'... "
                   "replacing every random draw (one input image only)")
    p.add_argument("--save-noise", action="store_true",
                   help="also write <name>.noise.safetensors per output (made again with --skip-existing where its "
                        "image is missing)")
    p.add_argument("--gamma", type=float, default=1.0, help="EXPERIMENTAL, not the paper: < 1 moves the sampler "
                   "towards the deterministic ODE (0 = no fresh noise); 1 = official (default 1)")
    add_output_args(p)
    add_device_args(p)
    add_compile_arg(p)
    return p


def check_args(args):
    if not 1 <= args.steps <= T1 - 1:
        raise DiffSRError(f"--steps must be 1 to {T1 - 1}, got {args.steps} (the paper uses 1 to 5)")
    check_upscale(args.upscale, "--upscale")
    check_tile_args(args)
    if not 0 <= args.gamma <= 1:
        raise DiffSRError(f"--gamma must be in [0, 1], got {args.gamma}")


def read_prompt_embeds(path):
    from ..sr_common.weights import read_state_dict

    tensors = read_state_dict(path)
    if "prompt_embeds" not in tensors:
        raise DiffSRError(f"{quoted_name(path)} has no 'prompt_embeds' tensor (found {sorted(tensors)[:5]}).")
    embeds = tensors["prompt_embeds"].float()
    return embeds[None] if embeds.dim() == 2 else embeds


def main_impl(argv=None):
    from ..dossr_core.model import load_dossr
    from ..dossr_core.pipeline import Options, dossr_upscale, load_noise, output_size, save_noise

    args = build_parser().parse_args(argv)
    check_args(args)
    images = find_images(args.inputs, args.recursive, args.output)
    if args.noise_file and len(images) != 1:
        raise DiffSRError("--noise-file fixes the draws of one image size; give exactly one input image.")
    pairs = plan_outputs(images, args.output, args.overwrite, args.skip_existing, suffix=f".{args.format}")
    if not pairs:
        return 0
    device = pick_device(args.device)
    dtype = network_dtype(args.dtype, device)
    noise = load_noise(args.noise_file) if args.noise_file else None
    embeds = read_prompt_embeds(args.prompt_embeds) if args.prompt_embeds else None
    model = load_dossr(args.weights, args.base, config=args.config, base_config=args.base_config).to(dtype=dtype)
    model.stage_loader = OffloadWhenShort(device)  # each network goes to the device for its stage
    if embeds is None and model.text_encoder is not None:
        embeds = model.prompt_embedding(args.prompt)  # once for every image
    if model.text_encoder is not None:
        move_module(model.text_encoder, "cpu")  # not needed any more: its device memory goes to the tiles
    if args.compile:
        model.compile()
    options = Options(steps=args.steps, color_fix=args.color_fix, upscale=args.upscale, seed=args.seed,
                      gamma=args.gamma, tile_latent=args.tile_latent, tile_overlap=args.tile_overlap,
                      vae_tile_encode=args.vae_tile_encode, vae_tile_decode=args.vae_tile_decode,
                      vae_tile_mode=args.vae_tile_mode)

    def upscale_one(image, out):
        noise_path = os.path.splitext(out)[0] + ".noise.safetensors"
        if args.save_noise and len(os.fsencode(os.path.basename(noise_path))) > NAME_MAX:
            raise DiffSRError(f"The noise file of {quoted_name(os.path.basename(out))} would be named with more than "
                              f"{NAME_MAX} bytes, the most a file name may have: give the input a shorter name, or run "
                              "without --save-noise.")
        # --skip-existing resumes: a noise file whose image was never written is replaced
        if args.save_noise and os.path.exists(noise_path) and not (args.overwrite or args.skip_existing):
            raise DiffSRError(f"{quoted_name(noise_path)} exists; pass --overwrite to replace it (--skip-existing: "
                              "only where its image is missing), or delete it.")
        trace = {} if args.save_noise else None  # each attempt fills it anew: its draws restart from the seed
        result = with_smaller_tiles_on_oom(lambda o: dossr_upscale(model, image, prompt=args.prompt,
                                                                   prompt_embeds=embeds, options=o, noise=noise,
                                                                   trace=trace), options)
        if args.save_noise:  # an earlier noise file is replaced only once the new one is written
            save_noise(trace["noise"], noise_path, replace=args.overwrite or args.skip_existing)
        return result

    return upscale_all(pairs, upscale_one, "dossr", args.quality,
                       lambda height, width: output_size(4 * height, 4 * width, args.upscale), args.overwrite,
                       args.skip_existing, output_folder=args.output)


def main_convert(src, dst, config=None, fp16=False):
    """``diffsr convert dossr SRC DST [--config YAML] [--fp16]``: the DoSSR parts of the official ckpt → safetensors."""
    from ..dossr_core.weights import convert_dossr

    info = convert_dossr(src, dst, config=config, dtype=torch.float16 if fp16 else None)
    if "cond_encoder_equals_vae_encoder" in info:
        print("note: the condition encoder " + ("equals" if info["cond_encoder_equals_vae_encoder"] else "differs from")
              + " the SD VAE encoder (it is always loaded from the DoSSR file)", file=sys.stderr)
    return 0


def main(argv=None):
    with torch.no_grad():  # the weights are plain tensors (torch.compile cannot trace inference tensors as weights)
        return run_main(main_impl, argv)


if __name__ == "__main__":
    sys.exit(main())
