"""``diffsr`` / ``python -m comfyui_diffsr``: one entry for every command."""

import sys

from ..sr_common.names import quoted_name

COMMANDS = {
    "osediff": "OSEDiff one-step super-resolution",
    "dape": "DAPE prompts (tags) for images",
    "dossr": "DoSSR domain-shift SDE super-resolution",
    "convert": "convert official weight files to safetensors",
    "download": "download the official weights (opt-in, resumable, verified)",
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        out = sys.stdout if asked else sys.stderr
        print("usage: diffsr COMMAND [args]\n\ncommands:", file=out)
        for name, text in COMMANDS.items():
            print(f"  {name:10s} {text}", file=out)
        if argv and not asked:
            print(f"error: unknown command {quoted_name(argv[0])}", file=out)
        return 0 if asked else 2
    name, rest = argv[0], argv[1:]
    if name == "osediff":
        from .osediff import main as run
    elif name == "dape":
        from .dape import main as run
    elif name == "dossr":
        from .dossr import main as run
    elif name == "download":
        from .download import main as run
    else:
        from .convert import main as run
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
