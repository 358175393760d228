"""Stable Diffusion 2.1-base as diffusers modules, fully offline, from the files users have.

Two layouts are read: a diffusers folder like ``stabilityai/stable-diffusion-2-1-base`` and a
single-file checkpoint like ``v2-1_512-ema-pruned.safetensors`` (original LDM key layout). The
single-file path needs the SD 2.1-base configs and tokenizer, which ship in ``configs/sd21_base``.
Other model families are recognised and refused with a message naming what was found.
"""

import codecs
import contextlib
import functools
import importlib.util
import json
import os
import pathlib
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, fields
from importlib import resources

import torch

from .. import _version
from .errors import (ArchitectureMismatch, ConfigWithByteOrderMark, DiffSRError, NotAConfigFile, WeightFileError,
                     releasing_tensors)
from .fast_modules import fast_modules, fast_vae_decoder
from .known_files import (KNOWN, OPEN_CLIP_PREFIX, SGM_OPEN_CLIP_PREFIX, TRANSFORMERS_CLIP_PREFIX, UNET_INPUT_FAMILIES,
                          UNET_PREFIX, VAE_PREFIX, canonical, describe, describe_model_folder,
                          diffusers_unet_is_v_prediction, identify, sd_family)
from .names import quoted_name, shown_name
from .tiling import WeightsOutOfMemory, cpu_allocation_failed, is_out_of_memory
from .weights import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, check_weight_file, dangling_link, load_module_weights,
                      maps_when_read, read_config_bytes, read_state_dict, stored_as_float32, stored_metadata)

SCALING_FACTOR = 0.18215
# SD's training noise schedule: β = linspace(√BETA_START, √BETA_END, NUM_TRAIN_TIMESTEPS)² ("scaled linear")
NUM_TRAIN_TIMESTEPS, BETA_START, BETA_END = 1000, 0.00085, 0.012


def scaled_linear_betas(dtype):
    """β_i = linspace(√BETA_START, √BETA_END, 1000)_i², i = 0..999, computed in ``dtype`` (ᾱ = ∏(1 − β) depends
    on it: float32 as diffusers' schedulers, float64 as the DoSSR code)."""
    return torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=dtype) ** 2


def shipped_config_dir():
    """The folder holding the SD 2.1-base diffusers configs and CLIP tokenizer shipped in the pack."""
    return str(resources.files(__package__).joinpath("configs", "sd21_base"))


@dataclass
class SD21:
    """The SD 2.1-base parts both methods use."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet_owned: bool = False  # the UNet's tensors are this process's own memory (read or converted at load)
    vae_owned: bool = False  # the same for the VAE's


def _read_json(path):
    """The JSON in ``path`` (``read_config_bytes``), UTF-8."""
    return json.loads(read_config_bytes(path).decode("utf-8"))


# where the user gets the file (Stability AI's own repository is gone; the download is a verified copy)
FETCH_SD21 = "`diffsr download sd21-base` fetches it; in ComfyUI the loader's 'download: ...' choice"
FOLDER_FIX = ("Download the stable-diffusion-2-1-base folder again, or use v2-1_512-ema-pruned.safetensors "
              f"({FETCH_SD21}).")
CONFIG_FOLDER_FIX = ("A config folder (--base-config) holds unet/, vae/ and text_encoder/config.json, as the "
                     "stable-diffusion-2-1-base folder does; leave it out for SD 2.1-base itself.")


BOM_FIX = "save it again as UTF-8 without BOM (Notepad: Save as, Encoding 'UTF-8')"


def read_config(folder, relative, fix):
    """The JSON object of the config file ``relative`` in ``folder``; one that is missing, unreadable or not a JSON
    object is refused by name, with ``fix`` (``NotAConfigFile`` for one that is no config file at all). One that
    starts with a UTF-8 byte order mark is refused saying so (``ConfigWithByteOrderMark``): diffusers and transformers
    read configs as UTF-8 without one (``json.loads`` of the text), so the folder would not load."""
    try:
        data = read_config_bytes(os.path.join(folder, relative))
    except NotAConfigFile as e:
        raise NotAConfigFile(f"{e} {fix}") from e
    except OSError as e:
        raise WeightFileError(f"{quoted_name(folder)} has no readable {relative} ({e.strerror or e}). {fix}") from e
    if data.startswith(codecs.BOM_UTF8):
        raise ConfigWithByteOrderMark(f"{relative} in {quoted_name(folder)} starts with a UTF-8 byte order mark (BOM), "
                                      f"which diffusers and transformers do not read: {BOM_FIX}.")
    try:
        config = json.loads(data.decode("utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8
        raise WeightFileError(f"{relative} in {quoted_name(folder)} is not JSON ({e}). {fix}") from e
    if not isinstance(config, dict):
        raise WeightFileError(f"{relative} in {quoted_name(folder)} is not a JSON object. {fix}")
    return config


def _refuse(name, what):
    raise WeightFileError(f"{quoted_name(os.path.basename(os.path.normpath(os.fspath(name))))} is not Stable Diffusion "
                          f"2.1-base: it is {what}. Use the whole SD 2.1-base: v2-1_512-ema-pruned.safetensors "
                          f"({FETCH_SD21}) or the stable-diffusion-2-1-base diffusers folder.")


def _what_instead(sd, path):
    """What a state dict that is not SD 2.1-base is: for another SD model or a part of one only what it is (the fix
    is SD 2.1-base whole), for any other file also where it goes."""
    known = identify(sd, path)
    return known.what if known is not None and known.sd_model else describe(sd, path)


NOT_OPEN_CLIP_H = "it is not an SD 2.1 OpenCLIP-H text encoder. The file is damaged or not SD 2.1-base."


def open_clip_to_hf(sd, num_layers, prefix=OPEN_CLIP_PREFIX, name=None):
    """OpenCLIP text tower keys → transformers ``CLIPTextModel`` keys, keeping the first ``num_layers`` blocks
    (``name``: the file, for the error where a tensor or a block is missing).

    SD 2.x uses the penultimate layer, so the HF encoder has one block fewer than the checkpoint;
    its ``final_layer_norm`` is OpenCLIP's ``ln_final``.
    """
    # unnamed: the caller names the file
    what = f"{quoted_name(os.path.basename(os.fspath(name)))}: the" if name else "The"

    def tensor(key):
        if key not in sd:
            raise WeightFileError(f"{what} text encoder lacks {key!r}; {NOT_OPEN_CLIP_H}")
        return sd[key]

    out = {
        "text_model.embeddings.token_embedding.weight": tensor(prefix + "token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": tensor(prefix + "positional_embedding"),
        "text_model.final_layer_norm.weight": tensor(prefix + "ln_final.weight"),
        "text_model.final_layer_norm.bias": tensor(prefix + "ln_final.bias"),
    }
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for i in range(num_layers):
        src = f"{prefix}transformer.resblocks.{i}."
        dst = f"text_model.encoder.layers.{i}."
        if not any(k.startswith(src) for k in sd):
            raise WeightFileError(f"{what} text encoder has fewer than {num_layers + 1} blocks; {NOT_OPEN_CLIP_H}")
        for part in ("weight", "bias"):
            q, k, v = tensor(src + f"attn.in_proj_{part}").chunk(3, dim=0)
            out[dst + f"self_attn.q_proj.{part}"] = q
            out[dst + f"self_attn.k_proj.{part}"] = k
            out[dst + f"self_attn.v_proj.{part}"] = v
            for old, new in names.items():
                out[dst + f"{new}.{part}"] = tensor(src + f"{old}.{part}")
    return out


TRANSFORMERS_BLOCK = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")


def text_encoder_state(sd, num_layers, name=None):
    """The text encoder of an LDM-layout state dict in transformers' ``CLIPTextModel`` keys, ``num_layers`` blocks:
    from OpenCLIP's layout (ldm's ``cond_stage_model.model.``, sgm's ``conditioner.embedders.0.model.``) by
    ``open_clip_to_hf``, else from transformers' own (``cond_stage_model.transformer.``), whose blocks from
    ``num_layers`` on are dropped likewise (SD 2.x uses the penultimate block)."""
    for prefix in (OPEN_CLIP_PREFIX, SGM_OPEN_CLIP_PREFIX):
        if any(k.startswith(prefix) for k in sd):
            return open_clip_to_hf(sd, num_layers, prefix, name)
    state = {}
    for key, value in sd.items():
        if key.startswith(TRANSFORMERS_CLIP_PREFIX):
            key = key.removeprefix(TRANSFORMERS_CLIP_PREFIX)
            block = TRANSFORMERS_BLOCK.match(key)
            if block is None or int(block[1]) < num_layers:
                state[key] = value
    return state


SD21_SIZE_FIX = "It is not SD 2.1-base; if it is a non-standard size, pass a matching config folder"
# a diffusers folder's part whose tensors are not the sizes its own config.json gives
FOLDER_SHAPE_FIX = f"Its weights and its config.json do not belong together. {FOLDER_FIX.removesuffix('.')}"


def load_ldm_unet_vae(sd, unet, vae, name=None, fix=SD21_SIZE_FIX):
    """Fill ``unet`` and ``vae`` (built on the meta device) from an LDM-layout state dict (``model.diffusion_model.``,
    ``first_stage_model.``) with diffusers' converters and ``load_module_weights`` (``fix`` ends a mismatch's
    message); returns whether each got tensors of its own (see ``SD21.unet_owned``)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    sd = {k: v for k, v in sd.items() if k.startswith((UNET_PREFIX, VAE_PREFIX))}  # not model_ema.*: see _note_ema
    try:
        unet_sd = convert_ldm_unet_checkpoint(sd, unet.config)
        vae_sd = convert_ldm_vae_checkpoint(sd, vae.config)
    except (KeyError, IndexError, RuntimeError) as e:
        what = quoted_name(os.path.basename(os.fspath(name))) if name else "The checkpoint"
        raise WeightFileError(f"{what}: cannot convert the SD 2.1 UNet/VAE keys ({e}). The file is damaged or not "
                              "SD 2.1-base.") from e
    return load_module_weights(unet, unet_sd, "UNet", name, fix), load_module_weights(vae, vae_sd, "VAE", name, fix)


