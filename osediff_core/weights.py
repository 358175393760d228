"""OSEDiff weights: the official ``osediff.pkl`` layout, its safetensors conversion, and the LoRA merge.

``osediff.pkl`` (a ``torch.save`` dict) holds PEFT LoRA pairs for the UNet (three adapters) and
the VAE encoder, the ranks, the target-module lists, and the fully trained UNet ``conv_in``.
"""

import copy
import json
import os

import torch

from ..sr_common.errors import WeightFileError, releasing_tensors
from ..sr_common.known_files import CONVERTED, KNOWN, canonical, describe, identify
from ..sr_common.names import quoted_name
from ..sr_common.weights import (OSEDIFF_FORMAT, check_safetensors_output, converted_kind, fresh_float32_cpu,
                                 prefaulting, read_state_dict, require_float, safetensors_metadata, write_safetensors)

# (module list, the part whose modules it names, the PEFT adapter it gets in the official load_ckpt)
MODULE_LISTS = (("unet_lora_encoder_modules", "unet", "default_encoder"),
                ("unet_lora_decoder_modules", "unet", "default_decoder"),
                ("unet_lora_others_modules", "unet", "default_others"),
                ("vae_lora_encoder_modules", "vae", "default_encoder"))
MODULE_LIST_KEYS = tuple(key for key, _, _ in MODULE_LISTS)
REQUIRED_KEYS = ("state_dict_unet", "state_dict_vae", "rank_unet", "rank_vae") + MODULE_LIST_KEYS
# Cannot be deduced from the file: the official LoraConfig passes no lora_alpha, so PEFT's
# default lora_alpha = 8 applies and every LoRA is scaled by 8 / rank.
PEFT_DEFAULT_ALPHA = 8


def osediff_from_safetensors(flat, metadata):
    """Rebuild the official dict from our converted safetensors (``unet.``/``vae.`` prefixes + metadata)."""
    if not metadata or metadata.get("format") != OSEDIFF_FORMAT:
        return flat
    out = {"rank_unet": int(metadata["rank_unet"]), "rank_vae": int(metadata["rank_vae"]),
           "state_dict_unet": {k[5:]: v for k, v in flat.items() if k.startswith("unet.")},
           "state_dict_vae": {k[4:]: v for k, v in flat.items() if k.startswith("vae.")}}
    for key in MODULE_LIST_KEYS:
        if key in metadata:
            out[key] = json.loads(metadata[key])
    return out


@releasing_tensors
def read_osediff(path):
    """Read and validate an OSEDiff weight file (official ``.pkl`` or our ``.safetensors``)."""
    path = os.fspath(path)
    name = os.path.basename(path)
    obj = read_state_dict(path)
    obj = canonical(obj) if isinstance(obj, dict) else obj
    metadata = safetensors_metadata(path)
    if metadata is not None:
        try:
            obj = osediff_from_safetensors(obj, metadata)
        except (KeyError, TypeError, ValueError) as e:
            raise WeightFileError(f"{quoted_name(name)} has damaged OSEDiff metadata ({type(e).__name__}: {e}); "
                                  "convert osediff.pkl again with `diffsr convert osediff`.") from e
    if not isinstance(obj, dict) or any(k not in obj for k in REQUIRED_KEYS):
        if identify(obj, path) in (KNOWN["osediff"], CONVERTED[OSEDIFF_FORMAT]):
            missing = [k for k in REQUIRED_KEYS if k not in obj]
            raise WeightFileError(f"{quoted_name(name)} is an incomplete OSEDiff checkpoint: it lacks {missing}. The "
                                  "file is damaged; download osediff.pkl again.")
        raise WeightFileError(f"{quoted_name(name)} is not an OSEDiff checkpoint: it is {describe(obj, path)}. "
                              f"Expected osediff.pkl with keys {list(REQUIRED_KEYS)}.")
    for part in ("unet", "vae"):
        _check_part(obj, part, name)
    _check_module_lists(obj, name)
    return obj


