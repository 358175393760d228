"""The few ComfyUI host APIs the pack uses, in one place: model folders, progress/cancel, devices, OOM.

The only module besides the node files that imports ComfyUI (``folder_paths``, ``comfy.*``).
"""

import contextlib
import functools
import os
import weakref

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths

from ..sr_common import tiling
from ..sr_common.download import OFFICIAL, downloaded, hf_endpoint_url
from ..sr_common.errors import NotAConfigFile, WeightFileError, releasing_tensors
from ..sr_common.fast_modules import forget_folded_kernels
from ..sr_common.image import with_upscaled_alpha
from ..sr_common.known_files import OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from ..sr_common.names import quoted_name, shown_name
from ..sr_common.sd21 import (NETWORK_DTYPES, PRECISIONS, check_precision, checked_context, ieee_float32, load_sd21,
                               module_tensors, move_module, sd21_from_ldm_state_dict)
from ..sr_common.tiling import DEFAULT_TILES
from ..sr_common.weights import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, gone_link_target, read_config_bytes

WEIGHT_EXTENSIONS = set(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
MODEL_FOLDERS = ("osediff", "dossr", "dape")
_cache = weakref.WeakValueDictionary()


def register_model_folders():
    """models/osediff, models/dossr, models/dape; paths from extra_model_paths.yaml are kept."""
    for name in MODEL_FOLDERS:
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            paths, exts = folder_paths.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            folder_paths.folder_names_and_paths[name] = (paths, set(exts) | WEIGHT_EXTENSIONS)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], set(WEIGHT_EXTENSIONS))


DOWNLOAD = "download: "


def official_files(folder):
    """Loader choices that fetch an official file into ``models/<folder>`` when picked (the opt-in)."""
    return [DOWNLOAD + src.filename for src in OFFICIAL.values() if src.folder == folder]


def files(folder, *, downloadable=False):
    names = folder_paths.get_filename_list(folder)
    return names + (official_files(folder) if downloadable else [])


def controlldm_configs():
    """The yamls of models/configs that describe a ControlLDM (DoSSR's config has a ``control_stage_config``),
    not ComfyUI's stock SD configs that share the folder; read as configs are (``read_config_bytes``): no FIFO,
    whose read would hold up ComfyUI's start-up for ever, nor a file of more than 1 MB."""
    found = []
    for name in folder_paths.get_filename_list("configs"):
        try:
            if b"control_stage_config" in read_config_bytes(folder_paths.get_full_path_or_raise("configs", name)):
                found.append(name)
        except (OSError, NotAConfigFile):
            pass
    return found


def is_unet_pipeline(folder, names):
    """Whether ``folder`` (holding the files ``names``) is a diffusers pipeline with a UNet, a candidate for SD
    2.1-base (SD 1.x, SDXL and other UNet pipelines are refused by name when loaded): its unet/ and its
    model_index.json, or where that is missing the unet/, vae/ and text_encoder/ that ``load_sd21`` reads."""
    parts = [os.path.isdir(os.path.join(folder, part)) for part in ("unet", "vae", "text_encoder")]
    return parts[0] and ("model_index.json" in names or all(parts))


def walk_once(root):
    """``os.walk(root, followlinks=True)``, each folder once: a link to a folder walked already (one above it: a loop)
    is not followed. ComfyUI's DiffusersLoader follows every link, so a loop lists what is below it again under ever
    longer names, as deep as the system resolves links, and two loops make its walk endless."""
    walked = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        walked.add(_folder_id(folder))
        subfolders[:] = [name for name in subfolders if _folder_id(os.path.join(folder, name)) not in walked]
        yield folder, subfolders, names


def _folder_id(folder):
    """(device, inode) of the folder a path leads to, links followed; the path itself where it cannot be read."""
    try:
        stat = os.stat(folder)
    except OSError:
        return folder
    return stat.st_dev, stat.st_ino


def diffusers_folders():
    """The diffusers pipelines with a UNet (``is_unet_pipeline``) anywhere below models/diffusers, by their path
    there: every folder ComfyUI's DiffusersLoader lists (nodes.py L584-589: each folder holding a model_index.json,
    links followed) that has a UNet, such as a Hugging Face cache's snapshot (models--org--name/snapshots/<revision>),
    and the pipeline folders the loader takes without a model_index.json; each folder once (``walk_once``)."""
    found = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if os.path.isdir(root):
            found += sorted(os.path.relpath(folder, root) for folder, _, names in walk_once(root)
                            if is_unet_pipeline(folder, names))
    return found


