"""Every weight file a user may have, given to every loader that does not take it: the loader names the file it got
(``known_files``) and refuses it. The pack's own files are the tiny fixtures of tests/data and their conversions;
the neighbours (other SD models, LoRAs, ControlNets, upscale models) are small dicts in their real key layouts."""

import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyui_diffsr.dossr_core.weights import convert_dossr, read_weights
from comfyui_diffsr.osediff_core import dape
from comfyui_diffsr.osediff_core.weights import convert_osediff, read_osediff
from comfyui_diffsr.sr_common.errors import WeightFileError
from comfyui_diffsr.sr_common.known_files import (CONVERTED, KNOWN, KNOWN_FILES, OPEN_CLIP_PREFIX, UNET_PREFIX,
                                                  canonical, identify, sd_family)
from comfyui_diffsr.sr_common.sd21 import load_sd21

from conftest import DAPE, DOSSR, DOSSR_CONFIG, OSEDIFF, RAM, SINGLE, sd15_layout



def t():
    return torch.zeros(2, 2)  # a fresh tensor per key: safetensors refuses shared ones


def _sd(change):
    def make(path):
        save_file(change(load_file(SINGLE)), path)
    return make


def _save(obj, suffix):
    def make(path):
        (save_file if suffix == ".safetensors" else torch.save)(obj, path)
    return make


def _copy(src):
    def make(path):
        with open(src, "rb") as f, open(path, "wb") as out:
            out.write(f.read())
    return make


