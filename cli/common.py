"""What every command shares: input discovery, output naming without overwriting, devices, progress, a folder run
that goes on past a bad image."""

import argparse
import codecs
import collections
import contextlib
import dataclasses
import os
import re
import sys
import threading
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

from ..sr_common.errors import DiffSRError, ImageInputError, clear_finished_frames
from ..sr_common.names import error_text, quoted_name, shown_name
from ..sr_common.sd21 import PRECISIONS, ieee_float32
from ..sr_common.tiling import (DEFAULT_TILES, TILE_FLOORS, OutOfMemory, WeightsOutOfMemory, is_out_of_memory,
                                overlap_within, with_oom_retry)
from ..sr_common.weights import partial_path, publish, remove_abandoned_partials, special_file, unwritable_part

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".tif", ".tiff")  # .jfif: a browser-saved JPEG
# Photos no Pillow reads (HEIF needs a plugin, camera raw a raw converter): a folder's are left out with a note.
UNREAD_PHOTO_SUFFIXES = (".heic", ".heif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2")
# The hidden file that marks a folder a run made for its outputs: a later -r run of a folder above it leaves it out.
OUTPUT_FOLDER_MARK = ".diffsr-output-folder"
HIGH_DEPTH_PEAK = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0, "F": 1.0}  # PIL mode → white


class CommandParser(argparse.ArgumentParser):
    """The commands' argument parser: its usage errors point out an argument that names an existing file but starts
    with '-' (an image named ``-photo.png``, read as an option), and how to give it."""

    def parse_known_args(self, args=None, namespace=None):
        self.given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        dashed = [arg for arg in getattr(self, "given", []) if arg.startswith("-") and os.path.isfile(arg)]
        if dashed:
            message += (f" ({quoted_name(dashed[0])} is a file, read as an option: give it as "
                        f"{quoted_name(os.path.join('.', dashed[0]))}, or after the options and --)")
        super().error(message)


def add_input_args(parser, writes_images=True):
    """INPUT... and -r; ``writes_images``: the command writes an output image per input (not ``dape``, which prints)."""
    outputs, left_out = (("; the outputs mirror the sub-folders", "hidden folders, links to folders, the output "
                          "folder and the output folders earlier runs made") if writes_images
                         else ("", "hidden folders, links to folders and the output folders runs made"))
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    parser.add_argument("-r", "--recursive", action="store_true",
                        help=f"also the images in the sub-folders of a folder INPUT{outputs} ({left_out} are left out; "
                             "a folder's hidden files, such as macOS's ._IMG.jpg, are never taken)")


def find_images(inputs, recursive=False, output=None):
    """(image path, output name) pairs. Files as given; folders contribute their image files (sorted), and with
    ``recursive`` those of their sub-folders too, whose output name keeps the path below the folder given
    (``2019/beach/img``), so the outputs mirror the sub-folders; hidden files and folders (macOS's ``._IMG.jpg``
    beside each photo on a USB stick), links to folders and ``output`` (the output folder, which may lie inside an
    input folder) are not searched. The output name is the path without its suffix. A file given twice (also as a
    folder's file, or through a link) counts once. An input folder that is the output folder is refused: the outputs
    would be inputs of the next run (``--skip-existing`` could not resume). Sub-folders that a run made as its output
    folder (``mark_output_folder``) are not searched either, so the upscales of a run with another ``output`` are not
    upscaled again; a note names them. A note counts a folder's photos in formats Pillow does not read (an iPhone's
    HEIC, camera raw), which are left out, and another its GIFs (taken only by name)."""
    found, seen, unread, earlier_outputs, gifs = [], set(), collections.Counter(), [], 0
    skip = _file_id(output) if output and os.path.isdir(output) else None
    for item in inputs:
        if os.path.isdir(item) and _is_folder(item, skip):
            raise DiffSRError(f"--output {quoted_name(output)} is the input folder {quoted_name(item)}: its outputs "
                              "would be read as inputs by the next run. Write them to another folder, e.g. "
                              f"{quoted_name(os.path.join(item, 'upscaled'))} (an output folder inside an input folder "
                              "is left out of the search).")
        if os.path.isdir(item):
            paths = []
            for folder, subfolders, names in os.walk(item, onerror=lambda error: _unreadable_folder(error, item)):
                subfolders[:] = sorted(d for d in subfolders if recursive and not d.startswith(".")
                                       and not _is_folder(os.path.join(folder, d), skip))
                marked = [d for d in subfolders if os.path.isfile(os.path.join(folder, d, OUTPUT_FOLDER_MARK))]
                earlier_outputs += [os.path.join(folder, d) for d in marked]
                subfolders[:] = [d for d in subfolders if d not in marked]
                visible = [n for n in sorted(names) if not n.startswith(".")]
                paths += [os.path.join(folder, n) for n in visible if n.lower().endswith(IMAGE_SUFFIXES)
                          and os.path.isfile(os.path.join(folder, n))]
                unread.update(os.path.splitext(n)[1].lower() for n in visible
                              if n.lower().endswith(UNREAD_PHOTO_SUFFIXES))
                gifs += sum(n.lower().endswith(".gif") for n in visible)
            named = [(path, os.path.relpath(path, item)) for path in paths]
        elif os.path.isfile(item):
            named = [(item, os.path.basename(item))]
        elif os.path.exists(item):
            raise DiffSRError(f"{quoted_name(item)} is not an image file: it is {special_file(os.stat(item).st_mode)}. "
                              "Give the image file itself.")
        else:
            raise DiffSRError(f"Input not found: {quoted_name(item)}")
        for path, name in named:
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                found.append((path, os.path.splitext(name)[0]))
    if earlier_outputs:
        print(f"note: left out {len(earlier_outputs)} output folder(s) of earlier runs "
              f"({', '.join(map(shown_name, earlier_outputs))}: a run made them and marked them with "
              f"{OUTPUT_FOLDER_MARK}); to upscale their images, give such a folder as INPUT.", file=sys.stderr)
    if gifs:
        print(f"note: left out {gifs} GIF(s): a folder's GIFs are not taken (mostly animations); give one by name "
              "to upscale its first frame.", file=sys.stderr)
    if unread:
        print(f"note: left out {sum(unread.values())} photo(s) in formats Pillow does not read "
              f"({', '.join(f'{suffix}: {n}' for suffix, n in sorted(unread.items()))}); to upscale them, export "
              "them as PNG or JPEG first.", file=sys.stderr)
    if not found:
        nested = not recursive and any(os.path.isdir(item) and _has_sub_folder(item) for item in inputs)
        raise DiffSRError(f"No images found in {', '.join(map(quoted_name, inputs))} (looked for "
                          f"{', '.join(IMAGE_SUFFIXES)})"
                          + ("; their sub-folders are searched with --recursive." if nested else "."))
    return found