def _check_part(ckpt, part, name):
    """Refuse a damaged ``state_dict_<part>``: non-tensors, non-float weights, LoRA pairs that miss a half (either)
    or do not have the stored rank."""
    damaged = "The file is damaged; download osediff.pkl again."
    state = ckpt[f"state_dict_{part}"]
    try:
        rank = int(ckpt[f"rank_{part}"])
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:  # torch's words: their first line, cut short
        raise WeightFileError(f"{quoted_name(name)} has no usable rank_{part} ({str(e).splitlines()[0][:120]}). "
                              f"{damaged}") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise WeightFileError(f"{quoted_name(name)}: state_dict_{part} is not a dict of named tensors. {damaged}")
    require_float(state, f"OSEDiff {part}", name)
    for key in ("conv_in.base_layer.weight", "conv_in.base_layer.bias") if part == "unet" else ():
        if key not in state:  # OSEDiff trains the UNet's conv_in whole
            raise WeightFileError(f"{quoted_name(name)} is incomplete: {key} is missing. {damaged}")
    for key in state:
        if ".lora_B." in key and key.replace(".lora_B.", ".lora_A.") not in state:
            raise WeightFileError(f"{quoted_name(name)} is incomplete: {key.replace('.lora_B.', '.lora_A.')} is "
                                  f"missing (its lora_B is there). {damaged}")
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        b_key = key.replace(".lora_A.", ".lora_B.")
        b = state.get(b_key)
        if b is None:
            raise WeightFileError(f"{quoted_name(name)} is incomplete: {b_key} is missing (its lora_A is there). "
                                  f"{damaged}")
        if a.dim() not in (2, 4) or a.shape[0] != rank:
            raise WeightFileError(f"{quoted_name(name)} is inconsistent: rank_{part} = {rank} but {key} has shape "
                                  f"{tuple(a.shape)} (rank {a.shape[0] if a.dim() else '?'}). {damaged}")
        if b.dim() != a.dim() or b.shape[1] != rank or b.shape[2:] not in ((), (1, 1)):
            raise WeightFileError(f"{quoted_name(name)} is inconsistent: rank_{part} = {rank} but {b_key} has shape "
                                  f"{tuple(b.shape)} (rank {b.shape[1] if b.dim() > 1 else '?'}). {damaged}")


def _check_module_lists(ckpt, name):
    """Refuse module lists the official ``load_ckpt`` could not load: it gives each module a list targets
    (``_entries_targeting``) a LoRA of the list's adapter and copies it from the state dict, so each entry needs a
    pair of that adapter there (real lists name modules in full). Pairs no list targets are left out, as there
    (``lora_pairs``). Not checked, as the base is not known here: that the base has no module an entry targets
    besides those with a pair (the official code fails on such a file; it loads here, with the pairs it has)."""
    damaged = "The file is damaged; download osediff.pkl again."
    for key, part, adapter in MODULE_LISTS:
        modules = ckpt[key]
        if not isinstance(modules, (list, tuple)) or not all(isinstance(m, str) for m in modules):
            raise WeightFileError(f"{quoted_name(name)}: {key} is not a list of module names. {damaged}")
        modules = list(dict.fromkeys(modules))  # the official VAE list names modules twice
        covered = set().union(*map(_entries_targeting, _adapter_pairs(ckpt[f"state_dict_{part}"], adapter)))
        missing = [m for m in modules if m not in covered]
        if missing:
            raise WeightFileError(f"{quoted_name(name)} is incomplete: {len(missing)} of the {len(modules)} modules of "
                                  f"{key} have no LoRA in state_dict_{part} ({', '.join(missing[:3])}"
                                  f"{', ...' if len(missing) > 3 else ''}). {damaged}")


def _entries_targeting(module):
    """The list entries that make PEFT (0.9, ``check_target_module_exists``) target ``module``: its name, and each
    tail of it after a dot (PEFT: ``module == entry or module.endswith("." + entry)``)."""
    parts = module.split(".")
    return {".".join(parts[i:]) for i in range(len(parts))}


def _adapter_pairs(state, adapter):
    """{module name: (A, B)} of the PEFT keys ``<module>.lora_A.<adapter>.weight`` / ``lora_B`` in ``state``."""
    tail = f".lora_A.{adapter}.weight"
    pairs = {}
    for key, a in state.items():
        if key.endswith(tail):
            module = key[:-len(tail)]
            b_key = f"{module}.lora_B.{adapter}.weight"
            if b_key not in state:
                raise WeightFileError(f"LoRA pair incomplete: {b_key} is missing.")
            pairs[module] = (a, state[b_key])
    return pairs


