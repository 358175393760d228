"""``osediff``: one-step super-resolution of image files with OSEDiff."""

import sys

import torch

from ..osediff_core.pipeline import MAX_PROCESS_SIZE, Options, build_osediff, osediff_upscale
from ..osediff_core.weights import read_osediff
from ..sr_common.color_fix import COLOR_FIXES
from ..sr_common.errors import DiffSRError
from ..sr_common.image import MAX_UPSCALE, MIN_UPSCALE, scaled_size
from ..sr_common.offload import OffloadWhenShort
from ..sr_common.sd21 import load_sd21, move_module, network_dtype
from .common import (CommandParser, add_compile_arg, add_device_args, add_input_args, add_output_args, add_seed_arg,
                     add_tile_args, check_sizing_args, check_tile_args, find_images, pick_device, plan_outputs,
                     run_main, upscale_all, with_smaller_tiles_on_oom)


def build_parser():
    p = CommandParser(prog="osediff", description="OSEDiff one-step diffusion super-resolution.")
    add_input_args(p)
    p.add_argument("-o", "--output", required=True,
                   help="output folder (one file named after each input, .png unless --format)")
    p.add_argument("--base", required=True,
                   help="SD 2.1-base: diffusers folder or v2-1_512-ema-pruned .safetensors/.ckpt")
    p.add_argument("--base-config", default=None,
                   help="diffusers-style config folder for a single-file base of non-standard size")
    p.add_argument("--weights", required=True,
                   help="osediff.pkl (osediff_face.pkl for faces, with --upscale 1 --color-fix none) or its "
                        "converted .safetensors")
    p.add_argument("--prompt", default=None, help="prompt text, encoded verbatim (skips DAPE); default ''")
    p.add_argument("--dape", default=None, help="DAPE.pth LoRA (with --ram), or the converted DAPE .safetensors")
    p.add_argument("--ram", default=None, help="ram_swin_large_14m.pth (with --dape)")
    p.add_argument("--user-prompt", default="", help="with DAPE: text appended as '{tags}, {user prompt},'")
    p.add_argument("--upscale", type=float, default=4, help=f"scale factor, {MIN_UPSCALE} to {MAX_UPSCALE} (default 4)")
    p.add_argument("--process-size", type=int, default=512,
                   help="inputs with a side below process_size/upscale are enlarged first; 0 to "
                        f"{MAX_PROCESS_SIZE} (default 512)")
    p.add_argument("--official-sizing", action="store_true",
                   help="the official size rules (raise small inputs, shrink to a multiple of 8, no crop back)")
    p.add_argument("--color-fix", choices=COLOR_FIXES, default="adain",
                   help="colour correction against the upscaled input (default adain, the official)")
    p.add_argument("--sample-mode", choices=["mean", "sample"], default="mean",
                   help="VAE posterior mean (deterministic; the default) or a seeded sample (the official samples)")
    add_seed_arg(p, 0, "seed for --sample-mode sample")
    add_tile_args(p, " (--official-sizing uses the official tiled VAE)")
    add_output_args(p)
    add_device_args(p)
    add_compile_arg(p)
    return p


def check_args(args):
    check_sizing_args(args)
    check_tile_args(args)
    if args.prompt is not None and args.dape:
        print("note: DAPE is not used: --prompt replaces its prompt (the tags are not made); to add text after DAPE's "
              "tags, give it as --user-prompt instead of --prompt", file=sys.stderr)
    if args.user_prompt and (args.prompt is not None or not args.dape):
        print("note: --user-prompt goes with the DAPE tags only; it is not used with --prompt or without --dape",
              file=sys.stderr)
    if args.ram and not args.dape:
        raise DiffSRError("--ram needs --dape (the DAPE LoRA); or pass a converted DAPE file as --dape alone.")


def make_prompt_fn(args, model, dtype):
    """DAPE tags on the upscaled LQ → '{tags}, {user prompt},' when DAPE files are given and no --prompt. The
    tagger is a stage of its own: it goes to the device through the model's stage loader, and leaves it when another
    stage needs the room."""
    if args.prompt is not None or not args.dape:
        return None
    from ..osediff_core.dape import dape_prompt, load_dape_tagger

    if args.ram:
        tagger = load_dape_tagger(ram_path=args.ram, dape_path=args.dape, dtype=dtype)
    else:
        tagger = load_dape_tagger(converted_path=args.dape, dtype=dtype)

    def prompt_of(lq):
        model.load_stage([tagger])
        return dape_prompt(tagger.tags(lq)[0], args.user_prompt)

    return prompt_of


def main_impl(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    images = find_images(args.inputs, args.recursive, args.output)
    pairs = plan_outputs(images, args.output, args.overwrite, args.skip_existing, suffix=f".{args.format}")
    if not pairs:
        return 0
    device = pick_device(args.device)
    dtype = network_dtype(args.dtype, device)
    ckpt = read_osediff(args.weights)
    model = build_osediff(load_sd21(args.base, args.base_config, in_memory=True), ckpt, consume=True).to(dtype=dtype)
    model.stage_loader = OffloadWhenShort(device)  # each network goes to the device for its stage
    if args.compile:
        model.compile()
    prompt_fn = make_prompt_fn(args, model, dtype)
    prompt_embeds = None
    if prompt_fn is None:  # one prompt for every image: encoded once, then the text encoder leaves the device
        prompt_embeds = model.prompt_embedding(args.prompt or "")
        move_module(model.text_encoder, "cpu")
    options = Options(upscale=args.upscale, process_size=args.process_size, official_sizing=args.official_sizing,
                      color_fix=args.color_fix, sample_mode=args.sample_mode, seed=args.seed,
                      tile_latent=args.tile_latent, tile_overlap=args.tile_overlap,
                      vae_tile_encode=args.vae_tile_encode, vae_tile_decode=args.vae_tile_decode,
                      vae_tile_mode=args.vae_tile_mode)

    def upscale_one(image, out):
        return with_smaller_tiles_on_oom(lambda o: osediff_upscale(model, image, prompt_embeds=prompt_embeds,
                                                                   prompt_fn=prompt_fn, options=o), options)

    return upscale_all(pairs, upscale_one, "osediff", args.quality,
                       lambda height, width: scaled_size(width, height, args.upscale)[::-1], args.overwrite,
                       args.skip_existing, output_folder=args.output)


def main(argv=None):
    with torch.no_grad():  # the weights are plain tensors (torch.compile cannot trace inference tensors as weights)
        return run_main(main_impl, argv)


if __name__ == "__main__":
    sys.exit(main())
