"""Safe reading of weight files: safetensors, or pickles opened with ``weights_only=True``.

Nothing here ever unpickles code. A file that cannot be opened safely is refused with a
message that says how to convert it, never loaded with ``weights_only=False``.
"""

import contextlib
import ctypes
import errno
import hashlib
import json
import mmap
import os
import pickle
import queue
import re
import secrets
import socket
import stat
import struct
import threading

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ArchitectureMismatch, NotAConfigFile, WeightFileError
from .names import error_text, quoted_name

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pkl", ".pth", ".pt", ".ckpt", ".bin")
CONVERT_HINT = ("If you trust the file, convert it once in a separate Python with `torch.load(path, "
                "weights_only=False)` and `safetensors.torch.save_file(...)`, then load the .safetensors file.")
DOWNLOAD_HINT = ("Download it again. The official SD 2.1-base, OSEDiff, DAPE and RAM files: `diffsr download "
                 "sd21-base|osediff|osediff-face|dape|ram` (in ComfyUI the loader's 'download:' entry) checks the file "
                 "there, moves a damaged one aside as <file>.bad and fetches it afresh; DoSSR's: from the links in its "
                 "official README.")


def gone_link_target(path):
    """Where ``path`` is a link whose file was moved or deleted: "a link to '<target>', which does not exist (moved
    or deleted)"; else ''."""
    if not os.path.islink(path) or os.path.exists(path):
        return ""
    return f"a link to {quoted_name(os.readlink(path))}, which does not exist (moved or deleted)"


def dangling_link(path):
    """For a path that does not exist: where it is a link, the sentence naming its target (``gone_link_target``) and
    the fix; else ''."""
    target = gone_link_target(path)
    return f" It is {target}: link the file again, or give its path." if target else ""