NOT_UTF8 = re.compile("([\\udc80-\\udcff]+)")  # the bytes of a name that are not UTF-8, as Python decodes them


def escaped_name(path):
    """``path`` as a command prints it for scripts (``diffsr dape``'s ``<file>`` field, ``diffsr download``'s lines):
    unchanged, or, where it holds a backslash or a character the messages escape (``shown_name``: a tab, line break,
    ESC or other control character, a format character such as U+202E or U+200B, another invisible one such as
    U+3164), "\\" + the name with its backslashes doubled and those characters written as the messages write them
    (\\t, \\n, \\r, \\x1b, \\u202e, \\u3164, \\U000e0041), after the ``sha256sum`` convention: a line that starts
    with a backslash is escaped, and no escaped name reads as another, real one. On Windows, where the backslash is
    the separator and no name holds one, a path without another character to escape is printed as it is, unless it
    starts with a backslash (\\\\server\\share, \\models: it would read as escaped). The bytes of a name that are
    not UTF-8 (which Python decodes to U+DC80-U+DCFF, and the messages escape) are kept: printed as those bytes,
    as ``sha256sum`` prints them (``run_main`` lets stdout write them). A character that stdout's encoding cannot
    write is escaped too (\\u5199 for 写 in cp1252, the code page of a Windows stdout that is a file or pipe), so the
    line still gives the name back."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"  # None: io.StringIO, pythonw

    def shown(text):
        return "".join(part if NOT_UTF8.fullmatch(part)
                       else shown_name(part).encode(encoding, "backslashreplace").decode(encoding)
                       for part in NOT_UTF8.split(text))

    escaped = shown(path.replace("\\", "\\\\"))
    if escaped == path or os.sep == "\\" and shown(path) == path and not path.startswith("\\"):
        return path
    return "\\" + escaped


def _is_folder(path, folder_id):
    """Whether ``path`` is the folder whose ``_file_id`` is ``folder_id`` (None: no folder), under any of its paths:
    through links, in another case where names ignore it (macOS keeps the case given in a real path), through a
    bind mount."""
    try:
        return folder_id is not None and _file_id(path) == folder_id
    except OSError:  # not to be looked up: the search cannot list it either (and says so)
        return False


def _has_sub_folder(folder):
    with os.scandir(folder) as entries:
        return any(entry.is_dir() for entry in entries)


def _unreadable_folder(error, input_folder):
    """``os.walk``'s report of a folder it cannot list: ``input_folder`` itself is refused; a sub-folder is left out,
    with a warning."""
    if error.filename == os.fspath(input_folder):
        raise DiffSRError(f"Cannot read the input folder {quoted_name(input_folder)}: {error.strerror}. Check that you "
                          "may list it, or give its images by name.")
    print(f"warning: cannot search {quoted_name(error.filename)}: {error.strerror}; its images are left out",
          file=sys.stderr)


def plan_outputs(images, outdir, overwrite=False, skip_existing=False, suffix=".png"):
    """(input, OUTDIR/<output name><suffix>) pairs for ``find_images``' (input, output name) pairs. Inputs that
    differ only in their suffix keep it (``a.png``, ``a.jpg`` → ``a.png.png``, ``a.jpg.png``); a clash that remains
    (``IMG.png`` and ``img.png`` where names ignore case; two names of one file through a link to a folder) is
    refused, as are, unless ``overwrite``, existing files. ``skip_existing`` leaves out the inputs whose output
    exists (to resume a folder run). The unfinished files that a killed run left in the output folders are removed
    (``clear_abandoned_partials``)."""
    if not outdir:
        raise DiffSRError("--output is empty; give the folder to write to.")
    clashes = {}
    for path, name in images:  # IMG.png and img.png: one file where names ignore case (Windows, macOS)
        clashes.setdefault(_name_key(name), []).append(_name_key(os.path.splitext(path)[1]))
    pairs, seen = [], {}
    for path, name in images:
        kept = clashes[_name_key(name)]
        if len(kept) == len(set(kept)) > 1:
            name += os.path.splitext(path)[1]
        out = os.path.join(outdir, name + suffix)
        folder = os.path.dirname(out)  # OUTDIR/2019 may be a link to OUTDIR/2020
        key = _name_key(os.path.join(os.path.realpath(folder), os.path.basename(out)))
        if key in seen:
            first, written = seen[key]
            how = ("where names ignore case" if _name_key(os.path.dirname(written)) == _name_key(folder)
                   else "through a link")
            where = (quoted_name(out) if written == out
                     else f"{quoted_name(written)} and {quoted_name(out)}, one file {how}")
            raise DiffSRError(f"{quoted_name(first)} and {quoted_name(path)} would both be written to {where}; rename "
                              "one of them (nothing was upscaled).")
        seen[key] = path, out
        pairs.append((path, out))
    inputs = {_file_id(path) for path, _ in images}
    for path, out in pairs:  # the same file under another name too (a link; another case where names ignore it)
        if os.path.exists(out) and _file_id(out) in inputs:
            raise DiffSRError(f"The output {quoted_name(out)} (for {quoted_name(path)}) is one of the input images; "
                              "choose another --output folder (inputs are never overwritten, not even with "
                              "--overwrite).")
    existing = [out for _, out in pairs if os.path.lexists(out)]  # a link to nothing is not written over either
    folders = [os.path.dirname(out) for _, out in pairs]
    if skip_existing:
        if existing:
            print(f"skipping {len(existing)} of {len(pairs)} image(s): their output exists (--skip-existing)",
                  file=sys.stderr)
        pairs = [(path, out) for path, out in pairs if out not in existing]
    elif existing and not overwrite:
        raise DiffSRError(f"{len(existing)} output file(s) exist already (e.g. {quoted_name(existing[0])}). Choose "
                          "another --output folder, pass --skip-existing to upscale only the others, or --overwrite.")
    for folder in dict.fromkeys([outdir, *folders]):  # OUTDIR and, with -r, its sub-folders
        check_output_folder(folder)
    clear_abandoned_partials(folders)
    return pairs


def mark_output_folder(folder):
    """Make ``folder``, a run's output folder that was missing when the run started, with a hidden file
    (``OUTPUT_FOLDER_MARK``) saying that a run made it: a later ``-r`` run of a folder above it leaves it out
    (``find_images``). Another run that made it meanwhile may have marked it already."""
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, OUTPUT_FOLDER_MARK), "x", encoding="utf-8") as mark:
            mark.write("comfyui-diffsr made this folder for its upscaled images. A folder run with -r of a folder "
                       "above it leaves this folder out, so they are not upscaled again; delete this file to have "
                       "such runs search it.\n")
    except FileExistsError:
        pass
    except OSError as e:
        raise DiffSRError(f"Cannot write in the output folder {quoted_name(folder)}: {error_text(e)}. Choose another "
                          "--output folder.") from e


def _save_output(new_folder, *save_args):
    """``save_image(*save_args)``, after ``mark_output_folder(new_folder)`` unless ``new_folder`` is None."""
    if new_folder is not None:
        mark_output_folder(new_folder)
    save_image(*save_args)


def check_output_folder(folder):
    """Refuse an output folder that cannot be made or written in (a file of the user's at its name or above it, a
    folder not writable), before the models are loaded and before anything is made: found while the images before
    it are upscaled, it would stop the run, and again each time it is resumed."""
    unwritable = unwritable_part(folder)
    if not unwritable:
        return
    if unwritable == os.path.abspath(folder) and not os.path.isdir(unwritable):
        raise DiffSRError(f"Cannot write the output folder {quoted_name(folder)}: it is a file, not a folder. Move "
                          "that file, or choose another --output folder.")
    raise DiffSRError(f"Cannot write the output folder {quoted_name(folder)}: {quoted_name(unwritable)} is not a "
                      "writable folder. Choose another --output folder.")


def clear_abandoned_partials(folders):
    """Remove from ``folders`` the unfinished files (``.diffsr-….partial``) of runs on this machine that were killed
    while they wrote (``remove_abandoned_partials``), with one note naming them."""
    removed = [os.path.join(folder, name) for folder in dict.fromkeys(folders)
               for name in remove_abandoned_partials(folder or ".")]
    if removed:
        print(f"note: removed {len(removed)} unfinished file(s) of a run stopped while writing (killed, or a power "
              f"cut): {', '.join(map(shown_name, removed))}", file=sys.stderr)


def _name_key(name):
    """``name`` as a file system that ignores case compares it: one key for names that are one file there. NTFS and
    exFAT map each character to its upper case, APFS and HFS+ fold each one, so ``Ä`` and ``ä`` are one name but
    ``Straße`` and ``Strasse`` two (``str.casefold`` makes ß "ss"); macOS also takes a name in any Unicode
    normalization (``é`` as one character, or as ``e`` and an accent) as the same, so the key is decomposed (NFD)."""
    return "".join(map(_folded_char, unicodedata.normalize("NFD", os.path.normcase(name))))


def _folded_char(char):
    """One character folded on its own: its upper case, then that one's lower case, each where it is one character
    (``ẞ`` → ``ß``, ``ς`` → ``σ``, ``ß`` stays)."""
    upper = char.upper() if len(char.upper()) == 1 else char
    return upper.lower() if len(upper.lower()) == 1 else upper


def _file_id(path):
    """(device, inode) of the file ``path`` names, links followed: one file under any of its names."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


