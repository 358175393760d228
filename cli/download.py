"""``diffsr download``: fetch the official weight files into a ComfyUI-style models folder (opt-in)."""

import argparse
import os
import sys

from tqdm import tqdm

from ..sr_common.download import OFFICIAL
from ..sr_common.errors import DiffSRError
from .common import escaped_name, run_main


def build_parser():
    p = argparse.ArgumentParser(
        prog="diffsr download",
        description="Download official weights (resumable, verified). A file already there is checked against its "
                    "pinned or recorded hash; a damaged one is moved aside as <file>.bad and fetched again. Prints "
                    "each file's path on a line (one holding a backslash (on Windows: at its start), a line "
                    "break, ESC or an invisible character escaped as \\n, \\x1b, \\u200b, backslashes doubled, on "
                    "a line starting with a backslash, as sha256sum does).")
    p.add_argument("which", nargs="+", choices=list(OFFICIAL) + ["all"], help="files to fetch")
    p.add_argument("--models-dir", default="models", help="models folder; files go to <models-dir>/<kind>/ (default ./models)")
    return p


def fetch(key, models_dir):
    """Download one official file (a progress bar on stderr) and return its path."""
    source = OFFICIAL[key]
    dest = os.path.join(models_dir, source.folder, source.filename)
    bars = []  # one, made when data arrives: a file already there (checked by fetch) shows none

    def progress(done, total):
        if not bars:
            bars.append(tqdm(desc=source.filename, unit="B", unit_scale=True, file=sys.stderr))
        bars[0].total = total
        bars[0].update(done - bars[0].n)

    try:
        return source.fetch(dest, progress)
    finally:
        for bar in bars:
            bar.close()


def main_impl(argv=None):
    """Each file asked for once, in order, its path printed on a line of its own (``escaped_name``: one holding a
    line break, ESC or an invisible character is escaped, on a line starting with a backslash); one that fails (not
    verified, refused offline, the server down) is named and the others are still fetched: exit status 2 when any
    failed, listed again at the end."""
    args = build_parser().parse_args(argv)
    if not args.models_dir:  # os.path.join would put the files in sub-folders of the current folder
        raise DiffSRError("--models-dir is empty; give the models folder, e.g. ComfyUI/models (default ./models).")
    keys = list(OFFICIAL) if "all" in args.which else list(dict.fromkeys(args.which))
    failed = []
    for key in keys:
        try:
            print(escaped_name(fetch(key, args.models_dir)), flush=True)
        except DiffSRError as e:
            print(f"error: {key}: {e}", file=sys.stderr)
            failed.append(key)
    if failed:
        print(f"error: {len(failed)} of {len(keys)} download(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


def main(argv=None):
    return run_main(main_impl, argv, interrupted="interrupted: run the same command again to resume the download (the "
                                                 "part fetched is kept as <file>.partial)")


if __name__ == "__main__":
    sys.exit(main())