def models_from_config(config_dir, *, random_init=True, fix=CONFIG_FOLDER_FIX, configs=None):
    """UNet, VAE and CLIP text encoder from a diffusers config folder: its parts' configs (``check_part_configs``;
    ``fix`` ends the refusal of one that is missing or not JSON), or ``configs``, those read already.
    ``random_init=False`` builds them on the meta device (no memory, no initialisation: 17 s less at full size on 2
    cores) for ``load_module_weights`` to fill."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = check_part_configs(config_dir, fix) if configs is None else configs
    text_cfg = CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items()
                                 if not k.startswith("_") and k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device("cpu" if random_init else "meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(text_cfg)
    return unet, vae, text_encoder


# the files of a tokenizer folder that transformers' CLIPTokenizer reads (each whole), where they are regular files
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.json", "chat_template.json", "chat_template.jinja")
MAX_TOKENIZER_BYTES = 64 << 20  # CLIP's vocab.json is under 1 MB, its merges.txt 0.5 MB
# CLIP's vocabulary: one token per merge of merges.txt, beside 2 × 256 byte tokens (alone, and word-final "</w>") and
# 2 special tokens; the slow CLIPTokenizer (transformers 4) reads at most CLIP_MERGES merges
CLIP_TOKENS_BESIDE_MERGES = 2 * 256 + 2
CLIP_MERGES = 49408 - CLIP_TOKENS_BESIDE_MERGES
TOKENIZER_FIX = ("Download the stable-diffusion-2-1-base folder again, or delete its tokenizer/ folder (the pack then "
                 "uses the SD 2.1 tokenizer it ships).")


def _check_tokenizer_files(folder):
    """Refuse by name a file of ``TOKENIZER_FILES`` in ``folder`` that transformers would read whole and fail on, or
    fail on only after minutes: one of more than ``MAX_TOKENIZER_BYTES`` (a weight file under its name), a JSON file
    or merges.txt starting with a UTF-8 byte order mark (transformers and tokenizers read them as UTF-8 without one:
    the mark of merges.txt is taken for a character of its first token, "Error while initializing BPE")."""
    for name in TOKENIZER_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):  # absent, or no regular file (a FIFO), which transformers takes as absent
            continue
        size = os.path.getsize(path)
        if size > MAX_TOKENIZER_BYTES:
            raise WeightFileError(f"{shown_name(name)} in {quoted_name(folder)} is {size / 2**20:,.1f} MB, and the pack "
                                  f"reads tokenizer files of at most {MAX_TOKENIZER_BYTES >> 20} MB: it is no tokenizer "
                                  f"file. {TOKENIZER_FIX}")
        if name.endswith(".json") or name == "merges.txt":
            with open(path, "rb") as f:
                if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8:
                    raise WeightFileError(f"{shown_name(name)} in {quoted_name(folder)} starts with a UTF-8 byte order "
                                          f"mark (BOM), which transformers does not read: {BOM_FIX}.")


def has_vocabulary(folder):
    """Whether the tokenizer folder ``folder`` has a CLIP vocabulary this transformers reads: ``vocab.json`` and
    ``merges.txt``, or ``tokenizer.json`` alone (as transformers 5 saves a tokenizer) where its ``CLIPTokenizer`` is the
    fast one (``reads_tokenizer_json``); not empty."""
    return (_has_file(folder, "vocab.json") and _has_file(folder, "merges.txt")
            or _has_file(folder, "tokenizer.json") and reads_tokenizer_json())


def _has_file(folder, name):
    """Whether ``folder`` holds a regular file ``name`` that is not empty."""
    path = os.path.join(folder, name)
    return os.path.isfile(path) and os.path.getsize(path) > 0


def reads_tokenizer_json():
    """Whether transformers' ``CLIPTokenizer`` reads a vocabulary from ``tokenizer.json``: from transformers 5 it is the
    fast tokenizer; before, the slow one, which reads only vocab.json and merges.txt (and transformers 4's fast one
    cannot parse the ``tokenizer.json`` of tokenizers 0.20 and later)."""
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast

    return issubclass(CLIPTokenizer, PreTrainedTokenizerFast)


def check_tokenizer_files(folder):
    """The checks of ``load_tokenizer`` that build no tokenizer: ``_check_tokenizer_files`` of ``folder`` where it has
    a vocabulary (else the shipped one is used)."""
    if has_vocabulary(folder):
        _check_tokenizer_files(folder)


def load_tokenizer(folder):
    """The CLIP tokenizer of ``folder``, or the SD 2.1 one the pack ships where ``folder`` lacks the vocabulary
    (``has_vocabulary``): a missing or empty tokenizer folder gives transformers' tokenizer without a vocabulary, which
    fails only when the prompt is encoded. Its files are checked first (``_check_tokenizer_files``); one transformers
    cannot read (a vocab.json cut short) is a ``WeightFileError`` naming the folder and the fix, as is a merges.txt
    cut short that transformers 4's slow tokenizer reads without an error: fewer merges than its vocabulary has
    merge tokens (``CLIP_MERGES`` at most), which would split a prompt's words otherwise than the text encoder
    learnt."""
    import transformers
    from transformers import CLIPTokenizer

    shipped = os.path.join(shipped_config_dir(), "tokenizer")
    if not has_vocabulary(folder):
        what = (f"has its CLIP vocabulary in tokenizer.json alone (as transformers 5 saves it), which transformers "
                f"{transformers.__version__} does not read" if _has_file(folder, "tokenizer.json") else
                "has no CLIP vocabulary (vocab.json, merges.txt)")
        warnings.warn(f"{quoted_name(folder)} {what}; using the SD 2.1 tokenizer this pack ships, which is the one of "
                      "stable-diffusion-2-1-base.", UserWarning, stacklevel=2)
        folder = shipped
    _check_tokenizer_files(folder)

    def unreadable(detail):
        if folder == shipped:
            return WeightFileError(f"Cannot read the SD 2.1 tokenizer this pack ships, in {quoted_name(folder)} "
                                   f"({detail}): its files are damaged, or transformers {transformers.__version__} "
                                   "cannot read them. Install the pack again, or another transformers.")
        return WeightFileError(f"Cannot read the tokenizer in {quoted_name(folder)} ({detail}): a file there is "
                               f"damaged or cut short. {TOKENIZER_FIX}")

    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 (tokenizers raises plain Exception on a damaged file; json ValueError)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise unreadable(first if type(e) is Exception else f"{type(e).__name__}: {first}") from e
    if hasattr(tokenizer, "bpe_ranks"):  # the slow tokenizer: its merges (merges.txt) and vocabulary (vocab.json)
        needed = min(len(tokenizer.encoder) - CLIP_TOKENS_BESIDE_MERGES, CLIP_MERGES)
        if len(tokenizer.bpe_ranks) < needed:
            raise unreadable(f"merges.txt holds {len(tokenizer.bpe_ranks):,} merges, vocab.json needs {needed:,}")
    return tokenizer


EMA_PREFIX = "model_ema.diffusion_model"  # LDM's EMA of the UNet: model_ema. + the key's dots removed


def _note_ema(sd, name):
    """Where a checkpoint holds the UNet's EMA (``model_ema.*``) beside its trained weights, as a training checkpoint
    does, say which are used: the trained ones (``model.diffusion_model.*``), as ComfyUI (comfy/sd.py: the UNet from
    that prefix) and ldm with the SD 2 inference configs (``use_ema: False``) take them."""
    if any(k.startswith(EMA_PREFIX) for k in sd):
        warnings.warn(f"{quoted_name(os.path.basename(os.fspath(name)))} holds the UNet twice: its trained weights "
                      "(model.diffusion_model.*) and their EMA (model_ema.*). The trained ones are used, as ComfyUI "
                      "and the SD 2 inference configs do; OSEDiff and DoSSR start from SD 2.1-base's EMA weights, "
                      f"which v2-1_512-ema-pruned.safetensors holds ({FETCH_SD21}).", UserWarning,
                      stacklevel=4)  # the caller of sd21_from_ldm_state_dict, above its releasing_tensors wrapper


def _sd2_state_dict(sd, name, path=None):
    """The flat state dict (``canonical``) of ``sd``, read from ``name`` (``path``: its file, if any), where it is
    an SD 2.x-base checkpoint (``sd_family``); refused by name, saying what it is, otherwise."""
    if not isinstance(sd, dict):  # a pickle of another object
        _refuse(name, describe(sd, path))
    sd = canonical(sd)
    if sd_family(sd) != "sd2":
        _refuse(name, _what_instead(sd, path))
    return sd


@releasing_tensors
def sd21_from_ldm_state_dict(sd, config_dir=None, name="checkpoint", owned=False, path=None, tokenizer=None,
                             configs=None):
    """SD 2.1-base from an LDM-layout state dict (a single-file checkpoint, or what ComfyUI's
    ``state_dict_for_saving`` returns for the MODEL/CLIP/VAE of its checkpoint loader). ``owned``: the tensors
    were read into this process's memory for this call alone (see ``SD21.unet_owned``); ``path``: the file they were
    read from, if any (its metadata may name a file the pack converted); ``tokenizer`` and ``configs``: the one of
    ``config_dir`` and its parts' configs, if read already (``load_single_file``)."""
    config_dir = config_dir or shipped_config_dir()
    sd = _sd2_state_dict(sd, name, path)
    _note_ema(sd, name)
    if tokenizer is None:
        tokenizer = load_tokenizer(os.path.join(config_dir, "tokenizer"))
    unet, vae, text_encoder = models_from_config(config_dir, random_init=False, configs=configs)
    unet_owned, vae_owned = load_ldm_unet_vae(sd, unet, vae, name)
    text_sd = text_encoder_state(sd, text_encoder.config.num_hidden_layers, name)
    load_module_weights(text_encoder, _in_module_names(text_encoder, text_sd), "text encoder", name, SD21_SIZE_FIX)
    return SD21(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer, unet_owned=unet_owned or owned,
                vae_owned=vae_owned or owned)