OUTPUT_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
MAX_SIDE = {".jpg": 65500, ".webp": 16383}  # pixels per side the format can store
NAME_MAX = 255  # the longest file name (in ``name_length``'s units) on Linux, macOS and Windows file systems


def name_length(name):
    """A file name's length as file systems limit it, and its unit: UTF-16 code units on Windows, bytes elsewhere."""
    if os.name == "nt":
        return len(name.encode("utf-16-le")) // 2, "UTF-16 code units"
    return len(os.fsencode(name)), "bytes"


def check_output_name(out):
    """Refuse an output whose file name is too long to be written (an input name of the longest length with a
    longer suffix, or with its own suffix kept), before any work is done on it."""
    length, unit = name_length(os.path.basename(out))
    if length > NAME_MAX:
        raise ImageInputError(f"The output {quoted_name(os.path.basename(out))} would be named with more than "
                              f"{NAME_MAX} {unit}, the most a file name may have: give the input a shorter name.")


def check_output_size(out, height, width):
    """Refuse an output the format cannot store, before any work is done on it."""
    limit = MAX_SIDE.get(os.path.splitext(out)[1].lower())
    if limit and max(height, width) > limit:
        raise ImageInputError(f"The output would be {width}×{height} px, but {os.path.splitext(out)[1]} stores at "
                              f"most {limit} px a side: use --format png, a smaller --upscale, or cut the image.")