# kind: (file name, how it is made)
FILES = {
    "sd2": ("v2-1_512-ema-pruned.safetensors", _copy(SINGLE)),
    "sd1": ("v1-5-pruned-emaonly.safetensors", _sd(sd15_layout)),
    # SDXL base: CLIP-L as sgm's embedder 0, OpenCLIP-bigG as its embedder 1
    "sdxl": ("sd_xl_base_1.0.safetensors", _sd(lambda sd: dict(sd, **{"conditioner.embedders.1.model.ln_final.bias":
                                                                          t()}))),
    "sd2-v": ("v2-1_768-ema-pruned.safetensors", _sd(lambda sd: dict(sd, **{
        key: torch.linspace(-1, 1, sd[key].numel()).reshape(sd[key].shape).to(sd[key].dtype)
        for key in sd if key.endswith(".1.transformer_blocks.0.norm1.bias") and "output_blocks" in key}))),
    "no-text-encoder": ("unet_vae.safetensors", _sd(lambda sd: {
        k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")})),
    "no-vae": ("unet_text.safetensors", _sd(lambda sd: {
        k: v for k, v in sd.items() if not k.startswith("first_stage_model.")})),
    # SD 2 models whose UNet takes more than the latent, and SD 2.1 unCLIP (its image embedding a class embedding)
    "inpainting": ("512-inpainting-ema.safetensors", _sd(lambda sd: dict(sd, **{
        f"{UNET_PREFIX}input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}))),
    "depth": ("512-depth-ema.safetensors", _sd(lambda sd: dict(sd, **{
        f"{UNET_PREFIX}input_blocks.0.0.weight": torch.zeros(32, 5, 3, 3),
        "depth_model.model.pretrained.act_postprocess1.0.project.0.weight": t()}))),
    "x4-upscaler": ("x4-upscaler-ema.safetensors", _sd(lambda sd: dict(sd, **{
        f"{UNET_PREFIX}input_blocks.0.0.weight": torch.zeros(32, 7, 3, 3), f"{UNET_PREFIX}label_emb.weight": t(),
        "low_scale_model.betas": torch.zeros(350)}))),
    "other-input": ("6-channel.safetensors", _sd(lambda sd: dict(sd, **{
        f"{UNET_PREFIX}input_blocks.0.0.weight": torch.zeros(32, 6, 3, 3)}))),
    "sd2-unclip": ("sd21-unclip-h.safetensors", _sd(lambda sd: dict(sd, **{
        f"{UNET_PREFIX}label_emb.0.0.weight": t(), "embedder.model.visual.conv1.weight": t()}))),
    "no-unet": ("v2-1_vae_text.safetensors", _sd(lambda sd: {
        k: v for k, v in sd.items() if not k.startswith("model.diffusion_model.")})),
    "text-encoder-alone": ("v2-1_open_clip.safetensors", _sd(lambda sd: {
        k: v for k, v in sd.items() if k.startswith("cond_stage_model.")})),
    # an SDXL UNet in the LDM layout without its text encoders: told by its class embedding (label_emb)
    "sdxl-unet": ("sd_xl_base_1.0_unet.safetensors", _save({"model.diffusion_model.label_emb.0.0.weight": t(),
                                                             "model.diffusion_model.input_blocks.0.0.weight": t()},
                                                            ".safetensors")),
    "sd-vae": ("vae-ft-mse-840000-ema-pruned.safetensors", _save({f"{part}.weight": t() for part in (
        "encoder.conv_in", "decoder.conv_in", "quant_conv", "post_quant_conv")}, ".safetensors")),
    # the parts of a diffusers folder given alone: its unet/ weights, its text_encoder/ weights (transformers' CLIP)
    "diffusers-unet": ("diffusion_pytorch_model.safetensors", _save({f"{part}.weight": t() for part in (
        "conv_in", "down_blocks.0.resnets.0.conv1", "mid_block.resnets.0.conv1", "up_blocks.0.resnets.0.conv1")},
        ".safetensors")),
    "clip-text-encoder": ("model.safetensors", _save({"text_model.embeddings.token_embedding.weight": t(),
                                                      "text_model.encoder.layers.0.mlp.fc1.weight": t()},
                                                     ".safetensors")),
    "osediff": ("osediff.pkl", _copy(OSEDIFF)),
    "osediff-converted": ("osediff.safetensors", lambda path: convert_osediff(OSEDIFF, path)),
    "ram": ("ram_swin_large_14m.pth", _copy(RAM)),
    "dape": ("DAPE.pth", _copy(DAPE)),
    "dape-converted": ("dape.safetensors", lambda path: dape.convert_dape(RAM, DAPE, path)),
    "dossr": ("dossr_default.ckpt", _copy(DOSSR)),
    "dossr-converted": ("dossr.safetensors", lambda path: convert_dossr(DOSSR, path, config=DOSSR_CONFIG)),
    "controlldm": ("controlldm.ckpt", lambda path: torch.save({k: v for k, v in _load(DOSSR)["state_dict"].items()
                                                             if not k.startswith("cond_encoder.")}, path)),
    # ControlNet v1.1 (lllyasviel) .pth: an image-hint ControlNet in the LDM layout
    "hint-controlnet": ("control_v11p_sd15_canny.pth", _save({"control_model.input_hint_block.0.weight": t(),
                                                              "control_model.zero_convs.0.0.weight": t()}, ".pth")),
    "diffusers-controlnet": ("diffusion_pytorch_model.safetensors", _save(
        {"controlnet_cond_embedding.conv_in.weight": t(), "controlnet_down_blocks.0.weight": t()}, ".safetensors")),
    # kohya's SD LoRA layout
    "sd-lora": ("detail_lora.safetensors", _save({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": t(),
                                                  "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t(),
                                                  "lora_unet_down_blocks_0_attentions_0_proj_in.alpha":
                                                      torch.tensor(1.0)},
                                                 ".safetensors")),
    "loralib": ("lora.pt", _save({"encoder.layer.0.attention.query.lora_A": t(),
                                  "encoder.layer.0.attention.query.lora_B": t()}, ".pt")),
    # RealESRGAN_x4plus.pth (BasicSR) and the original ESRGAN layout
    "esrgan": ("RealESRGAN_x4plus.pth", _save({"params_ema": {"conv_first.weight": t(), "body.0.rdb1.conv1.weight": t(),
                                                              "conv_last.weight": t()}}, ".pth")),
    "esrgan-old": ("4x_ESRGAN.pth", _save({"model.0.weight": t(), "model.1.sub.0.RDB1.conv1.0.weight": t()}, ".pth")),
}
KIND_OF = {"esrgan-old": "esrgan", "text-encoder-alone": "no-unet", "sdxl-unet": "sdxl"}

# loader: (what it is, how it is called, the kinds it takes)
LOADERS = {
    # a ControlLDM .ckpt holds its SD model whole: DoSSR's is SD 2.1-base
    "sd21": ("the SD 2.1-base loader", load_sd21, {"sd2", "dossr", "controlldm"}),
    "osediff": ("the OSEDiff reader", read_osediff, {"osediff", "osediff-converted"}),
    "ram": ("DAPE's RAM reader", dape._read_ram, {"ram"}),
    "dape": ("DAPE's LoRA reader", dape._read_dape, {"dape"}),
    "dape-converted": ("the converted DAPE loader", lambda p: dape.load_dape_tagger(converted_path=p),
                       {"dape-converted"}),
    "dossr": ("the DoSSR reader", read_weights, {"dossr", "dossr-converted"}),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("known")
    paths = {}
    for kind, (name, make) in FILES.items():
        folder = root / kind
        folder.mkdir()
        paths[kind] = str(folder / name)
        make(paths[kind])
    return paths


def _load(path):
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("kind", FILES)
def test_each_file_is_named_by_its_keys(files, kind):
    path = files[kind]
    known = identify(_load(path), path)
    assert known is not None and known.kind == KIND_OF.get(kind, kind), known


def test_a_converted_dossr_file_is_named_without_its_metadata(files):
    assert identify(_load(files["dossr-converted"])).kind == "dossr-converted"


@pytest.mark.parametrize("kind, loader", [(kind, loader) for kind in FILES for loader, (_, _, takes) in LOADERS.items()
                                          if KIND_OF.get(kind, kind) not in takes])
def test_every_loader_names_the_wrong_file_it_was_given(files, loader, kind):
    _, load, _ = LOADERS[loader]
    known = identify(_load(files[kind]), files[kind])
    with pytest.raises(WeightFileError) as info:
        load(files[kind])
    message = str(info.value)
    assert os.path.basename(files[kind]) in message, message
    assert known.what in message, message
    if loader == "sd21":  # another SD model: only what it is, as the fix is SD 2.1-base whole; else where it goes
        assert f"it is {known.what if known.sd_model else known.describe()}. Use the whole SD 2.1-base" in message


def test_every_known_file_is_tested_and_matches_no_earlier_entry(files):
    """Each registry entry has a file here, and that file is not claimed by an entry before its own (the first
    match wins)."""
    kinds = {KIND_OF.get(kind, kind) for kind in FILES}
    assert {known.kind for known in KNOWN_FILES + tuple(CONVERTED.values())} == kinds
    for kind, path in files.items():
        own = KIND_OF.get(kind, kind)
        if own not in KNOWN:  # named by its metadata
            continue
        sd = canonical(_load(path))
        for known in KNOWN_FILES:
            if known.kind == own:
                break
            assert not known.detect(sd), f"{kind} is claimed by the earlier {known.kind}"


def _sd2_with_norm_bias_spreads(stds):
    """An SD 2.x state dict (UNet, VAE and OpenCLIP keys) whose output blocks ``{block: std}`` have a first transformer
    norm bias of 320 values with that spread (torch's std, as ComfyUI reads it)."""
    sd = {f"{OPEN_CLIP_PREFIX}ln_final.bias": t(), "first_stage_model.decoder.conv_in.bias": t()}
    for block, std in stds.items():
        x = torch.randn(320, generator=torch.Generator().manual_seed(block))
        sd[f"{UNET_PREFIX}output_blocks.{block}.1.transformer_blocks.0.norm1.bias"] = (x - x.mean()) / x.std() * std
    return sd


@pytest.mark.parametrize("std, family", [(0.085, "sd2"), (0.095, "sd2-v")])
def test_v_prediction_is_told_by_the_spread_of_output_block_11s_norm_bias(std, family):
    """ComfyUI's rule (comfy/supported_models.py, SD20.model_type): v-prediction where the std of
    ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` exceeds 0.09. Block 11 is the last by number (after 9
    and 10, which sort after it as text); the other blocks' spreads do not count."""
    assert sd_family(_sd2_with_norm_bias_spreads({**{b: 0.01 for b in range(3, 11)}, 11: std})) == family
    assert sd_family(_sd2_with_norm_bias_spreads({**{b: 0.5 for b in range(3, 11)}, 11: std})) == family


def test_format_metadata_of_other_writers_is_not_taken_for_the_packs(tmp_path):
    """safetensors files converted by others carry ``format`` metadata too ("pt", from transformers and the Hugging
    Face converter): only the pack's own formats name a converted file, the others are named by their keys."""
    path = str(tmp_path / "v1-5-pruned-emaonly.safetensors")
    save_file(sd15_layout(load_file(SINGLE)), path, metadata={"format": "pt"})
    assert identify(_load(path), path).kind == "sd1"
    with pytest.raises(WeightFileError, match=r"'v1-5-pruned-emaonly.safetensors' is not Stable Diffusion 2.1-base: "
                                              r"it is a Stable Diffusion 1\.x checkpoint"):
        load_sd21(path)


def test_an_unknown_file_lists_its_keys(tmp_path):
    path = str(tmp_path / "mystery.safetensors")
    save_file({f"layer{i}.weight": t() for i in range(9)}, path)
    with pytest.raises(WeightFileError, match=r"mystery\.safetensors.*an unknown file \(keys: "
                                              r"\['layer0.weight', .*…\)"):
        read_osediff(path)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_file_keyed_by_numbers_is_refused_by_every_loader(tmp_path, loader):
    """Keys that are not names (a pickle may have any): a clear refusal, not an AttributeError from the search."""
    path = str(tmp_path / "numbers.pth")
    torch.save({"state_dict": {1: t(), 2: t()}}, path)
    with pytest.raises(WeightFileError, match=r"numbers\.pth.*a dict without named tensors"):
        LOADERS[loader][1](path)


READERS = {"osediff": read_osediff, "ram": dape._read_ram, "dape": dape._read_dape, "dossr": read_weights}


def _keys(read):
    if isinstance(read, tuple):  # read_weights: (state dict, kind, metadata)
        read = read[0]
    return sorted(k for k in read if isinstance(k, str))


@pytest.mark.parametrize("wrap", ["state_dict", "one-key", "module."])
@pytest.mark.parametrize("kind", READERS)
def test_each_reader_takes_its_own_file_in_a_container(files, tmp_path, kind, wrap):
    """A checkpoint saved from a Lightning module (``state_dict``), under any one key (ComfyUI's rule,
    comfy/utils.py load_torch_file) or from a DataParallel module (``module.``): read as the file itself, as the
    recogniser names it."""
    obj = _load(files[kind])
    obj = obj.get("state_dict", obj) if kind == "dossr" else obj
    wrapped = ({"state_dict": obj} if wrap == "state_dict" else {"checkpoint": obj} if wrap == "one-key"
               else {"module." + k: v for k, v in obj.items()})
    path = str(tmp_path / ("wrapped" + os.path.splitext(files[kind])[1]))
    torch.save(wrapped, path)
    assert _keys(READERS[kind](path)) == _keys(READERS[kind](files[kind]))


@pytest.mark.parametrize("loader", LOADERS)
def test_a_file_wrapped_twice_is_unwrapped_once_by_every_loader(tmp_path, loader):
    """An SD 2.1-base checkpoint under two single keys: each loader unwraps one (ComfyUI's rule), as it reads it, and
    names the file by that: the SD loader called it 'a Stable Diffusion 2.x checkpoint' as it refused it, and the
    OSEDiff and DoSSR readers sent it to --base, as they unwrapped it a second time to name it."""
    path = str(tmp_path / "wrapped_twice.ckpt")
    torch.save({"checkpoint": {"model": load_file(SINGLE)}}, path)
    with pytest.raises(WeightFileError, match=r"'wrapped_twice\.ckpt'.* it is an unknown file \(keys: \['model'\]\)"):
        LOADERS[loader][1](path)


@pytest.mark.parametrize("part", ["state_dict_unet", "state_dict_vae"])
@pytest.mark.parametrize("loader", LOADERS)
def test_an_osediff_file_holding_one_part_is_named_an_osediff_file(files, tmp_path, loader, part):
    """An osediff.pkl of one of its parts alone is OSEDiff's (incomplete, to the OSEDiff reader), not the LoRA or
    diffusers UNet that the single-key unwrap would take the part for."""
    path = str(tmp_path / "osediff.pkl")
    torch.save({part: _load(files["osediff"])[part]}, path)
    what = (r"an incomplete OSEDiff checkpoint: it lacks" if loader == "osediff"
            else re.escape(KNOWN["osediff"].what))
    with pytest.raises(WeightFileError, match=rf"'osediff\.pkl'.* {what}"):
        LOADERS[loader][1](path)


def test_an_unknown_files_keys_are_cut_after_six():
    """Up to six keys are listed whole; "…" marks the ones left out."""
    from comfyui_diffsr.sr_common.known_files import describe

    six = {f"layer{i}.weight": t() for i in range(6)}
    assert describe(six) == f"an unknown file (keys: {sorted(six)})"
    assert describe(dict(six, **{"layer6.weight": t()})) == f"an unknown file (keys: {sorted(six)} …)"


def test_only_a_prefix_on_every_key_is_dataparallels():
    """DataParallel prefixes every key with ``module.``: that prefix is dropped; a dict where only some keys start
    with it (a network with a submodule named ``module``) keeps its keys whole."""
    assert list(canonical({"module.conv.weight": t(), "module.conv.bias": t()})) == ["conv.weight", "conv.bias"]
    assert list(canonical({"module.conv.weight": t(), "head.weight": t()})) == ["module.conv.weight", "head.weight"]


def test_an_incomplete_file_of_the_kind_a_reader_wants_is_called_incomplete(files, tmp_path):
    """Not "it is not an OSEDiff checkpoint: it is an OSEDiff weight file"."""
    osediff = _load(files["osediff"])
    del osediff["rank_vae"]
    torch.save(osediff, tmp_path / "osediff.pkl")
    with pytest.raises(WeightFileError, match=r"'osediff.pkl' is an incomplete OSEDiff checkpoint: it lacks "
                                              r"\['rank_vae'\]\. The file is damaged; download osediff.pkl again"):
        read_osediff(str(tmp_path / "osediff.pkl"))
    converted = str(tmp_path / "dossr.safetensors")
    with safe_open(files["dossr-converted"], framework="pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if not k.startswith("rrdb.")}, converted, f.metadata())
    with pytest.raises(WeightFileError, match="dossr.safetensors' is not a DoSSR weight file: it is an incomplete "
                                              "converted DoSSR file"):
        read_weights(converted)


@pytest.mark.parametrize("loader", LOADERS)
def test_values_that_are_not_tensors_where_sd_keeps_one_are_refused(tmp_path, loader):
    """The v-prediction rule reads one tensor's spread: a pickle may hold anything under that key."""
    path = str(tmp_path / "odd.pth")
    torch.save({"model.diffusion_model.output_blocks.2.1.transformer_blocks.0.norm1.bias": 5,
                "model.diffusion_model.output_blocks.x.1.transformer_blocks.0.norm1.bias": t(),
                "cond_stage_model.model.ln_final.bias": t()}, path)
    with pytest.raises(WeightFileError, match=r"odd\.pth"):
        LOADERS[loader][1](path)


def test_a_unet_taking_fewer_channels_than_the_latent_is_told_by_its_inputs():
    """A UNet whose first convolution takes other than the 4 latent channels is named by them, fewer as well as
    more (a pixel-space or one-channel UNet is no SD 2.1-base either)."""
    from comfyui_diffsr.sr_common.known_files import sd_family

    for channels, family in ((1, "other-input"), (3, "other-input"), (6, "other-input"), (9, "inpainting")):
        assert sd_family({f"{UNET_PREFIX}input_blocks.0.0.weight": torch.zeros(32, channels, 3, 3)}) == family


def test_sd1_is_told_by_its_768_wide_context_also_with_linear_projections():
    """SD 1.x's cross-attention reads CLIP-L's 768-wide context, SD 2.x's OpenCLIP-H's 1024-wide one: a UNet whose
    transformers project with linear layers (as SD 2.x's) is still SD 1.x by that width."""
    from comfyui_diffsr.sr_common.known_files import sd_family

    def unet(context):
        return {f"{UNET_PREFIX}input_blocks.1.1.proj_in.weight": torch.zeros(320, 320),
                f"{UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, context)}

    assert sd_family(unet(768)) == "sd1"
    assert sd_family(unet(1024)) != "sd1"