@releasing_tensors
def load_single_file(path, config_dir=None, in_memory=False, configs=None):
    """SD 2.1-base from one LDM-layout checkpoint (``.safetensors`` or ``.ckpt``). A float32 file is memory-mapped
    (the kernel can drop pages nothing writes), or with ``in_memory`` read into this process's own memory, for a
    caller that merges into the UNet in place (``unet_owned``): written pages of a mapping are copied one by one, and
    replaced ones stay mapped. An fp16 safetensors file is always read and converted to float32 in one pass: its
    float32 copy is new memory anyway, and a mapping would hold the fp16 file beside it. The config folder's configs
    and tokenizer are checked before the file is read; ``configs``: its part configs read already, {part: config}."""
    config_dir = config_dir or shipped_config_dir()
    configs = check_part_configs(config_dir, CONFIG_FOLDER_FIX, configs)
    tokenizer = load_tokenizer(os.path.join(config_dir, "tokenizer"))
    sd, read_in = _read_base_file(path, in_memory)
    return sd21_from_ldm_state_dict(sd, config_dir, name=path, owned=read_in, path=path, tokenizer=tokenizer,
                                    configs=configs)


def _read_base_file(path, in_memory):
    """The state dict of one SD 2.1-base weight file (a single file, or a part of a diffusers folder), and whether it
    was read into this process's memory: with ``in_memory``, or always for an fp16 safetensors file (converted to
    float32 as it is read); otherwise a float32 file is memory-mapped. See ``load_single_file``."""
    read_in = in_memory or not stored_as_float32(path)
    return read_state_dict(path, mmap=not read_in, float32=read_in), read_in


DIFFUSERS_PARTS = ("unet", "vae", "text_encoder")  # the parts read (a tokenizer: load_tokenizer)


def check_part_configs(folder, fix, configs_read=None):
    """The ``config.json`` of each of the ``DIFFUSERS_PARTS`` of ``folder``, {part: config}, read before the weights
    are: one that ``read_config`` refuses (missing, not a JSON object, a FIFO or a huge file, which diffusers and
    transformers would read whole; a byte order mark) is refused with ``fix``. ``configs_read``: those read already,
    {part: config} (the UNet's, by ``check_diffusers_folder``), taken as they are."""
    configs_read = configs_read or {}
    return {part: configs_read[part] if part in configs_read else read_config(folder, f"{part}/config.json", fix)
            for part in DIFFUSERS_PARTS}


def _is_diffusers_folder(folder):
    return all(os.path.isdir(os.path.join(folder, part)) for part in DIFFUSERS_PARTS)


def _indexed_parts(folder):
    """The part folders a diffusers folder's model_index.json names (``"unet": ["diffusers", "UNet2DConditionModel"]``);
    none where it has no readable one."""
    try:
        index = _read_json(os.path.join(folder, "model_index.json"))
    except (OSError, ValueError):  # missing or unreadable, or not JSON
        return set()
    return {key for key, value in index.items() if isinstance(value, list)} if isinstance(index, dict) else set()


def _pipeline_parts(folder):
    """The part folders a diffusers folder's model_index.json names (``_indexed_parts``), and the parts read
    (``DIFFUSERS_PARTS``) whatever it says."""
    return _indexed_parts(folder) | set(DIFFUSERS_PARTS)


def _model_config(folder):
    """The config.json of a folder of one model; {} where it is not readable JSON (named then as of no class); a file
    that is no config file (``NotAConfigFile``) is refused."""
    try:
        return read_config(folder, "config.json", FOLDER_FIX)
    except NotAConfigFile:
        raise
    except WeightFileError:
        return {}