def lora_pairs(ckpt, part):
    """{module name: (A, B, scale)}: the LoRAs the official ``load_ckpt`` gives ``part`` ("unet" or "vae"); scale =
    lora_alpha / rank with PEFT's default lora_alpha (``PEFT_DEFAULT_ALPHA``).

    Each adapter takes its pairs whose module its list targets (``_entries_targeting``); a pair no list targets is
    left out, as PEFT never makes that LoRA. A module two lists target gets both LoRAs, which PEFT adds (forward
    and merge): s·B1@A1 + s·B2@A2 = s·[B1 B2]@[A1; A2], one pair of the ranks summed (a part's adapters share its
    rank, so one s)."""
    state, scale = ckpt[f"state_dict_{part}"], PEFT_DEFAULT_ALPHA / int(ckpt[f"rank_{part}"])
    pairs = {}
    for key, list_part, adapter in MODULE_LISTS:
        if list_part != part:
            continue
        entries = set(ckpt[key])
        for module, (a, b) in _adapter_pairs(state, adapter).items():
            if entries.isdisjoint(_entries_targeting(module)):
                continue
            if module in pairs:
                a0, b0, _ = pairs[module]
                shapes = [(b0.shape[0],) + tuple(a0.shape[1:]), (b.shape[0],) + tuple(a.shape[1:])]
                if shapes[0] != shapes[1]:
                    raise WeightFileError(f"The OSEDiff LoRAs of {module!r} (two module lists name it) change weights "
                                          f"of shapes {shapes[0]} and {shapes[1]}: the file is damaged; download "
                                          "osediff.pkl again.")
                a, b = torch.cat([a0, a]), torch.cat([b0, b], dim=1)
            pairs[module] = (a, b, scale)
    return pairs


def lora_delta(a, b, scale):
    """ΔW = scale · B @ A, for Linear (A: r×in, B: out×r) and Conv (A: r×in×k×k, B: out×r×1×1), in float32."""
    a32, b32 = a.float(), b.float()
    delta = b32.reshape(b32.shape[0], -1) @ a32.reshape(a32.shape[0], -1)
    return scale * delta.reshape((b32.shape[0],) + tuple(a32.shape[1:]))


def _check_lora_targets(modules, pairs, what):
    for name, (a, b, _) in pairs.items():
        target = modules.get(name)
        if target is None or not hasattr(target, "weight"):
            raise WeightFileError(f"The OSEDiff {what} LoRA targets {name!r}, which the base model does not have: "
                                  "the base is not SD 2.1-base.")
        shape = (b.shape[0],) + tuple(a.shape[1:])
        if shape != tuple(target.weight.shape):
            raise WeightFileError(f"The OSEDiff {what} LoRA for {name!r} has shape {shape}, the base "
                                  f"weight {tuple(target.weight.shape)}: the base is not SD 2.1-base.")


def _merge_into(out, weight, lora):
    """out ← W + scale · B @ A (``out`` may be ``weight`` itself): one fused addmm in float32 (no temporaries the
    size of W), otherwise computed in float32 and cast to ``out``'s dtype."""
    a, b, scale = lora
    if out.dtype != torch.float32 or not out.is_contiguous():
        out.copy_((weight.float() + lora_delta(a, b, scale).to(weight.device)).to(out.dtype))
        return
    rows, rank = out.shape[0], a.shape[0]
    factors = b.float().reshape(rows, rank).to(out.device), a.float().reshape(rank, -1).to(out.device)
    if out is weight:
        out.view(rows, -1).addmm_(*factors, alpha=scale)
    else:
        torch.addmm(weight.reshape(rows, -1), *factors, alpha=scale, out=out.view(rows, -1))


def _lora_of(name, pairs):
    """The LoRA of ``pairs`` that targets parameter ``name`` (a module's ``weight``), or None."""
    module_name, _, part = name.rpartition(".")
    return pairs.get(module_name) if part == "weight" else None


def merged_copy(module_root, pairs, what, replace=None):
    """A copy of ``module_root`` with every LoRA merged, W' = W + scale · B @ A (W from ``replace`` where it names
    the parameter); the other parameters copied. The original is never written to.

    Float32 CPU parameters all land in one new buffer (``fresh_float32_cpu``), the merged ones computed straight
    into it: writing into the weights in place instead faults every page twice when they are memory-mapped from
    the file (13 s against 6–7 s for the SD 2.1 UNet on 2 cores), and a copy first (ComfyUI's model stays usable)
    costs a full copy more."""
    replace = replace or {}
    _check_lora_targets(dict(module_root.named_modules()), pairs, what)
    tensors = dict(module_root.named_parameters()) | dict(module_root.named_buffers())
    copy_ = copy.deepcopy(module_root, memo={id(t): t for t in tensors.values()})  # modules only
    params = {name: replace.get(name, p) for name, p in module_root.named_parameters()}
    on_cpu = {n for n, p in params.items() if p.dtype == torch.float32 and p.device.type == "cpu"}
    buffer, offset = fresh_float32_cpu(sum(params[n].numel() for n in on_cpu)), 0
    with torch.no_grad(), prefaulting(buffer):
        for name, weight in params.items():
            if name in on_cpu:
                new = buffer[offset:offset + weight.numel()].view(weight.shape)
                offset += weight.numel()
            else:
                new = torch.empty_like(weight, memory_format=torch.contiguous_format)
            lora = _lora_of(name, pairs)
            if lora is None:
                new.copy_(weight)
            else:
                _merge_into(new, weight, lora)
            module_name, _, part = name.rpartition(".")
            owner = copy_.get_submodule(module_name) if module_name else copy_
            setattr(owner, part, torch.nn.Parameter(new, requires_grad=weight.requires_grad))
    return copy_