def _integer_in(allowed, what):
    """An argparse type: an integer in the range ``allowed`` (named ``what`` in the message)."""
    def integer(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value not in allowed:  # (None in a range would walk the whole range)
            raise argparse.ArgumentTypeError(f"must be an integer from {what}, got {text!r}")
        return value
    return integer


SEEDS = range(-2**63, 2**64)  # what torch.Generator.manual_seed takes (a negative s draws as the seed 2⁶⁴ + s)


def add_seed_arg(parser, default, help):
    """--seed, refused when the arguments are read where a ``torch.Generator`` cannot take it."""
    parser.add_argument("--seed", type=_integer_in(SEEDS, "-2^63 to 2^64 - 1"), default=default,
                        help=f"{help} (-2^63 to 2^64 - 1; default {default})")


def add_tile_args(parser, mode_note=""):
    """The latent and VAE tiles, as both methods take them (``check_tile_args`` checks them)."""
    parser.add_argument("--tile-latent", type=int, default=DEFAULT_TILES.tile_latent,
                        help="latent tile size (latent px; 0 = never tile; default %(default)s)")
    parser.add_argument("--tile-overlap", type=int, default=DEFAULT_TILES.tile_overlap,
                        help="latent tile overlap (latent px; default %(default)s)")
    parser.add_argument("--vae-tile-encode", type=int, default=DEFAULT_TILES.vae_tile_encode,
                        help="VAE encoder tile size (image px; 0 = off; default %(default)s)")
    parser.add_argument("--vae-tile-decode", type=int, default=DEFAULT_TILES.vae_tile_decode,
                        help="VAE decoder tile size (latent px; 0 = off; default %(default)s)")
    parser.add_argument("--vae-tile-mode", choices=["bounded", "exact"], default="bounded",
                        help="bounded: one tile at a time, memory stays flat as images grow (default); exact: the "
                             f"untiled result, memory grows with the image{mode_note}")


def add_output_args(parser):
    parser.add_argument("--format", choices=list(OUTPUT_FORMATS), default="png",
                        help="output file format (default png, lossless)")
    parser.add_argument("--quality", type=_integer_in(range(1, 101), "1 to 100"), default=95,
                        help="jpg/webp quality, 1 to 100 (default 95)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace existing output files")
    group.add_argument("--skip-existing", action="store_true",
                       help="leave out inputs whose output exists (resume an interrupted folder run)")


class OutputMadeMeanwhile(DiffSRError):
    """An output that appeared after the outputs were planned: made by another run writing to the same folder."""

    def __init__(self, out):
        self.what = (f"its output {quoted_name(out)} was made since this run started (by another run writing to the "
                     "same folder?)")
        super().__init__(f"{self.what} and is left as it is; run again with --skip-existing to upscale only the images "
                         "whose output is missing, or with --overwrite to replace it")


def upscale_all(pairs, upscale_one, desc, quality=95, output_size=lambda height, width: (height, width),
                overwrite=False, skip_existing=False, output_folder=None):
    """``save_image(upscale_one(image, out), out, metadata, quality, alpha, overwrite)`` with ``read_image(path)``
    for each (path, out) pair, in order (a transparent image's alpha upscaled bicubically; dropped, with a note, for
    jpg).

    An image that fails on its own (unreadable or unusable: ``DiffSRError``/``ValueError``; an output, of
    ``output_size(height, width)``, that the format cannot store, or whose name is too long; out of memory even at
    the smallest tiles; an output ``save_image`` could not make, an ``ImageInputError``; unless ``overwrite``, an
    output that another run made meanwhile, found before the upscale or when it is written: ``OutputMadeMeanwhile``,
    which with ``skip_existing`` skips the image with a note instead) is reported and skipped, and
    the others go on; an output that cannot be written (another ``DiffSRError``: a full disk, a folder not writable)
    stops the run, and so do weights that do not fit on the device (``WeightsOutOfMemory``) and Ctrl-C: each is
    raised after the summary and the number of images left (an output being written is finished first). Returns the
    exit status: 0, or 2 when any failed (listed again at the end, in the order of the run: an output that cannot be
    made is known only once the next image has been read, and that one may have failed first).

    ``output_folder`` (the run's ``--output``), where it is missing at the start, is made with the first output and
    marked as a run's (``mark_output_folder``), so that a later ``-r`` run of a folder above it leaves it out.

    While an image is upscaled, the next one is read and the previous output written on two helper threads (PIL
    releases the interpreter lock while it decodes and encodes; a 2048² PNG takes about a second to write, as long
    as a GPU upscale). At most one output waits to be written.

    The error that stops the run holds none of its tensors (``clear_finished_frames``): neither the frames of the
    run (its image, the output being written) nor this loop's (``_upscale_each``), which kept the error in a cycle
    that only the garbage collector frees.
    """
    new_folder = output_folder if output_folder is not None and not os.path.lexists(output_folder) else None
    status, stopped = _upscale_each(pairs, upscale_one, desc, quality, output_size, overwrite, skip_existing,
                                    new_folder)
    if stopped is None:
        return status
    clear_finished_frames(stopped)
    try:
        raise stopped
    finally:  # no cycle (this frame, the error): freed with the error, not by the garbage collector
        del stopped


def _upscale_each(pairs, upscale_one, desc, quality, output_size, overwrite, skip_existing, new_folder):
    """``upscale_all``'s loop and summary: (its exit status, the error that stopped the run or None); ``new_folder``
    (missing at the start) is made and marked with the first output."""
    failed, written, skipped, stopped, left = [], 0, 0, None, 0

    def fail(i, reason):  # the i-th image alone: the others go on
        tqdm.write(f"error: {shown_name(pairs[i][0])}: {reason}", file=sys.stderr)
        failed.append(i)

    def made_meanwhile(i, error):  # by another run: as an existing output with --skip-existing, else a failure
        nonlocal skipped
        if skip_existing:
            skipped += 1
            tqdm.write(f"note: {shown_name(pairs[i][0])}: skipped: {error.what} (--skip-existing)", file=sys.stderr)
        else:
            fail(i, error)

    def finish(writing, i):
        """Wait for the pending ``save_image`` of the i-th output: None, or the ``DiffSRError`` that stops the run
        (no output can be written); an output ``save_image`` could not make (``ImageInputError``) or that another run
        made meanwhile (``OutputMadeMeanwhile``) fails alone."""
        nonlocal written
        try:
            writing.result()
        except OutputMadeMeanwhile as e:
            made_meanwhile(i, e)
            written -= 1
        except ImageInputError as e:  # its encoder refused it, or memory ran out
            fail(i, e)
            written -= 1
        except DiffSRError as e:
            written -= 1
            clear_finished_frames(e)  # the writer's frames held the output
            return e.with_traceback(None)  # it led back through this frame to the loop's, which keeps the error
        return None

    with ThreadPoolExecutor(1, "diffsr-read") as reader, ThreadPoolExecutor(1, "diffsr-write") as writer:
        reading = [reader.submit(read_image, path) for path, _ in pairs[:1]]
        writing = writing_index = None  # the pending save_image and its image's index
        try:
            for i, (path, out) in enumerate(tqdm(pairs, desc=desc, unit="image", file=sys.stderr)):
                read = reading.pop()
                reading += [reader.submit(read_image, later) for later, _ in pairs[i + 1:i + 2]]
                try:
                    if not overwrite and os.path.lexists(out):  # planned as missing: another run made it since
                        raise OutputMadeMeanwhile(out)
                    check_output_name(out)
                    image, metadata, alpha = read.result()
                    check_output_size(out, *output_size(*image.shape[-2:]))
                    with torch.inference_mode():
                        result = upscale_one(image, out)
                except WeightsOutOfMemory as e:  # the weights do not fit: no image can run
                    stopped, left = e, len(pairs) - i
                    break
                except OutputMadeMeanwhile as e:
                    made_meanwhile(i, e)
                    continue
                except (DiffSRError, ValueError, OutOfMemory) as e:
                    fail(i, f"out of memory even at the smallest tiles ({e})" if isinstance(e, OutOfMemory) else e)
                    continue
                if writing is not None:  # an output that cannot be written stops the run: the next could not be
                    error, writing = finish(writing, writing_index), None
                    if error is not None:  # left: its image, this one and the rest
                        stopped, left = error, len(pairs) - i + 1
                        break
                if alpha is not None and out.lower().endswith(".jpg"):
                    tqdm.write(f"note: {shown_name(path)}: jpg has no transparency, the alpha is dropped (--format png "
                               "or webp keeps it)", file=sys.stderr)
                    alpha = None
                writing = writer.submit(_save_output, new_folder, result, out, metadata, quality, alpha, overwrite)
                new_folder = None
                writing_index, written = i, written + 1
        except KeyboardInterrupt as e:  # Ctrl-C: the output being written is finished, then the summary
            stopped, left = e, len(pairs) - written - len(failed) - skipped
        try:
            error = finish(writing, writing_index) if writing is not None else None
        except KeyboardInterrupt as e:  # Ctrl-C as the last output is written: the same (a second one stops at once)
            if isinstance(stopped, KeyboardInterrupt):
                raise
            stopped, error = stopped or e, finish(writing, writing_index)
        if error is not None:
            if stopped is not None:  # the weights or Ctrl-C stopped the run as well
                tqdm.write(f"error: {error}", file=sys.stderr)
            stopped, left = stopped or error, left + 1
    if written:
        folder = os.path.commonpath([os.path.dirname(os.path.abspath(out)) for _, out in pairs])
        print(f"wrote {written} image(s) to {shown_name(folder)}", file=sys.stderr)
    if failed:
        names = ", ".join(shown_name(pairs[i][0]) for i in sorted(failed))
        print(f"error: {len(failed)} of {len(pairs)} image(s) failed: {names}", file=sys.stderr)
    if stopped is not None:
        print(f"error: stopped with {left} image(s) left (--skip-existing resumes the run):", file=sys.stderr)
    return 2 if failed else 0, stopped


def check_sizing_args(args):
    """--upscale, --process-size and --official-sizing as OSEDiff (and DAPE, which tags what OSEDiff sees) takes
    them (``check_sizing``, as the Python API checks them), before anything is loaded."""
    from ..osediff_core.pipeline import check_sizing

    check_sizing(args.upscale, args.process_size, args.official_sizing,
                 ("--upscale", "--process-size", "--official-sizing"))


def check_tile_args(args):
    """Tile sizes and overlap the commands share: not negative (0 = off), the overlap below the latent tile."""
    for name in ("tile_latent", "tile_overlap", "vae_tile_encode", "vae_tile_decode"):
        if getattr(args, name) < 0:
            raise DiffSRError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.tile_latent and args.tile_overlap >= args.tile_latent:
        raise DiffSRError(f"--tile-overlap must be smaller than --tile-latent, got {args.tile_overlap} >= "
                          f"{args.tile_latent}")


def with_smaller_tiles_on_oom(run, options):
    """``run(options)``; on out-of-memory (a CPU allocation that fails counts too) again with every tile halved
    (``tiling.with_oom_retry``), the overlap kept below the latent tile, as the nodes do."""
    defaults = type(options)()

    def attempt(**tiles):
        if tiles != {k: getattr(options, k) for k in TILE_FLOORS}:
            overlap = overlap_within(tiles["tile_latent"], options.tile_overlap)
            return run(dataclasses.replace(options, tile_overlap=overlap, **tiles))
        return run(options)

    return with_oom_retry(attempt, {k: getattr(options, k) for k in TILE_FLOORS},
                          {k: getattr(defaults, k) for k in TILE_FLOORS},
                          notify=lambda smaller: tqdm.write(f"out of memory: retrying with smaller tiles {smaller}",
                                                            file=sys.stderr))


EXIF_IFD, MAKER_NOTE, PIXEL_WIDTH, PIXEL_HEIGHT = 0x8769, 0x927C, 0xA002, 0xA003
IMAGE_WIDTH, IMAGE_LENGTH = 0x0100, 0x0101  # a pixel size in the first IFD (some phones write it in a JPEG's too)
JPEG_EXIF_LIMIT = 65533 - 8  # bytes in a JPEG APP1 segment, less its length field and "Exif\0\0"
ORIENTATION, GPS_IFD = 0x0112, 0x8825
# the first IFD's tags that EXIF has (Exif 2.32, 4.6.4), less those that lay out the stored pixels: description, make,
# model, x and y resolution and their unit, transfer function, software, date, artist, white point, primaries,
# copyright, and the Exif and GPS blocks
EXIF_IFD0 = frozenset({0x010E, 0x010F, 0x0110, 0x011A, 0x011B, 0x0128, 0x012D, 0x0131, 0x0132, 0x013B, 0x013E,
                       0x013F, 0x8298, EXIF_IFD, GPS_IFD})


@dataclasses.dataclass(frozen=True)
class PhotoMetadata:
    """What an output keeps of its input: the ICC colour profile (an RGB one) and the EXIF tags (camera, date taken,
    exposure, GPS…), less what the upscale makes wrong: the orientation (the pixels are upright now), the pixel size
    (set to the output's), the embedded thumbnail and the maker note (a camera's own block, whose offsets break when
    the EXIF is written again)."""

    icc_profile: bytes | None = None
    exif: bytes | None = None  # as read, less the orientation (``_exif_of``)

    def save_options(self, width, height, kind, name):
        """Keyword arguments for PIL's ``Image.save`` of a ``width`` × ``height`` output in format ``kind``; ``name``
        (the output's) heads a note on EXIF left out."""
        from PIL import Image

        options = {"icc_profile": self.icc_profile}
        if not self.exif:
            return options
        try:  # PIL reads more EXIF than it can write again: such a photo is upscaled without its EXIF
            exif = Image.Exif()
            exif.load(self.exif)
            sub = exif.get_ifd(EXIF_IFD)
            sub.pop(MAKER_NOTE, None)
            for ifd, tag, value in ((sub, PIXEL_WIDTH, width), (sub, PIXEL_HEIGHT, height), (exif, IMAGE_WIDTH, width),
                                    (exif, IMAGE_LENGTH, height)):
                if tag in ifd:
                    ifd[tag] = value
            data = exif.tobytes()  # IFD0 and its sub-IFDs: no thumbnail (IFD1)
        except Exception as e:  # noqa: BLE001 (whatever PIL raises, the image matters more than its tags)
            print(f"note: {shown_name(name)}: the EXIF cannot be written again ({type(e).__name__}: {e}) and is left "
                  "out", file=sys.stderr)
            return options
        if kind == "JPEG" and len(data) > JPEG_EXIF_LIMIT:
            print(f"note: {shown_name(name)}: the EXIF ({len(data)} bytes) does not fit a JPEG and is left out "
                  "(--format png or webp keeps it)", file=sys.stderr)
        else:
            options["exif"] = data
        return options


def save_image(image01, path, metadata=PhotoMetadata(), quality=95, alpha=None, overwrite=False):
    """(1, 3, H, W) in [0, 1] → an 8-bit PNG, JPEG or WebP by the name's suffix (``quality`` for the last two), with
    the input's ``metadata`` (``PhotoMetadata``: its colour profile, so its colours mean what the input's did, and its
    EXIF) and ``alpha`` (1, 1, h, w) upscaled (``with_upscaled_alpha``) when given, written atomically (temporary
    file, then ``publish``): a failed write leaves an earlier file at ``path`` as it was, and a file there is replaced
    only with ``overwrite``, even one made since the outputs were planned (``OutputMadeMeanwhile``). The temporary
    file is hidden and has a short name of its own (``partial_path``: ``path`` may use all the bytes a name may have).

    An output its encoder refuses (Pillow's ``ValueError``, or its ``OSError`` with no errno) or that runs out of
    memory is an ``ImageInputError``: that image fails, the next may be written. A file-system error is a
    ``DiffSRError``: no output can be written. Anything else is a defect and is raised as it is."""
    from PIL import Image

    from ..sr_common.image import tensor_to_uint8, with_upscaled_alpha

    tmp = partial_path(path)  # made by PIL's save, with the mode of the user's new files
    try:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        if alpha is not None:
            image01 = with_upscaled_alpha(image01.clamp(0, 1), alpha)
        image = Image.fromarray(tensor_to_uint8(image01))
        kind = OUTPUT_FORMATS[os.path.splitext(path)[1].lower().lstrip(".")]
        lossy = {"JPEG": {"quality": quality, "subsampling": 0}, "WEBP": {"quality": quality}}  # JPEG: full colour
        image.save(tmp, format=kind, **metadata.save_options(*image.size, kind, path),  # resolution, not 4:2:0
                   **lossy.get(kind, {}))
        try:
            publish(tmp, path, replace=overwrite)
        except FileExistsError as e:
            raise OutputMadeMeanwhile(path) from e
    except OSError as e:
        if e.errno is None:  # Pillow's encoder failed on this image (what the file system raises has an errno)
            raise ImageInputError(f"Cannot write {quoted_name(path)}: {e}. Try --format png.") from e
        raise DiffSRError(f"Cannot write {quoted_name(path)}: {error_text(e)}. Check that its folder is writable and "
                          "has space, or choose another --output folder.") from e
    except ValueError as e:  # the encoder refused the image (Pillow's way to refuse what a format cannot store)
        raise ImageInputError(f"Cannot write {quoted_name(path)}: {e}. Try --format png.") from e
    except (MemoryError, RuntimeError) as e:  # out of memory for this output, beside the next upscale
        if not is_out_of_memory(e, (OutOfMemory, MemoryError)):
            raise
        raise ImageInputError(f"Cannot write {quoted_name(path)}: out of memory ({type(e).__name__}: {e}). Close other "
                              "programs, or use a smaller --upscale.") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def warnings_ignored(category):
    """``category``'s warnings ignored, in every thread, while the block runs; the filters are as they were after it.
    One entry is put first in the list of filters and taken out of that same list: ``catch_warnings`` puts back the
    whole list it found, so on the helper thread that reads the images, one of the main thread's (PyTorch enters some)
    ending in the meantime would revive or drop the other's filters for the rest of the process. The entry's message
    pattern, compiled without ``re.I``, is one ``filterwarnings`` never makes (it adds ``re.I``; ``simplefilter``
    gives none), so the same filter set meanwhile by another thread is not the one taken out, nor left unset as a
    duplicate; one that reset the filters meanwhile took it out already."""
    filters, entry = warnings.filters, ("ignore", re.compile(""), category, None, 0)
    filters.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # resetwarnings() emptied the list meanwhile
            filters.remove(entry)


# .path: the image file this thread decodes (``read_image``), which the warnings it gives meanwhile are about;
# .noted: the notes given on it so far (each is said once per image)
_reading = threading.local()


def read_image(path):
    """An image file → ((1, 3, H, W) float in [0, 1], its ``PhotoMetadata``, its alpha (1, 1, H, W) if it has
    transparency, else None).

    RGB as the official code converts it, turned upright by the file's EXIF orientation as a viewer (and ComfyUI's
    Load Image) shows it; 16-bit and float grayscale keep their values (PIL's RGB conversion would clip them at 255),
    and their transparent value (a PNG's tRNS) gives their alpha.
    """
    import numpy as np

    from ..sr_common.image import pil_to_tensor

    _reading.path, _reading.noted = path, set()
    try:
        im, metadata = _decoded_upright(path)
    finally:
        _reading.path = None
    if im.mode in HIGH_DEPTH_PEAK:
        values = np.asarray(im, dtype=np.float32)
        plane = torch.from_numpy(values / HIGH_DEPTH_PEAK[im.mode]).clamp(0, 1)[None, None].repeat(1, 3, 1, 1)
        opaque = values != im.info.get("transparency", np.nan)  # a PNG's tRNS: one value is transparent
        return plane, metadata, None if opaque.all() else torch.from_numpy(opaque.astype(np.float32))[None, None]
    alpha = None
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        plane = np.asarray(im.convert("RGBA").getchannel("A"))
        alpha = None if plane.min() == 255 else torch.from_numpy(plane / np.float32(255))[None, None]
    return pil_to_tensor(im), metadata, alpha


def _decoded_upright(path):
    """The first frame of an image file, decoded and turned upright by its EXIF orientation, and its
    ``PhotoMetadata``. Whatever PIL raises on a damaged file (a cut multi-page TIFF: TypeError; a cut GIF:
    IndexError, struct.error; an unknown compression: KeyError) is an ``ImageInputError``, whose message does not
    name the file (its callers' lines do: ``error: <path>: Cannot read image: ...``); out of memory is not. An
    image past Pillow's decompression-bomb warning (89 megapixels) is read, with a one-line note.

    A TIFF is turned by Pillow itself as it loads (tested on 10.0 to 13.0), and Pillow 10.0 keeps the orientation in
    its EXIF after that, so ``exif_transpose`` would turn it twice: a TIFF is only loaded. It is read through a file
    object: from a path, Pillow 11 to 13 map an uncompressed L, RGBA or 16-bit TIFF with orientation 5 to 8 at the
    turned size and scramble it."""
    from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

    try:  # Pillow's warning, with its source line, is said as a note below
        with warnings_ignored(Image.DecompressionBombWarning), open(path, "rb") as file, Image.open(file) as opened:
            width, height = opened.size
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                tqdm.write(f"note: {shown_name(path)}: {width}×{height} px, more than the {Image.MAX_IMAGE_PIXELS:,} "
                           "pixels Pillow opens without a decompression-bomb warning; it is read as given",
                           file=sys.stderr)
            icc_profile = opened.info.get("icc_profile")
            if icc_profile and icc_profile[16:20] != b"RGB ":  # a CMYK, gray or Lab profile does not describe the
                icc_profile = None                             # RGB output (its colour space: header bytes 16-19)
            frames = getattr(opened, "n_frames", 1)
            if frames > 1:
                tqdm.write(f"note: {shown_name(path)}: {frames} frames (an animation or a multi-page file); only the "
                           "first is read", file=sys.stderr)
            if isinstance(opened, TiffImagePlugin.TiffImageFile):
                opened.load()
                upright = opened.copy()
            else:
                upright = ImageOps.exif_transpose(opened)  # a decoded copy
            return upright, PhotoMetadata(icc_profile, _exif_of(opened))
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"Image too large to open safely ({e}). Downscale it or cut it into parts "
                              "first.") from e
    except UnidentifiedImageError as e:  # PIL's message names the file object it read, not the file
        raise ImageInputError(f"Cannot read image: {_not_an_image(path)}") from e
    except (OSError, ValueError, SyntaxError) as e:  # SyntaxError: PIL's broken PNG chunk
        reason = e.strerror if isinstance(e, OSError) and e.filename is not None else e  # less the file's name
        if str(reason).startswith("image file is truncated"):  # Pillow's words for a file cut short
            reason = f"{reason}: the file is cut short (its copy or download did not finish). Copy it again."
        raise ImageInputError(f"Cannot read image: {reason}") from e
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 (PIL meets the damage where it expects none)
        raise ImageInputError(f"Cannot read image: the file is damaged ({type(e).__name__}: {e}). Export or copy it "
                              "again.") from e


