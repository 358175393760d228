"""What every command shares: input discovery, output naming without overwriting, devices, progress."""

import os
import sys

import torch

from ..sr_common.errors import DiffSRError, ImageInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HIGH_DEPTH_PEAK = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0, "F": 1.0}  # PIL mode → white


def find_images(inputs):
    """Files as given; folders contribute their image files (sorted, not recursive)."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            found += sorted(os.path.join(item, n) for n in os.listdir(item) if n.lower().endswith(IMAGE_SUFFIXES))
        elif os.path.isfile(item):
            found.append(item)
        else:
            raise DiffSRError(f"Input not found: {item!r}")
    if not found:
        raise DiffSRError(f"No images found in {list(inputs)} (looked for {', '.join(IMAGE_SUFFIXES)}).")
    return found


def plan_outputs(images, outdir, overwrite, suffix=".png"):
    """OUTDIR/<input stem>.png per input; refuses name clashes and, without ``overwrite``, existing files."""
    outputs, seen = [], {}
    for path in images:
        out = os.path.join(outdir, os.path.splitext(os.path.basename(path))[0] + suffix)
        if out in seen:
            raise DiffSRError(f"{path!r} and {seen[out]!r} would both be written to {out!r}; rename one of them.")
        seen[out] = path
        outputs.append(out)
    existing = [o for o in outputs if os.path.exists(o)]
    if existing and not overwrite:
        raise DiffSRError(f"{len(existing)} output file(s) exist already (e.g. {existing[0]!r}). "
                          "Choose another --output folder or pass --overwrite.")
    return outputs


def save_png(image01, path):
    """(1, 3, H, W) in [0, 1] → 8-bit PNG, written atomically (temporary file, then rename)."""
    from PIL import Image

    from ..sr_common.image import tensor_to_uint8

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial"
    Image.fromarray(tensor_to_uint8(image01, "round")).save(tmp, format="PNG")
    os.replace(tmp, path)


def load_image(path):
    """An image file → (1, 3, H, W) float in [0, 1] (RGB as the official code converts it).

    16-bit and float grayscale keep their values (PIL's RGB conversion would clip them at 255).
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from ..sr_common.image import pil_to_tensor

    try:
        with Image.open(path) as im:
            if im.mode in HIGH_DEPTH_PEAK:
                plane = np.asarray(im, dtype=np.float32) / HIGH_DEPTH_PEAK[im.mode]
                return torch.from_numpy(plane).clamp(0, 1)[None, None].repeat(1, 3, 1, 1)
            return pil_to_tensor(im)
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"Image {path!r} is too large to open safely ({e}). Downscale it or cut it into "
                              "parts first.") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageInputError(f"Cannot read image {path!r}: {e}") from e


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise DiffSRError("--device cuda was asked for but no CUDA GPU is available; use --device cpu.")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def add_device_args(parser):
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="network precision; default fp32 on CPU, fp16 on CUDA")


def resolve_dtype(name, device):
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def run_main(main_fn, argv):
    """Run a command: our own errors print one clear line and exit with status 2.

    Large CPU tensors are allowed transparent huge pages (PyTorch's ``THP_MEM_ALLOC_ENABLE``):
    the forward passes fault in gigabytes of fresh pages, and 2 MiB pages cut that cost (about
    15 % of an OSEDiff 128→512 run on 2 cores, same output).
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        return main_fn(argv)
    except DiffSRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

