"""``diffsr dape``: the OSEDiff prompt (DAPE tags) of each image, one line per image.

    diffsr dape INPUT... (--ram RAM.pth --dape DAPE.pth | --weights DAPE.safetensors | --dape DAPE.safetensors)
                [--upscale 4] [--process-size 512] [--official-sizing] [--user-prompt TEXT] [--tags-only]
                [--exclude a,b] [--max-tags N] [--no-names] [--device cpu|cuda] [--dtype fp32|fp16|bf16]

Output: ``<file>\\t<prompt>`` per image (``--no-names``: just the prompt, and ``<failed>`` (``FAILED_LINE``) for an
image that fails, so the Nth line is the Nth image's and an image that failed is told from one with no tags, whose
``--tags-only`` line is empty; the failure is named on stderr); a file name holding a backslash (on Windows, the
separator, only at its start), a tab, line break or other control character (ESC), a format character (a
bidirectional control such as U+202E, an
invisible one such as U+200B) or another invisible character (U+3164 Hangul filler; ``shown_name``) is written
escaped (``\\\\``, ``\\t``, ``\\n``, ``\\r``, ``\\x1b``, ``\\u202e``) on a line that starts with a backslash,
after ``sha256sum``, so every image stays one line with one tab, no name can send the terminal an escape sequence,
and none hides an invisible character. The prompt is what
``diffsr osediff`` would encode with the same ``--user-prompt``: ``"{tags}, {user prompt},"`` (``--tags-only``:
the tags alone; ``--prompt`` is the same option, kept for older scripts, not ``osediff``'s). DAPE
sees the image after OSEDiff's pre-processing (PIL bicubic ×upscale of the 8-bit image, and the
short-side enlargement of very small images), so the tags are those of the OSEDiff run; the ×upscale image is made
only where the tagger's resize to 384×384 reads it (``lq_as_read``), with ``--official-sizing`` too where one of its
sides or both are multiples of 8 (that sizing's shrink to them is one LANCZOS pass or none).
"""

import sys

from ..sr_common.errors import DiffSRError
from ..sr_common.image import MAX_UPSCALE, MIN_UPSCALE
from ..sr_common.sd21 import network_dtype
from ..sr_common.tiling import OutOfMemory, is_out_of_memory
from .common import (CommandParser, add_device_args, add_input_args, check_sizing_args, escaped_name, find_images,
                     load_image, pick_device, run_main, shown_name)


FAILED_LINE = "<failed>"  # no prompt starts with "<": it starts with a tag (a letter or digit) or ", " (no tags)


def build_parser():
    p = CommandParser(prog="dape", description="DAPE (RAM + LoRA) prompts for OSEDiff.",
                      epilog="To write RAM + DAPE as one converted tagger: diffsr convert dape.")
    add_input_args(p, writes_images=False)
    p.add_argument("--ram", default=None, help="ram_swin_large_14m.pth (with --dape)")
    p.add_argument("--dape", default=None, help="DAPE.pth (with --ram), or a converted DAPE .safetensors alone")
    p.add_argument("--weights", default=None, help="converted DAPE .safetensors (diffsr convert dape)")
    p.add_argument("--upscale", type=float, default=4,
                   help=f"OSEDiff scale factor, {MIN_UPSCALE} to {MAX_UPSCALE} (default 4)")
    p.add_argument("--process-size", type=int, default=512, help="as diffsr osediff (default 512)")
    p.add_argument("--official-sizing", action="store_true", help="as diffsr osediff")
    p.add_argument("--user-prompt", "--prompt", dest="user_prompt", default="",
                   help="text after the tags, as osediff's --user-prompt: prompt = '{tags}, {user prompt},' "
                        "(--prompt: the same, kept for older scripts; osediff's --prompt skips DAPE)")
    p.add_argument("--tags-only", action="store_true", help="print only the tags")
    p.add_argument("--exclude", default="", help="comma-separated tags never to output")
    p.add_argument("--max-tags", type=int, default=0,
                   help="keep the N most probable tags (in tag-list order); 0 = all (default), as the DAPE Prompt "
                        "Extractor node")
    p.add_argument("--no-names", action="store_true",
                   help=f"print only the prompt, not '<file>\\t'; an image that fails prints the line {FAILED_LINE} "
                        "(which no prompt or tag list can be: an image without tags prints an empty line with "
                        "--tags-only), so the Nth line is the Nth image's")
    add_device_args(p)
    return p