def base_choices():
    return ([f"checkpoints/{n}" for n in files("checkpoints", downloadable=True)]
            + [f"diffusers/{n}" for n in diffusers_folders()])


def other_separator(name):
    """``name`` with the other system's path separator: a nested folder is listed as SD2\\plain on Windows and
    SD2/plain elsewhere, so a workflow saved on one names it so on the other."""
    return name.replace("\\", "/") if os.sep == "/" else name.replace("/", os.sep)


def base_path(choice):
    """The file or folder of a Load SD 2.1-base choice; a diffusers folder's name is taken below models/diffusers, as
    ComfyUI's get_full_path takes a file's (folder_paths.py L282: '..' and a whole path stay inside), and where no
    folder has that exact name, with the other system's separator (``other_separator``)."""
    kind, _, name = choice.partition("/")
    if kind == "diffusers":
        for spelling in dict.fromkeys((name, other_separator(name))):
            try:
                below = os.path.relpath(os.path.join("/", spelling), "/")
            except ValueError:  # Windows: a whole path on another drive or a network share, none below the root
                continue
            for root in folder_paths.get_folder_paths("diffusers"):
                if os.path.isdir(os.path.join(root, below)):
                    return os.path.join(root, below)
        raise FileNotFoundError(f"Diffusers folder {quoted_name(name)} not found in models/diffusers.")
    return weight_path("checkpoints", name)


def missing_file_message(folder, name):
    """What to do about a loader choice that is not on disk, as in a workflow shared by someone who has the file
    (ComfyUI checks a V3 combo's value only when the node runs)."""
    where = " or ".join(folder_paths.get_folder_paths(folder))
    fix = f"put it in {where} and refresh the node lists (R)"
    if any(src.folder == folder and src.filename == name for src in OFFICIAL.values()):
        fix += f", or choose '{DOWNLOAD}{name}' in this loader to fetch the official file"
    elif folder == "dossr":
        fix += (" (dossr_default.ckpt and dossr_onestep.ckpt are linked from the README of "
                "https://github.com/AMD-AIG-AIMA/DoSSR)")
    return f"{quoted_name(name)} is not in models/{folder}: {fix}."


def _dangling_link_message(folder, name):
    """Where a loader choice is a link whose file was moved or deleted (ComfyUI lists it, and finds no file there):
    what it links to; else None."""
    for root in folder_paths.get_folder_paths(folder):
        target = gone_link_target(os.path.join(root, name))
        if target:
            return (f"{quoted_name(name)} in models/{folder} is {target}: link the file again, or put the file itself "
                    "there and refresh the node lists (R).")
    return None


def weight_path(folder, name):
    """Full path of a loader choice, where no file has that exact name the name with the other system's separator
    (``other_separator``: a workflow saved on Windows names a file in a sub-folder SD2\\v2-1.safetensors); a
    ``download: <file>`` choice fetches the official file first (resumable, verified, moved into place only when
    complete) into the first ``models/<folder>`` path, once; a damaged file there is set aside."""
    if not name.startswith(DOWNLOAD):
        for spelling in dict.fromkeys((name, other_separator(name))):
            path = folder_paths.get_full_path(folder, spelling)
            if path is not None:
                return path
        raise FileNotFoundError(_dangling_link_message(folder, name) or missing_file_message(folder, name))
    filename = name[len(DOWNLOAD):]
    source = next((s for s in OFFICIAL.values() if s.folder == folder and s.filename == filename), None)
    if source is None:
        raise FileNotFoundError(f"No official download for {quoted_name(filename)} in models/{folder}.")
    for root in folder_paths.get_folder_paths(folder):
        if downloaded(os.path.join(root, filename), source):
            return os.path.join(root, filename)
    dest = os.path.join(folder_paths.get_folder_paths(folder)[0], filename)
    bar = comfy.utils.ProgressBar(1)
    print(f"[DiffSR] downloading {source.name} from {hf_endpoint_url(source.url)} to {shown_name(dest)}")

    def progress(done, total):
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total or max(done, 1))  # a server that does not say the size: done of done

    return source.fetch_afresh(dest, progress)  # a file at dest failed its check above


def cached(key, load, owner=None):
    """One instance per key while anything still uses it (ComfyUI's output cache, another node's model): one
    SD 2.1-base in memory serves both methods, and nothing stays in memory after ComfyUI lets go of it.

    ``owner``: the object the result is built from (e.g. the SD21_BASE); the entry goes with it.
    """
    if owner is not None:
        key = (id(owner),) + key
    model = _cache.get(key)
    if model is None:
        model = load()
        _cache[key] = model
        if owner is not None:
            weakref.finalize(owner, _cache.pop, key, None)
    return model


