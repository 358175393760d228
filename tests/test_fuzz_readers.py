"""Fuzzing the weight-file readers: small safetensors, torch zip and legacy pickle files with flipped bits,
truncations, insertions and overwrites. Every reader and recogniser may only raise our own errors."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from comfyui_diffsr.dossr_core.model import load_dossr
from comfyui_diffsr.dossr_core.weights import read_weights
from comfyui_diffsr.osediff_core import dape
from comfyui_diffsr.osediff_core.weights import MODULE_LIST_KEYS, read_osediff
from comfyui_diffsr.sr_common.errors import DiffSRError
from comfyui_diffsr.sr_common.known_files import identify
from comfyui_diffsr.sr_common.sd21 import load_sd21
from comfyui_diffsr.sr_common.weights import DAPE_FORMAT, DOSSR_FORMAT, read_state_dict

from conftest import DAPE, DOSSR_CONFIG, RAM, copy_tiny_sd21

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _t(*shape):
    return torch.arange(int(torch.tensor(shape).prod())).reshape(shape).float() / 10


def _osediff():
    lora = {"conv_in.base_layer.weight": _t(4, 4, 3, 3), "conv_in.base_layer.bias": _t(4),
            "conv_in.lora_A.default_encoder.weight": _t(2, 4, 3, 3), "conv_in.lora_B.default_encoder.weight": _t(4, 2, 1, 1),
            "a.to_q.lora_A.default_others.weight": _t(2, 8), "a.to_q.lora_B.default_others.weight": _t(8, 2)}
    return {"unet_lora_encoder_modules": ["conv_in"], "unet_lora_decoder_modules": [],
            "unet_lora_others_modules": ["a.to_q"], "vae_lora_encoder_modules": ["quant_conv"], "rank_unet": 2,
            "rank_vae": 2, "state_dict_unet": lora,
            "state_dict_vae": {"quant_conv.lora_A.default_encoder.weight": _t(2, 8, 1, 1),
                               "quant_conv.lora_B.default_encoder.weight": _t(8, 2, 1, 1)}}


def _sd():  # SD-like without a text encoder: refused before any model is built
    return {"model.diffusion_model.input_blocks.0.0.weight": _t(4, 4, 3, 3),
            "model.diffusion_model.output_blocks.2.1.transformer_blocks.0.norm1.bias": _t(8),
            "first_stage_model.encoder.conv_in.weight": _t(4, 3, 3, 3)}


def _dossr():
    return {"state_dict": {"control_model.zero_convs.0.0.weight": _t(4, 4, 1, 1),
                           "control_model.input_blocks.0.0.weight": _t(4, 8, 3, 3),
                           "cond_encoder.encoder.conv_in.weight": _t(4, 3, 3, 3),
                           "preprocess_model.conv_first.weight": _t(4, 3, 3, 3), "lambdas": _t(3)}}


def _ram():
    return {"model": {"visual_encoder.patch_embed.proj.weight": _t(4, 3, 2, 2), "label_embed": _t(3, 4),
                      "tagging_head.encoder.layer.0.crossattention.self.query.weight": _t(4, 4)}}


def _dape():
    return {"visual_encoder.layers.0.blocks.0.attn.qkv.lora_A": _t(2, 4),
            "visual_encoder.layers.0.blocks.0.attn.qkv.lora_B": _t(12, 2)}


def _save_torch(obj, legacy=False):
    def write(path):
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return write


def _save_safetensors(tensors, metadata):
    def write(path):
        save_file(tensors, path, metadata=metadata)
    return write


def _osediff_safetensors():
    ckpt = _osediff()
    tensors = {f"unet.{k}": v for k, v in ckpt["state_dict_unet"].items()}
    tensors.update({f"vae.{k}": v for k, v in ckpt["state_dict_vae"].items()})
    return _save_safetensors(tensors, {"format": "osediff", "rank_unet": "2", "rank_vae": "2",
                                       **{key: json.dumps(ckpt[key]) for key in MODULE_LIST_KEYS}})


def _dape_converted():
    config = {"swin": {"image_size": 32, "patch_size": 4, "embed_dim": 8, "depths": [1], "num_heads": [1],
                       "window_size": 2}, "label_dim": 4, "hidden": 4, "layers": 1, "intermediate": 8, "heads": 1,
              "num_tags": 4585}
    return _save_safetensors({"label_embed": _t(3, 4), "fc.weight": _t(1, 4)},
                             {"format": DAPE_FORMAT, "config": json.dumps(config)})


def _dossr_converted():
    tensors = {"controlnet.controlnet_down_blocks.0.weight": _t(4, 4, 1, 1),
               "cond_encoder.encoder.conv_in.weight": _t(4, 3, 3, 3), "rrdb.conv_first.weight": _t(4, 3, 3, 3)}
    return _save_safetensors(tensors, {"format": DOSSR_FORMAT, "controlnet_config": json.dumps({"in_channels": 4}),
                                       "vae_config": json.dumps({"latent_channels": 4}), "info": "{}"})


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    return copy_tiny_sd21(tmp_path_factory.mktemp("base") / "tiny_sd21")


# seed: (file name, writer, the readers and loaders it goes through)
SEEDS = {
    "osediff-zip": ("osediff.pkl", _save_torch(_osediff()), [read_osediff]),
    "osediff-legacy": ("osediff.pkl", _save_torch(_osediff(), legacy=True), [read_osediff]),
    "osediff-safetensors": ("osediff.safetensors", _osediff_safetensors(), [read_osediff]),
    "sd-safetensors": ("sd.safetensors", _save_safetensors(_sd(), None),
                       [lambda p: identify(read_state_dict(p)),
                        lambda p: identify(read_state_dict(p, mmap=False)), "load_sd21",
                        "load_sd21_in_memory"]),
    "sd-legacy": ("sd.ckpt", _save_torch({"state_dict": _sd()}, legacy=True), ["load_sd21", "load_sd21_in_memory"]),
    "dossr-zip": ("dossr.ckpt", _save_torch(_dossr()), [read_weights, lambda p: load_dossr(p, config=DOSSR_CONFIG)]),
    "dossr-safetensors": ("dossr.safetensors", _dossr_converted(), [read_weights, "load_dossr_converted"]),
    "ram-zip": ("ram.pth", _save_torch(_ram()), [dape._read_ram, lambda p: dape.load_dape_tagger(p, DAPE)]),
    "dape-legacy": ("dape.pth", _save_torch(_dape(), legacy=True), [dape._read_dape,
                                                                     lambda p: dape.load_dape_tagger(RAM, p)]),
    "dape-safetensors": ("dape.safetensors", _dape_converted(), [lambda p: dape.load_dape_tagger(converted_path=p)]),
}


@st.composite
def mutations(draw):
    """1-4 edits: a bit flip, a truncation, an insertion, an overwrite or a deletion, at any position."""
    edit = st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(0, 7)),
        st.tuples(st.just("truncate"), st.integers(0, 2**20)),
        st.tuples(st.just("insert"), st.integers(0, 2**20), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("overwrite"), st.integers(0, 2**20), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), st.integers(0, 2**20), st.integers(1, 64)))
    return draw(st.lists(edit, min_size=1, max_size=4))


def mutate(data, edits):
    data = bytearray(data)
    for edit in edits:
        kind, position = edit[0], edit[1] % (len(data) + 1)
        if kind == "flip" and position < len(data):
            data[position] ^= 1 << edit[2]
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = edit[2]
        elif kind == "overwrite":
            data[position:position + len(edit[2])] = edit[2]
        elif kind == "delete":
            del data[position:position + edit[2]]
    return bytes(data)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # a byte of the header mutated
@pytest.mark.parametrize("seed", SEEDS)
def test_mutated_files_raise_only_our_errors(seed, tmp_path_factory, base_config):
    name, write, readers = SEEDS[seed]
    folder = tmp_path_factory.mktemp(seed)
    original = folder / ("seed_" + name)
    write(str(original))
    data = original.read_bytes()
    named = {"load_sd21": lambda p: load_sd21(p, config_dir=base_config),
             "load_sd21_in_memory": lambda p: load_sd21(p, config_dir=base_config, in_memory=True),
             "load_dossr_converted": lambda p: load_dossr(p, base=base_config)}
    calls = [read_state_dict] + [named.get(r, r) for r in readers]

    def run(path):
        for call in calls:
            try:
                call(path)
            except DiffSRError:
                pass

    run(str(original))  # the seed itself: readable, then refused as incomplete

    @FUZZ
    @given(edits=mutations())
    def fuzz(edits):
        path = folder / name
        path.write_bytes(mutate(data, edits))
        run(str(path))

    fuzz()