def _diffusers_folder_above(path):
    """The diffusers folder that ``path`` is a part of (one of its part folders, ``_pipeline_parts``, such as unet/;
    a file in one; its model_index.json), where ``path`` is not a diffusers folder itself; else None. Only a folder
    with its model_index.json counts: a model tree with unet/, vae/ and text_encoder/ folders of single files is none;
    and only its parts: a model in another sub-folder (a snapshot copied into it, a checkpoints/ sub-folder) is not."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        if _is_diffusers_folder(path):
            return None
        above, part = os.path.dirname(path), os.path.basename(path)
    elif os.path.basename(path) == "model_index.json":
        above, part = os.path.dirname(path), None
    else:
        folder = os.path.dirname(path)
        above, part = os.path.dirname(folder), os.path.basename(folder)
    if not (os.path.isfile(os.path.join(above, "model_index.json")) and _is_diffusers_folder(above)):
        return None
    return above if part is None or part in _pipeline_parts(above) else None


def _single_files(folder):
    """The single-file checkpoints (safetensors, .ckpt) in ``folder``, by name."""
    return sorted(n for n in os.listdir(folder) if n.lower().endswith((*SAFETENSORS_SUFFIXES, ".ckpt")))


def _hugging_face_snapshot(folder):
    """Where ``folder`` is a Hugging Face cache folder (``models--org--name``: ``snapshots/<revision>`` the
    downloads, ``refs/main`` the revision downloaded last): what in it to pass, its snapshot (refs/main's, or the only
    one), the diffusers folder, or the single file a snapshot without one holds (``huggingface-cli download <repo>
    <file>``); else None."""
    snapshots = os.path.join(folder, "snapshots")
    if not os.path.isdir(snapshots):
        return None
    revisions = sorted(os.listdir(snapshots))
    try:
        main = read_config_bytes(os.path.join(folder, "refs", "main")).decode("utf-8").strip()
    except (OSError, ValueError):  # none (or no file, not UTF-8): the snapshot is not named
        main = None
    if not (main in revisions or len(revisions) == 1):
        return f"its snapshot {quoted_name(snapshots)}/<revision>, the diffusers folder"
    snapshot = os.path.join(snapshots, main if main in revisions else revisions[0])
    singles = [] if _is_diffusers_folder(snapshot) else _single_files(snapshot)
    if singles:
        return f"the file in its snapshot, {quoted_name(os.path.join(snapshot, singles[0]))}"
    return f"its snapshot {quoted_name(snapshot)}, the diffusers folder"


def check_diffusers_folder(folder):
    """Refuse diffusers folders that are not SD 2.x-base by their configs (SD 1.x, SDXL, a UNet of other inputs or
    with a class embedding, a 768 v-prediction scheduler). Returns the part configs read, {"unet": config}, for
    ``check_part_configs``."""
    name = os.path.basename(os.path.normpath(folder))
    absent = [part for part in DIFFUSERS_PARTS if not os.path.isdir(os.path.join(folder, part))]
    snapshot = _hugging_face_snapshot(folder) if absent else None
    if snapshot:
        raise WeightFileError(f"{quoted_name(name)} is a Hugging Face cache folder: pass {snapshot}.")
    if (absent and os.path.isfile(os.path.join(folder, "config.json"))
            and not os.path.isfile(os.path.join(folder, "model_index.json"))):  # a folder of one model, no pipeline
        path = os.path.abspath(folder)
        if os.path.basename(path) in _indexed_parts(os.path.dirname(path)):  # a part of a pipeline folder
            raise WeightFileError(f"{quoted_name(name)} holds one part of a diffusers folder (its config.json and "
                                  "weights), not the whole folder: pass the folder holding unet/, vae/ and "
                                  "text_encoder/ (the stable-diffusion-2-1-base folder).")
        _refuse(folder, describe_model_folder(_model_config(folder)))
    singles = _single_files(folder)
    if absent and singles:
        raise WeightFileError(f"{quoted_name(name)} is a folder of single-file checkpoints, not a diffusers folder: "
                              f"pass the file itself, e.g. {quoted_name(os.path.join(folder, singles[0]))}.")
    if absent:
        raise WeightFileError(f"{quoted_name(name)} is not a diffusers Stable Diffusion folder: missing {absent}. "
                              "Expected the layout of stabilityai/stable-diffusion-2-1-base.")
    unet_cfg = read_config(folder, "unet/config.json", FOLDER_FIX)
    has_scheduler = os.path.exists(os.path.join(folder, "scheduler", "scheduler_config.json"))
    sched = read_config(folder, "scheduler/scheduler_config.json", FOLDER_FIX) if has_scheduler else {}
    if unet_cfg.get("addition_embed_type") == "text_time" or os.path.isdir(os.path.join(folder, "text_encoder_2")):
        _refuse(folder, KNOWN["sdxl"].what)
    inputs = unet_cfg.get("in_channels", 4)
    if inputs in UNET_INPUT_FAMILIES:  # inpainting, depth-to-image, the x4 upscaler
        _refuse(folder, KNOWN[UNET_INPUT_FAMILIES[inputs]].what)
    if inputs != 4:
        _refuse(folder, f"a Stable Diffusion model whose UNet takes {inputs} input channels, not the 4 latent channels")
    if unet_cfg.get("class_embed_type") == "projection":  # StableUnCLIP: the CLIP image embedding
        _refuse(folder, KNOWN["sd2-unclip"].what)
    if unet_cfg.get("cross_attention_dim") == 768 or not unet_cfg.get("use_linear_projection", False):  # _unet_is_sd1
        _refuse(folder, KNOWN["sd1"].what)
    if sched.get("prediction_type") == "v_prediction":
        _refuse(folder, KNOWN["sd2-v"].what)
    return {"unet": unet_cfg}


def _check_epsilon_weights(folder, unet):
    """Refuse a v-prediction UNet by its weights (``diffusers_unet_is_v_prediction``), for a folder whose scheduler
    config does not say it (missing: the parts copied without scheduler/)."""
    if diffusers_unet_is_v_prediction(unet.state_dict()):
        _refuse(folder, KNOWN["sd2-v"].what)


def _not_named_tensors(state):
    """Why a pickle's ``state`` is not a dict of named tensors (what it holds, or a key that is not a name), or
    None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}"
    key = next((k for k in state if not isinstance(k, str)), None)
    return None if key is None else f"it has the key {key!r}"