def load_base(choice):
    path = base_path(choice)
    return cached(("sd21", path), lambda: load_sd21(path))


def check_comfy_sd2(model, clip):
    """Refuse what is not SD 2.x-base (epsilon, OpenCLIP-H, 4-channel UNet) from ComfyUI's own model description."""
    base = model.model
    config = base.model_config
    unet = getattr(config, "unet_config", {})
    family = type(config).__name__
    sampling = model.get_model_object("model_sampling")
    kinds = {c.__name__ for c in type(sampling).__mro__} | {getattr(base.model_type, "name", str(base.model_type))}
    if kinds & {"V_PREDICTION", "V_PREDICTION_EDM", "V_PREDICTION_CONTINUOUS"}:
        raise WeightFileError("The checkpoint from Load Checkpoint is a v-prediction model (SD 2.x 768-v, or "
                              "sampling overridden to v_prediction). OSEDiff and DoSSR need the 512 px epsilon "
                              "'stable-diffusion-2-1-base' (v2-1_512-ema-pruned).")
    if (unet.get("context_dim") != 1024 or unet.get("in_channels", 4) != 4 or unet.get("adm_in_channels")
            or not family.startswith("SD2")):
        raise WeightFileError(f"The checkpoint from Load Checkpoint is {family} (UNet context_dim "
                              f"{unet.get('context_dim')}, in_channels {unet.get('in_channels', 4)}), not "
                              "Stable Diffusion 2.1-base. OSEDiff and DoSSR are built on v2-1_512-ema-pruned.")
    if clip is None:
        raise WeightFileError("Load Checkpoint gave no CLIP (the checkpoint has no text encoder); the SD 2.1 "
                              "OpenCLIP-H text encoder is needed.")


@releasing_tensors
def sd21_from_comfy(model, clip, vae):
    """Our SD 2.1-base (diffusers modules) from the MODEL/CLIP/VAE of ComfyUI's Load Checkpoint.

    As ``comfy.sd.save_checkpoint`` (comfy/sd.py L1359): load with patches applied (so LoRAs on the MODEL/CLIP
    are kept), then ``BaseModel.state_dict_for_saving`` (comfy/model_base.py L315) gives the original LDM layout.
    """
    check_comfy_sd2(model, clip)
    mm.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    sd = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd())
    if "v_pred" in sd:
        raise WeightFileError("The checkpoint from Load Checkpoint is a v-prediction model; OSEDiff and DoSSR "
                              "need stable-diffusion-2-1-base (epsilon).")
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    rounded = reduced_precision_parts(sd)
    if rounded:
        print(f"[DiffSR] Load Checkpoint holds {rounded}: OSEDiff and DoSSR run on those rounded weights, not the "
              "official float32 ones. For those, use Load SD 2.1-base (DiffSR), or start ComfyUI with --fp32-unet "
              "--fp32-vae --fp32-text-enc.")
    return sd21_from_ldm_state_dict(sd, name="the Load Checkpoint model")


LDM_PARTS = {UNET_PREFIX: "the UNet", VAE_PREFIX: "the VAE", OPEN_CLIP_PREFIX: "the text encoder"}


def reduced_precision_parts(sd):
    """'the UNet in float16, the VAE in bfloat16' for the parts of an LDM state dict not stored in float32."""
    found = {}
    for key, tensor in sd.items():
        part = next((name for prefix, name in LDM_PARTS.items() if key.startswith(prefix)), None)
        if part and tensor.is_floating_point() and tensor.dtype != torch.float32:
            found.setdefault(part, set()).add(str(tensor.dtype).removeprefix("torch."))
    return ", ".join(f"{part} in {'/'.join(sorted(kinds))}" for part, kinds in found.items())


def device():
    return mm.get_torch_device()


def offload_device():
    return mm.unet_offload_device()


class HeldModules(torch.nn.Module):
    """Torch modules as one module, the ``model`` of a ComfyUI ModelPatcher, which loads and unloads them."""

    def __init__(self, parts):
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)


