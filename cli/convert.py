"""``diffsr convert KIND ...``: official weight files → safetensors that load to the same result."""

import argparse
import sys

from .common import run_main


def build_parser():
    p = argparse.ArgumentParser(prog="diffsr convert", description="Convert official weight files to safetensors.")
    sub = p.add_subparsers(dest="kind", required=True)
    o = sub.add_parser("osediff", help="osediff.pkl → .safetensors")
    o.add_argument("src")
    o.add_argument("dst")
    return p


def main_impl(argv=None):
    args = build_parser().parse_args(argv)
    if args.kind == "osediff":
        from ..osediff_core.weights import convert_osediff

        convert_osediff(args.src, args.dst)
    print(f"wrote {args.dst}")
    return 0


def main(argv=None):
    return run_main(main_impl, argv)


if __name__ == "__main__":
    sys.exit(main())