def check_weight_files(folder, loaded=(), in_memory=False):
    """Check the weight files each part will be loaded from (its safetensors, else its pickles) before
    diffusers or transformers open them: a damaged file or a pickle holding code is refused by name. A pickle that
    the pack's readers load (in ``loaded``, the paths of ``_folder_part_files``) is checked by the read that loads
    it (``_read_base_file``), so that it is unpickled once, and refused unless it holds named tensors: returns those
    reads, {path: (state dict, read in)}; none is held by the error of a file refused after them."""
    reads = {}
    for sub in ("unet", "vae", "text_encoder"):
        part = os.path.join(folder, sub)
        names = sorted(os.listdir(part))
        safetensors = [n for n in names if n.endswith(SAFETENSORS_SUFFIXES)]
        checked = safetensors or [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        # and the pickles loaded where safetensors of another variant lie beside them (fp16 beside a float32 .bin)
        checked += [n for n in names if os.path.join(part, n) in loaded and n not in checked]
        for n in checked:
            path = os.path.join(part, n)
            try:
                if path in loaded and n.endswith(PICKLE_SUFFIXES):
                    reads[path] = _read_base_file(path, in_memory)
                    why = _not_named_tensors(reads[path][0])
                    if why:
                        raise WeightFileError(f"{quoted_name(n)} is not a dict of named tensors ({why}). {FOLDER_FIX}")
                else:
                    check_weight_file(path)
            except WeightFileError as e:
                reads.clear()  # the error's traceback holds this frame
                raise WeightFileError(f"{sub}/{shown_name(n)} in the diffusers folder {quoted_name(folder)}: "
                                      f"{e}") from e
    return reads


# the weight files' names (safetensors, pickle) in each part of a diffusers folder, before a variant and the suffix
FOLDER_WEIGHT_FILES = {"unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
                       "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
                       "text_encoder": ("model", "pytorch_model")}
# the parts diffusers loads, which reads a safetensors index before the file beside it (0.30-0.42 ModelMixin
# .from_pretrained: _fetch_index_file first); transformers reads the text encoder's file first
INDEX_BEFORE_FILE = ("unet", "vae")
DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _in_module_names(module, state):
    """A state dict of diffusers' or transformers' layout in the module's names: the VAE attention of diffusers
    before 0.14 (``query``/``key``/``value``/``proj_attn``), and CLIP's ``position_ids``, which transformers before
    4.31 saved."""
    expected = module.state_dict()
    fixed = {}
    for key, value in state.items():
        if key.endswith("position_ids") and key not in expected:
            continue
        path, _, part = key.rpartition(".")
        owner, _, name = path.rpartition(".")
        if name in DEPRECATED_ATTENTION_NAMES and f"{owner}.{DEPRECATED_ATTENTION_NAMES[name]}.{part}" in expected:
            key = f"{owner}.{DEPRECATED_ATTENTION_NAMES[name]}.{part}"
        fixed[key] = value
    return fixed


def _folder_part_names(sub):
    """(weight file, index of its shards) of one folder part, in the order they are looked for: float32 before
    diffusers' fp16 variant (``save_pretrained(variant="fp16")``: ``model.fp16.safetensors``,
    ``model.safetensors.index.fp16.json``), safetensors before pickles (``.bin``)."""
    stems = FOLDER_WEIGHT_FILES[sub]
    for variant in ("", ".fp16"):
        for stem, suffix in zip(stems, ("safetensors", "bin")):
            yield f"{stem}{variant}.{suffix}", f"{stem}.{suffix}.index{variant}.json"


def _folder_part_files(folder, sub, their_loaders=False):
    """The weight files of one folder part: the first of ``_folder_part_names`` there whole, as one file or as the
    shards its index maps the keys to (as diffusers and transformers write a large part); None when none is. Where
    both are there, the one the part's loader reads: a safetensors index in ``INDEX_BEFORE_FILE``'s parts, else the
    file. ``their_loaders``: the index is checked for diffusers' and transformers' loaders too (``shard_files``)."""
    for name, index_name in _folder_part_names(sub):
        single, indexed = os.path.join(folder, sub, name), os.path.isfile(os.path.join(folder, sub, index_name))
        index_first = sub in INDEX_BEFORE_FILE and name.endswith(SAFETENSORS_SUFFIXES)
        if os.path.isfile(single) and not (index_first and indexed):
            return [single]
        if indexed:
            return shard_files(folder, sub, index_name, their_loaders)
    return None


JSON_KINDS = {dict: "a JSON object", list: "a list", str: "a string", int: "a number", float: "a number",
              bool: "true or false", type(None): "null"}


def shard_files(folder, sub, index_name, their_loaders=False):
    """The shard files of the part ``sub`` of a diffusers folder that its index ``index_name`` names, each once, as
    diffusers and transformers read them (``sorted(set(index["weight_map"].values()))`` in the part's folder). Refused
    by name with the fix: an index that is not a JSON object, or without a ``weight_map`` object of tensor names to
    shard file names, or mapping no tensor; a shard name outside the part's folder (a root or ``..``) or missing.
    ``their_loaders``, for a folder left to diffusers' and transformers' loaders (the pack's reader needs neither):
    also an index without a ``metadata`` object (they add keys to it: a KeyError or TypeError traceback naming no
    file), and a UNet or VAE shard in a folder of the part's own (diffusers 0.42 reads plain file names only;
    transformers 5.25 reads a text encoder's there)."""
    part = os.path.join(folder, sub)
    index = read_config(part, index_name, FOLDER_FIX)
    objects = {"weight_map": "a JSON object of tensor names to shard files"}
    if their_loaders:
        objects["metadata"] = "a JSON object"
    for field, what in objects.items():
        if field not in index:
            _refuse_index(part, index_name, f"has no {field}")
        if not isinstance(index[field], dict):
            _refuse_index(part, index_name, f"has a {field} that is {JSON_KINDS[type(index[field])]}, not {what}")
    if not index["weight_map"]:
        _refuse_index(part, index_name, "maps no tensor to a shard file")
    for tensor, shard in index["weight_map"].items():
        if not isinstance(shard, str):
            _refuse_index(part, index_name, f"maps {tensor!r} to {json.dumps(shard)}, not to the name of a shard file")
    shards = sorted(set(index["weight_map"].values()))
    for shard in shards:
        relative = pathlib.PurePath(shard)
        if relative.anchor or ".." in relative.parts:
            _refuse_index(part, index_name, f"names the shard {quoted_name(shard)}, which is outside its folder")
        if their_loaders and sub != "text_encoder" and os.path.basename(shard) != shard:
            _refuse_index(part, index_name, f"names the shard {quoted_name(shard)}, which diffusers does not read: a "
                                            "shard is a file in the part's folder")
        if not os.path.isfile(os.path.join(part, shard)):
            _refuse_index(part, index_name, f"names the shard {quoted_name(shard)}, which is missing")
    return [os.path.join(part, shard) for shard in shards]


def _refuse_index(part, index_name, problem):
    raise WeightFileError(f"{index_name} in {quoted_name(part)} {problem}: diffusers and transformers cannot load the "
                          f"part from it. {FOLDER_FIX}")


def _load_folder_parts(folder, files, in_memory, reads, configs):
    """UNet, VAE, text encoder and whether each was read into memory, built on the meta device and filled from the
    folder's weight files per part (``files``, of ``_folder_part_files``: safetensors, or pickles opened with
    ``weights_only``; ``reads``: those already read, by ``check_weight_files``; ``configs``: its parts' configs, by
    ``check_part_configs``) with this pack's readers, as a single file is (see ``load_single_file``); None when a part
    is stored under another name or its keys are not the module's, which ``load_diffusers_folder`` leaves to
    diffusers and transformers. A part whose tensors are not floating point (an int8-quantised file) is refused by
    name, also after a part left to diffusers: diffusers and transformers would cast them to float silently; so is a
    part whose keys are the module's but not all its shapes (its config.json and weights do not belong together),
    which diffusers and transformers refuse too, advising an option of theirs the user cannot pass."""
    if None in files.values():
        return None
    parts, owned, mismatched = models_from_config(folder, random_init=False, configs=configs), [], False
    for (sub, paths), module in zip(files.items(), parts):
        state, read_in = {}, True
        for path in paths:
            shard, shard_read_in = reads.pop(path) if path in reads else _read_base_file(path, in_memory)
            state.update(shard)
            read_in = read_in and shard_read_in
        state = _in_module_names(module, state)
        try:
            owned.append(load_module_weights(module, state, sub, fix=FOLDER_SHAPE_FIX) or read_in)
        except ArchitectureMismatch as e:
            if e.keys_match:  # only shapes differ, which no loader mends
                refused = str(e)
                break
            mismatched = True  # left to diffusers once the other parts' tensors are seen to be floating point
        except WeightFileError as e:
            refused = str(e)
            break
    else:
        return None if mismatched else (parts, owned)
    # the error holds no tensor read (ComfyUI keeps it to report it): none of this frame's, nor load_module_weights'
    parts = module = state = shard = None
    reads.clear()
    where = f"{sub}/{os.path.basename(paths[0])}" if len(paths) == 1 else f"{sub}/ (its {len(paths)} shards)"
    raise WeightFileError(f"{shown_name(where)} in the diffusers folder {quoted_name(folder)}: {refused}")


# the first transformers that loads a safetensors file without metadata, and the first that loads one of any format (or
# none); the formats those before it load
TRANSFORMERS_READS_NO_METADATA, TRANSFORMERS_READS_ANY_FORMAT = "4.48", "5.0"
TRANSFORMERS_4_FORMATS = ("pt", "tf", "flax", "mlx")
# the formats whose model.safetensors (not its shards, read as PyTorch's) transformers 4.x takes for another
# framework's weights: the framework's name, and the modules its conversion imports, in order
TRANSFORMERS_4_CONVERTED = {"tf": ("TensorFlow", ("tensorflow",)), "flax": ("Flax", ("jax", "flax"))}


# the first diffusers whose ModelMixin.from_pretrained loads a sharded part without accelerate: 0.30-0.32 load one only
# with it (their default low_cpu_mem_usage falls back to False without it, and that path calls load_state_dict(None)
# for a sharded part: a bare TypeError traceback)
DIFFUSERS_LOADS_SHARDS_ALONE = "0.33"


def diffusers_needs_accelerate_for_shards():
    """Whether the installed diffusers loads a sharded UNet or VAE only with accelerate, and accelerate is not
    installed: diffusers before ``DIFFUSERS_LOADS_SHARDS_ALONE`` and not diffusers' ``is_accelerate_available()``."""
    import diffusers
    from diffusers.utils import is_accelerate_available

    return _version(diffusers.__version__) < _version(DIFFUSERS_LOADS_SHARDS_ALONE) and not is_accelerate_available()


def diffusers_loads_through_accelerate():
    """Whether the installed diffusers loads a UNet or VAE through accelerate's loaders by default: before
    ``DIFFUSERS_LOADS_SHARDS_ALONE`` with accelerate installed (0.30-0.32 ``ModelMixin.from_pretrained``, whose
    ``low_cpu_mem_usage`` is then True: a file with ``load_model_dict_into_meta``, which raises on a tensor the file
    lacks, shards with ``accelerate.load_checkpoint_and_dispatch(..., strict=True)``, which fails on a tensor the
    module lacks and leaves one the shards lack on the meta device, reporting none)."""
    import diffusers
    from diffusers.utils import is_accelerate_available

    return _version(diffusers.__version__) < _version(DIFFUSERS_LOADS_SHARDS_ALONE) and is_accelerate_available()


def _check_shards_loadable(folder):
    """Refuse by name a UNet or VAE saved in shards, whose index diffusers reads (``INDEX_BEFORE_FILE``), where the
    installed diffusers loads one only with accelerate, which is not installed
    (``diffusers_needs_accelerate_for_shards``)."""
    if not diffusers_needs_accelerate_for_shards():
        return
    import diffusers

    for sub in INDEX_BEFORE_FILE:
        index = _shards_index(folder, sub)
        if index is not None:
            raise WeightFileError(f"{sub}/{os.path.basename(index)} in the diffusers folder {quoted_name(folder)}: the "
                                  f"{sub} is saved in shards, which diffusers {diffusers.__version__} (installed "
                                  "here) loads only with accelerate, which is not installed: install it into the "
                                  "Python that runs ComfyUI or the pack's commands (pip install accelerate), or update "
                                  f"diffusers to {DIFFUSERS_LOADS_SHARDS_ALONE} or later.")


def _shards_index(folder, sub):
    """The path of the safetensors shard index of ``sub`` that diffusers reads, where there is one; else None."""
    path = os.path.join(folder, sub, f"{FOLDER_WEIGHT_FILES[sub][0]}.safetensors.index.json")
    return path if os.path.isfile(path) else None


def _diffusers_options(folder, configs):
    """diffusers' ``from_pretrained`` options for the UNet and VAE, {part: options}. Where diffusers loads through
    accelerate (``diffusers_loads_through_accelerate``): a part in one file with ``low_cpu_mem_usage=False``, the
    loader that reports a missing tensor, refused then as without accelerate (accelerate's raised a ValueError saying
    to pass that option); a part in shards, which diffusers loads there through accelerate alone, is checked by its
    index's tensor names first: one its module lacks is refused by name, one the shards lack as missing. Without
    accelerate: ``low_cpu_mem_usage=False``, which diffusers falls back to there after a warning to install it."""
    from diffusers.utils import is_accelerate_available

    if not is_accelerate_available():
        return {sub: {"low_cpu_mem_usage": False} for sub in INDEX_BEFORE_FILE}
    if not diffusers_loads_through_accelerate():
        return {sub: {} for sub in INDEX_BEFORE_FILE}
    import diffusers

    options, modules = {}, None
    for sub in INDEX_BEFORE_FILE:
        index = _shards_index(folder, sub)
        if index is None:
            options[sub] = {"low_cpu_mem_usage": False}
            continue
        options[sub] = {}
        modules = modules or dict(zip(FOLDER_WEIGHT_FILES, models_from_config(folder, random_init=False,
                                                                               configs=configs)))
        weight_map = read_config(os.path.dirname(index), os.path.basename(index), FOLDER_FIX)["weight_map"]
        stored, expected = _in_module_names(modules[sub], dict.fromkeys(weight_map)), modules[sub].state_dict()
        _refuse_missing(folder, sub, sorted(k for k in expected if k not in stored))
        unexpected = sorted(k for k in stored if k not in expected)
        if unexpected:
            raise WeightFileError(f"{sub}/{os.path.basename(index)} in the diffusers folder {quoted_name(folder)}: the "
                                  f"{sub}'s shards hold {len(unexpected)} tensor(s) its model lacks (e.g. "
                                  f"{unexpected[:2]}), on which diffusers {diffusers.__version__} (installed here) "
                                  "fails: it loads shards through accelerate, which takes only the model's tensors. "
                                  f"Update diffusers to {DIFFUSERS_LOADS_SHARDS_ALONE} or later, which drops them, or "
                                  f"save the {sub} again without them.")
    return options


def _refuse_missing(folder, part, missing):
    """Refuse ``part`` of the diffusers folder, which lacks the tensors ``missing`` (names), if any."""
    if missing:
        raise WeightFileError(f"The {part}/ weights in the diffusers folder {quoted_name(folder)} lack "
                              f"{len(missing)} of the model's tensors (e.g. {missing[:2]}), which diffusers and "
                              f"transformers would start at random. {FOLDER_FIX}")


def _on_meta_device(module):
    """The names of ``module``'s parameters and buffers on the meta device (holding no data)."""
    return [name for name, tensor in (*module.named_parameters(), *module.named_buffers()) if tensor.is_meta]


def _check_text_encoder_format(folder):
    """Refuse by name the text encoder's safetensors files (model.safetensors, or the shards its index names,
    ``shard_files``) whose ``format`` metadata the installed transformers does not load: before
    ``TRANSFORMERS_READS_NO_METADATA`` a file without metadata (4.40-4.47: an AttributeError traceback from
    ``metadata.get("format")``; ``safetensors.torch.save_file`` writes none unless asked), and before
    ``TRANSFORMERS_READS_ANY_FORMAT`` one whose metadata (empty too) has no format or one outside
    ``TRANSFORMERS_4_FORMATS`` (4.40-4.57: "Incompatible safetensors file. File metadata is not ['pt', 'tf', 'flax',
    'mlx'] but None", naming no file; a shard "does not contain the valid metadata"); and before it a model.safetensors
    of a format in ``TRANSFORMERS_4_CONVERTED`` whose framework is not installed (4.40-4.57 convert it from
    TensorFlow's or Flax's weights: a bare "No module named 'tensorflow'" traceback)."""
    import transformers

    installed = _version(transformers.__version__)
    if installed >= _version(TRANSFORMERS_READS_ANY_FORMAT):
        return
    part = os.path.join(folder, "text_encoder")
    paths = [os.path.join(part, "model.safetensors")] if os.path.isfile(os.path.join(part, "model.safetensors")) else []
    if not paths and os.path.isfile(os.path.join(part, "model.safetensors.index.json")):
        paths = shard_files(folder, "text_encoder", "model.safetensors.index.json", their_loaders=True)
    for path in paths:
        metadata = stored_metadata(path)  # a damaged or missing file refused by name
        if metadata is None and installed >= _version(TRANSFORMERS_READS_NO_METADATA):
            continue
        file_format = (metadata or {}).get("format")
        where = f"text_encoder/{shown_name(os.path.relpath(path, part))} in the diffusers folder {quoted_name(folder)}"
        if file_format in TRANSFORMERS_4_CONVERTED and os.path.basename(path) == "model.safetensors":
            framework, modules = TRANSFORMERS_4_CONVERTED[file_format]
            absent = next((module for module in modules if importlib.util.find_spec(module) is None), None)
            if absent:
                raise WeightFileError(f"{where} has the format {quoted_name(file_format)} in its metadata, which "
                                      f"transformers {transformers.__version__} (installed here) takes for {framework} "
                                      f"weights, to convert with {absent}, which is not installed: save the file again "
                                      "with metadata={'format': 'pt'} (safetensors.torch.save_file) if its tensors are "
                                      f"PyTorch's, or update transformers to {TRANSFORMERS_READS_ANY_FORMAT} or later, "
                                      "which reads them as PyTorch's.")
        if file_format in TRANSFORMERS_4_FORMATS:
            continue
        fix = "or save the file again with metadata={'format': 'pt'} (safetensors.torch.save_file)."
        if file_format is None:
            first = TRANSFORMERS_READS_NO_METADATA if metadata is None else TRANSFORMERS_READS_ANY_FORMAT
            raise WeightFileError(f"{where} has no 'format' in its metadata, which transformers "
                                  f"{transformers.__version__} (installed here) needs to load it: update transformers "
                                  f"to {first} or later, {fix}")
        raise WeightFileError(f"{where} has the format {quoted_name(file_format)} in its metadata, which transformers "
                              f"{transformers.__version__} (installed here) does not load (it loads 'pt', 'tf', 'flax' "
                              f"and 'mlx'): update transformers to {TRANSFORMERS_READS_ANY_FORMAT} or later, {fix}")


@releasing_tensors
def load_diffusers_folder(folder, in_memory=False, checked=None):
    """SD 2.1-base from a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``). Its standard
    layout is read like a single file (``in_memory``: see ``load_single_file``); other layouts through diffusers'
    and transformers' own loaders, memory-mapped. ``checked``: the part configs ``check_sd21`` read of the folder,
    whose checks it made (``check_diffusers_folder``), {part: config}; both are not made again."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    configs_read = check_diffusers_folder(folder) if checked is None else checked
    # the cheap checks before any weight is read: the tokenizer, the configs (a FIFO or a huge file refused: diffusers
    # and transformers read it whole)
    tokenizer = load_tokenizer(os.path.join(folder, "tokenizer"))
    configs = check_part_configs(folder, FOLDER_FIX, configs_read)
    files = {sub: _folder_part_files(folder, sub) for sub in FOLDER_WEIGHT_FILES}
    read_here = [] if None in files.values() else [path for paths in files.values() for path in paths]
    # the reads of the check are held by _load_folder_parts alone: none is left while diffusers loads the folder
    loaded = _load_folder_parts(folder, files, in_memory, check_weight_files(folder, read_here, in_memory), configs)
    if loaded is not None:
        (unet, vae, text_encoder), (unet_owned, vae_owned, _) = loaded
        _check_epsilon_weights(folder, unet)
        return SD21(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer, unet_owned=unet_owned, vae_owned=vae_owned)
    for sub in FOLDER_WEIGHT_FILES:  # an index's metadata and the text encoder's format, for their loaders alone
        _folder_part_files(folder, sub, their_loaders=True)
    _check_shards_loadable(folder)
    _check_text_encoder_format(folder)
    options = _diffusers_options(folder, configs)
    try:
        unet, unet_info = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True,
                                                               torch_dtype=torch.float32, output_loading_info=True,
                                                               **options["unet"])
        vae, vae_info = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True,
                                                      torch_dtype=torch.float32, output_loading_info=True,
                                                      **options["vae"])
        text_encoder, text_info = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"),
                                                                local_files_only=True, torch_dtype=torch.float32,
                                                                output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise WeightFileError(f"Cannot load the diffusers folder {quoted_name(folder)}: {e} Its files are incomplete "
                              f"or damaged. {FOLDER_FIX}") from e
    for part, module, info in (("unet", unet, unet_info), ("vae", vae, vae_info),
                               ("text_encoder", text_encoder, text_info)):
        # started at random, with a logged warning only; or left on the meta device by accelerate's loaders, which
        # report none
        _refuse_missing(folder, part, sorted({*info["missing_keys"], *_on_meta_device(module)}))
    _check_epsilon_weights(folder, unet)
    return SD21(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer)


def _sd21_path(path):
    """``path`` as a string, where it exists and is not a part of a diffusers folder; refused by name otherwise."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightFileError(f"Base model not found: {quoted_name(path)}.{dangling_link(path)} Pass the "
                              "stable-diffusion-2-1-base folder or v2-1_512-ema-pruned.safetensors.")
    folder = _diffusers_folder_above(path)
    if folder is not None:
        raise WeightFileError(f"{quoted_name(os.path.basename(os.path.normpath(path)))} is a part of the diffusers "
                              f"folder {quoted_name(folder)}: pass that folder itself (in ComfyUI: the whole folder in "
                              "models/diffusers, chosen in Load SD 2.1-base (DiffSR)).")
    return path