class HeldContents(torch.nn.Module):
    """The submodules, parameters and buffers of ``module``, in its own registries (what moves or is cast here moves
    or is cast there), without ``module`` itself: the ``model`` of the ModelPatcher of a model that is one module (the
    DAPE tagger), which keeps that patcher (``_patcher``). A patcher holding the module would be in a reference cycle
    with it, and a tagger ComfyUI had let go of would stay in memory, counted as loaded, until a garbage collection."""

    def __init__(self, module):
        super().__init__()
        self._modules, self._parameters, self._buffers = module._modules, module._parameters, module._buffers
        self._non_persistent_buffers_set = module._non_persistent_buffers_set


def _parts(model):
    return [model] if isinstance(model, torch.nn.Module) else list(model.modules())


_exact = weakref.WeakKeyDictionary()  # torch module → {tensor name: exact value on the offload device | Recomputed}


class Recomputed:
    """A tensor's exact value as a function of other weights (``compute()``: e.g. the base weight + a LoRA) instead
    of a kept copy; ``held``: the module's tensor holds that value now (as built, or after a cast to its dtype)."""

    def __init__(self, compute):
        self.compute, self.held = compute, True


def recompute_exact(root, value_of):
    """Let ``set_precision`` recompute every floating-point tensor of ``root`` as ``value_of(name)`` (``name``: its
    parameter or buffer name in ``root``) instead of keeping its float32 value aside: the module's tensors must hold
    those values now. Saves a float32 copy of a derived model (OSEDiff's merged UNet: 3.5 GB) once it runs in 16 bits.
    ``value_of`` must not refer to ``root``, whose entries it would keep alive."""
    for module_name, module in root.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.is_floating_point():
                    entry = Recomputed(lambda full=prefix + name: value_of(full))
                    _exact.setdefault(module, {})[name] = entry


def exact_value(root, name):
    """The exact value of ``root``'s tensor ``name`` (a parameter or buffer name): as loaded, whatever casts
    ``set_precision`` made since."""
    module_name, _, part = name.rpartition(".")
    module = root.get_submodule(module_name)
    entry = _exact.get(module, {}).get(part)
    if isinstance(entry, Recomputed):
        return getattr(module, part).detach() if entry.held else entry.compute()
    return getattr(module, part).detach() if entry is None else entry


@contextlib.contextmanager
def exact_weights(*modules):
    """Within the block, every tensor of ``modules`` holds its value as loaded, on the CPU where the loaders put it:
    the exact value of one ``set_precision`` has cast, a CPU copy of one a run has left on the GPU. So a model built
    there from them (OSEDiff's LoRA merged into the shared SD 2.1 UNet) starts from the loaded weights, not from
    another model's fp16 rounding of them, and is built in CPU memory, where ComfyUI's memory manager expects it
    (not in GPU memory it does not count); the weights are put back after."""
    swapped = []
    for module in {id(m): m for root in modules for m in root.modules()}.values():
        for store in (module._parameters, module._buffers):
            for name, held in store.items():
                if held is None:
                    continue
                exact = exact_value(module, name).to("cpu")
                if (held.dtype, held.device, held.data_ptr()) != (exact.dtype, exact.device, exact.data_ptr()):
                    swapped.append((store, name, held.data))
                    _put(store, name, exact)
    try:
        yield
    finally:
        for store, name, held in reversed(swapped):
            _put(store, name, held)


def _put(store, name, value):
    """``value`` into a module's parameter (keeping the Parameter object) or buffer ``name``."""
    if isinstance(store[name], torch.nn.Parameter):
        store[name].data = value
    else:
        store[name] = value


def set_precision(model, dtype):
    """Every floating-point weight of ``model`` in ``dtype``, cast from its exact value, never from an earlier cast.

    The first cast of a tensor keeps its exact value in CPU memory (also under --highvram / --gpu-only, where
    ComfyUI's offload device is the GPU), so a later float32 run, or another model sharing the module (the SD 2.1
    VAE and text encoder), never computes with rounded weights; that copy stays there from then on. A
    ``recompute_exact`` tensor keeps no copy: its value is computed again when a cast needs it. Returns whether
    anything was cast (a cached prompt embedding keeps the precision it was encoded in and is encoded again for
    another: ``NetworksOnSD21.prompt_embedding``)."""
    modules = {id(m): m for part in _parts(model) for m in part.modules()}.values()  # shared modules once
    cast_any = False
    for module in modules:
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                    continue
                exact = _exact.setdefault(module, {})
                entry = exact.get(name)
                if isinstance(entry, Recomputed):
                    value = tensor.detach() if entry.held else entry.compute()
                    cast = value.to(device=tensor.device, dtype=dtype)
                    entry.held = cast.dtype == value.dtype
                else:
                    if entry is None:  # never cast before: the tensor holds the exact value
                        entry = exact[name] = tensor.detach().to("cpu")
                    cast = entry.to(device=tensor.device, dtype=dtype)
                _put(store, name, cast)
                cast_any = True
    return cast_any