def special_file(mode):
    """What a file of ``mode`` (``os.stat``'s) that is not a regular file is, for a message: "a FIFO (a named pipe)",
    "a device", or "not a regular file"."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (a named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


MAX_CONFIG_BYTES = 1 << 20  # SD's JSON configs are under 10 KB, the ControlLDM yamls under 3 KB


def read_config_bytes(path):
    """The bytes of the config file ``path`` (a model folder's JSON, a ControlLDM yaml): a regular file of at most
    ``MAX_CONFIG_BYTES``, else ``NotAConfigFile``. Opened without waiting (``O_NONBLOCK``), so that a FIFO is told by
    its type: its read would wait for a writer for ever (ComfyUI loading the model with it). A huge file would be
    read whole into memory. Opened by ``open`` itself, which closes what it refuses (a folder): a descriptor handed to
    it is left open."""
    with open(path, "rb", opener=lambda name, flags: os.open(name, flags | getattr(os, "O_NONBLOCK", 0))) as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise NotAConfigFile(f"{quoted_name(path)} is not a config file: it is {special_file(info.st_mode)}.")
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        size_mb = max(info.st_size, len(data)) / 2**20
        raise NotAConfigFile(f"{quoted_name(path)} is not a config file: it is {size_mb:,.1f} MB, and the pack reads "
                             f"config files of at most {MAX_CONFIG_BYTES >> 20} MB.")
    return data


def _check_file(path):
    """``path`` as a string, where it is a regular file (links followed) of at least one byte; refused by name
    otherwise, before it is opened: a FIFO's read would wait for a writer for ever, a device's (/dev/zero) would not
    end, and safetensors waits in ``safe_open`` holding the interpreter lock (every thread of the process stops)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        fix = dangling_link(path) or " Check the path or the model folder."
        raise WeightFileError(f"Weight file not found: {quoted_name(path)}.{fix}")
    if os.path.isdir(path):
        raise WeightFileError(f"Expected a weight file but {quoted_name(path)} is a folder; give the file itself.")
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise WeightFileError(f"{quoted_name(path)} is not a weight file: it is {special_file(mode)}. Give the weight "
                              "file itself.")
    if os.path.getsize(path) == 0:
        raise WeightFileError(f"Weight file {quoted_name(path)} is empty (0 bytes): the download or copy did not "
                              "finish. Download it again.")
    return path


IMAGE_KIND = "an image, not weights"  # what ``sniff`` says of a PNG, JPEG, GIF or WebP
IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")  # an image so named was given by mistake


def sniff(path):
    """What the first bytes of a file say it is: 'zip', 'pickle', 'safetensors', or a description of another kind."""
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"  # 8-byte little-endian header size, then the JSON header
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x80"):
        return "pickle"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (the weights were never downloaded: run `git lfs pull` or download the file)"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a failed download or a login page), not weights"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF")):
        return IMAGE_KIND
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "not a weight file (unknown binary format)"
    if any(b < 9 or 13 < b < 32 for b in head):
        return "not a weight file (unknown binary format)"
    return "a text file, not weights"


def _unpickling_detail(error):
    """The informative line of torch's weights-only refusal (e.g. 'unsupported GLOBAL posix.system')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for words in ("GLOBAL", "Unsupported", "WeightsUnpickler"):
        found = [line for line in lines if words in line]
        if found:
            return found[0]
    return lines[0] if lines else type(error).__name__


def _damaged_safetensors(name, error):
    return WeightFileError(f"Cannot read {quoted_name(name)} as safetensors ({error}). The file is truncated or "
                           f"damaged. {DOWNLOAD_HINT}")


def check_weight_file(path):
    """Refuse a damaged or unsafe weight file without loading its tensors (safetensors: header and size only)."""
    path = _check_file(path)
    if not (path.lower().endswith(SAFETENSORS_SUFFIXES) and sniff(path) == "safetensors"):
        read_state_dict(path)
        return
    try:
        with safe_open(path, "pt"):
            pass
    except Exception as e:
        raise _damaged_safetensors(os.path.basename(path), e) from e


def require_float(tensors, what, name=None):
    """Refuse entries that are not floating-point tensors where weights are expected (``name``: the file)."""
    for key, value in tensors.items():
        if not (torch.is_tensor(value) and value.is_floating_point()):
            kind = str(value.dtype).removeprefix("torch.") if torch.is_tensor(value) else type(value).__name__
            where = f"{quoted_name(name)}: the" if name else "The"
            raise WeightFileError(f"{where} {what} tensor {key!r} is {kind}, but weights must be floating-point "
                                  "tensors: the file is quantised, damaged or was written wrongly. Use a float32 or "
                                  "float16 copy of it: download or convert it again.")


def read_state_dict(path, *, mmap=True, float32=False):
    """Read a weight file into a dict without running any code from it.

    ``.safetensors`` is validated by safetensors and memory-mapped, or with ``mmap=False`` read into this process's
    memory (``float32``: its floating-point tensors converted to float32 as they are read); anything else with
    ``torch.load(weights_only=True)`` (memory-mapped where the file is a zip pickle and ``mmap``). Raises
    ``WeightFileError`` naming the file and the fix on any failure.
    """
    path = _check_file(path)
    name = os.path.basename(path)
    kind = sniff(path)
    if kind == IMAGE_KIND and name.lower().endswith(IMAGE_FILE_SUFFIXES):  # a slip: the image itself was given
        raise WeightFileError(f"Cannot read {quoted_name(name)}: it is an image, not a weight file. Give the weight "
                              "file there (the images to upscale are the command's inputs).")
    if kind not in ("zip", "pickle", "safetensors"):
        raise WeightFileError(f"Cannot read {quoted_name(name)}: it is {kind}. {DOWNLOAD_HINT}")
    named_safetensors = path.lower().endswith(SAFETENSORS_SUFFIXES)
    if named_safetensors and kind != "safetensors":
        raise WeightFileError(f"{quoted_name(name)} is named .safetensors but is a PyTorch pickle, which could run "
                              f"code when loaded. {CONVERT_HINT}")
    if kind == "safetensors":
        if not named_safetensors:
            raise WeightFileError(f"{quoted_name(name)} is a safetensors file with a "
                                  f"{quoted_name(os.path.splitext(name)[1])} name; rename it to .safetensors.")
        try:
            return _map_safetensors(path) if mmap else _read_safetensors_into_memory(path, float32)
        except (MemoryError, WeightFileError):
            raise
        except Exception as e:  # safetensors raises several types on damaged headers
            raise _damaged_safetensors(name, e) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and kind == "zip")
    except pickle.UnpicklingError as e:
        raise WeightFileError(
            f"Refusing to open {quoted_name(name)}: it contains Python objects that could run code when loaded, or it "
            f"is damaged ({_unpickling_detail(e)}). This pack only loads plain tensors. {CONVERT_HINT} If the file "
            "came from the official release, it may be damaged: download it again.") from e
    except MemoryError:
        raise
    except Exception as e:  # a damaged zip or pickle can fail in many ways inside torch.load
        first = str(e).splitlines()[0] if str(e) else ""
        first = first.split(". ")[0].rstrip(".") if len(first) > 160 else first  # torch's first sentence, whole
        raise WeightFileError(f"Cannot read {quoted_name(name)} ({type(e).__name__}: {first}). The file is truncated, "
                              f"damaged or not a PyTorch weight file. {DOWNLOAD_HINT}") from e


def maps_when_read(path):
    """Whether ``read_state_dict`` memory-maps the file's tensors rather than reading them: a safetensors file or a
    zip pickle (not a legacy pickle). A path that is no weight file is refused by name (``_check_file``)."""
    return sniff(_check_file(path)) in ("safetensors", "zip")


def stored_as_float32(path):
    """Whether a weight file holds its floating-point tensors as float32, from the safetensors header (the official
    SD 2.1 files do, fp16 copies do not); assumed for pickles, whose dtypes are only known once loaded."""
    try:
        if sniff(_check_file(path)) != "safetensors":
            return True
        layout, _ = _safetensors_layout(path)
    except Exception:  # unreadable or damaged: read_state_dict says what is wrong
        return True
    return all(dtype == torch.float32 for dtype, *_ in layout.values() if dtype.is_floating_point)


def _fresh_memory(nbytes):
    """``nbytes`` of new, writable memory in small pages (never transparent huge pages).

    On a fragmented host, the kernel compacts memory to hand out each huge page that was asked for
    (``madvise(MADV_HUGEPAGE)``: numpy does it by default, PyTorch with ``THP_MEM_ALLOC_ENABLE``), and the
    first write of a 5.2 GB buffer took 12–19 s on 2 cores against 2.4–3 s in 4 KB pages."""
    if nbytes > 0 and hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        memory.madvise(mmap.MADV_NOHUGEPAGE)
        return memory
    return bytearray(nbytes)


MADV_POPULATE_WRITE = 23  # Linux >= 5.14
PREFAULT_STEP = 128 << 20  # bytes per madvise call (after each, the thread waits for the interpreter lock)


def _prefault_in_order(address, nbytes, stop):
    """Fault in the pages of ``nbytes`` of memory at ``address`` for writing, front to back, without writing them
    (``madvise(MADV_POPULATE_WRITE)``: pages already present are left as they are). Does nothing where the kernel
    lacks it or the memory is not whole pages of a private mapping."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise  # ctypes releases the interpreter lock for the call
        madvise.argtypes, madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    except (OSError, AttributeError, TypeError):
        return
    skip = -address % mmap.PAGESIZE  # madvise takes whole pages
    address, nbytes = address + skip, nbytes - skip
    for done in range(0, nbytes, PREFAULT_STEP):
        if stop.is_set() or madvise(address + done, min(PREFAULT_STEP, nbytes - done), MADV_POPULATE_WRITE) != 0:
            return


@contextlib.contextmanager
def prefaulting(tensor):
    """While the body fills ``tensor`` (new memory, ``fresh_float32_cpu``) front to back, a second thread faults its
    pages in ahead of it, so the kernel's work for new memory (5.2 GB: 1.6–3.5 s on this 2-core VM, writing the same
    memory again 0.3 s) runs on the other core instead of in the filling thread: reading and converting the fp16
    SD 2.1 file took 3.3–5.2 s instead of 5.6–6.7 s."""
    if tensor.numel() == 0:
        yield tensor
        return
    stop = threading.Event()
    thread = threading.Thread(target=_prefault_in_order, name="prefault", daemon=True,
                              args=(tensor.data_ptr(), tensor.numel() * tensor.element_size(), stop))
    thread.start()
    try:
        yield tensor
    finally:
        stop.set()
        thread.join()


def fresh_float32_cpu(numel):
    """An uninitialised float32 CPU tensor of ``numel`` elements in small pages (see ``_fresh_memory``)."""
    if numel == 0:
        return torch.empty(0, dtype=torch.float32)
    return torch.frombuffer(_fresh_memory(numel * 4), dtype=torch.float32)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
READ_CHUNK = 64 << 20


def _safetensors_layout(path):
    """{name: (dtype, shape, begin, end)} and the offset of the data, from a header safetensors has validated
    (offsets, sizes, dtypes)."""
    with safe_open(path, framework="pt"):
        pass
    with open(path, "rb", buffering=0) as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    layout = {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise WeightFileError(f"{quoted_name(os.path.basename(path))}: tensor {name!r} has dtype {info['dtype']}, "
                                  "which this pack does not read: use a float32 or float16 copy of the file.")
        layout[name] = (dtype, info["shape"], *info["data_offsets"])
    return layout, 8 + length


def _map_safetensors(path):
    """The tensors of a safetensors file as views of the file memory-mapped (copy-on-write: the file is never
    written). The kernel can drop pages nothing wrote, but every page stays mapped while any tensor of the file
    lives. safetensors' own ``load_file`` maps the file too, but cuts its tensors out of the mapping with one storage
    slice each, which read them from disk one by one (1.3 s for SD 2.1 on 2 cores, cold cache) before anything
    could use them; here nothing is read until used."""
    layout, start = _safetensors_layout(path)
    with open(path, "rb") as f:
        raw = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
    tensors = {}
    for name, (dtype, shape, begin, end) in layout.items():
        part = raw[start + begin:start + end]
        if (start + begin) % dtype.itemsize:  # an unaligned tensor (not written by safetensors' own writers): copied
            part = part.clone()
        tensors[name] = part.view(dtype).reshape(shape) if end > begin else torch.empty(shape, dtype=dtype)
    return tensors


def _read_exactly(f, offset, view):
    f.seek(offset)
    done = 0
    while done < len(view):
        got = f.readinto(view[done:done + READ_CHUNK])
        if not got:
            raise OSError(f"the file ended {len(view) - done} bytes early")
        done += got


PIECE = 16 << 20  # bytes converted at a time


def _read_safetensors_into_memory(path, float32=False):
    """The tensors of a safetensors file in one buffer of this process's own (``_fresh_memory``), read in file order,
    with ``float32`` the floating-point ones converted to float32 on the way.

    For a model that replaces some of its weights (the OSEDiff LoRA merge): in a mapping the old ones would stay
    resident (3.8 GB for SD 2.1's UNet). Converting as it reads, an fp16 file costs its float32 size in memory, not
    that plus a mapped or read fp16 copy. A second thread reads, a piece ahead of the conversion, so disk and
    conversion overlap (reading and converting SD 2.1 took 1.7 s + 1.5 s one after the other on 2 cores)."""
    layout, start = _safetensors_layout(path)
    out_dtype = {n: torch.float32 if float32 and d.is_floating_point else d for n, (d, *_) in layout.items()}
    offsets, total = {}, 0
    in_file_order = sorted(layout.items(), key=lambda item: item[1][2])
    for name, (dtype, _, begin, end) in in_file_order:  # the buffer filled front to back
        offsets[name] = total
        total += ((end - begin) // dtype.itemsize * out_dtype[name].itemsize + 7) // 8 * 8  # 8-byte aligned slots
    memory = _fresh_memory(total)
    raw = torch.frombuffer(memory, dtype=torch.uint8) if total else torch.empty(0, dtype=torch.uint8)
    tensors, pieces = {}, []  # (file offset, bytes, destination offset, dtype to convert from or None)
    for name, (dtype, shape, begin, end) in in_file_order:
        size, at = end - begin, offsets[name]
        if out_dtype[name] == dtype and size:  # read straight into place, with the previous piece if both follow on
            last = pieces[-1] if pieces else None
            if last and last[3] is None and last[0] + last[1] == start + begin and last[2] + last[1] == at:
                pieces[-1] = (last[0], last[1] + size, last[2], None)
            else:
                pieces.append((start + begin, size, at, None))
        elif out_dtype[name] != dtype:  # converted to float32 piece by piece
            pieces += [(start + begin + done, min(PIECE, size - done), at + done // dtype.itemsize * 4, dtype)
                       for done in range(0, size, PIECE)]
        nbytes = size // dtype.itemsize * out_dtype[name].itemsize
        tensors[name] = (raw[at:at + nbytes].view(out_dtype[name]).reshape(shape) if size
                         else torch.empty(shape, dtype=out_dtype[name]))
    free, ready, stop = queue.Queue(), queue.Queue(), threading.Event()
    for _ in range(2):
        free.put(_fresh_memory(PIECE))

    def read_pieces():
        try:
            with open(path, "rb", buffering=0) as f, memoryview(memory) as out:
                for offset, size, at, dtype in pieces:
                    if dtype is None:
                        _read_exactly(f, offset, out[at:at + size])
                        continue
                    slot = free.get()
                    if stop.is_set():
                        return
                    with memoryview(slot) as view:
                        _read_exactly(f, offset, view[:size])
                    ready.put((slot, size, at, dtype))
            ready.put(None)
        except BaseException as e:  # raised in the caller's thread
            ready.put(e)

    reader = threading.Thread(target=read_pieces, name="safetensors-reader", daemon=True)
    with prefaulting(raw):
        reader.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                slot, size, at, dtype = item
                numel = size // dtype.itemsize
                raw[at:at + 4 * numel].view(torch.float32).copy_(torch.frombuffer(slot, dtype=dtype, count=numel))
                free.put(slot)
        finally:
            stop.set()
            free.put(None)  # wakes the reader if it waits for a slot
            reader.join()
    return {name: tensors[name] for name in layout}


def as_float32_cpu(tensors):
    """``tensors`` as float32 CPU tensors: float32 CPU ones as they are, the others (an fp16 checkpoint, tensors
    on a GPU) converted into slices of one new buffer (``fresh_float32_cpu``). One allocation rather than one
    per tensor: converting a 2.6 GB fp16 SD 2.1 tensor by tensor took 11 s on 2 cores."""
    convert = [k for k, v in tensors.items() if v.dtype != torch.float32 or v.device.type != "cpu"]
    buffer = fresh_float32_cpu(sum(tensors[k].numel() for k in convert))
    out, offset = dict(tensors), 0
    with prefaulting(buffer):
        for k in convert:
            size = tensors[k].numel()
            out[k] = buffer[offset:offset + size].view(tensors[k].shape).copy_(tensors[k])
            offset += size
    return out


def load_module_weights(module, state, what, name=None, fix="pass a config matching the file"):
    """Fill ``module`` with ``state``: every key it expects, of its shape, no others (else an ``ArchitectureMismatch``
    saying what differs and ``fix``), floating point (else ``require_float``'s ``WeightFileError``). float32 CPU
    tensors are taken as they are (no copy), others converted once (``as_float32_cpu``: an fp16 file, or tensors on a
    GPU); the module's own tensors are replaced, so a module built on the meta device costs nothing to build. Returns
    True when every tensor is a new one."""
    expected = module.state_dict()
    if not any(k.startswith("text_model.") for k in expected):  # transformers >= 5 drops CLIP's prefix
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    where = f" in {quoted_name(os.path.basename(os.fspath(name)))}" if name else ""
    require_float({k: state[k] for k in expected if k in state}, what, name and os.path.basename(os.fspath(name)))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [
            f"missing {len(missing)} key(s) (e.g. {missing[:2]})" if missing else "",
            f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[:2]})" if unexpected else "",
            f"{len(wrong)} shape(s) differ (e.g. {wrong[0]}: file {tuple(state[wrong[0]].shape)} vs model "
            f"{tuple(expected[wrong[0]].shape)})" if wrong else ""]))
        raise ArchitectureMismatch(f"The {what}{where} does not match the architecture: {detail}. {fix}.",
                                   keys_match=not (missing or unexpected))
    tensors = as_float32_cpu({k: state[k] for k in expected})
    module.load_state_dict(tensors, strict=True, assign=True)
    _materialise_position_ids(module)
    return not any(tensors[k] is state[k] for k in expected)