def check_sd21(path, config_dir=None):
    """The checks ``load_sd21`` makes of ``path`` before it reads a weight, for a loader that reads large weights of
    its own (``load_dossr``), so that a wrong base is refused before them: ``path`` exists and is no part of a
    diffusers folder; a folder is SD 2.x-base by its configs (``check_diffusers_folder``) and has its parts' configs,
    a single file's config folder (``config_dir``, default the shipped one) has them (``check_part_configs``); the
    tokenizer files there are ones ``load_tokenizer`` reads (``check_tokenizer_files``); and a single file is SD
    2.x-base (``_sd2_state_dict``), told from its tensors memory-mapped where ``read_state_dict`` maps them (a
    safetensors file, a zip pickle: its header, or its pickle without the tensors, and the one norm bias that tells
    v-prediction are read); a legacy pickle, which is read whole, is told once ``load_sd21`` reads it. Returns the
    part configs read, {part: config}, for ``load_sd21(path, config_dir, checked=...)``, which reads them no more."""
    path = _sd21_path(path)
    if os.path.isdir(path):  # in the orders of load_diffusers_folder and load_single_file
        configs_read = check_diffusers_folder(path)
        check_tokenizer_files(os.path.join(path, "tokenizer"))
        return check_part_configs(path, FOLDER_FIX, configs_read)
    config_dir = config_dir or shipped_config_dir()
    configs = check_part_configs(config_dir, CONFIG_FOLDER_FIX)
    check_tokenizer_files(os.path.join(config_dir, "tokenizer"))
    if maps_when_read(path):
        _sd2_state_dict(read_state_dict(path, mmap=True), path, path)
    return configs