def _not_an_image(path):
    """What a file that Pillow finds no image in is, by its first bytes, and the fix: an empty file or an HTML page
    (a failed download) is copied or downloaded again; another is exported as PNG or JPEG."""
    try:
        with open(path, "rb") as file:
            head = file.read(64)
    except OSError:  # as unreadable as it was to Pillow: the general advice
        head = None
    if head == b"":
        return "the file is empty (0 bytes): its copy or download did not finish. Copy it again."
    if head and head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "it is an HTML page (a failed download or a login page), not an image. Download it again."
    return "it is not an image, or in a format Pillow cannot read. Export it as PNG or JPEG."


def _exif_of(opened):
    """The EXIF of an opened image as bytes, less the orientation (the pixels are turned upright); of a TIFF, whose
    first page holds the EXIF tags beside those that lay out its pixels, only the tags EXIF has there. None where
    it has none or PIL cannot read it (the pixels still can)."""
    from PIL import Image, TiffImagePlugin

    try:
        exif = Image.Exif()
        exif.load(opened.getexif().tobytes())  # a copy, of its own bytes: the file's is left as read
        tiff = isinstance(opened, TiffImagePlugin.TiffImageFile)
        for tag in [tag for tag in exif if tag == ORIENTATION or (tiff and tag not in EXIF_IFD0)]:
            del exif[tag]
        return exif.tobytes() if len(exif) else None
    except Exception:  # noqa: BLE001 (a damaged EXIF costs the tags, not the image)
        return None