def _materialise_position_ids(module):
    """CLIP's non-persistent ``position_ids`` buffer, the one buffer no state dict carries, for a model built on
    the meta device."""
    for name, buffer in list(module.named_buffers()):
        if buffer.is_meta:
            if not name.endswith("position_ids"):
                raise RuntimeError(f"{type(module).__name__}.{name} is not in the state dict and was built on the "
                                   "meta device")
            owner = module.get_submodule(name.rpartition(".")[0])
            owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape).clone(),
                                  persistent=False)


# the ``format`` metadata of the pack's converted files (what each is: ``known_files.CONVERTED``)
OSEDIFF_FORMAT, DAPE_FORMAT, DOSSR_FORMAT = "osediff", "diffsr-dape-tagger", "dossr-diffusers-v1"


def stored_metadata(path):
    """The metadata of the safetensors file ``path`` as stored: None where it has none (``save_file`` without
    ``metadata``), {} where it has an empty one. A path that is no weight file is refused (``_check_file``), a file
    safetensors cannot open by name (``_damaged_safetensors``)."""
    path = _check_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata()
    except Exception as e:  # safetensors raises several types on damaged headers
        raise _damaged_safetensors(os.path.basename(path), e) from e


def safetensors_metadata(path):
    """The metadata of a safetensors file (``SAFETENSORS_SUFFIXES``; {} when it has none, ``stored_metadata``), None
    for another kind."""
    path = os.fspath(path)
    if not path.lower().endswith(SAFETENSORS_SUFFIXES):
        return None
    return stored_metadata(path) or {}


