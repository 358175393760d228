"""``diffsr download``: fetch the official weight files into a ComfyUI-style models folder (opt-in)."""

import argparse
import os
import sys

from tqdm import tqdm

from ..sr_common.download import OFFICIAL, downloaded
from .common import run_main


def build_parser():
    p = argparse.ArgumentParser(
        prog="diffsr download",
        description="Download official weights (resumable, verified). A file already there is checked against its "
                    "pinned or recorded hash; a damaged one is moved aside as <file>.bad and fetched again.")
    p.add_argument("which", nargs="+", choices=list(OFFICIAL) + ["all"], help="files to fetch")
    p.add_argument("--models-dir", default="models", help="models folder; files go to <models-dir>/<kind>/ (default ./models)")
    return p


def fetch(key, models_dir):
    """Download one official file (a progress bar on stderr) and return its path."""
    source = OFFICIAL[key]
    dest = os.path.join(models_dir, source.folder, source.filename)
    if downloaded(dest, source):  # a damaged file there is set aside by fetch; a folder is refused by download
        return dest
    bar = tqdm(desc=source.filename, unit="B", unit_scale=True, file=sys.stderr)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    try:
        return source.fetch(dest, progress)
    finally:
        bar.close()


def main_impl(argv=None):
    args = build_parser().parse_args(argv)
    keys = list(OFFICIAL) if "all" in args.which else args.which
    for key in keys:
        print(fetch(key, args.models_dir))
    return 0


def main(argv=None):
    return run_main(main_impl, argv)


if __name__ == "__main__":
    sys.exit(main())
