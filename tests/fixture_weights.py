"""Random-weight checkpoints for the tests and the benchmarks (which load this file: tests/ is not a package).

The tiny checkpoints of the parity fixtures are made from recipes instead of being stored.

A fixture script writes ``<file>.recipe.json`` beside the expected outputs it made with ``<file>``; the tests make
``<file>`` again from it at the start of a session (``make_checkpoint``). A recipe holds the file's container
(``"torch"``: ``torch.save`` of the tree; ``"safetensors"``: a flat dict of tensors) and its content as a tree:
dicts, lists and plain values as they are, and in place of each tensor

- ``{"__normal__": [dtype, shape, mean, std]}``: mean + std·z, z drawn by numpy's ``RandomState`` seeded with
  crc32(f"{seed}/{path}"), ``path`` the tensor's keys joined by "/", in float64 and rounded once to ``dtype``; mean
  and std are numbers, or lists of one per index of the first axis (rows drawn with their own scale);
- ``{"__fixed__": name}``: the tensor ``name`` of ``<file>.fixed.safetensors`` (buffers such as schedules and
  index tables);
- ``{"__same__": path}``: the very tensor at ``path``, an earlier drawn or fixed one (tied weights, one tensor under
  two names as in the state dict of a model that shares them; ``torch.save`` stores it once).

RandomState's stream is frozen by numpy and the rounding is IEEE's, so every numpy and torch version makes the same
tensors; the recipe's ``digest`` (``tree_digest``: names, dtypes, shapes and bytes) checks that they did.

``random_osediff_checkpoint`` makes an OSEDiff checkpoint in the official layout for a given UNet and VAE (the tiny
ones of the tests, full size in the benchmarks), its LoRA drawn by a seeded torch generator.
"""

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import threading
import zlib

import numpy as np
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

if os.name == "nt":
    import msvcrt
else:
    import fcntl

DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


def standard_normal(seed, path, shape):
    """z of the tensor at ``path``: a stream of its own, so no tensor's values depend on the others'."""
    state = np.random.RandomState(zlib.crc32(f"{seed}/{path}".encode()))
    return state.standard_normal(math.prod(shape)).reshape(shape)


def normal(dtype, shape, mean, std):
    """The recipe entry of a drawn tensor; ``mean`` and ``std`` a number or a sequence of one per first-axis index."""
    number = lambda x: [float(v) for v in x] if isinstance(x, (list, tuple)) else float(x)
    return {"__normal__": [dtype, list(shape), number(mean), number(std)]}


def fixed(name):
    """The recipe entry of a tensor taken from the ``.fixed.safetensors`` file."""
    return {"__fixed__": name}


def fixed_once(fixed_tensors, name, value):
    """The recipe entry of ``value`` as a fixed tensor, put in ``fixed_tensors`` under ``name`` unless an equal one is
    there already (then it is that one's entry: each distinct tensor is stored once)."""
    name = next((n for n, t in fixed_tensors.items()
                 if t.dtype == value.dtype and t.shape == value.shape and torch.equal(t, value)), name)
    fixed_tensors.setdefault(name, value)
    return fixed(name)


def same(path):
    """The recipe entry of a tensor that is the one at ``path`` (keys joined by "/")."""
    return {"__same__": path}


def build_tree(content, seed, fixed_tensors):
    """The checkpoint's object from a recipe's ``content``."""
    built = {}

    def build(node, path):
        if isinstance(node, dict) and set(node) == {"__normal__"}:
            dtype, shape, mean, std = node["__normal__"]
            mean, std = (np.reshape(x, (-1,) + (1,) * (len(shape) - 1)) if isinstance(x, list) else x
                         for x in (mean, std))
            values = mean + std * standard_normal(seed, path, tuple(shape))
            built[path] = torch.from_numpy(np.ascontiguousarray(values.astype(DTYPES[dtype])))
            return built[path]
        if isinstance(node, dict) and set(node) == {"__fixed__"}:
            built[path] = fixed_tensors[node["__fixed__"]].clone()
            return built[path]
        if isinstance(node, dict) and set(node) == {"__same__"}:
            return built[node["__same__"]]
        if isinstance(node, dict):
            return {k: build(v, f"{path}/{k}" if path else k) for k, v in node.items()}
        return node

    return build(content, "")