def converted_kind(path):
    """The ``format`` metadata of a safetensors file the pack converted (``OSEDIFF_FORMAT``, ``DAPE_FORMAT`` or
    ``DOSSR_FORMAT``), else None."""
    try:
        kind = (safetensors_metadata(path) or {}).get("format")
    except (OSError, SafetensorError, WeightFileError):  # not readable as safetensors: the readers say why
        return None
    return kind if kind in (OSEDIFF_FORMAT, DAPE_FORMAT, DOSSR_FORMAT) else None


# ``partial_path``'s names: the writer's process id, ``_machine_tag`` and 8 random hex digits
PARTIAL_NAME = re.compile(r"\.diffsr-([1-9][0-9]*)-([0-9a-f]{8})-[0-9a-f]{8}\.partial")


def partial_path(path):
    """A temporary name beside ``path`` to write it under and then rename: hidden and short, as ``path`` may use all
    the bytes a file name may have (``path + ".partial"`` would then be too long). It names its writer (this process
    and ``_machine_tag``), so that a later run can tell one whose writer was killed (``remove_abandoned_partials``)."""
    name = f".diffsr-{os.getpid()}-{_machine_tag()}-{secrets.token_hex(4)}.partial"
    return os.path.join(os.path.dirname(os.path.abspath(path)), name)


