"""Parity fixtures for OSEDiff, made by the official inference code on a tiny random-weight model.

Run with the official code's environment (diffusers 0.25.0, transformers 4.28.1, peft 0.9.0; see
tests/data/osediff/README.md) and a checkout of cswry/OSEDiff (commit fcc4f09):

    PYTHONPATH=/path/to/OSEDiff python tools/make_osediff_fixtures.py --upstream /path/to/OSEDiff --out tests/data/osediff

It writes a tiny SD 2.1-base-architecture model as one LDM-layout single file drawn from a recipe
(``tiny_sd21_single.safetensors.recipe.json``, ``logit_scale`` in its ``.fixed.safetensors``; tests/fixture_weights.py:
the tests make the file from it at the start of a session), the diffusers folder the official code loads converted
from that file by diffusers' own LDM converters (``tiny_sd21/``, fp16; our LDM layout must map it back to the file
exactly; its weight files are not stored either: the tests make them from the single file and check them against
``weights_sha256.json``; the tokenizer is the one the pack ships, sr_common/configs/sd21_base/tokenizer, and is not
stored again), an ``osediff_tiny.pkl`` in the official layout, also from a recipe (adapter lists by the official
``initialize_unet`` / ``initialize_vae``, every LoRA A/B and ``conv_in`` drawn), input images, and for each case the
official output (``.png``) and float tensors (``.safetensors``), listed in ``cases.json``. Nothing of the official
code is copied: it is imported from --upstream and driven the way test_osediff.py's ``__main__`` drives it.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import save_file

from upstream import require_on_pythonpath, tests_module

PROMPT = "a cat, grass, ,"  # what f"{tags}, {args.prompt}," gives for DAPE tags "a cat, grass" and prompt ""
SEED = 7
HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "sr_common", "configs", "sd21_base", "tokenizer")
fw = tests_module("fixture_weights")
squashed_by_lanczos = tests_module("osediff_sizing").squashed_by_lanczos

SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.8.0",
               "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
               "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"]}


# ----------------------------------------------------------------------------------------------------------
# CPU: the official code hard-codes CUDA


def cpu_patches():
    fix = lambda v: "cpu" if (v == "cuda" or (isinstance(v, torch.device) and v.type == "cuda")) else v
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    module_to, tensor_to, tensor = torch.nn.Module.to, torch.Tensor.to, torch.tensor
    torch.nn.Module.to = lambda self, *a, **k: module_to(self, *[fix(x) for x in a], **{n: fix(v) for n, v in k.items()})
    torch.Tensor.to = lambda self, *a, **k: tensor_to(self, *[fix(x) for x in a], **{n: fix(v) for n, v in k.items()})
    torch.tensor = lambda *a, **k: tensor(*a, **{n: fix(v) for n, v in k.items()})


# ----------------------------------------------------------------------------------------------------------
# inputs


def natural_image(width, height, seed):
    """Smooth gradients, a few shapes, a slight blur and noise: something a VAE sees as an image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([0.5 + 0.4 * np.sin(6 * xx + seed), 0.5 + 0.4 * np.cos(5 * yy - seed), 0.3 + 0.5 * xx * yy], -1)
    im = Image.fromarray((base * 255).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for i in range(3):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + max(2, width // 3), y0 + max(2, height // 3)]
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if i % 2 == 0 else draw.rectangle)(box, fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(0.7))
    arr = np.asarray(im).astype(np.float32) + rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(arr.clip(0, 255).round().astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------
# tiny SD 2.1-base: the LDM single file is drawn from its recipe, the diffusers folder is converted from it

SINGLE, PKL = "tiny_sd21_single.safetensors", "osediff_tiny.pkl"  # made from their recipes
SEED_SD21, SEED_LORA, RANK = 1234, 4321, 4  # the recipes' seeds; the LoRA rank


def tiny_networks():
    """The tiny SD 2.1-base networks, for their configs, names and shapes: their own init is never used (the weights
    come from the single file's recipe)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(64, 64, 128, 128), layers_per_block=1,
        norm_num_groups=32, cross_attention_dim=8, attention_head_dim=[1, 1, 1, 1], use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, mid_block_type="UNetMidBlock2DCrossAttn")
    # layers_per_block 2 as in SD: the official tiled VAE (vaehook.build_sampling) hard-codes 2 (enc) / 3 (dec).
    # Every GroupNorm has 2 or more channels per group (64 to 256 channels, 32 groups): with 32 channels each group
    # is one channel, an instance norm that no per-channel shift or scale of its input (a wrong bias, time embedding
    # or dtype) changes. The groups stay 32, as in SD, since the official tiled VAE (vaehook) hard-codes 32.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(64, 64, 64, 64), layers_per_block=2, norm_num_groups=32,
        latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=256, scaling_factor=0.18215)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=8, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=0))
    return unet, vae, text


def drawn(key, shape, shapes, dtype):
    """The recipe entry of a random weight: PyTorch's default init in variance (std 1/sqrt(3 fan_in)) for weights and
    the biases beside them, norm scales N(1, 0.1) and their biases N(0, 0.05), CLIP's embeddings N(0, 0.02).
    ``shapes``: every tensor's shape by name (a bias is drawn by its weight's)."""
    if "embedding" in key:
        return fw.normal(dtype, shape, 0, 0.02)
    if key.endswith("bias"):
        weight = shapes[key[:-len("bias")] + "weight"]
        return fw.normal(dtype, shape, 0, 0.05 if len(weight) == 1 else (3 * math.prod(weight[1:])) ** -0.5)
    if len(shape) == 1:  # every 1-D weight here scales a GroupNorm or LayerNorm
        return fw.normal(dtype, shape, 1, 0.1)
    return fw.normal(dtype, shape, 0, (3 * math.prod(shape[1:])) ** -0.5)


RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
       "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_unet(unet):
    """diffusers UNet2DConditionModel keys -> ``model.diffusion_model.*``."""
    sd, cfg, out = unet.state_dict(), unet.config, {}
    nrb, levels = cfg.layers_per_block, len(cfg.block_out_channels)

    def put(prefix_d, prefix_l, renames=None):
        for k, v in sd.items():
            if k.startswith(prefix_d + "."):
                rest = k[len(prefix_d) + 1:]
                for a, b in (renames or {}).items():
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                out[f"model.diffusion_model.{prefix_l}.{rest}"] = v

    put("time_embedding.linear_1", "time_embed.0")
    put("time_embedding.linear_2", "time_embed.2")
    put("conv_in", "input_blocks.0.0")
    for i in range(levels):
        for j in range(nrb):
            idx = 1 + i * (nrb + 1) + j
            put(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", RES)
            put(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1")
        if i < levels - 1:
            put(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{1 + i * (nrb + 1) + nrb}.0.op")
    put("mid_block.resnets.0", "middle_block.0", RES)
    put("mid_block.attentions.0", "middle_block.1")
    put("mid_block.resnets.1", "middle_block.2", RES)
    for i in range(levels):
        has_attn = f"up_blocks.{i}.attentions.0.proj_in.weight" in sd
        for j in range(nrb + 1):
            idx = i * (nrb + 1) + j
            put(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", RES)
            put(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1")
        if i < levels - 1:
            put(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * (nrb + 1) + nrb}.{2 if has_attn else 1}.conv")
    put("conv_norm_out", "out.0")
    put("conv_out", "out.2")
    assert len(out) == len(sd), (len(out), len(sd))
    return out


def ldm_vae(vae):
    """diffusers AutoencoderKL keys -> ``first_stage_model.*`` (mid attention q/k/v/proj_out as 1x1 convs)."""
    sd, out = vae.state_dict(), {}
    levels = len(vae.config.block_out_channels)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    short = lambda t: "nin_shortcut" + t[len("conv_shortcut"):] if t.startswith("conv_shortcut") else t
    for k, v in sd.items():
        new = k
        for side in ("encoder", "decoder"):
            if not k.startswith(side + "."):
                continue
            rest = k[len(side) + 1:]
            if rest.startswith("down_blocks."):
                _, i, kind, j, tail = rest.split(".", 4)
                new = (f"{side}.down.{i}.block.{j}.{short(tail)}" if kind == "resnets"
                       else f"{side}.down.{i}.downsample.conv.{tail.split('.', 1)[-1]}")
            elif rest.startswith("up_blocks."):
                _, i, kind, j, tail = rest.split(".", 4)
                li = levels - 1 - int(i)
                new = (f"{side}.up.{li}.block.{j}.{short(tail)}" if kind == "resnets"
                       else f"{side}.up.{li}.upsample.conv.{tail.split('.', 1)[-1]}")
            elif rest.startswith("mid_block.resnets."):
                _, _, j, tail = rest.split(".", 3)
                new = f"{side}.mid.block_{int(j) + 1}.{short(tail)}"
            elif rest.startswith("mid_block.attentions.0."):
                tail = rest[len("mid_block.attentions.0."):]
                for a, b in attn.items():
                    if tail.startswith(a + "."):
                        tail = b + tail[len(a):]
                new = f"{side}.mid.attn_1.{tail}"
                if v.dim() == 2:
                    v = v[:, :, None, None]
            elif rest.startswith("conv_norm_out."):
                new = f"{side}.norm_out.{rest.split('.', 1)[1]}"
        out["first_stage_model." + new] = v
    return out


CLIP = "cond_stage_model.model."


def open_clip_text(text):
    """CLIPTextModel keys -> OpenCLIP ``cond_stage_model.model.*`` (q/k/v joined as ``attn.in_proj_*``)."""
    sd = {k: v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}  # transformers >= 5
    out = {CLIP + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           CLIP + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           CLIP + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           CLIP + "ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(text.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{CLIP}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[dst + f"attn.in_proj_{part}"] = torch.cat([sd[src + f"self_attn.{n}_proj.{part}"] for n in "qkv"])
            for a, b in names.items():
                out[dst + f"{b}.{part}"] = sd[src + f"{a}.{part}"]
    return out


def single_file_recipe(unet, vae, text):
    """The recipe's content of the single file: every tensor drawn (``drawn``) in the layout of an original SD 2.1
    checkpoint, fp16, by name as the file orders them; OpenCLIP has one resblock more than the HF encoder (SD 2
    takes the penultimate layer), ``text_projection`` and ``logit_scale`` (ln 100, fixed)."""
    shapes = {k: tuple(v.shape) for k, v in {**ldm_unet(unet), **ldm_vae(vae), **open_clip_text(text)}.items()}
    last, extra = text.config.num_hidden_layers - 1, text.config.num_hidden_layers
    shapes.update({k.replace(f".resblocks.{last}.", f".resblocks.{extra}."): v for k, v in shapes.items()
                   if k.startswith(f"{CLIP}transformer.resblocks.{last}.")})
    shapes[CLIP + "text_projection"] = (text.config.hidden_size, text.config.projection_dim)
    content = {k: drawn(k, shape, shapes, "float16") for k, shape in shapes.items()}
    content[CLIP + "logit_scale"] = fw.fixed("logit_scale")
    return dict(sorted(content.items())), {"logit_scale": torch.tensor(math.log(100), dtype=torch.float16)}


def write_folder(single, unet, vae, text, folder):
    """The diffusers folder the official code loads: the single file's tensors converted by diffusers 0.25's own LDM
    converters, fp16 (upcast to fp32 to run). Our LDM layout must give the single file back from them."""
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import (convert_ldm_unet_checkpoint,
                                                                         convert_ldm_vae_checkpoint,
                                                                         convert_open_clip_checkpoint)

    text.config.save_pretrained(os.path.join(folder, "text_encoder"))  # convert_open_clip_checkpoint reads it
    # the converters pop keys: give them copies
    unet.load_state_dict(convert_ldm_unet_checkpoint(dict(single), dict(unet.config)))
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(single), dict(vae.config)))
    # diffusers drops the last resblock and text_projection only for the real SD 2 (23 layers); do the same, with a
    # projection so that text_projection (which gives d_model) has somewhere to go
    extra = f"{CLIP}transformer.resblocks.{text.config.num_hidden_layers}."
    clip = convert_open_clip_checkpoint({k: v for k, v in single.items() if not k.startswith(extra)},
                                        os.path.join(folder, "text_encoder"), has_projection=True,
                                        local_files_only=True).state_dict()
    text.load_state_dict({k: clip[k] for k in text.state_dict()})
    back = {**ldm_unet(unet), **ldm_vae(vae), **open_clip_text(text)}
    unused = {k for k in single if k.startswith(extra)} | {CLIP + "text_projection", CLIP + "logit_scale"}
    assert back.keys() == single.keys() - unused, "LDM layout"
    assert all(torch.equal(v.half(), single[k]) for k, v in back.items()), "LDM layout"
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        m.half().save_pretrained(os.path.join(folder, name), safe_serialization=True)
    shutil.copytree(TOKENIZER, os.path.join(folder, "tokenizer"), dirs_exist_ok=True)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f, indent=2)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(MODEL_INDEX, f, indent=2)


# ----------------------------------------------------------------------------------------------------------
# osediff.pkl in the official layout


def lora_recipe(model, part, keep, rng, content):
    """``content[part]``: the recipe of the tensors of ``model`` that ``OSEDiff_gen.save_model`` keeps (``keep``), in
    its order: every ``lora_A`` ~ N(0, 1/r) (PEFT's "gaussian"), every ``lora_B`` ~ N(0, std) with std chosen so that
    |scaling B@A| is 10..30 % (drawn by ``rng``) of |W| of its layer, anything else (``conv_in.base_layer``, which
    replaces the base conv_in) as ``drawn``."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if keep(k)}
    made = lambda k: fw.build_tree({part: {k: content[part][k]}}, SEED_LORA, {})[part][k].double()
    content[part] = {}
    for k, shape in shapes.items():
        if ".lora_A." in k:
            content[part][k] = fw.normal("float32", shape, 0, 1 / RANK)
        elif ".lora_B." in k:
            name, adapter = k[:-len(".weight")].split(".lora_B.")
            layer = model.get_submodule(name)
            a = made(f"{name}.lora_A.{adapter}.weight")  # lora_A comes first in the state dict
            w = made(name + ".base_layer.weight") if name + ".base_layer.weight" in shapes else layer.base_layer.weight
            z = torch.from_numpy(fw.standard_normal(SEED_LORA, f"{part}/{k}", shape))
            delta = layer.scaling[adapter] * (z.reshape(shape[0], RANK) @ a.reshape(RANK, -1))
            content[part][k] = fw.normal("float32", shape, 0, rng.uniform(0.1, 0.3) * w.double().norm() / delta.norm())
        else:
            content[part][k] = drawn(k, shape, shapes, "float32")


def make_osediff_pkl(folder, path):
    """osediff_tiny.pkl from its recipe: the dict ``OSEDiff_gen.save_model`` writes, for the module lists of the
    official ``initialize_unet`` / ``initialize_vae`` on the tiny model. Returns it, and |scaling B@A| / |W| of
    each LoRA layer as made."""
    from osediff import initialize_unet, initialize_vae

    args = argparse.Namespace(pretrained_model_name_or_path=folder, lora_rank=RANK)
    unet, enc, dec, others = initialize_unet(args)
    vae, vae_list = initialize_vae(args)
    content = {"vae_lora_encoder_modules": vae_list, "unet_lora_encoder_modules": enc, "unet_lora_decoder_modules": dec,
               "unet_lora_others_modules": others, "rank_unet": RANK, "rank_vae": RANK}
    rng = np.random.RandomState(SEED_LORA)
    lora_recipe(unet, "state_dict_unet", lambda k: "lora" in k or "conv_in" in k, rng, content)
    lora_recipe(vae, "state_dict_vae", lambda k: "lora" in k, rng, content)
    ckpt = fw.save_recipe(path, "torch", SEED_LORA, content)
    ratios = []
    for part, model in (("state_dict_unet", unet), ("state_dict_vae", vae)):
        state = ckpt[part]
        for k in (k for k in state if ".lora_B." in k):
            name, adapter = k[:-len(".weight")].split(".lora_B.")
            layer = model.get_submodule(name)
            b, a = state[k], state[f"{name}.lora_A.{adapter}.weight"]
            w = state.get(name + ".base_layer.weight", layer.base_layer.weight)
            ratios.append((layer.scaling[adapter] * (b.reshape(b.shape[0], RANK) @ a.reshape(RANK, -1))).norm().item()
                          / w.norm().item())
    return ckpt, ratios


# ----------------------------------------------------------------------------------------------------------
# cases

# name, input (W, H), upscale, process_size, sizing, sample_mode, colour fix, latent tile/overlap, vae enc/dec tile
DEF = (96, 32), (1024, 224)
CASES = [
    # exact cases keep min(W, H) >= process_size // upscale: no min-size raise under either reading of "exact"
    ("a32_adain", (32, 32), 4, 128, "official", "mean", "adain", *DEF),
    ("a32_wavelet", (32, 32), 4, 128, "official", "mean", "wavelet", *DEF),
    ("a32_nofix_sample", (32, 32), 4, 128, "official", "sample", "nofix", *DEF),
    ("a32_exact_adain", (32, 32), 4, 128, "exact", "mean", "adain", *DEF),
    ("b24x40_raise", (24, 40), 4, 128, "official", "mean", "adain", *DEF),
    ("c21x27_wavelet_sample", (21, 27), 4, 64, "official", "sample", "wavelet", *DEF),
    ("c21x27_exact_sample", (21, 27), 4, 64, "exact", "sample", "adain", *DEF),
    ("c21x27_x2", (21, 27), 2, 32, "official", "mean", "adain", *DEF),
    ("d13x19_raise", (13, 19), 4, 128, "official", "mean", "adain", *DEF),
    ("d13x19_exact_wavelet", (13, 19), 4, 32, "exact", "mean", "wavelet", *DEF),
    ("e40x32_latent_tiled", (40, 32), 4, 128, "official", "mean", "adain", (8, 4), DEF[1]),
    ("e40x32_untiled", (40, 32), 4, 128, "official", "mean", "adain", *DEF),
    ("f64x48_vae_tiled", (64, 48), 4, 128, "official", "mean", "nofix", DEF[0], (64, 8)),
    ("f64x48_untiled", (64, 48), 4, 128, "official", "mean", "nofix", *DEF),
    ("g37x29_exact_latent_tiled", (37, 29), 4, 64, "exact", "sample", "wavelet", (8, 4), DEF[1]),
    # exact sizing with the min-size raise: processed enlarged, then resized back to exactly 4 x input
    ("h13x19_exact_raise", (13, 19), 4, 128, "exact", "mean", "adain", *DEF),
    # x1 with no colour fix, as the official README runs osediff_face.pkl (face restoration)
    ("i40x48_x1_nofix", (40, 48), 1, 32, "official", "mean", "nofix", *DEF),
    ("j37x29_exact_x1_nofix", (37, 29), 1, 16, "exact", "mean", "nofix", *DEF),
]


def official_resize(image, ps, up):
    """test_osediff.py __main__, verbatim in behaviour (its own statements, our variable names)."""
    ow, oh = image.size
    if ow < ps // up or oh < ps // up:
        scale = (ps // up) / min(ow, oh)
        image = image.resize((int(scale * ow), int(scale * oh)))
    image = image.resize((image.size[0] * up, image.size[1] * up))
    return image.resize((image.width - image.width % 8, image.height - image.height % 8), Image.LANCZOS)


def exact_pad(lq):
    """Our sizing: pad right/bottom to a multiple of 8; reflect, or replicate where a side is too short."""
    h, w = lq.shape[-2:]
    ph, pw = (-h) % 8, (-w) % 8
    mode = "reflect" if (ph < h and pw < w) else "replicate"
    return F.pad(lq, (0, pw, 0, ph), mode=mode), mode


def psnr(a, b):
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


README = """# OSEDiff parity fixtures

Made by `tools/make_osediff_fixtures.py` with the **official** OSEDiff inference code (cswry/OSEDiff, commit
`fcc4f09`, imported from a checkout, never copied) on a tiny random-weight SD 2.1-base-architecture model, fp32 on
CPU. Regenerate (1-3 min on 2 CPU cores):

    python3 -m venv /work/venvs/osediff-up
    /work/venvs/osediff-up/bin/pip install torch==2.14.1 torchvision==0.29.1 diffusers==0.25.0 transformers==4.28.1 \\
        peft==0.9.0 accelerate safetensors pillow numpy "huggingface_hub<0.26" einops open_clip_torch
    git clone https://github.com/cswry/OSEDiff /work/upstream/OSEDiff && git -C /work/upstream/OSEDiff checkout fcc4f09
    PYTHONPATH=/work/upstream/OSEDiff /work/venvs/osediff-up/bin/python tools/make_osediff_fixtures.py \\
        --upstream /work/upstream/OSEDiff --out tests/data/osediff

(versions used: {versions}.) The weights are drawn from recipes (tests/fixture_weights.py: numpy's frozen RandomState per tensor, checked by a digest), so any run with any numpy and torch makes them byte for byte; the official outputs repeat within a session (seeded posterior noise; of several runs here, one moved 4 fp16 values of one case by an ulp) and move across sessions and machines by kernel noise: earlier sets made again in a fresh venv (2026-12-02) and on the Intel Xeon machine kind (2026-12-03) had the same weights (the LoRA within 7.5e-9) and official outputs within 9.3e-3 (a few flipped 8-bit roundings in the PNG chains, PNGs within 3 levels): hence the 60 dB bound for PNG-against-PNG cases in `tests/test_osediff_parity.py`. Made again on 2026-12-05 with the weights from recipes (they were torch's init of the diffusers networks, perturbed by a seeded torch generator, and stored: 6.1 MB): every weight, output and figure here is new, and the files stored in this folder went from 8.6 to 2.7 MB. Made again on 2026-12-06 with wider networks: the UNet's `block_out_channels` (32, 32, 64, 64) became (64, 64, 128, 128) and the VAE's (32, 32, 32, 32) became (64, 64, 64, 64), `norm_num_groups` still 32 (SD's; the official tiled VAE, my_utils/vaehook.py, hard-codes 32 groups, so fewer groups would not be the official algorithm's), so that every GroupNorm has 2 or more channels per group: with one channel a group is an instance norm, which no per-channel shift or scale of its input changes, and a wrong bias or time-embedding add at the UNet's first levels or in any VAE resnet passed every parity case (conv1's bias added twice in the VAE resnets: 70.6 dB at worst; the time embedding dropped at the 32-channel UNet levels: 71.9 dB). With these networks the same mutations put the parity cases they reach at 21-49 dB. Cases, inputs, recipe rules and seeds are as before; every weight, output and figure is new, the single file (not stored) went from 5.2 to 17.9 MB and `osediff_tiny.pkl` (not stored) from 0.9 to 1.6 MB, the files stored in this folder at 2.66 MB. Made again on 2026-12-06 (stop 51) in a fresh venv (these versions) on the Intel Xeon machine kind, the squashed cases taken from `tests/osediff_sizing.py`: every weight, digest, output and `cases.json` byte-identical, the three `<case>_lq.png` identical in pixels (not in PNG bytes).

## Files

| file | what |
|---|---|
| `tiny_sd21/` | diffusers folder laid out like `stabilityai/stable-diffusion-2-1-base` (model_index.json, unet/, vae/, text_encoder/, scheduler/ = the SD 2.1-base PNDMScheduler config), weights **fp16** safetensors (upcast to fp32 to run), converted by the script from `tiny_sd21_single.safetensors` with diffusers 0.25's `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint` (the script's own LDM layout maps them back to the file exactly). **The weight files are not stored**: `tests/conftest.py` makes them from the single file at the start of a test session (after the file itself), and checks them byte for byte against the SHA-256 the script wrote (`weights_sha256.json`). **Nor is `tokenizer/`**: it is byte-identical to `sr_common/configs/sd21_base/tokenizer` (made by `tools/make_clip_tokenizer.py`); copy it in before loading. |
| `tiny_sd21_single.safetensors` | the weights as one original SD 2.1 checkpoint (fp16, {single_mb:.1f} MB): `model.diffusion_model.*`, `first_stage_model.*` (mid attention q/k/v/proj_out as 1x1 convs), `cond_stage_model.model.*` (OpenCLIP layout, `attn.in_proj_*`, `text_projection`, `logit_scale`) with **3** resblocks where the HF encoder has 2: `resblocks.2` is random and must be ignored (SD 2 uses the penultimate layer). Every tensor is drawn: weights N(0, 1/sqrt(3 fan_in)) (PyTorch's default init in variance) and the biases beside them likewise, GroupNorm/LayerNorm scales N(1, 0.1) and biases N(0, 0.05), CLIP's token and position embeddings N(0, 0.02); `logit_scale` is ln 100. **Not stored**: `tests/conftest.py` makes it at the start of a test session from `tiny_sd21_single.safetensors.recipe.json` ({single_recipe_kb:.0f} kB: per tensor its dtype, shape, mean and std, and the file's digest) and `tiny_sd21_single.safetensors.fixed.safetensors` (`logit_scale`). |
| `osediff_tiny.pkl` | `torch.save` dict exactly as `OSEDiff_gen.save_model` writes it (fp32, {pkl_mb:.1f} MB): module lists from the official `initialize_unet`/`initialize_vae` on the tiny model (UNet {modules} modules, VAE list {vae_list} entries with duplicates, {vae_unique} unique), `rank_unet = rank_vae = 4`, PEFT default alpha 8 (scale 2). Every `lora_A` ~ N(0, 1/r) (std), every `lora_B` ~ N(0, std) with std chosen so that `|2 B@A| / |W|` is 0.10..0.30 per layer (drawn per layer); `conv_in.base_layer.{{weight,bias}}` is drawn as the base weights, so differs from the base `conv_in` (must replace it, then add its LoRA). Loads with `weights_only=True`. **Not stored**: made like the single file, from `osediff_tiny.pkl.recipe.json` ({pkl_recipe_kb:.0f} kB; module lists and ranks as plain values). |
| `in_WxH.png` | inputs (smooth gradients + shapes + noise, RGB) |
| `<case>.png` | the official output PNG (official cases: `ToPILImage` truncation after the official PIL colour fix; exact cases: `round(out_float*255)`) |
| `<case>_lq.png` | the LQ the official code fed the networks (`official_resize`'s result) in the official cases whose ×upscale size LANCZOS squashes to a multiple of 8 (`b24x40_raise`, `c21x27_wavelet_sample`, `c21x27_x2`; which cases those are is `squashed_by_lanczos` in `tests/osediff_sizing.py`, used by the script and the tests alike), as this Pillow's LANCZOS made it: older Pillow's differs by up to 2 levels (Pillow 13 needs Python 3.11), and `tests/test_osediff_parity.py` runs these cases from this LQ at ×1 there |
| `<case>.safetensors` | `out_float` = float image in [0,1] right before the final quantisation (after colour fix and, for exact sizing with a min-size raise, after the bicubic resize back to exactly upscale x input; fp16). `a32_adain` also keeps `eps` (UNet output) and `x0` (fp16). |
| `prompt.safetensors` | `input_ids` (1,77) and `prompt_embeds` (1,77,8) of the prompt |
| `cases.json` | all parameters per case, expected files, sizes, which tilings are active, `input_ids` |

## Common settings

* Prompt (DAPE bypassed; what `f"{{tags}}, {{args.prompt}},"` gives for tags `a cat, grass` and an empty user prompt):
  `{prompt!r}`, ids `{ids}` then 0 (pad `!`) to 77.
* `--mixed_precision fp32`, `--merge_and_unload_lora` off, `.cuda()`/`device="cuda"` patched to CPU in the script.
* `sample_mode`: `mean` = posterior mean; `sample` = the official `latent_dist.sample()` patched to
  `mean + exp(0.5*clamp(logvar,-30,20)) * torch.randn((1,4,h,w), generator=torch.Generator('cpu').manual_seed(seed))`
  over the whole latent (after the tiled encoder), seed {seed}. For exact cases h, w are the *padded* latent sizes.
* official sizing = `test_osediff.py __main__`: raise when a side < process_size//upscale (`int()` truncation),
  PIL BICUBIC x upscale, then LANCZOS squash to a multiple of 8; colour fix on PIL images against that LQ.
* **exact sizing (ours)**: the official min-size raise when a side < process_size//upscale (only `h13x19_exact_raise`),
  then `PIL.resize((upscale*W, upscale*H), BICUBIC)` of the 8-bit input (no squash) ->
  `ToTensor` ([0,1]) -> pad right/bottom to a multiple of 8 with `torch.nn.functional.pad(lq, (0, pw, 0, ph),
  mode="reflect")` on the [0,1] tensor, or `mode="replicate"` if `ph >= H` or `pw >= W` (reflect impossible; not hit
  by these cases) -> `*2-1` -> official networks -> crop `decoded[..., :H*upscale, :W*upscale]` -> `*0.5+0.5`, clamp
  [0,1] -> float colour fix (official `adaptive_instance_normalization` / `wavelet_reconstruction`) against the
  unpadded upscaled LQ tensor -> clamp [0,1] -> (raised only) PIL float ("F") BICUBIC resize per channel to
  exactly upscale x input, clamp = `out_float` (no 8-bit round trip before the colour fix).
* Tiling thresholds (my_utils/vaehook.py): the VAE encoder is tiled when `max(H, W) > vae_encoder_tiled_size + 64`
  (image px, pad 32), the decoder when `max(h, w) > vae_decoder_tiled_size + 22` (latent px, pad 11). Latent tiling
  when `h*w > latent_tiled_size**2`.
* Sanity: `a32_adain` with every `lora_B` zeroed is {lora_psnr:.2f} dB from the real output: the LoRA is not blind.
* Exact sizing uses our own tiled VAE (margins exchanged, exact statistics), which is not the official algorithm,
  so no exact case tiles the VAE; `g37x29_exact_latent_tiled` tiles the latent (official Gaussian blend).
* Tiled vs untiled differ a lot with random weights (e40x32 {tiled_db[0]:.0f} dB, f64x48 {tiled_db[1]:.0f} dB; global attention in a random net
  and 8-latent tiles): compare each tiled case with its own official output, not with the untiled one.

## Cases

| name | input | up | ps | sizing | sample | fix | latent tile/ov | vae enc/dec tile | tiled (lat/enc/dec) | model in | out |
|---|---|---|---|---|---|---|---|---|---|---|---|
{rows}
"""


def write_readme(out, listing, lora_psnr, tiled_db, ckpt):
    import diffusers
    import peft
    import transformers

    versions = (f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
                f"peft {peft.__version__}, Pillow {Image.__version__}, numpy {np.__version__}")
    rows = "\n".join(
        f"| {c['name']} | {c['input']} | {c['upscale']} | {c['process_size']} | {c['sizing']} | {c['sample_mode']} | "
        f"{c['color_fix']} | {c['tile_latent']}/{c['tile_overlap']} | {c['vae_tile_encode']}/{c['vae_tile_decode']} | "
        f"{'/'.join('y' if c[k] else '-' for k in ('latent_tiled', 'vae_encoder_tiled', 'vae_decoder_tiled'))} | "
        f"{c['model_input_size'][0]}x{c['model_input_size'][1]} | {c['output_size'][0]}x{c['output_size'][1]} |"
        for c in listing)
    size = lambda name: os.path.getsize(os.path.join(out, name))
    modules = "/".join(str(len(ckpt[f"unet_lora_{k}_modules"])) for k in ("encoder", "decoder", "others"))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(README.format(versions=versions, prompt=PROMPT, ids=TOKEN_IDS[:8], seed=SEED, lora_psnr=lora_psnr,
                              tiled_db=tiled_db, rows=rows, single_mb=size(SINGLE) / 1e6,
                              single_recipe_kb=size(SINGLE + ".recipe.json") / 1e3, pkl_mb=size(PKL) / 1e6,
                              pkl_recipe_kb=size(PKL + ".recipe.json") / 1e3, modules=modules,
                              vae_list=len(ckpt["vae_lora_encoder_modules"]),
                              vae_unique=len(set(ckpt["vae_lora_encoder_modules"]))))


TOKEN_IDS = []
WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors")


def write_weight_hashes(folder):
    """``weights_sha256.json`` in the folder: the SHA-256 of its weight files, which are not stored (the same tensors
    as the single file): the tests make them from the single file and check them against these (tests/conftest.py)."""
    hashes = {}
    for name in WEIGHT_FILES:
        with open(os.path.join(folder, name), "rb") as f:
            hashes[name] = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(folder, "weights_sha256.json"), "w") as f:
        json.dump(hashes, f, indent=1)
        f.write("\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True, help="checkout of cswry/OSEDiff (fcc4f09)")
    p.add_argument("--out", required=True)
    p.add_argument("--keep-tokenizer", action="store_true", help="also store tiny_sd21/tokenizer (1.5 MB)")
    a = p.parse_args()
    t_start = time.time()
    a.upstream, a.out = require_on_pythonpath(a.upstream), os.path.abspath(a.out)
    cpu_patches()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(a.out, exist_ok=True)
    folder = os.path.join(a.out, "tiny_sd21")
    unet, vae, text = tiny_networks()
    content, fixed = single_file_recipe(unet, vae, text)
    single = fw.save_recipe(os.path.join(a.out, SINGLE), "safetensors", SEED_SD21, content, fixed)
    write_folder(single, unet, vae, text, folder)
    counts = {p: sum(k.startswith(p) for k in single) for p in ("model.", "first_stage_model.", "cond_stage_model.")}
    print(f"single file: {counts} tensors, converted to the diffusers folder by diffusers' LDM converters and back "
          "by ours", flush=True)
    write_weight_hashes(folder)
    pkl = os.path.join(a.out, PKL)
    ckpt, ratios = make_osediff_pkl(folder, pkl)
    print(f"osediff_tiny.pkl: unet {len(ckpt['state_dict_unet'])} tensors, vae {len(ckpt['state_dict_vae'])}, "
          f"modules {len(ckpt['unet_lora_encoder_modules'])}/{len(ckpt['unet_lora_decoder_modules'])}/"
          f"{len(ckpt['unet_lora_others_modules'])}, vae list {len(ckpt['vae_lora_encoder_modules'])} "
          f"({len(set(ckpt['vae_lora_encoder_modules']))} unique); |dW|/|W| {min(ratios):.2f}..{max(ratios):.2f}",
          flush=True)

    cwd = os.getcwd()
    os.chdir(a.upstream)
    import diffusers
    import my_utils.devices
    import my_utils.wavelet_color_fix as wcf
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from osediff import OSEDiff_test
    from torchvision import transforms
    os.chdir(cwd)
    my_utils.devices.device = torch.device("cpu")

    set_timesteps = diffusers.DDPMScheduler.set_timesteps
    diffusers.DDPMScheduler.set_timesteps = lambda self, n, device=None: set_timesteps(self, n, device="cpu")
    # the official .sample() has no generator; make it reproducible: the whole (1,4,h,w) noise from a CPU generator
    draw = {"mode": "mean", "seed": SEED}
    DiagonalGaussianDistribution.sample = lambda self, generator=None: (
        self.mean if draw["mode"] == "mean" else
        self.mean + self.std * torch.randn(self.mean.shape, generator=torch.Generator("cpu").manual_seed(draw["seed"]),
                                           dtype=torch.float32))
    # capture the float image right before the official colour fix quantises it (ToPILImage inside wcf)
    captured = {}
    real_to_pil = wcf.ToPILImage

    class RecordingToPIL(real_to_pil):
        def __call__(self, pic):
            captured["fixed"] = pic.detach().clone()
            return super().__call__(pic)

    wcf.ToPILImage = RecordingToPIL

    def build(lt, lo, et, dt, osediff_path=pkl):
        args = argparse.Namespace(pretrained_model_name_or_path=folder, osediff_path=osediff_path,
                                  mixed_precision="fp32", merge_and_unload_lora=False, vae_decoder_tiled_size=dt,
                                  vae_encoder_tiled_size=et, latent_tiled_size=lt, latent_tiled_overlap=lo)
        m = OSEDiff_test(args)
        step = m.noise_scheduler.step

        def recording_step(model_output, timestep, sample, **kw):
            res = step(model_output, timestep, sample, **kw)
            captured.update(eps=model_output.detach().clone(), z=sample.detach().clone(),
                            x0=res.prev_sample.detach().clone())
            return res

        m.noise_scheduler.step = recording_step
        return m

    models, listing, timings = {}, [], {}
    tok = None
    for name, (w, h), up, ps, sizing, mode, fix, (lt, lo), (et, dt) in CASES:
        t0 = time.time()
        key = (lt, lo, et, dt)
        if key not in models:
            models[key] = build(*key)
        model = models[key]
        if tok is None:
            tok = model.tokenizer(PROMPT, max_length=model.tokenizer.model_max_length, padding="max_length",
                                  truncation=True).input_ids
            TOKEN_IDS[:] = tok
            embeds = model.encode_prompt([PROMPT])
            save_file({"input_ids": torch.tensor(tok)[None], "prompt_embeds": embeds.contiguous()},
                      os.path.join(a.out, "prompt.safetensors"))
        draw.update(mode=mode, seed=SEED)
        src_name = f"in_{w}x{h}.png"
        src_path = os.path.join(a.out, src_name)
        if not os.path.exists(src_path):
            natural_image(w, h, seed=w * 100 + h).save(src_path)
        image = Image.open(src_path).convert("RGB")
        ow, oh = image.size
        captured.clear()
        extra = {}
        if sizing == "official":
            image = official_resize(image, ps, up)
            if squashed_by_lanczos(ow, oh, ps, up):
                image.save(os.path.join(a.out, f"{name}_lq.png"))
            lq = transforms.ToTensor()(image).unsqueeze(0)
            with torch.no_grad():
                decoded = model(lq * 2 - 1, prompt=PROMPT)
            out_pil = transforms.ToPILImage()(decoded[0].cpu() * 0.5 + 0.5)
            if fix == "adain":
                out_pil = wcf.adain_color_fix(target=out_pil, source=image)
            elif fix == "wavelet":
                out_pil = wcf.wavelet_color_fix(target=out_pil, source=image)
            out_float = captured["fixed"] if fix != "nofix" else (decoded[0] * 0.5 + 0.5)
            model_in = lq
        else:
            # our sizing: the official min-size raise, PIL bicubic x up, pad to /8, the official networks, crop
            # back, float colour fix and, when raised, a PIL bicubic (float) resize to exactly up x input
            raised = ow < ps // up or oh < ps // up
            if raised:
                scale = (ps // up) / min(ow, oh)
                image = image.resize((int(scale * ow), int(scale * oh)))
            image = image.resize((image.size[0] * up, image.size[1] * up), Image.BICUBIC)
            lq = transforms.ToTensor()(image).unsqueeze(0)
            model_in, pad_mode = exact_pad(lq)
            with torch.no_grad():
                decoded = model(model_in * 2 - 1, prompt=PROMPT)
            target = (decoded[..., :lq.shape[2], :lq.shape[3]] * 0.5 + 0.5).clamp(0, 1)
            if fix == "adain":
                target = wcf.adaptive_instance_normalization(target, lq)
            elif fix == "wavelet":
                target = wcf.wavelet_reconstruction(target, lq)
            out_float = target[0].clamp(0, 1)
            if raised:
                planes = [Image.fromarray(c.numpy(), "F").resize((ow * up, oh * up), Image.BICUBIC) for c in out_float]
                out_float = torch.stack([torch.from_numpy(np.asarray(pl).copy()) for pl in planes]).clamp(0, 1)
            out_pil = Image.fromarray((out_float.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            extra = {"pad_mode": pad_mode, "padded_size": [model_in.shape[3], model_in.shape[2]]}
        out_pil.save(os.path.join(a.out, f"{name}.png"))
        lat = captured["z"].shape[-2:]
        # kept small: the tests assert the PNG (official sizing) or out_float (exact sizing); eps/x0 for one case
        tensors = {"out_float": out_float[None].half()}
        if name == "a32_adain":
            tensors.update(eps=captured["eps"].half(), x0=captured["x0"].half())
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, os.path.join(a.out, f"{name}.safetensors"))
        vae_enc_tiled = max(model_in.shape[-2:]) > et + 2 * 32
        vae_dec_tiled = max(lat) > dt + 2 * 11
        listing.append(dict(
            name=name, input=src_name, input_size=[ow, oh], upscale=up, process_size=ps, sizing=sizing,
            sample_mode=mode, seed=SEED, color_fix=fix, tile_latent=lt, tile_overlap=lo, vae_tile_encode=et,
            vae_tile_decode=dt, prompt=PROMPT, output=f"{name}.png", tensors=f"{name}.safetensors",
            output_size=list(out_pil.size), model_input_size=[model_in.shape[3], model_in.shape[2]],
            latent_size=[lat[1], lat[0]], latent_tiled=lat[0] * lat[1] > lt * lt, vae_encoder_tiled=vae_enc_tiled,
            vae_decoder_tiled=vae_dec_tiled, **extra))
        clipped = (decoded.abs() >= 1).float().mean().item()
        timings[name] = time.time() - t0
        print(f"{name}: out {out_pil.size}, latent {tuple(lat)}, clipped {clipped:.1%}, {timings[name]:.1f}s", flush=True)

    # sanity: the LoRA must matter (all lora_B zeroed => plain SD networks + the new conv_in)
    zero = dict(ckpt, state_dict_unet={k: v * 0 if ".lora_B." in k else v for k, v in ckpt["state_dict_unet"].items()},
                state_dict_vae={k: v * 0 if ".lora_B." in k else v for k, v in ckpt["state_dict_vae"].items()})
    zero_pkl = os.path.join(a.out, "_zero_lora.pkl")
    torch.save(zero, zero_pkl)
    plain = build(*DEF[0], *DEF[1], osediff_path=zero_pkl)
    os.remove(zero_pkl)
    case = listing[0]
    image = official_resize(Image.open(os.path.join(a.out, case["input"])).convert("RGB"), case["process_size"],
                            case["upscale"])
    lq = transforms.ToTensor()(image).unsqueeze(0)
    draw.update(mode="mean")
    with torch.no_grad():
        out_plain = wcf.adain_color_fix(transforms.ToPILImage()(plain(lq * 2 - 1, prompt=PROMPT)[0] * 0.5 + 0.5), image)
    ref = transforms.ToTensor()(Image.open(os.path.join(a.out, case["output"])))
    lora_psnr = psnr(transforms.ToTensor()(out_plain), ref)
    print(f"sanity: {case['name']} with every lora_B zeroed vs with LoRA: PSNR {lora_psnr:.2f} dB", flush=True)
    png = lambda name: transforms.ToTensor()(Image.open(os.path.join(a.out, f"{name}.png")))
    tiled_db = [psnr(png(f"{size}_{tiled}"), png(f"{size}_untiled"))
                for size, tiled in (("e40x32", "latent_tiled"), ("f64x48", "vae_tiled"))]
    print(f"tiled vs untiled: e40x32 {tiled_db[0]:.2f} dB, f64x48 {tiled_db[1]:.2f} dB", flush=True)

    if not a.keep_tokenizer:  # identical to sr_common/configs/sd21_base/tokenizer; the tests copy it in
        shutil.rmtree(os.path.join(folder, "tokenizer"))
    with open(os.path.join(a.out, "cases.json"), "w") as f:
        json.dump({"upstream_commit": "fcc4f09", "prompt": PROMPT, "input_ids": tok, "seed": SEED,
                   "lora_zeroed_psnr_db": round(lora_psnr, 2), "cases": listing}, f, indent=1)
    write_readme(a.out, listing, lora_psnr, tiled_db, ckpt)
    print(f"done in {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
