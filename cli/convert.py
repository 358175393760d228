"""``diffsr convert KIND ...``: official weight files → safetensors that load to the same result."""

import argparse
import os
import sys

from .common import clear_abandoned_partials, run_main, shown_name


def build_parser():
    p = argparse.ArgumentParser(prog="diffsr convert", description="Convert official weight files to safetensors.")
    sub = p.add_subparsers(dest="kind", required=True)
    o = sub.add_parser("osediff", help="osediff.pkl → .safetensors")
    o.add_argument("src")
    o.add_argument("dst")
    a = sub.add_parser("dape", help="RAM + DAPE .pth → one compact .safetensors (the tagging path, DAPE merged)")
    a.add_argument("--ram", required=True, help="ram_swin_large_14m.pth")
    a.add_argument("--dape", required=True, help="DAPE.pth")
    a.add_argument("-o", "--output", required=True, help="output .safetensors")
    a.add_argument("--fp16", action="store_true", help="store fp16 (about 0.43 GB instead of 0.85 GB)")
    d = sub.add_parser("dossr", help="DoSSR .ckpt → .safetensors of its own parts (ControlNet, cond encoder, RRDB)")
    d.add_argument("src")
    d.add_argument("dst")
    d.add_argument("--config", default=None, help="official-style model yaml (default: SD 2.1 cldm_v21)")
    d.add_argument("--fp16", action="store_true", help="store fp16 weights")
    return p


def main_impl(argv=None):
    args = build_parser().parse_args(argv)
    clear_abandoned_partials([os.path.dirname(args.output if args.kind == "dape" else args.dst)])
    if args.kind == "osediff":
        from ..osediff_core.weights import convert_osediff

        convert_osediff(args.src, args.dst)
        print(f"wrote {shown_name(args.dst)}")
    elif args.kind == "dape":
        from ..osediff_core.dape import convert_dape

        convert_dape(args.ram, args.dape, args.output, half=args.fp16)
        print(f"wrote {shown_name(args.output)}")
    else:
        from .dossr import main_convert

        main_convert(args.src, args.dst, args.config, args.fp16)
        print(f"wrote {shown_name(args.dst)}")
    return 0


def main(argv=None):
    return run_main(main_impl, argv)


if __name__ == "__main__":
    sys.exit(main())