def load_tagger(args, device, dtype):
    from ..osediff_core.dape import load_dape_tagger

    if args.weights and (args.ram or args.dape):
        raise DiffSRError("Give --weights (converted) alone, or --ram with --dape.")
    if args.weights:
        return load_dape_tagger(converted_path=args.weights, device=device, dtype=dtype)
    if args.ram and args.dape:
        return load_dape_tagger(ram_path=args.ram, dape_path=args.dape, device=device, dtype=dtype)
    if args.dape:
        return load_dape_tagger(converted_path=args.dape, device=device, dtype=dtype)
    raise DiffSRError("DAPE weights missing: pass --ram RAM.pth --dape DAPE.pth, or --weights CONVERTED.safetensors.")


def main_impl(argv=None):
    args = build_parser().parse_args(argv)
    check_sizing_args(args)
    if args.max_tags < 0:
        raise DiffSRError("--max-tags must be 0 (all tags) or more.")
    if args.user_prompt.splitlines() not in ([], [args.user_prompt]):
        raise DiffSRError("--user-prompt holds a line break, which would split each image's line in two; the "
                          "tokenizer reads it as a space: give the text on one line.")
    from ..osediff_core.dape import dape_prompt, lq_as_read, misspelt_tags, tag_list

    images = find_images(args.inputs, args.recursive)
    device = pick_device(args.device)
    tagger = load_tagger(args, device, network_dtype(args.dtype, device))
    exclude = tag_list(args.exclude)
    unknown = tagger.unknown_tags(exclude)
    if unknown:  # a misspelt tag would leave the one meant in every prompt
        print(f"note: --exclude: {misspelt_tags(unknown)}: not among DAPE's tags (check the spelling)",
              file=sys.stderr)
    failed = []

    def fail(path, reason):  # named on stderr; with --no-names FAILED_LINE, so the Nth line stays the Nth image's
        print(f"error: {shown_name(path)}: {reason}", file=sys.stderr)
        if args.no_names:
            print(FAILED_LINE, flush=True)
        failed.append(path)

    for path, _ in images:
        try:  # an image that fails fails alone: the others go on
            lq = lq_as_read(load_image(path), upscale=args.upscale, process_size=args.process_size,
                            official_sizing=args.official_sizing)
            tags = tagger.tags(lq, exclude=exclude, max_tags=args.max_tags or None)[0]
        except (DiffSRError, ValueError) as e:
            fail(path, e)
            continue
        except (MemoryError, RuntimeError) as e:  # a large photo enlarged as OSEDiff does: gigabytes
            if not is_out_of_memory(e, (OutOfMemory, MemoryError)):
                raise
            fail(path, f"out of memory: DAPE tags the image enlarged ×{args.upscale:g}, as OSEDiff does. Give a "
                       "smaller --upscale, or downscale the image.")
            continue
        prompt = dape_prompt(tags, args.user_prompt, tags_only=args.tags_only)
        print(prompt if args.no_names else f"{escaped_name(path)}\t{prompt}", flush=True)
    if failed:
        print(f"error: {len(failed)} of {len(images)} image(s) failed: {', '.join(map(shown_name, failed))}",
              file=sys.stderr)
        return 2
    return 0


def main(argv=None):
    return run_main(main_impl, argv)


if __name__ == "__main__":
    sys.exit(main())