def tree_digest(tree):
    """SHA-256 over every tensor's path, dtype, shape and bytes and every other value's path and repr, in order."""
    h = hashlib.sha256()

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            h.update(f"{path}:{node.dtype}:{tuple(node.shape)}:".encode())
            h.update(node.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        else:
            h.update(f"{path}={node!r};".encode())

    walk(tree, "")
    return h.hexdigest()


def checkpoint_bytes(tree, container, metadata=None):
    """The file of ``tree`` written as ``container``."""
    if container == "safetensors":
        return safetensors.torch.save(tree, metadata=metadata)
    buffer = io.BytesIO()
    torch.save(tree, buffer)  # through a file object: the archive's folder is "archive"
    return buffer.getvalue()


def replace_file(path, data):
    """``path`` replaced by a file holding ``data`` in one rename, from a ``.partial`` file of this process and
    thread alone: a reader, or a test session making the same file at the same time, finds the old file or the new
    one, never a part of it."""
    partial = f"{path}.{os.getpid()}-{threading.get_ident()}.partial"
    try:
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


def same_bytes(a, b):
    if not os.path.exists(a):
        return False
    with open(a, "rb") as f, open(b, "rb") as g:
        return f.read() == g.read()


def holds(path, data):
    """Whether the file ``path`` exists and holds ``data``."""
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        return f.read() == data


@contextlib.contextmanager
def exclusive_lock(path):
    """Within the block, this open file of ``path`` (made if missing) holds its lock: another's block, in this
    process or another, waits for it. The system lets it go when the file is closed or the process ends, killed or
    not (``flock`` on Linux and macOS, ``msvcrt.locking`` of its first byte on Windows)."""
    with open(path, "a+b") as f:
        if os.name == "nt":
            f.seek(0)
            while True:
                try:
                    msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)  # EDEADLOCK after 10 tries, 1 s apart
                    break
                except OSError as e:
                    if e.errno != errno.EDEADLOCK:  # no lock on this file system, a bad handle: not a wait
                        raise
            try:
                yield
            finally:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield


def read_recipe(recipe_path):
    with open(recipe_path, encoding="utf-8") as f:
        recipe = json.load(f)
    fixed_path = recipe_path[: -len(".recipe.json")] + ".fixed.safetensors"
    fixed_tensors = load_file(fixed_path) if os.path.exists(fixed_path) else {}
    return recipe, build_tree(recipe["content"], recipe["seed"], fixed_tensors)


def recipe_json(node, depth=0):
    """JSON with one line per tensor or plain value."""
    if isinstance(node, dict) and node and not set(node) & {"__normal__", "__fixed__", "__same__"}:
        pad = " " * (depth + 1)
        items = ",\n".join(f"{pad}{json.dumps(k)}: {recipe_json(v, depth + 1)}" for k, v in node.items())
        return "{\n" + items + "\n" + " " * depth + "}"
    return json.dumps(node)


def save_recipe(path, container, seed, content, fixed_tensors=None, metadata=None):
    """For fixture scripts: write ``path``'s recipe (and its ``.fixed.safetensors`` where ``fixed_tensors``), then
    ``path`` made from the recipe as read back. Returns the checkpoint's object."""
    recipe = {"container": container, "seed": seed, "metadata": metadata, "content": content}
    if fixed_tensors:
        save_file({k: v.contiguous() for k, v in fixed_tensors.items()}, path + ".fixed.safetensors")
    recipe["digest"] = tree_digest(build_tree(content, seed, fixed_tensors or {}))
    with open(path + ".recipe.json", "w", encoding="utf-8") as f:
        f.write(recipe_json(recipe) + "\n")
    return make_checkpoint(path + ".recipe.json")


