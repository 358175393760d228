"""Error types the pack raises for user mistakes: each message names the problem and the fix."""

import functools
import traceback


class DiffSRError(Exception):
    """Base class of every error this pack raises on purpose."""


class WeightFileError(DiffSRError, ValueError):
    """A weight file is missing, unreadable, unsafe, or not the kind that was asked for."""


class NotAConfigFile(WeightFileError):
    """A file read as a config (a model folder's config.json or model_index.json, a ControlLDM yaml) that cannot be
    one: not a regular file (a FIFO, whose read would wait for a writer for ever) or larger than any config (it would
    be read whole)."""


class ConfigWithByteOrderMark(WeightFileError):
    """A JSON config (a model folder's config.json, a shard index) that starts with a UTF-8 byte order mark, which
    diffusers and transformers do not read (they decode it as UTF-8 without one): saved again without it, it loads."""


class ArchitectureMismatch(WeightFileError):
    """A state dict's keys or shapes are not the ones of the module it was to fill; ``keys_match``: only shapes."""

    def __init__(self, message, keys_match=False):
        super().__init__(message)
        self.keys_match = keys_match


class ImageInputError(DiffSRError, ValueError):
    """An input image, or the noise file replayed for it, cannot be processed as given."""


class OptionError(DiffSRError, ValueError):
    """An option outside what it takes: a command's argument, or an ``Options`` field of the Python API."""


def clear_finished_frames(error):
    """Drop the local variables of the finished frames in the tracebacks of ``error`` and of the exceptions it was
    raised from or during (``__cause__``, ``__context__``), so that a refusal kept to be reported holds none of
    the tensors those frames had read: ComfyUI keeps the error, in a cycle of frames that only the garbage collector
    frees (every ~10 s after a prompt). Frames still running (the caller's) are left as they are. A frame keeps its
    function, so what a closure on the failed stack captured stays: give it tensors as arguments (a
    ``functools.partial``) instead."""
    pending, seen = [error], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        pending += [error.__cause__, error.__context__]


def releasing_tensors(load):
    """``load``, whose failures hold none of what its finished frames had read (``clear_finished_frames``): for the
    loaders, whose frames hold the state dict of the file they read and the networks built from it, and the nodes'
    runs (``nodes.host.node_run``), whose frames hold the image, its latents, tiles and outputs.

    Every failure, not only the pack's refusals (``DiffSRError``): out of memory in the middle of a load (a CPU
    ``MemoryError``, the CPU allocator's RuntimeError, ``torch.OutOfMemoryError``) kept everything loaded so far in
    the kept error, so the user's retry with a smaller model ran out of memory again; an unexpected error holds the
    same gigabytes, and an interrupt (Ctrl-C in a notebook keeps ``sys.last_exc``) too. A failed load's tensors serve
    nothing: the traceback printed keeps its file names, line numbers and messages, only a debugger loses the locals."""

    @functools.wraps(load)
    def releasing(*args, **kwargs):
        try:
            return load(*args, **kwargs)
        except BaseException as error:
            clear_finished_frames(error)
            raise

    return releasing