def load_image(path):
    """``read_image``'s RGB image alone."""
    return read_image(path)[0]


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise DiffSRError("--device cuda was asked for but no CUDA GPU is available; use --device cpu.")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def add_device_args(parser):
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=list(PRECISIONS), default=None,
                        help="network precision; default fp16 on CUDA GPUs that run it well (compute capability 7 "
                             "or more, not GTX 16xx / T-series), else fp32")


def add_compile_arg(parser):
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the diffusion networks: the first image (and each new size) compiles "
                             "first, minutes on a CPU; needs a C++ compiler (CPU) or Triton (GPU)")


def show_warning_as_note(message, category, filename, lineno, file=None, line=None):
    """A warning (ours, such as the fp16 VAE's overflow, or a library's) as the commands' other notes: one line,
    ``note: <message>``, beside the progress bar, without Python's ``file:line: Category:`` header and source line.
    One given while an image is decoded (Pillow's on a damaged EXIF: "Truncated File Read") names the image,
    once per image: ``note: <image>: <message>``."""
    text, image = " ".join(str(message).split()), getattr(_reading, "path", None)
    if image is not None:
        if text in _reading.noted:
            return
        _reading.noted.add(text)
        text = f"{shown_name(image)}: {text}"
    tqdm.write(f"note: {text}", file=file or sys.stderr)