# where Linux keeps the machine's id (systemd's; D-Bus's on older systems): made once, at install
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def _machine_tag():
    """8 hex digits for this machine and its process ids: the host name, the machine id and, on Linux, the PID
    namespace (containers sharing a host name and a folder may not share their process ids). The machine id tells
    apart machines of one host name (a default one) writing into one network folder: the first PID namespace has
    one id on every Linux machine."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux
        namespace = ""
    return hashlib.sha256("\0".join((socket.gethostname(), _machine_id(), namespace)).encode(
        errors="surrogateescape")).hexdigest()[:8]  # a host name may hold bytes that are not UTF-8


def _machine_id():
    """The machine id of ``MACHINE_ID_FILES`` (the first that can be read), or "" (not Linux, or a container without
    one)."""
    for path in MACHINE_ID_FILES:
        with contextlib.suppress(OSError, UnicodeDecodeError), open(path, encoding="ascii") as f:
            return f.read().strip()
    return ""


def _process_runs(pid):
    """Whether a process ``pid`` runs here (POSIX); true also where that cannot be told."""
    try:
        os.kill(pid, 0)  # signal 0: only whether it could be sent
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (PermissionError), or an id too large to ask
        return True
    return True


def remove_abandoned_partials(folder):
    """Remove from ``folder`` the ``partial_path`` files whose writer was killed (SIGKILL, a power cut) before it
    could remove them: named by a process of this machine (``_machine_tag``) that no longer runs. Never another file,
    nor one whose writer may still run (on another machine or in another container, or whose process id is in use
    again). Returns the names removed; none on Windows, where ``os.kill`` does not ask whether a process runs."""
    if os.name == "nt":
        return []
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # not made yet, or not to be listed: nothing was written there
        return []
    removed, machine = [], _machine_tag()
    for name in names:
        match = PARTIAL_NAME.fullmatch(name)
        path = os.path.join(folder, name)
        if match and match[2] == machine and not _process_runs(int(match[1])) and os.path.isfile(path) \
                and not os.path.islink(path):
            with contextlib.suppress(OSError):  # removed meanwhile by another run, or a folder not writable
                os.remove(path)
                removed.append(name)
    return removed


def publish(tmp, path, replace=False):
    """Give the finished file ``tmp`` (``partial_path(path)``) the name ``path`` in one step, once its bytes are on
    the disk (``os.fsync``): after a power cut or a system crash the name holds the earlier file or the whole new
    one, never an empty or cut file (which a resumed run would take as done). A file of that name is replaced only
    when ``replace``; otherwise ``FileExistsError``, also for one made since the name was checked (or the same file
    reached through a link): ``tmp`` is hard-linked to ``path``, which fails where the name is taken. Where the file
    system has no hard links (FAT, some network shares), the name is checked just before the rename."""
    # Windows flushes only a writable handle; elsewhere the user's umask may have made the file read-only
    fd = os.open(tmp, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here: any other failure comes again from the rename
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


def unwritable_part(folder):
    """Where ``folder`` cannot be made or written in: the nearest existing part of it (``folder`` itself, or the
    nearest of its parent folders that exists) where that is not a writable folder; else None."""
    nearest = os.path.abspath(folder)
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    return None if os.path.isdir(nearest) and os.access(nearest, os.W_OK | os.X_OK) else nearest


def check_safetensors_output(path, replace=False):
    """Refuse ``path`` as a ``.safetensors`` to write, before any work is done for it (a conversion reads gigabytes
    first): a name of another kind, a file there (unless ``replace``), a folder that cannot be made or written."""
    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise WeightFileError(f"The output {quoted_name(path)} must end in .safetensors (the loaders read files by "
                              "their kind).")
    if os.path.lexists(path) and not replace:  # a link to nothing too: the file would be written through it
        raise WeightFileError(f"{quoted_name(path)} exists; choose another output name or delete it first.")
    unwritable = unwritable_part(os.path.dirname(os.path.abspath(path)))
    if unwritable:
        raise WeightFileError(f"Cannot write {quoted_name(path)}: {quoted_name(unwritable)} is not a writable folder; "
                              "choose another output name.")


def write_safetensors(tensors, path, metadata=None, replace=False):
    """Write ``tensors`` (contiguous copies) to ``path`` (a ``.safetensors`` name; its folder made if missing)
    atomically (``publish``): replacing an existing file only when ``replace`` (and then only once the new one is
    written), nothing left behind on failure, and readable by whoever may read the user's new files (safetensors 0.8
    writes owner-only files: a ComfyUI server run as another user could not load them)."""
    path = os.fspath(path)
    check_safetensors_output(path, replace)
    tmp = partial_path(path)
    try:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        with open(tmp, "wb"):
            mode = os.stat(tmp).st_mode & 0o777  # what the user's umask gives a new file
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        publish(tmp, path, replace)
    except (OSError, SafetensorError) as e:
        raise WeightFileError(f"Cannot write {quoted_name(path)} ({type(e).__name__}: {error_text(e)}); check that its "
                              "folder is writable and has space.") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)