def auto_dtype(model):
    """ComfyUI's own precision for a diffusion model of this size on its device (``comfy.model_management.unet_dtype``):
    it honours --force-fp32, --force-fp16, --fp32-unet, --bf16-unet…, and runs fp16 only where the GPU computes it
    well (not on the CPU, not on GTX 16xx cards, whose fp16 gives NaN, nor on 10xx cards under Linux, where float32 is
    faster). The networks compute in the dtype they are stored in, so where ComfyUI would store a precision and compute
    in another (``unet_manual_cast``: fp16 weights computed in fp32 on those cards; --fp8_e4m3fn-unet, --fp64-unet),
    this is the one it computes in."""
    params = sum(p.numel() for m in networks(model) for p in m.parameters())
    stored = mm.unet_dtype(device(), model_params=params, supported_dtypes=list(NETWORK_DTYPES))
    computed = mm.unet_manual_cast(stored, device(), supported_dtypes=list(NETWORK_DTYPES)) or stored
    return computed if computed in NETWORK_DTYPES else torch.float32


def widget_dtype(model, dtype_widget):
    """The precision a node's ``dtype`` widget asks for ``model`` (auto: ``auto_dtype``), if the device computes it."""
    return check_precision(auto_dtype(model) if dtype_widget == "auto" else PRECISIONS[dtype_widget], device())


def in_precision(module, dtype_widget):
    """A module just loaded (float32) cast once to ``widget_dtype``; nothing of its float32 weights is kept."""
    return move_module(module, dtype=widget_dtype(module, dtype_widget))


def cast_for_run(model, dtype_widget, networks=None):
    """``networks`` of ``model`` (default: all), the ones a node runs, in ``widget_dtype``; the others keep theirs,
    so nodes on one model in different precisions (an fp32 LQ Encoder before an auto decode) do not cast each
    other's networks back at every run. Those that need a cast and that ComfyUI holds on its device, alone or in a
    network loaded whole (a VAE decoder in its VAE), are unloaded by it first (``unload``): the cast then allocates
    in CPU memory, where the loaders keep the weights, not in device memory ComfyUI does not count, and ComfyUI
    counts their new size when the run loads them again."""
    dtype = widget_dtype(model, dtype_widget)
    parts = [m for m in networks or _parts(model) if m is not None]
    unload([m for m in parts if any(t.is_floating_point() and t.dtype != dtype for t in module_tensors(m))])
    set_precision(model if networks is None else HeldModules(parts), dtype)


def cast_and_encode(model, dtype_widget, networks, prompts):
    """``networks`` of ``model`` cast for the run (``cast_for_run``), the text encoder only where a prompt of
    ``prompts`` has no embedding of the run's precision cached (only then does it run), and the prompts'
    embeddings."""
    dtype = widget_dtype(model, dtype_widget)
    encodes = any(not model.has_prompt_embedding(prompt, dtype) for prompt in prompts)
    networks = [m for m in networks if m is not model.text_encoder]
    cast_for_run(model, dtype_widget, networks + [model.text_encoder] if encodes else networks)
    return [model.prompt_embedding(prompt, dtype) for prompt in prompts]


def prompt_context(model, dtype_widget, networks, prompt, conditioning, node):
    """The text context of a run, the CONDITIONING's (``conditioning_embedding``, checked before anything is cast: a
    refused one casts nothing) or else the prompt's, with ``networks`` cast for the run (``cast_and_encode``)."""
    embeds = None if conditioning is None else conditioning_embedding(conditioning, model.unet, node)
    encoded = cast_and_encode(model, dtype_widget, networks, [prompt] if embeds is None else [])
    return encoded[0] if embeds is None else embeds


def vae_decoder(vae):
    """The parts of an SD VAE that decode (``sr_common.latents.vae_decode``): its post_quant_conv and decoder."""
    return [vae.post_quant_conv, vae.decoder]