def merge_lora_in_place(module_root, pairs, what, replace=None):
    """``merged_copy`` into ``module_root`` itself, the ``replace`` tensors copied in first. For weights this process
    owns and nothing else uses (a file read into memory or converted at load): no second copy of the model."""
    _check_lora_targets(dict(module_root.named_modules()), pairs, what)
    with torch.no_grad():
        for name, new in (replace or {}).items():
            module_root.get_parameter(name).copy_(new)
        for name, lora in pairs.items():
            weight = module_root.get_submodule(name).weight
            _merge_into(weight, weight, lora)
    return module_root


def merged_value(name, weight, pairs):
    """Parameter ``name`` of a ``merged_copy``: W + scale · B @ A from ``weight`` (W) where a LoRA of ``pairs``
    targets it (a new tensor), else ``weight`` itself."""
    lora = _lora_of(name, pairs)
    if lora is None:
        return weight
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    _merge_into(out, weight, lora)
    return out


def osediff_unet_changes(unet, ckpt):
    """(replace, pairs) of the OSEDiff UNet: the trained ``conv_in`` tensors (as ``unet``'s dtype and device) and
    the UNet LoRA pairs."""
    state = ckpt["state_dict_unet"]
    replace = {}
    for part in ("weight", "bias"):
        new = state.get(f"conv_in.base_layer.{part}")
        if new is None:
            raise WeightFileError("The OSEDiff checkpoint has no conv_in.base_layer weights; download osediff.pkl "
                                  "again.")
        old = getattr(unet.conv_in, part)
        if new.shape != old.shape:
            raise WeightFileError(f"OSEDiff conv_in.{part} has shape {tuple(new.shape)}, the base UNet "
                                  f"{tuple(old.shape)}: the base is not SD 2.1-base.")
        replace[f"conv_in.{part}"] = new.to(old)
    return replace, lora_pairs(ckpt, "unet")


def lq_encoder_pairs(ckpt):
    """The LoRA pairs of OSEDiff's VAE encoder + ``quant_conv`` (names as in the VAE)."""
    return lora_pairs(ckpt, "vae")


def apply_osediff_unet(unet, ckpt, in_place=False):
    """The OSEDiff UNet: the trained ``conv_in`` and every UNet LoRA merged (``conv_in``'s LoRA on top of the trained
    one), into a copy of ``unet`` (left untouched), or into ``unet`` itself with ``in_place``."""
    replace, pairs = osediff_unet_changes(unet, ckpt)
    merge = merge_lora_in_place if in_place else merged_copy
    return merge(unet, pairs, "UNet", replace)


def lq_encoder(vae, ckpt, in_place=False):
    """The VAE encoder + ``quant_conv`` with the OSEDiff LoRA merged, as a copy (the VAE untouched), or into the
    VAE's own modules with ``in_place``."""
    parts = torch.nn.ModuleDict({"encoder": vae.encoder, "quant_conv": vae.quant_conv})
    merge = merge_lora_in_place if in_place else merged_copy
    return merge(parts, lq_encoder_pairs(ckpt), "VAE encoder")


@releasing_tensors
def convert_osediff(src, dst):
    """Write the official ``osediff.pkl`` as a safetensors file that loads to the same weights (a converted file is
    refused: a copy of it would be all the conversion gave)."""
    check_safetensors_output(dst)
    if converted_kind(src) == OSEDIFF_FORMAT:
        raise WeightFileError(f"{quoted_name(os.path.basename(os.fspath(src)))} is already a converted OSEDiff file: "
                              "use it as it is (--weights, or the Load OSEDiff node); only osediff.pkl is converted.")
    ckpt = read_osediff(src)
    tensors = {f"unet.{k}": v for k, v in ckpt["state_dict_unet"].items()}
    tensors.update({f"vae.{k}": v for k, v in ckpt["state_dict_vae"].items()})
    metadata = {"format": OSEDIFF_FORMAT, "rank_unet": str(int(ckpt["rank_unet"])), "rank_vae": str(int(ckpt["rank_vae"])),
                "lora_alpha": str(PEFT_DEFAULT_ALPHA)}
    metadata.update({key: json.dumps(list(ckpt[key])) for key in MODULE_LIST_KEYS})
    write_safetensors(tensors, dst, metadata)
    return dst