@releasing_tensors
def load_sd21(path, config_dir=None, *, in_memory=False, checked=None):
    """SD 2.1-base from a diffusers folder or a single-file checkpoint (``in_memory``: see ``load_single_file``).
    ``checked``: what ``check_sd21(path, config_dir)`` returned, for a loader that checked ``path`` first: the part
    configs it read, not read again (nor the folder's checks made again)."""
    path = _sd21_path(path)
    if os.path.isdir(path):
        return load_diffusers_folder(path, in_memory, checked)
    return load_single_file(path, config_dir, in_memory, checked)


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def network_dtype(name, device):
    """The networks' dtype for a precision name of ``PRECISIONS``; None or "auto": fp16 on a CUDA GPU that computes
    it well (as the official code; ``fp16_works``), float32 elsewhere."""
    if name in (None, "auto"):
        return torch.float16 if device.type == "cuda" and fp16_works(device) else torch.float32
    return check_precision(PRECISIONS[name], device)


@functools.cache
def cpu_computes_float16():
    """Whether this PyTorch has float16 convolution and layer norm kernels on the CPU (2.1 has neither)."""
    try:
        half = torch.ones(1, 1, 3, 3, dtype=torch.float16)
        torch.nn.functional.conv2d(half, half)
        torch.nn.functional.layer_norm(half, (3,))
    except RuntimeError:
        return False
    return True


def check_precision(dtype, device):
    """``dtype``, unless it is float16 on a CPU whose PyTorch cannot compute it: refused by name then, before a network
    fails inside ("LayerNormKernelImpl" not implemented for 'Half')."""
    if dtype == torch.float16 and device.type == "cpu" and not cpu_computes_float16():
        raise DiffSRError(f"PyTorch {torch.__version__} has no float16 kernels on the CPU: run fp32 or bf16 there "
                          "(--dtype, or the node's dtype), or update PyTorch.")
    return dtype


@contextlib.contextmanager
def ieee_float32():
    """Within the block, float32 cuDNN convolutions and CUDA matrix products compute in IEEE float32. By default
    PyTorch lets Ampere and later GPUs run float32 convolutions in TF32 (a 10-bit mantissa), which put the official
    parity cases 34–50 dB from float32 (TF32 simulated on the CPU). The flags are put back after, for the host's
    other models; through the API of the PyTorch at hand (2.9 on refuse to mix it with the one before)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):  # PyTorch 2.9 on
        flags = [(cudnn.conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
    else:
        flags = [(cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]
    before = [getattr(owner, name) for owner, name, _ in flags]
    for owner, name, value in flags:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(flags, before):
            setattr(owner, name, value)


FP16_BROKEN = ("1660", "1650", "1630", "T500", "T550", "T600", "MX550", "MX450", "CMP 30HX", "T2000", "T1000",
               "T1200")  # GPU names


def fp16_works(device):
    """Whether a CUDA GPU runs the networks well in fp16: from compute capability 7 on (before it, fp16 is no faster
    than float32, or far slower), but not the Turing cards without tensor cores (GTX 16xx, T-series, MX450/550),
    whose fp16 gives NaN in Stable Diffusion. ComfyUI's ``should_use_fp16`` rule (comfy/model_management.py L1227,
    as on Linux); the nodes ask ComfyUI itself (``nodes.host.auto_dtype``)."""
    if torch.version.hip:  # AMD GPUs (ROCm): fp16 throughout, as ComfyUI
        return True
    props = torch.cuda.get_device_properties(device)
    return props.major >= 7 and not any(name in props.name for name in FP16_BROKEN)


def move_module(module, device=None, dtype=None):
    """``module.to(device, dtype)`` as ``torch.nn.Module`` does it: diffusers' own ``to`` warns about every cast it
    is given ("There are modules in AutoencoderKL that should be kept in float32: []"), though these modules keep
    nothing in float32 and are never quantised."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def module_tensors(module):
    """The parameters and buffers of ``module``."""
    return [*module.parameters(), *module.buffers()]