def unload(modules):
    """The ComfyUI patchers that hold weights of ``modules`` (as their network, or a part of it) and that ComfyUI
    holds loaded, unloaded by it as its ``free_memory`` unloads a model (``LoadedModel.model_unload``, the entry
    dropped from ``current_loaded_models``). Matched by tensor: a module without weights may be in several networks
    (diffusers < 0.33 gives every UNet and ControlNet one shared SiLU)."""
    wanted = {id(t) for module in modules for t in module_tensors(module)}
    if not wanted:
        return
    patchers = {id(p) for p in list(_patchers.values()) if any(id(t) in wanted for t in module_tensors(p.model))}
    loaded = [entry for entry in mm.current_loaded_models if id(entry.model) in patchers]
    for entry in loaded:
        entry.model_unload()
        mm.current_loaded_models.remove(entry)
    if loaded:
        mm.soft_empty_cache()


class HeldModulesPatcher(comfy.model_patcher.ModelPatcher):
    """ComfyUI's ModelPatcher, whose partial unload (``model_management.LoadedModel.model_unload``: to free part of
    a model, it moves single layers with ``m.to``) also drops what ``FusedUpsample2D`` folded from a layer it moved,
    which ComfyUI does not see and would leave in device memory it counts as freed."""

    def partially_unload(self, *args, **kwargs):
        try:
            return super().partially_unload(*args, **kwargs)
        finally:
            forget_folded_kernels(self.model)


_patchers = weakref.WeakValueDictionary()  # id(torch module) → its ModelPatcher, while a model keeps that patcher


def _patcher(model, module):
    """The ``comfy.model_patcher.ModelPatcher`` of ``module`` (one of ``model``'s networks, or ``model`` itself when
    it is one module): one per module, shared by every model that holds the module (the SD 2.1 VAE and text encoder
    of an OSEDiff and a DoSSR model on one base), so ComfyUI counts it, loads it and unloads it once.

    ComfyUI holds patchers by weak reference only: each model keeps its own in ``model._comfy_patchers``, and a
    patcher goes with the last model that keeps it. Kept on the modules instead, they would put each in a reference
    cycle of its own, and a shared module would outlive its models by a garbage collection; so the patcher of a
    model that is one module holds that module's contents, not the module (``HeldContents``)."""
    patchers = getattr(model, "_comfy_patchers", None)
    if patchers is None:
        patchers = model._comfy_patchers = {}
    patcher = _patchers.get(id(module))  # a live patcher holds its module (or only that module keeps it): its id
    if patcher is None:
        held = HeldContents(module) if module is model else HeldModules([module])
        patcher = _patchers[id(module)] = HeldModulesPatcher(
            held, load_device=device(), offload_device=offload_device())
        weakref.finalize(patcher, _leave_device, weakref.ref(module), offload_device()).atexit = False
    patchers[id(module)] = patcher
    return patcher


def _leave_device(module_ref, offload):
    """For a patcher that goes while its module stays (the SD21_BASE outlives the OSEDiff model that used it):
    ComfyUI stops counting the module, so it leaves the device, as ComfyUI's unload would move it (``detach``)."""
    module = module_ref()
    if module is not None:
        module.to(offload)


def load_on_device(model, *modules, memory_required=0):
    """Put ``modules`` of ``model`` (default: ``networks(model)``; as they are) on ComfyUI's torch device through
    its memory manager, with ``memory_required`` bytes free beside them (a stage's estimated activations, as
    ComfyUI's own VAE decode asks), and return that device.

    All go in one ``comfy.model_management.load_models_gpu`` call, fully (plain torch layers cannot be partially
    loaded), each through its ModelPatcher (``_patcher``): ComfyUI unloads other models to make room (ours of other
    stages too), and unloads ours when it needs the memory; a module stays on the device between runs until then.
    Under ``--novram`` ComfyUI loads only the layers it can stream from the CPU (``comfy.ops``) whatever the call
    asks; the rest of a patcher is then loaded as ComfyUI loads a model that fits (``ModelPatcher.partially_load``
    with room for all of it), so no layer computes on the CPU's copy of its weights.
    """
    patchers = [_patcher(model, m) for m in (modules or networks(model))]
    for patcher in patchers:  # sizes as they are now (a cast since changes them)
        patcher.size = 0
        patcher.model_size()
    mm.load_models_gpu(patchers, memory_required=memory_required, force_full_load=True)
    for patcher in patchers:
        if patcher.loaded_size() < patcher.model_size():
            patcher.partially_load(patcher.load_device, extra_memory=1e32)
    return device()