BYTES_OR_ESCAPE = "comfyui_diffsr.bytes_or_escape"  # the codecs error handler name of ``bytes_or_escape``


def bytes_or_escape(error):
    """The stdout error handler of the commands: the character at ``error.start`` that the encoding cannot write is,
    where it is U+DC80-U+DCFF (the byte 0x80-0xFF of a name that is not UTF-8, as Python decodes it) and the
    encoding is ASCII-compatible, that byte (``surrogateescape``); else its Python escape (``backslashreplace``:
    \\xe9, \\u5199, \\U0001f469)."""
    char = error.object[error.start]
    if "\udc80" <= char <= "\udcff" and "a".encode(error.encoding) == b"a":
        return bytes([ord(char) - 0xDC00]), error.start + 1
    return char.encode("ascii", "backslashreplace").decode("ascii"), error.start + 1


def run_main(main_fn, argv, interrupted="interrupted"):
    """Run a command: our own errors print one clear line and exit with status 2; Ctrl-C prints ``interrupted`` (the
    command's own line, such as how to resume) and exits with status 130; warnings print as notes
    (``show_warning_as_note``): Pillow's on each image that gives them, not on the first alone (Python's default
    shows a warning once per source line), and not torch 2.1's "TypedStorage is deprecated", which its own
    weights-only loader gives (a filter the user sets with -W or PYTHONWARNINGS comes first). A strict stdout writes
    every name (``bytes_or_escape``): one that is not UTF-8 as its bytes (``escaped_name``), as ``sha256sum`` prints
    it, and a character its encoding lacks (Windows' file or pipe in the code page: 写真.png in cp1252) as a Python
    escape, not a UnicodeEncodeError after the work is done or half way through a folder; errors the user asked for
    (PYTHONIOENCODING's ``:replace``, ``:backslashreplace``) are kept.

    Large CPU tensors are allowed transparent huge pages (PyTorch's ``THP_MEM_ALLOC_ENABLE``):
    the forward passes fault in gigabytes of fresh pages, and 2 MiB pages cut that cost (about
    15 % of an OSEDiff 128→512 run on 2 cores, same output).
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if hasattr(sys.stdout, "reconfigure") and sys.stdout.errors == "strict":
        codecs.register_error(BYTES_OR_ESCAPE, bytes_or_escape)
        sys.stdout.reconfigure(errors=BYTES_OR_ESCAPE)
    try:
        with ieee_float32(), warnings.catch_warnings():  # --dtype fp32 is float32 on every GPU, not TF32
            warnings.showwarning = show_warning_as_note
            warnings.filterwarnings("always", module=r"PIL\.", append=True)
            warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning, append=True)
            return main_fn(argv)
    except (DiffSRError, WeightsOutOfMemory) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from torch._dynamo.exc import BackendCompilerFailed

        if not isinstance(e, BackendCompilerFailed):
            raise
        cause = e.inner_exception
        print(f"error: torch.compile failed ({e.backend_name}: {type(cause).__name__}: {cause}). "
              "Run again without --compile.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout stopped (``dape … | head -1``): quietly, as a Unix tool's SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more for Python's flush at exit
        return 128 + 13

