"""Broken and wrong weight files, table-driven: each is refused with a ``WeightFileError`` that names the
file and the fix, and no model built on the way is left alive.

The wrong files are made in ``tmp_path`` by mutating the tiny fixtures of tests/data.
"""

import contextlib
import gc
import json
import os
import random
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyui_diffsr.dossr_core.model import load_dossr
from comfyui_diffsr.dossr_core.weights import convert_dossr
from comfyui_diffsr.osediff_core.dape import convert_dape, load_dape_tagger
from comfyui_diffsr.osediff_core.weights import convert_osediff, read_osediff
from comfyui_diffsr.sr_common.errors import WeightFileError
from comfyui_diffsr.sr_common.sd21 import SD21, load_sd21

from conftest import (DAPE, DATA, DOSSR, DOSSR_CONFIG, OSEDIFF, RAM, SINGLE, copy_tiny_sd21, fifo, outcome_within,
                      sd15_layout)

TINY_SD21 = os.path.join(DATA, "osediff", "tiny_sd21")
PNG = os.path.join(DATA, "osediff", "in_13x19.png")
UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny SD 2.1 diffusers folder (with its tokenizer) and the fixtures read once."""
    root = tmp_path_factory.mktemp("env")
    folder = copy_tiny_sd21(root / "tiny_sd21")
    converted_dape = str(root / "dape.safetensors")
    convert_dape(RAM, DAPE, converted_dape)
    converted_dossr = str(root / "dossr.safetensors")
    convert_dossr(DOSSR, converted_dossr, config=DOSSR_CONFIG)
    own = load_dossr(DOSSR, config=DOSSR_CONFIG)  # a base of the DoSSR fixture's size, for its converted file
    return {"folder": folder, "single": load_file(SINGLE), "osediff": torch.load(OSEDIFF, weights_only=True),
            "dossr_base": SD21(own.unet, own.vae, own.text_encoder, own.tokenizer),
            "dossr": torch.load(DOSSR, weights_only=True)["state_dict"], "dape": converted_dape,
            "dossr_converted": converted_dossr}


# ------------------------------------------------------------------------------------------ file makers
def _bytes(data):
    def make(path, env):
        path.write_bytes(data(env) if callable(data) else data)
    return make


def _truncated(src, fraction=0.6):
    return _bytes(lambda env: open(src, "rb").read()[: int(os.path.getsize(src) * fraction)])


def _random_bytes(n=4096):
    data = bytes(random.Random(0).randrange(256) for _ in range(n))
    return _bytes(b"\x01" + data)  # not 0x80 (pickle) nor "PK" (zip)


def _sd(mutate):
    def make(path, env):
        save_file(mutate(dict(env["single"])), str(path))
    return make


def _sdxl(sd):
    return dict(sd, **{"conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": torch.zeros(4)})


def _v_prediction(sd):
    key = UNET + "output_blocks.7.1.transformer_blocks.0.norm1.bias"
    return dict(sd, **{key: torch.randn(sd[key].shape, generator=torch.Generator().manual_seed(0)).half() * 0.5})


def _to_dtype(prefix, dtype):
    def mutate(sd):
        return {k: (v.to(dtype) if k.startswith(prefix) else v) for k, v in sd.items()}
    return mutate


def _quantised(prefix):
    """The tensors under ``prefix`` as an int8 quantisation stores them: integers (a scale of 100)."""
    def mutate(sd):
        return {k: ((v.float() * 100).round().clamp(-127, 127).to(torch.int8) if k.startswith(prefix) else v)
                for k, v in sd.items()}
    return mutate


def _wrong_shape(sd):
    key = UNET + "input_blocks.1.0.in_layers.2.weight"
    return dict(sd, **{key: torch.zeros(sd[key].shape[0], sd[key].shape[1], 1, 1, dtype=sd[key].dtype)})


def _no_text_encoder(sd):
    return {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}


def _unet_input(channels, extra=None):
    """The UNet's first convolution widened to ``channels`` inputs (an inpainting 9, a depth-to-image 5, the x4
    upscaler 7), with the other keys such a file has (``extra``)."""
    def mutate(sd):
        key = UNET + "input_blocks.0.0.weight"
        w = sd[key]
        wide = torch.cat([w, torch.zeros(w.shape[0], channels - w.shape[1], *w.shape[2:], dtype=w.dtype)], 1)
        return dict(sd, **{key: wide}, **(extra or {}))
    return mutate


def _unclip(sd):
    """SD 2.1 unCLIP (sd21-unclip-h.ckpt): the CLIP image embedding as a class embedding (label_emb), the image
    encoder (embedder.*) and its noise augmentor beside the SD 2.1 parts."""
    return dict(sd, **{UNET + "label_emb.0.0.weight": torch.zeros(128, 2048).half(),
                       "embedder.model.visual.conv1.weight": torch.zeros(16, 3, 14, 14).half(),
                       "noise_augmentor.betas": torch.zeros(1000)})


def _folder_unet_input(channels, pipeline):
    """A diffusers folder of another pipeline whose UNet takes ``channels`` inputs: its config and its weights."""
    def mutate(folder):
        _edit_json("model_index.json", _class_name=pipeline)(folder)
        _edit_json("unet/config.json", in_channels=channels)(folder)
        path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
        state = load_file(path)
        w = state["conv_in.weight"]
        state["conv_in.weight"] = torch.cat([w, torch.zeros(w.shape[0], channels - w.shape[1], *w.shape[2:],
                                                            dtype=w.dtype)], 1)
        save_file(state, path)
    return mutate


def _folder_v_weights_without_scheduler(folder):
    """A 768 v-prediction folder copied without its scheduler/ (the one config that says v-prediction): the spread
    of the last up block's first transformer norm bias still tells it, as ComfyUI's rule for single files."""
    shutil.rmtree(os.path.join(folder, "scheduler"))
    path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    key = "up_blocks.3.attentions.1.transformer_blocks.0.norm1.bias"
    state[key] = (torch.randn(state[key].shape, generator=torch.Generator().manual_seed(0)) * 0.5).half()
    save_file(state, path)


def _write(relative, text):
    def mutate(folder):
        with open(os.path.join(folder, relative), "w", encoding="utf-8") as f:
            f.write(text)
    return mutate


def _remove(relative):
    return lambda folder: os.remove(os.path.join(folder, relative))


def _config_folder(make):
    """A config folder for a single file (``--base-config``), made by ``make(path)``."""
    return lambda path, env: make(path)


def _single_with_config(path, env):
    return load_sd21(SINGLE, config_dir=str(path))


def _folder_all(*mutations):
    def mutate(folder):
        for change in mutations:
            change(folder)
    return mutate


def _folder(mutate):
    def make(path, env):
        shutil.copytree(env["folder"], path)
        mutate(str(path))
    return make


def _edit_json(relative, drop=(), **changes):
    def mutate(folder):
        name = os.path.join(folder, relative)
        with open(name, encoding="utf-8") as f:
            config = json.load(f)
        config.update(changes)
        for key in drop:
            config.pop(key, None)
        with open(name, "w", encoding="utf-8") as f:
            json.dump(config, f)
    return mutate


def _truncate_in_folder(relative):
    def mutate(folder):
        name = os.path.join(folder, relative)
        data = open(name, "rb").read()
        open(name, "wb").write(data[: len(data) // 2])
    return mutate


def _osediff(mutate):
    def make(path, env):
        ckpt = {k: (dict(v) if isinstance(v, dict) else v) for k, v in env["osediff"].items()}
        torch.save(mutate(ckpt), path)
    return make


def _other_rank(ckpt):
    return dict(ckpt, rank_unet=8)


def _b_of_other_rank(ckpt):
    key = "conv_in.lora_B.default_encoder.weight"
    b = ckpt["state_dict_unet"][key]
    ckpt["state_dict_unet"][key] = b[:, :3].clone()
    return ckpt


def _missing_b(ckpt):
    del ckpt["state_dict_unet"]["conv_in.lora_B.default_encoder.weight"]
    return ckpt


def _missing_a(ckpt):
    del ckpt["state_dict_vae"]["encoder.conv_in.lora_A.default_encoder.weight"]
    return ckpt


def _ram(drop):
    def make(path, env):
        ram = torch.load(RAM, weights_only=True)
        torch.save({"model": {k: v for k, v in ram["model"].items() if not k.startswith(drop)}}, path)
    return make


def _dape_without(key):
    def make(path, env):
        torch.save({k: v for k, v in torch.load(DAPE, weights_only=True).items() if k != key}, path)
    return make


def _osediff_converted(change_tensors=None, change_meta=None):
    def make(path, env):
        tmp = path.with_name("tmp_" + path.name)
        torch.save(env["osediff"], tmp.with_suffix(".pkl"))
        convert_osediff(tmp.with_suffix(".pkl"), tmp)
        _rewrite(tmp, path, change_tensors, change_meta)
    return make


def _rewrite(src, dst, change_tensors=None, change_meta=None):
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(src))
    tensors = change_tensors(tensors) if change_tensors else tensors
    meta = change_meta(meta) if change_meta else meta
    save_file(tensors, str(dst), metadata=meta)


def _meta(**changes):
    return lambda meta: dict(meta, **changes)


def _first(prefix, dtype=None, shape=None):
    """Change the first tensor whose key starts with ``prefix`` (after sorting) to ``dtype`` or ``shape``."""
    def change(tensors):
        key = sorted(k for k in tensors if k.startswith(prefix))[0]
        value = tensors[key]
        tensors[key] = value.to(dtype) if dtype is not None else torch.zeros(shape, dtype=value.dtype)
        return tensors
    return change


def _converted_copy(which, change_tensors=None, change_meta=None):
    def make(path, env):
        _rewrite(env[which], path, change_tensors, change_meta)
    return make


def _copy(src):
    def make(path, env):
        shutil.copy(src, path)
    return make


def _dossr(mutate):
    def make(path, env):
        torch.save({"state_dict": mutate(dict(env["dossr"]))}, path)
    return make


def _drop(prefix):
    return lambda sd: {k: v for k, v in sd.items() if not k.startswith(prefix)}


def _dossr_wrong_shape(sd):
    key = "control_model.input_blocks.1.0.in_layers.2.weight"
    return dict(sd, **{key: torch.zeros(sd[key].shape[0], sd[key].shape[1], 1, 1)})


# ------------------------------------------------------------------------------------------ loaders
def sd21(path, env):
    return load_sd21(path, config_dir=env["folder"])


def osediff(path, env):
    return read_osediff(path)


def ram(path, env):
    return load_dape_tagger(path, DAPE)


def dape(path, env):
    return load_dape_tagger(RAM, path)


def dape_converted(path, env):
    return load_dape_tagger(converted_path=path)


def dossr(path, env):
    return load_dossr(path, config=DOSSR_CONFIG)


def dossr_converted(path, env):
    return load_dossr(path, base=env["dossr_base"])


DOWNLOAD = "[Dd]ownload .*again"
NOT_FLOAT = "floating-point.*(download|convert)"
# id: (file name, how it is made, loader, what the message must say: the cause and the fix)
CASES = {
    "sd-truncated": ("v2-1_512.safetensors", _truncated(SINGLE), sd21, "truncated.*" + DOWNLOAD),
    "sd-zero-bytes": ("v2-1_512.ckpt", _bytes(b""), sd21, r"empty \(0 bytes\).*" + DOWNLOAD),
    "sd-random-bytes": ("v2-1_512.ckpt", _random_bytes(), sd21, "not a weight file.*" + DOWNLOAD),
    "sd-text-file": ("v2-1_512.safetensors", _bytes(b"404: Not Found\n"), sd21, "text file.*" + DOWNLOAD),
    "sd-html-page": ("v2-1_512.ckpt", _bytes(b"<!DOCTYPE html><html><body>Sign in</body></html>"), sd21,
                     "HTML page.*" + DOWNLOAD),
    "sd-git-lfs-pointer": ("v2-1_512.safetensors", _bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:"
                                                          b"0123\nsize 5214865159\n"), sd21, "Git LFS pointer.*lfs pull"),
    "sd-png": ("v2-1_512.ckpt", _copy(PNG), sd21, "an image.*" + DOWNLOAD),
    # an image given by its own name where the weights go (a slip on the command line): no download would help
    "sd-photo-given": ("photo.png", _copy(PNG), sd21, r"is an image, not a weight file\. Give the weight file there "
                       r"\(the images to upscale are the command's inputs\)\.$"),
    "sd-missing": ("v2-1_512.safetensors", lambda path, env: None, sd21, "not found.*v2-1_512-ema-pruned"),
    # a pickle of something other than a dict (ComfyUI's load_torch_file fails on it with an AttributeError)
    "sd-a-list": ("v2-1_512.ckpt", lambda path, env: torch.save([torch.zeros(1)], path), sd21,
                  "it is a list, not a dict of tensors.*Use the whole SD 2.1-base"),
    "sd-safetensors-named-ckpt": ("v2-1_512.ckpt", _copy(SINGLE), sd21,
                                  "safetensors file with a '.ckpt' name.*rename it to .safetensors"),
    "sd-1.5": ("sd15.safetensors", _sd(sd15_layout), sd21, r"Stable Diffusion 1\.x.*stable-diffusion-2-1-base"),
    "sdxl": ("sdxl.safetensors", _sd(_sdxl), sd21, "SDXL.*stable-diffusion-2-1-base"),
    "sd2-768-v": ("v2-1_768.safetensors", _sd(_v_prediction), sd21, "768 v-prediction.*v2-1_512-ema-pruned"),
    "sd-no-text-encoder": ("unet_vae.safetensors", _sd(_no_text_encoder), sd21, "OpenCLIP text encoder.*Use the whole SD 2.1-base"),
    "sd-no-vae": ("unet_text.safetensors", _sd(_drop("first_stage_model.")), sd21,
                  r"without the VAE \('first_stage_model\.\*'\).*Use the whole SD 2.1-base"),
    # models on SD 2 with another UNet input or a class embedding, each named (not "pass a matching config folder")
    "sd2-inpainting": ("512-inpainting-ema.safetensors", _sd(_unet_input(9)), sd21,
                       "it is an inpainting model.*9 input channels.*Use the whole SD 2.1-base: v2-1_512-ema-pruned"),
    "sd2-depth": ("512-depth-ema.safetensors", _sd(_unet_input(5, {
        "depth_model.model.pretrained.act_postprocess1.0.project.0.weight": torch.zeros(8, 16)})), sd21,
                  "it is a depth-to-image model.*5 input channels.*Use the whole SD 2.1-base: v2-1_512-ema-pruned"),
    "sd-x4-upscaler": ("x4-upscaler-ema.safetensors", _sd(_unet_input(7, {UNET + "label_emb.weight": torch.zeros(
        1000, 128), "low_scale_model.betas": torch.zeros(350)})), sd21,
                       "it is the Stable Diffusion x4 upscaler.*Use the whole SD 2.1-base: v2-1_512-ema-pruned"),
    "sd21-unclip": ("sd21-unclip-h.safetensors", _sd(_unclip), sd21,
                    "it is a Stable Diffusion 2.1 unCLIP model.*Use the whole SD 2.1-base: v2-1_512-ema-pruned"),
    "sd-int64-unet": ("int.safetensors", _sd(_to_dtype(UNET, torch.int64)), sd21, "int64.*" + NOT_FLOAT),
    # int8-quantised: its norm biases' spread (integers) was read as a 768 v-prediction model's
    "sd-int8-unet": ("int8.safetensors", _sd(_quantised(UNET)), sd21, "UNet tensor.*int8.*" + NOT_FLOAT),
    "sd-bool-vae": ("bool.safetensors", _sd(_to_dtype("first_stage_model.", torch.bool)), sd21, "bool.*" + NOT_FLOAT),
    # one tensor far from the first (the UNet's last convolution's bias): every tensor is checked
    "sd-one-int64-tensor": ("int_out.safetensors", _sd(_to_dtype(UNET + "out.2.bias", torch.int64)), sd21,
                            "conv_out.bias.*int64.*" + NOT_FLOAT),
    "sd-wrong-shape": ("other_size.safetensors", _sd(_wrong_shape), sd21, r"shape\(s\) differ.*config folder"),
    # a text encoder missing a block SD 2.1-base's encoder uses (it keeps all but the last of the file's blocks)
    "sd-text-encoder-short": ("short_clip.safetensors", _sd(_drop("cond_stage_model.model.transformer.resblocks.1.")),
                              sd21, "fewer than 3 blocks.*not an SD 2.1 OpenCLIP-H.*damaged or not SD 2.1-base"),
    "osediff-as-base": ("osediff.pkl", _copy(OSEDIFF), sd21, "not Stable Diffusion 2.1-base: it is an OSEDiff weight file.*as the OSEDiff weights"),
    "diffusers-missing-vae": ("sd21_folder", _folder(lambda f: shutil.rmtree(os.path.join(f, "vae"))),
                              lambda p, e: load_sd21(p), r"missing \['vae'\].*stable-diffusion-2-1-base"),
    "diffusers-sd-1.5": ("sd15_folder", _folder(_edit_json("unet/config.json", cross_attention_dim=768,
                                                           use_linear_projection=False)),
                         lambda p, e: load_sd21(p), r"Stable Diffusion 1\.x.*stable-diffusion-2-1-base"),
    # told from SD 2.x as a single file's UNet is (``known_files._unet_is_sd1``): by its 768 wide context alone
    "diffusers-sd1-linear": ("sd1_linear_folder", _folder(_edit_json("unet/config.json", cross_attention_dim=768,
                                                                     use_linear_projection=True)),
                             lambda p, e: load_sd21(p), r"Stable Diffusion 1\.x.*stable-diffusion-2-1-base"),
    "diffusers-sdxl": ("sdxl_folder", _folder(lambda f: os.mkdir(os.path.join(f, "text_encoder_2"))),
                       lambda p, e: load_sd21(p), "SDXL.*stable-diffusion-2-1-base"),
    # SD 1.5's unet/config.json (written by diffusers 0.6) has no use_linear_projection: diffusers' default, False
    "diffusers-sd-1.5-old-config": ("sd15_folder", _folder(_edit_json("unet/config.json", cross_attention_dim=768,
                                                                      drop=("use_linear_projection",))),
                                    lambda p, e: load_sd21(p), r"Stable Diffusion 1\.x.*stable-diffusion-2-1-base"),
    # an SDXL UNet (its text_time embedding) in a folder without text_encoder_2
    "diffusers-sdxl-unet": ("sdxl_folder", _folder(_edit_json("unet/config.json", addition_embed_type="text_time")),
                            lambda p, e: load_sd21(p), "SDXL.*stable-diffusion-2-1-base"),
    "diffusers-768-v": ("sd21_768_folder", _folder(_edit_json("scheduler/scheduler_config.json",
                                                              prediction_type="v_prediction")),
                        lambda p, e: load_sd21(p), "768 v-prediction.*v2-1_512-ema-pruned"),
    # other SD 2 pipelines: named by their UNet (before, the depth and inpainting folders loaded as SD 2.1-base and
    # the x4 upscaler and unCLIP were called 768 v-prediction models)
    "diffusers-sd2-depth": ("sd2_depth_folder", _folder(_folder_unet_input(5, "StableDiffusionDepth2ImgPipeline")),
                            lambda p, e: load_sd21(p), "it is a depth-to-image model.*stable-diffusion-2-1-base"),
    "diffusers-sd2-inpainting": ("sd2_inpainting_folder", _folder(_folder_unet_input(
        9, "StableDiffusionInpaintPipeline")), lambda p, e: load_sd21(p),
                                 "it is an inpainting model.*stable-diffusion-2-1-base"),
    "diffusers-x4-upscaler": ("x4_upscaler_folder", _folder(_folder_all(
        _edit_json("model_index.json", _class_name="StableDiffusionUpscalePipeline"),
        _edit_json("unet/config.json", in_channels=7, num_class_embeds=1000),
        _edit_json("scheduler/scheduler_config.json", prediction_type="v_prediction"))),
                              lambda p, e: load_sd21(p),
                              "it is the Stable Diffusion x4 upscaler.*stable-diffusion-2-1-base"),
    "diffusers-sd21-unclip": ("sd21_unclip_folder", _folder(_folder_all(
        _edit_json("model_index.json", _class_name="StableUnCLIPImg2ImgPipeline"),
        _edit_json("unet/config.json", class_embed_type="projection", projection_class_embeddings_input_dim=2048),
        _edit_json("scheduler/scheduler_config.json", prediction_type="v_prediction"))),
                              lambda p, e: load_sd21(p),
                              "it is a Stable Diffusion 2.1 unCLIP model.*stable-diffusion-2-1-base"),
    # a UNet of any other input width (here 8: the latent and 4 more channels), its weights matching its config
    "diffusers-other-unet-input": ("sd_8_channel_folder", _folder(_folder_unet_input(8, "StableDiffusionPipeline")),
                                   lambda p, e: load_sd21(p), "whose UNet takes 8 input channels, not the 4 latent "
                                   "channels.*stable-diffusion-2-1-base"),
    "diffusers-768-v-without-scheduler": ("sd21_768_folder", _folder(_folder_v_weights_without_scheduler),
                                          lambda p, e: load_sd21(p), "768 v-prediction.*v2-1_512-ema-pruned"),
    # a config that is missing or not JSON: named, never a FileNotFoundError or JSONDecodeError traceback
    "diffusers-no-unet-config": ("sd21_folder", _folder(_remove("unet/config.json")), lambda p, e: load_sd21(p),
                                 "has no readable unet/config.json.*" + DOWNLOAD),
    "diffusers-no-text-encoder-config": ("sd21_folder", _folder(_remove("text_encoder/config.json")),
                                         lambda p, e: load_sd21(p),
                                         "has no readable text_encoder/config.json.*" + DOWNLOAD),
    "diffusers-unet-config-not-json": ("sd21_folder", _folder(_write("unet/config.json", "{oops")),
                                       lambda p, e: load_sd21(p),
                                       "unet/config.json in .* is not JSON.*" + DOWNLOAD),
    "diffusers-scheduler-config-a-page": ("sd21_folder", _folder(_write("scheduler/scheduler_config.json", "<html>")),
                                          lambda p, e: load_sd21(p), "scheduler/scheduler_config.json in .* is not "
                                          "JSON.*" + DOWNLOAD),
    "diffusers-unet-config-a-list": ("sd21_folder", _folder(_write("unet/config.json", "[1, 2]")),
                                     lambda p, e: load_sd21(p), "unet/config.json in .* is not a JSON object"),
    "base-config-empty-folder": ("configs", _config_folder(lambda path: path.mkdir()), _single_with_config,
                                 "has no readable .*config.json.*--base-config.*leave it out for SD 2.1-base itself"),
    "base-config-missing": ("configs", _config_folder(lambda path: None), _single_with_config,
                            "has no readable .*config.json.*--base-config"),
    "base-config-a-file": ("config.json", _config_folder(lambda path: shutil.copy(
        os.path.join(TINY_SD21, "unet", "config.json"), path)), _single_with_config,
                           "has no readable .*config.json.*--base-config"),
    "diffusers-truncated-unet": ("sd21_folder", _folder(_truncate_in_folder(
        "unet/diffusion_pytorch_model.safetensors")), lambda p, e: load_sd21(p), "truncated.*" + DOWNLOAD),
    "osediff-missing": ("osediff.pkl", lambda path, env: None, osediff, "not found.*Check the path"),
    "osediff-a-folder": ("osediff", lambda path, env: path.mkdir(), osediff, "is a folder; give the file itself"),
    "osediff-truncated": ("osediff.pkl", _truncated(OSEDIFF), osediff, "truncated.*" + DOWNLOAD),
    "osediff-other-rank": ("osediff.pkl", _osediff(_other_rank), osediff, "rank_unet = 8.*download osediff.pkl again"),
    "osediff-converted-other-rank": ("osediff.safetensors", _osediff_converted(change_meta=_meta(rank_unet="2")),
                                     osediff, "rank_unet = 2.*download osediff.pkl again"),
    "osediff-lora-b-other-rank": ("osediff.pkl", _osediff(_b_of_other_rank), osediff,
                                  "conv_in.lora_B.*rank 3.*download osediff.pkl again"),
    "osediff-missing-lora-b": ("osediff.pkl", _osediff(_missing_b), osediff,
                               "conv_in.lora_B.default_encoder.weight.*missing.*download osediff.pkl again"),
    "osediff-missing-lora-a": ("osediff.pkl", _osediff(_missing_a), osediff,
                               "incomplete: encoder.conv_in.lora_A.default_encoder.weight is missing.*download osediff"),
    "osediff-converted-int64": ("osediff.safetensors", _osediff_converted(_first("unet.", torch.int64)), osediff,
                                "int64.*" + NOT_FLOAT),
    "osediff-converted-bool": ("osediff.safetensors", _osediff_converted(_first("vae.", torch.bool)), osediff,
                               "bool.*" + NOT_FLOAT),
    "osediff-converted-bad-metadata": ("osediff.safetensors", _osediff_converted(change_meta=_meta(rank_unet="four")),
                                       osediff, "metadata.*convert.*again"),
    "osediff-plain-safetensors": ("osediff.safetensors", _sd(_no_text_encoder), osediff,
                                  "not an OSEDiff checkpoint.*Stable Diffusion.*Expected osediff.pkl"),
    "dossr-as-osediff": ("dossr.ckpt", _copy(DOSSR), osediff, "not an OSEDiff checkpoint.*DoSSR"),
    "ram-as-dape": ("ram_copy.pth", _copy(RAM), dape, "given as the DAPE weights but it is the RAM.*Expected DAPE.pth"),
    "dape-as-ram": ("dape_copy.pth", _copy(DAPE), ram,
                    "given as the RAM weights but it is a DAPE LoRA.*Expected ram_swin_large_14m.pth"),
    "ram-no-head-intermediate": ("ram.pth", _ram("tagging_head.encoder.layer.0.intermediate."), ram,
                                 "RAM checkpoint 'ram.pth' lacks 'tagging_head.encoder.layer.0.intermediate.dense.weight'"
                                 "; the file is incomplete"),
    "ram-no-swin-mlp": ("ram.pth", _ram("visual_encoder.layers.0.blocks.0.mlp.fc1."), ram,
                        "RAM checkpoint 'ram.pth' lacks 'visual_encoder.layers.0.blocks.0.mlp.fc1.weight'; the file is"),
    "ram-no-patch-norm": ("ram.pth", _ram("visual_encoder.patch_embed.norm."), ram,
                          r"RAM checkpoint 'ram.pth' lacks 2 tagging tensors \(e.g. \['visual_encoder.patch_embed.norm"),
    "dape-missing-lora-a": ("dape.pth", _dape_without("visual_encoder.layers.1.blocks.0.attn.qkv.lora_A"), dape,
                            "'dape.pth': DAPE file has visual_encoder.layers.1.blocks.0.attn.qkv.lora_B but no "
                            "visual_encoder.layers.1.blocks.0.attn.qkv.lora_A; the file is damaged"),
    "dape-missing-lora-b": ("dape.pth", _dape_without("visual_encoder.layers.1.blocks.0.attn.qkv.lora_B"), dape,
                            "DAPE file has visual_encoder.layers.1.blocks.0.attn.qkv.lora_A but no .*lora_B; the file"),
    "ram-truncated": ("ram.pth", _truncated(RAM), ram, "truncated.*" + DOWNLOAD),
    "dape-converted-bool": ("dape.safetensors", _converted_copy("dape", _first("fc.", torch.bool)), dape_converted,
                            "bool.*" + NOT_FLOAT),
    "dape-converted-wrong-shape": ("dape.safetensors", _converted_copy("dape", _first("fc.weight", shape=(1, 3))),
                                   dape_converted, r"fc.weight.*\(1, 3\).*convert.*again"),
    "dape-converted-bad-config": ("dape.safetensors", _converted_copy("dape", change_meta=_meta(config="{oops")),
                                  dape_converted, "metadata.*convert.*again"),
    "dossr-no-controlnet": ("dossr.ckpt", _dossr(_drop("control_model.")), dossr,
                            "without the ControlNet.*dossr_default.ckpt"),
    "dossr-text-encoder-short": ("dossr.ckpt", _dossr(_drop("cond_stage_model.model.transformer.resblocks.1.")), dossr,
                                 "'dossr.ckpt': The text encoder has fewer than 3 blocks.*damaged or not SD 2.1-base"),
    "dossr-text-encoder-no-first-block": ("dossr.ckpt", _dossr(_drop("cond_stage_model.model.transformer.resblocks.0.")),
                                          dossr, "'dossr.ckpt': The text encoder lacks 'cond_stage_model.model."
                                          "transformer.resblocks.0.mlp.c_fc.weight'.*damaged or not SD 2.1-base"),
    "dossr-text-encoder-no-ln-final": ("dossr.ckpt", _dossr(_drop("cond_stage_model.model.ln_final.")), dossr,
                                       "'dossr.ckpt': The text encoder lacks 'cond_stage_model.model.ln_final.weight'"),
    "sd-text-encoder-no-out-proj": ("no_out_proj.safetensors",
                                    _sd(_drop("cond_stage_model.model.transformer.resblocks.0.attn.out_proj.")), sd21,
                                    "'no_out_proj.safetensors': the text encoder lacks 'cond_stage_model.model.transformer"
                                    r".resblocks.0.attn.out_proj.weight'; it is not an SD 2.1 OpenCLIP-H"),
    "dossr-text-encoder-no-embedding": ("dossr.ckpt", _dossr(_drop("cond_stage_model.model.token_embedding.")), dossr,
                                        "'dossr.ckpt': The text encoder lacks.*token_embedding.weight.*damaged or not"),
    "dossr-no-rrdb": ("dossr.ckpt", _dossr(_drop("preprocess_model.")), dossr, "RRDB.*dossr_default.ckpt"),
    "dossr-truncated": ("dossr.ckpt", _truncated(DOSSR), dossr, "truncated.*" + DOWNLOAD),
    "dossr-wrong-shape": ("dossr.ckpt", _dossr(_dossr_wrong_shape), dossr, r"ControlNet.*shape\(s\) differ.*--config"),
    "osediff-as-dossr": ("osediff.pkl", _copy(OSEDIFF), dossr, "not a DoSSR weight file: it is an OSEDiff weight file.*diffsr osediff --weights"),
    "dossr-converted-no-metadata": ("dossr.safetensors", _converted_copy("dossr_converted", change_meta=lambda m: {}),
                                    dossr_converted, "metadata.*diffsr convert dossr"),
    "dossr-converted-int64": ("dossr.safetensors", _converted_copy("dossr_converted", _first("controlnet.", torch.int64)),
                              dossr_converted, "int64.*" + NOT_FLOAT),
}


def _live_modules():
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.nn.Module))


@pytest.mark.parametrize("case", CASES)
def test_broken_file_is_refused_clearly(tmp_path, env, case):
    filename, make, load, expected = CASES[case]
    path = tmp_path / filename
    make(path, env)
    before = _live_modules()
    with pytest.raises(WeightFileError) as info:
        load(str(path), env)
    message = str(info.value)
    del info
    assert filename in message, message
    assert re.search(expected, message, re.S), message
    assert _live_modules() == before, "a partly built model was left alive"


# ------------------------------------------------------------------------------------------ one module missing
def _without_module(state, module):
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[0] != module}


def _save_official(kind, env, path, module):
    """The tiny official file of ``kind`` without the tensors of ``module`` (a key's prefix before its last dot)."""
    if kind == "sd21":
        save_file(_without_module(env["single"], module), str(path))
    elif kind == "osediff":
        part, module = module.split(":")
        torch.save(dict(env["osediff"], **{part: _without_module(env["osediff"][part], module)}), path)
    elif kind == "dossr":
        torch.save({"state_dict": _without_module(env["dossr"], module)}, path)
    elif kind == "ram":
        torch.save({"model": _without_module(torch.load(RAM, weights_only=True)["model"], module)}, path)
    else:  # DAPE: one tensor, half a LoRA pair
        torch.save({k: v for k, v in torch.load(DAPE, weights_only=True).items() if k != module}, path)


def _modules_of(kind, env):
    if kind == "osediff":
        return [f"{part}:{m}" for part in ("state_dict_unet", "state_dict_vae")
                for m in sorted({k.rsplit(".", 1)[0] for k in env["osediff"][part]})]
    if kind == "dape":  # one tensor each, half of a LoRA pair
        return sorted(torch.load(DAPE, weights_only=True))
    state = {"sd21": env["single"], "dossr": env["dossr"]}.get(kind) or torch.load(RAM, weights_only=True)["model"]
    return sorted({k.rsplit(".", 1)[0] for k in state})


# What the loaders do not read, so that a file without it loads: SD 2.1's last text block (the penultimate layer's
# output is used), DoSSR's DDPM buffers, RAM's captioning networks and its Swin attention masks (made, not read).
TEXT_LAST_BLOCK = r"cond_stage_model\.model\.transformer\.resblocks\.2\."
NOT_READ = {"sd21": TEXT_LAST_BLOCK, "dossr": r"[a-z_0-9]+$|" + TEXT_LAST_BLOCK,
            "ram": r"(tag_encoder|text_decoder)\.|visual_encoder\.layers\.\d+\.blocks\.\d+$", "osediff": "$^",
            "dape": "$^"}
LOADERS = {"sd21": lambda p: load_sd21(p, config_dir=TINY_SD21), "osediff": None,
           "dossr": lambda p: load_dossr(p, config=DOSSR_CONFIG), "ram": lambda p: load_dape_tagger(p, DAPE),
           "dape": lambda p: load_dape_tagger(RAM, p)}
STRIDE = {"sd21": 10, "osediff": 7, "dossr": 19, "ram": 6, "dape": 2}  # a fixed sample, every kind of module in it


@pytest.mark.filterwarnings("ignore:.*has no CLIP vocabulary")
@pytest.mark.parametrize("kind", list(LOADERS))
def test_a_file_missing_any_one_module_is_refused_or_it_was_not_read(tmp_path, env, kind):
    """Each tiny official file without one module's tensors (a fixed sample of them: every few modules in key order;
    DAPE: without one tensor, half of a LoRA pair)
    is refused with a WeightFileError naming the file, never a bare KeyError, or loads only where the loader does not
    read that module (``NOT_READ``). This found a lora_B without its lora_A loading with that LoRA left out, and bare
    KeyErrors for a text encoder or RAM tensor missing."""
    if kind == "osediff":
        base = load_sd21(SINGLE, config_dir=TINY_SD21)
        from comfyui_diffsr.osediff_core.pipeline import build_osediff
        load = lambda p: build_osediff(base, read_osediff(p))  # noqa: E731
    else:
        load = LOADERS[kind]
    modules = _modules_of(kind, env)
    sample = modules[::STRIDE[kind]]
    suffix = {"sd21": ".safetensors", "osediff": ".pkl", "dossr": ".ckpt"}.get(kind, ".pth")
    loaded = []
    for module in sample:
        path = tmp_path / f"{kind}_damaged{suffix}"
        _save_official(kind, env, path, module)
        try:
            load(str(path))
        except WeightFileError as e:
            assert path.name in str(e), str(e)
            continue
        loaded.append(module)
    assert [m for m in loaded if not re.match(NOT_READ[kind], m)] == []
    assert len(sample) >= 25, len(sample)


# ------------------------------------------------------------------------------------------ no file at all
def _in_folder(env, tmp_path, relative):
    folder = copy_tiny_sd21(tmp_path / "sd21")
    os.remove(os.path.join(folder, relative))
    return folder, os.path.join(folder, relative)


# id: (the name of the special file, the loader given the folder it is in, or the file: (path, env, tmp_path))
SPECIAL_FILE_LOADERS = {
    "sd21-safetensors": ("v2-1_512.safetensors", sd21), "sd21-ckpt": ("v2-1_512.ckpt", sd21),
    "sd21-folder-part": ("unet/diffusion_pytorch_model.safetensors", None),
    "osediff": ("osediff.pkl", osediff), "osediff-converted": ("osediff.safetensors", osediff),
    "convert-osediff": ("osediff.safetensors", lambda path, env: convert_osediff(path, path + ".out.safetensors")),
    "ram": ("ram_swin_large_14m.pth", ram), "dape": ("DAPE.pth", dape),
    "dape-converted": ("dape.safetensors", dape_converted), "dossr": ("dossr_default.ckpt", dossr),
    "dossr-converted": ("dossr.safetensors", dossr_converted),
    "convert-dossr": ("dossr_default.ckpt", lambda path, env: convert_dossr(path, path + ".out.safetensors")),
}


@pytest.mark.parametrize("special", ["fifo", "device"])
@pytest.mark.parametrize("case", SPECIAL_FILE_LOADERS)
def test_a_fifo_or_a_device_given_as_a_weight_file_is_refused_by_its_type(tmp_path, env, case, special):
    """A FIFO (named pipe) given as a weight file was opened before its type was looked at: loading an SD 2.1 single
    file waited for a writer for ever (its dtype was read first), and converting an OSEDiff file froze the whole
    process (safetensors waits in ``safe_open`` holding the interpreter lock: ComfyUI's server stopped answering);
    the other loaders, and every loader given a device (a link to /dev/zero), called it an unfinished download
    ("empty (0 bytes)"). Each is refused at once by what it is, before it is opened."""
    import time

    relative, load = SPECIAL_FILE_LOADERS[case]
    if load is None:  # a part of a diffusers folder
        chosen, path = _in_folder(env, tmp_path, relative)
        load = sd21
    else:
        chosen = path = str(tmp_path / relative)
    what = "a FIFO \\(a named pipe\\)" if special == "fifo" else "a device"
    with contextlib.ExitStack() as stack:
        if special == "fifo":
            stack.enter_context(fifo(path, let_go_after=20))
        else:
            os.symlink("/dev/zero", path)
        start = time.monotonic()
        how, error = outcome_within(lambda: load(chosen, env), seconds=30)
        took = time.monotonic() - start
    assert took < 10, f"{took:.1f} s: the file was opened and read waiting for a writer"
    assert how == "raised" and isinstance(error, WeightFileError), error
    assert re.search(rf"'.*{re.escape(os.path.basename(path))}' is not a weight file: it is {what}\. Give the weight "
                     "file itself", str(error)), error


def test_a_special_file_is_named_by_its_type():
    """The refusals name a file by its type: a block device (a disk, /dev/sda) is "a device" as a character device
    (/dev/zero) is; a socket, neither a FIFO nor a device, is "not a regular file"."""
    import stat

    from comfyui_diffsr.sr_common.weights import special_file

    assert special_file(stat.S_IFIFO | 0o644) == "a FIFO (a named pipe)"
    assert [special_file(kind | 0o660) for kind in (stat.S_IFCHR, stat.S_IFBLK)] == ["a device", "a device"]
    assert special_file(stat.S_IFSOCK | 0o755) == "not a regular file"


# id: (the module whose read_state_dict reads the file, the file, the loader given it, what the refusal says)
WRONG_FILE_LOADERS = {
    "dossr-given-sd": ("dossr_core.weights", SINGLE, lambda p: load_dossr(p, config=DOSSR_CONFIG),
                       "is not a DoSSR weight file"),
    "dossr-given-osediff": ("dossr_core.weights", OSEDIFF, lambda p: load_dossr(p, config=DOSSR_CONFIG),
                            "is not a DoSSR weight file"),
    "osediff-given-sd": ("osediff_core.weights", SINGLE, read_osediff, "is not an OSEDiff checkpoint"),
    "convert-osediff-given-sd": ("osediff_core.weights", SINGLE, lambda p: convert_osediff(p, p + ".safetensors"),
                                 "is not an OSEDiff checkpoint"),
    "ram-given-sd": ("osediff_core.dape", SINGLE, lambda p: load_dape_tagger(p, DAPE), "was given as the RAM weights"),
    "convert-ram-given-sd": ("osediff_core.dape", SINGLE, lambda p: convert_dape(p, DAPE, p + ".safetensors"),
                             "was given as the RAM weights"),
    "dossr-wrong-shape": ("dossr_core.weights", "wrong-shape", lambda p: load_dossr(p, config=DOSSR_CONFIG),
                          r"ControlNet.*shape\(s\) differ"),
    "convert-dossr-wrong-shape": ("dossr_core.weights", "wrong-shape",
                                  lambda p: convert_dossr(p, p + ".safetensors", config=DOSSR_CONFIG),
                                  r"ControlNet.*shape\(s\) differ"),
}


@pytest.mark.parametrize("case", WRONG_FILE_LOADERS)
def test_a_refused_file_holds_none_of_its_tensors(tmp_path, env, monkeypatch, case):
    """A file refused by the DoSSR, OSEDiff or RAM loader or converter (another model's file, a tensor of another
    shape) was held, every tensor of it (the official DoSSR .ckpt: 5 GB mapped), by the error's traceback for as long
    as the error was kept: ComfyUI keeps it to report it, in a cycle of frames that only the garbage collector frees.
    None of its tensors outlives the refusal."""
    import importlib
    import weakref

    module, path, load, refusal = WRONG_FILE_LOADERS[case]
    if path == "wrong-shape":
        path = str(tmp_path / "dossr.ckpt")
        torch.save({"state_dict": _dossr_wrong_shape(env["dossr"])}, path)
    module = importlib.import_module(f"comfyui_diffsr.{module}")
    tensors, real_read = [], module.read_state_dict

    def read(*args, **kwargs):
        state = real_read(*args, **kwargs)
        for value in state.values():
            tensors.extend(weakref.ref(t) for t in (value.values() if isinstance(value, dict) else [value])
                           if torch.is_tensor(t))
        return state

    monkeypatch.setattr(module, "read_state_dict", read)
    with pytest.raises(WeightFileError, match=refusal) as error:
        load(path)
    assert tensors
    assert all(tensor() is None for tensor in tensors), error  # the error kept, as ComfyUI keeps it


def test_a_refusal_raised_from_an_error_kept_holds_none_of_its_tensors():
    """A loader's refusal raised from an error kept from an earlier ``except`` (its cause, with no context then) holds
    none of what that error's frames had read: the cause is cleared as the context is."""
    import weakref

    from comfyui_diffsr.sr_common.errors import releasing_tensors

    tensors = []

    def read():
        tensor = torch.zeros(4)
        tensors.append(weakref.ref(tensor))
        raise ValueError("damaged")

    @releasing_tensors
    def load():
        try:
            read()
        except ValueError as e:
            damaged = e
        raise WeightFileError("refused") from damaged

    with pytest.raises(WeightFileError) as error:
        load()
    assert error.value.__context__ is None and tensors
    assert tensors[0]() is None, error  # the error kept