class ComfyStageLoader:
    """The stage loader (``NetworksOnSD21.load_stage``) of a model in ComfyUI: before each stage of a run, its
    networks go to the device through ComfyUI's memory manager (``load_on_device``) with the stage's estimated
    activations as ``memory_required``. So a text encoder goes there only for a prompt not encoded yet, and on a
    device short of memory ComfyUI unloads the networks of other stages for the VAE decode, as it unloads a
    diffusion model for its own VAE Decode; where there is room, each stays loaded between runs."""

    @property
    def device(self):
        return device()

    def __call__(self, model, networks, activation_bytes):
        load_on_device(model, *networks, memory_required=activation_bytes)


def networks(model):
    """The modules of a pack model that run for every image: all but its text encoder, which runs only for a prompt
    not encoded yet."""
    return [m for m in _parts(model) if m is not getattr(model, "text_encoder", None)]


def managed(model):
    """``model`` (OSEDiff, DoSSR) with its networks loaded stage by stage by ComfyUI (``ComfyStageLoader``)."""
    model.stage_loader = ComfyStageLoader()
    return model


def node_run(execute):
    """A run node's ``execute`` (an upscale, a stage, the DAPE tags): its float32 computed as IEEE float32 on the GPU,
    not TF32 (``sd21.ieee_float32``: dtype fp32 means float32 there too; ComfyUI's flags are put back after), and
    its failures holding none of the tensors its finished frames had made (``releasing_tensors``): ComfyUI keeps
    the error of a failed run, out of memory, Cancel (``InterruptProcessingException``) or any other, and its frames
    held the image, the latents, the tiles and the outputs of the batch's images done before until a garbage
    collection, so the user's retry ran out of memory again. An out-of-memory that ``with_oom_retry`` handles never
    reaches here: the retry with smaller tiles runs as before."""
    @releasing_tensors
    @functools.wraps(execute)
    def run(*args, **kwargs):
        with ieee_float32():
            return execute(*args, **kwargs)
    return run


def check_interrupted(*_):
    """Raise ComfyUI's interruption when the user pressed Cancel (takes any arguments: a stage's callback)."""
    mm.throw_exception_if_processing_interrupted()


class Progress:
    """A ComfyUI progress bar over ``total`` units that also lets the user cancel between units."""

    def __init__(self, total):
        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, *_):
        check_interrupted()
        self.bar.update(1)


# the upscale nodes' VAE tiles (their inputs set only the latent tile)
DEFAULT_VAE_TILES = {"vae_tile_encode": DEFAULT_TILES.vae_tile_encode,
                     "vae_tile_decode": DEFAULT_TILES.vae_tile_decode}
TILE_DEFAULTS = {"tile_latent": DEFAULT_TILES.tile_latent, **DEFAULT_VAE_TILES}


def with_oom_retry(run, *tensors, **tiles):
    """``run(*tensors, **tiles)``; on ComfyUI's out-of-memory exception, or a CPU allocation refused, again with every
    tile halved (``tiling.with_oom_retry``) after ComfyUI frees its cache. The tensors a run works on are given as
    ``tensors``, not captured by ``run``: a failed run's frames are cleared (``node_run``), but a frame keeps its
    function, and a closure what it captured."""
    return tiling.with_oom_retry(
        functools.partial(run, *tensors), tiles, TILE_DEFAULTS, oom=mm.OOM_EXCEPTION, free=mm.soft_empty_cache,
        notify=lambda smaller: print(f"[DiffSR] out of memory: retrying with smaller tiles {smaller}"))


def image_to_bchw(image):
    """ComfyUI IMAGE [B, H, W, C] → list of (1, 3, H, W) and the alpha planes (or None); never mutates. Gray (C = 1)
    becomes RGB; the alpha of gray + alpha (C = 2) or RGBA (C = 4) is kept aside."""
    if image.shape[0] == 0:
        raise ValueError("The IMAGE batch is empty (0 images); connect a node that gives at least one image.")
    x = image.movedim(-1, 1).float()
    alpha = None
    if x.shape[1] in (2, 4):  # gray + alpha, RGBA
        alpha = x[:, -1:]
        x = x[:, :-1]
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return [x[i:i + 1].cpu() for i in range(x.shape[0])], alpha