def make_checkpoint(recipe_path):
    """The checkpoint of ``recipe_path`` made and checked against the recipe's digest, then written where its file
    is missing or differs. Returns the checkpoint's object."""
    recipe, tree = read_recipe(recipe_path)
    path = recipe_path[: -len(".recipe.json")]
    if tree_digest(tree) != recipe["digest"]:
        raise RuntimeError(f"{os.path.basename(path)} made from its recipe is not the file the fixture script wrote "
                           "(the digest differs): numpy's RandomState stream or its float rounding has changed.")
    data = checkpoint_bytes(tree, recipe["container"], recipe["metadata"])
    if not holds(path, data):
        replace_file(path, data)
    return tree


# ------------------------------------------------------------ OSEDiff checkpoints for any SD 2.1 UNet and VAE

UNET_TARGET_PATTERNS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                        "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
VAE_TARGET_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v",
                       "to_out.0")


def official_lora_targets(unet, vae):
    """The module lists the official training code builds (``initialize_unet`` / ``initialize_vae``).

    UNet: every weight (not bias/norm) whose name contains a pattern, routed to the encoder adapter
    (``down_blocks``/``conv_in``), the decoder adapter (``up_blocks``/``conv_out``) or the others (mid
    block). VAE: encoder modules and ``quant_conv``, with the official duplicates.
    """
    enc, dec, others = [], [], []
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in UNET_TARGET_PATTERNS:
            if pattern in name:
                module = name.replace(".weight", "")
                (enc if ("down_blocks" in name or "conv_in" in name) else
                 dec if ("up_blocks" in name or "conv_out" in name) else others).append(module)
                break
    vae_targets = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in VAE_TARGET_PATTERNS:
            if pattern in name and "encoder" in name:
                vae_targets.append(name.replace(".weight", ""))
            elif "quant_conv" in name and "post_quant_conv" not in name:
                vae_targets.append(name.replace(".weight", ""))
    return {"unet_lora_encoder_modules": enc, "unet_lora_decoder_modules": dec, "unet_lora_others_modules": others,
            "vae_lora_encoder_modules": vae_targets}


def random_osediff_checkpoint(unet, vae, rank=4, std=0.02, seed=0, rank_vae=None):
    """An OSEDiff checkpoint in the official layout with random LoRA A and B (for tests and benchmarks); the VAE's
    LoRA has ``rank_vae`` (default: ``rank``, as the official file)."""
    rank_vae = rank if rank_vae is None else rank_vae
    g = torch.Generator().manual_seed(seed)
    targets = official_lora_targets(unet, vae)
    modules = dict(unet.named_modules())
    state_unet = {"conv_in.base_layer.weight": unet.conv_in.weight.detach().clone() * 1.1,
                  "conv_in.base_layer.bias": unet.conv_in.bias.detach().clone()}
    for adapter, key in (("default_encoder", "unet_lora_encoder_modules"), ("default_decoder", "unet_lora_decoder_modules"),
                         ("default_others", "unet_lora_others_modules")):
        for name in targets[key]:
            state_unet.update(random_lora_pair(modules[name], name, adapter, rank, std, g))
    vae_modules = dict(vae.named_modules())
    state_vae = {}
    for name in dict.fromkeys(targets["vae_lora_encoder_modules"]):
        state_vae.update(random_lora_pair(vae_modules[name], name, "default_encoder", rank_vae, std, g))
    return dict(targets, rank_unet=rank, rank_vae=rank_vae, state_dict_unet=state_unet, state_dict_vae=state_vae)


def random_lora_pair(module, name, adapter, rank, std, g):
    """PEFT's tensors ``<name>.lora_A.<adapter>.weight`` / ``lora_B`` of a random LoRA of ``rank`` for ``module``
    (a Linear or Conv2d), entries N(0, std²) drawn by ``g``."""
    w = module.weight
    if w.dim() == 4:
        a_shape, b_shape = (rank, w.shape[1], w.shape[2], w.shape[3]), (w.shape[0], rank, 1, 1)
    else:
        a_shape, b_shape = (rank, w.shape[1]), (w.shape[0], rank)
    return {f"{name}.lora_A.{adapter}.weight": torch.randn(a_shape, generator=g) * std,
            f"{name}.lora_B.{adapter}.weight": torch.randn(b_shape, generator=g) * std}