def tensor_bytes(tensors):
    """Bytes of ``tensors``, each tensor once: what moving them copies (not their storages', which for weights read
    into one buffer, a checkpoint loaded in memory, are the whole file's)."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def weight_bytes(*modules):
    """Bytes of the parameters and buffers of ``modules``, each once."""
    return tensor_bytes(t for m in modules for t in module_tensors(m))


def weights_out_of_memory(names, modules, device, error):
    """The ``WeightsOutOfMemory`` of ``modules`` (called ``names``) that did not fit on ``device`` (``error``: what
    the move raised), with the fixes that apply: a 16-bit dtype where they are in float32, the CPU where they went
    to a GPU. Where the CPU allocator refused (``cpu_allocation_failed``) while they went to a GPU, it was the
    computer's memory, filling with the networks moved off the GPU to make room: that is said instead."""
    dtype = next((t.dtype for m in modules for t in module_tensors(m) if t.is_floating_point()), torch.float32)
    size = f"{weight_bytes(*modules) / 2 ** 30:.2f} GiB in {str(dtype).removeprefix('torch.')}"
    half = ["choose dtype fp16 or bf16 (half the weights' memory)"] if dtype == torch.float32 else []
    to_gpu = torch.device(device).type != "cpu"
    if to_gpu and cpu_allocation_failed(error):
        fixes = ["close other programs", *half, "give the computer more memory (or swap)"]
        where = (f"Out of the computer's memory (RAM, not {device}'s) while networks moved off {device} to make room "
                 f"for the weights of {', '.join(names)} ({size}): the networks moved off did not fit in it")
    else:
        fixes = ["close other programs that use the device", *half, *(["run on the CPU"] if to_gpu else [])]
        where = (f"Out of memory while moving the weights of {', '.join(names)} ({size}) to {device}: they do not "
                 "fit beside what else holds its memory")
    return WeightsOutOfMemory(f"{where}, and smaller tiles cannot help. To fix: {', '.join(fixes[:-1])}"
                              f"{' or ' if len(fixes) > 1 else ''}{fixes[-1]}.")


NETWORK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the networks' precisions, most preferred first


class NetworksOnSD21:
    """What OSEDiff's and DoSSR's models (dataclasses of networks on SD 2.1-base, listed by ``modules()``, with a
    ``text_encoder``, ``tokenizer``, ``prompt_cache`` and a ``decoder_owned`` init flag) share: the fast modules,
    built once; the device they compute on and the dtype of the UNet; moving and casting every network; loading
    the networks of a stage (``load_stage``); the cached prompt embeddings."""

    def __post_init__(self, decoder_owned):
        for module in self.modules():
            fast_modules(module)
        fast_vae_decoder(self.vae.decoder, in_place=decoder_owned)
        self.stage_loader = None

    @property
    def device(self):
        """The device the networks compute on: the stage loader's, else the UNet's (every network is there)."""
        return self.stage_loader.device if self.stage_loader is not None else self.unet.conv_in.weight.device

    def load_stage(self, networks, activation_bytes=0):
        """Before a stage of a run: ``networks``, the ones it runs, on ``device`` with room for the stage's
        estimated ``activation_bytes`` (0: not estimated), by ``stage_loader(self, networks, activation_bytes)``
        (``sr_common.offload.OffloadWhenShort``; ComfyUI's memory manager in the nodes). Without a stage loader
        nothing moves: every network is on ``device``. Out of memory there is ``WeightsOutOfMemory``, which names
        the networks and the fixes: smaller tiles cannot help."""
        if self.stage_loader is None:
            return
        networks = list({id(m): m for m in networks}.values())
        try:
            self.stage_loader(self, networks, activation_bytes)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            names = {id(getattr(self, f.name)): f.name for f in fields(self)}
            raise weights_out_of_memory([names.get(id(m), type(m).__name__) for m in networks], networks,
                                        self.stage_loader.device, error) from error

    @property
    def dtype(self):
        return self.unet.conv_in.weight.dtype

    def to(self, device=None, dtype=None):
        """Every network moved / cast (``move_module``), and computing where moved (the stage loader, if any, is
        dropped); the cached prompt embeddings are of the old ones."""
        if dtype is not None and dtype not in NETWORK_DTYPES:
            raise ValueError(f"`dtype` must be torch.float32, float16 or bfloat16, got {dtype}")
        for module in self.modules():
            move_module(module, device, dtype)
        if device is not None:
            self.stage_loader = None
        self.prompt_cache.clear()
        return self

    def has_prompt_embedding(self, prompt, dtype):
        """Whether the embedding of ``prompt`` in ``dtype`` (the precision the text encoder ran in) is cached."""
        return prompt in self.prompt_cache and self.prompt_cache[prompt].dtype == dtype

    def prompt_embedding(self, prompt, dtype=None):
        """Text embedding (1, 77, D) of ``prompt`` by the SD 2.1 text encoder (``encode_prompt``), cached per prompt
        in the precision it was encoded in: ``dtype`` (default: the text encoder's now). A cached embedding of
        another precision is encoded again (a node, or another model on the same base, has cast the text encoder)."""
        if dtype is None and self.text_encoder is not None:
            dtype = self.text_encoder.dtype
        if prompt not in self.prompt_cache or (dtype is not None and not self.has_prompt_embedding(prompt, dtype)):
            if self.text_encoder is None or self.tokenizer is None:
                raise ValueError(f"This {type(self).__name__} has no text encoder, so it cannot encode a prompt: pass "
                                 "the prompt's embedding instead (--prompt-embeds on the command line, a CONDITIONING "
                                 "in ComfyUI), or load the model with an SD 2.1-base (--base).")
            self.load_stage([self.text_encoder])
            with torch.no_grad():
                self.prompt_cache[prompt] = encode_prompt(self.text_encoder, self.tokenizer, [prompt])
        return self.prompt_cache[prompt]


class PromptCache(OrderedDict):
    """Prompt → text embedding for the ``size`` most recently used prompts. Unbounded, a folder run with DAPE (a
    prompt per image) would keep every embedding (158 KB each in fp16) on the device for as long as the model."""

    def __init__(self, size=32):
        super().__init__()
        self.size = size

    def __getitem__(self, prompt):
        self.move_to_end(prompt)
        return super().__getitem__(prompt)

    def __setitem__(self, prompt, embedding):
        super().__setitem__(prompt, embedding)
        self.move_to_end(prompt)
        while len(self) > self.size:  # not popitem: Python 3.10's calls __getitem__ on the key it has unlinked
            del self[next(iter(self))]


def checked_context(context, unet):
    """``context`` (B, 77, D), if D is the width ``unet`` cross-attends to (SD 2.1: 1024, its OpenCLIP-H text
    encoder); refused by name otherwise (a CONDITIONING of another model's CLIP: SD 1.x 768, SDXL 2048)."""
    width = unet.config.cross_attention_dim
    if context.dim() != 3 or context.shape[-1] != width:
        raise ValueError(f"The prompt embedding has shape {tuple(context.shape)}; the UNet needs (1, 77, {width}), "
                         "the SD 2.1 text encoder's output: CLIP Text Encode with the CLIP of an SD 2.1 checkpoint, "
                         "or the prompt text.")
    return context


def encode_prompt(text_encoder, tokenizer, prompts):
    """CLIP last hidden state (B, 77, D) for a list of prompts: max-length padding, truncation, no mask."""
    ids = tokenizer(list(prompts), max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]