# what a node adds to a CONDITIONING entry for a sampler to apply → the node that adds it (ComfyUI nodes.py:
# ConditioningSetArea, ConditioningSetAreaStrength, ConditioningSetMask, ConditioningSetTimestepRange,
# ControlNetApplyAdvanced, InpaintModelConditioning, unCLIPConditioning, GLIGENTextBoxApply; comfy_extras/
# nodes_hooks.py: SetClipHooks): the keys a node adds alone first, those it adds beside another after
SAMPLER_SETTINGS = {"area": "Conditioning (Set Area)", "mask": "Conditioning (Set Mask)",
                    "start_percent": "ConditioningSetTimestepRange", "control": "Apply ControlNet",
                    "concat_latent_image": "InpaintModelConditioning", "unclip_conditioning": "unCLIPConditioning",
                    "gligen": "GLIGENTextBoxApply", "hooks": "Set CLIP Hooks",
                    "strength": "ConditioningSetAreaStrength", "set_area_to_bounds": "Conditioning (Set Mask)",
                    "mask_strength": "Conditioning (Set Mask)", "end_percent": "ConditioningSetTimestepRange",
                    "concat_mask": "InpaintModelConditioning"}


def conditioning_embedding(conditioning, unet, node):
    """The prompt embedding of a CONDITIONING of one entry, as CLIP Text Encode gives it, of the width ``unet``
    cross-attends to (``checked_context``: another model's CLIP is refused by name). Several entries
    (Conditioning (Combine), areas) are refused by name: a sampler combines them step by step, these nodes take one.
    So is an entry that carries ``SAMPLER_SETTINGS`` (an area, a mask, a timestep range, a ControlNet…), which
    these nodes cannot apply (they were dropped silently), even where they change nothing (a range of 0 to 1)."""
    if len(conditioning) != 1:
        raise ValueError(f"{node}: the CONDITIONING has {len(conditioning)} entries (from Conditioning (Combine) or "
                         "area nodes); it takes one prompt embedding. Connect one CLIP Text Encode, or merge prompts "
                         "with Conditioning (Concat) or Conditioning (Average).")
    settings = [key for key in SAMPLER_SETTINGS if key in conditioning[0][1]]
    if settings:
        maker = SAMPLER_SETTINGS[settings[0]]
        raise ValueError(f"{node}: the CONDITIONING carries {', '.join(settings)} (from {maker} or a node like it), "
                         "which a sampler applies and this node cannot: it takes the prompt embedding alone. Connect "
                         "the CLIP Text Encode without that node.")
    return checked_context(conditioning[0][0][:1], unet)


# LATENT key: (H, W) of the image a latent holds top-left, padded right and bottom (the OSEDiff LQ Encoder's upscaled
# image, to a multiple of 8 px; the DoSSR Sampler's REFERENCE, to 64 px). ComfyUI's latent nodes copy the dict
# (``s = samples.copy()``: nodes.py LatentCrop, LatentUpscaleBy…), so it stays through them: check it against the
# latent's shape.
ENCODED_SIZE = "diffsr_encoded_size"


def padded_latent_size(size):
    """The latent size (h, w) of an image of ``size`` (H, W) padded to a multiple of 8: ⌈H/8⌉ × ⌈W/8⌉ (the OSEDiff LQ
    Encoder's; the latent px over the DoSSR Sampler's REFERENCE)."""
    return -(-size[0] // 8), -(-size[1] // 8)


def latent_samples(latent, node):
    """The (B, 4, h, w) samples of a LATENT in float32; another family's latent refused by name."""
    samples = latent["samples"]
    if samples.dim() != 4 or samples.shape[1] != 4:
        raise ValueError(f"{node}: the LATENT has shape {tuple(samples.shape)}; OSEDiff and DoSSR take the 4-channel "
                         "latent of Stable Diffusion 1.x/2.x, (B, 4, h, w) (VAE Encode with the SD 2.1 VAE, Empty "
                         "Latent Image, or this pack's nodes), not an SD3, Flux or video latent.")
    if samples.shape[0] == 0:
        raise ValueError(f"{node}: the LATENT batch is empty (0 latents); connect a node that gives at least one.")
    return samples.float()


def latent_with_references(latent, references, node):
    """The (1, 4, h, w) latents of a LATENT paired with the reference images they were made from (one each)."""
    latents = latent_samples(latent, node).split(1)
    if len(latents) != len(references):
        raise ValueError(f"{node}: the LATENT holds {len(latents)} image(s) but the reference {len(references)}; "
                         "connect the image batch the latent was made from.")
    return list(zip(references, latents))


def bchw_to_image(images, alpha=None):
    """List of (1, 3, H, W) → IMAGE [B, H, W, C]; alpha (B, 1, h, w) is upscaled bicubically and appended."""
    out = torch.cat(images).clamp(0, 1)
    if alpha is not None:
        out = with_upscaled_alpha(out, alpha)
    return out.movedim(1, -1).cpu()
