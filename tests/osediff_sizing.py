"""The official OSEDiff sizing's arithmetic (test_osediff.py's ``__main__``), shared by the parity tests and
tools/make_osediff_fixtures.py. It imports nothing, so that the script, which imports the upstream code, and the
tests, which cannot import that script, use the same function."""


def squashed_by_lanczos(width, height, process_size, upscale):
    """Whether the official sizing's LANCZOS step changes an input's size: after the min-size raise (a side under
    ``process_size // upscale``: both sides times ``(process_size // upscale) / min(width, height)``, truncated) the
    ×upscale size is not a multiple of 8 on some side."""
    if width < process_size // upscale or height < process_size // upscale:
        scale = (process_size // upscale) / min(width, height)
        width, height = int(scale * width), int(scale * height)
    return (width * upscale) % 8 != 0 or (height * upscale) % 8 != 0
