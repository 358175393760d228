"""Safe reading of weight files: safetensors, or pickles opened with ``weights_only=True``.

Nothing here ever unpickles code. A file that cannot be opened safely is refused with a
message that says how to convert it, never loaded with ``weights_only=False``.
"""

import os
import pickle
import zipfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import WeightFileError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pkl", ".pth", ".pt", ".ckpt", ".bin")


def _check_file(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightFileError(f"Weight file not found: {path!r}. Check the path or the model folder.")
    if os.path.isdir(path):
        raise WeightFileError(f"Expected a weight file but {path!r} is a folder.")
    if os.path.getsize(path) == 0:
        raise WeightFileError(f"Weight file {path!r} is empty (0 bytes): the download or copy did not finish. "
                              "Download it again.")
    return path


def read_state_dict(path, *, mmap=True):
    """Read a weight file into a dict without running any code from it.

    ``.safetensors`` is read with safetensors; anything else with ``torch.load(weights_only=True)``
    (memory-mapped where the file is a zip pickle). Raises ``WeightFileError`` naming the file
    and the fix on any failure.
    """
    path = _check_file(path)
    name = os.path.basename(path)
    if path.lower().endswith(SAFETENSORS_SUFFIXES):
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WeightFileError(f"Cannot read {name!r} as safetensors ({e}). The file is truncated or "
                                  "not a safetensors file: download it again.") from e
    try:
        use_mmap = mmap and zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        raise WeightFileError(
            f"Refusing to open {name!r}: it contains Python objects that could run code when loaded "
            f"({str(e).splitlines()[0]}). This pack only loads plain tensors. If you trust the file, convert it "
            "once in a separate Python with `torch.load(path, weights_only=False)` and "
            "`safetensors.torch.save_file(...)`, then load the .safetensors file.") from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as e:
        raise WeightFileError(f"Cannot read {name!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                              "The file is truncated or not a PyTorch/safetensors weight file: download it again.") from e


def write_safetensors(tensors, path, metadata=None):
    """Write ``tensors`` (contiguous copies) to ``path`` atomically, never replacing an existing file."""
    path = os.fspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path!r} exists; choose another output name or delete it first.")
    tmp = path + ".partial"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)
