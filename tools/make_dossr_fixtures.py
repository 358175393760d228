#!/usr/bin/env python
"""Generate DoSSR parity fixtures by running the *official* upstream inference
(AMD-AIG-AIMA/DoSSR, ``scripts/inference.py``) on a tiny random-weight model.

Run with the upstream venv (see tests/data/dossr/README.md):

    PYTHONPATH=/work/upstream/DoSSR /work/venvs/dossr-up/bin/python tools/make_dossr_fixtures.py \
        --upstream /work/upstream/DoSSR --out tests/data/dossr

This script contains no upstream code: it builds the upstream ``ControlLDM``
from a tiny yaml written here, writes the recipe of its random weights
(``dossr_tiny.ckpt.recipe.json`` and ``.fixed.safetensors``, tests/fixture_weights.py:
every weight drawn from numpy's frozen RandomState, the DDPM buffers stored) and
the checkpoint made from it, which the model must take strictly, then calls the
upstream ``main()`` of ``scripts/inference.py`` (via a patched ``sys.argv``) on
that checkpoint once per case while recording intermediate tensors through thin
wrappers around upstream methods and every ``torch.randn`` / ``torch.randn_like``
draw. The tests make the checkpoint again from the recipe at session start.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from upstream import require_on_pythonpath, tests_module

SEED = 42          # upstream default --seed
WEIGHT_SEED = 1234

TINY_YAML = """\
target: model.cldm.ControlLDM
params:
  linear_start: 0.00085
  linear_end: 0.0120
  num_timesteps_cond: 1
  log_every_t: 200
  timesteps: 1000
  first_stage_key: "jpg"
  cond_stage_key: "txt"
  control_key: "hint"
  image_size: 64
  channels: 4
  cond_stage_trainable: false
  conditioning_key: crossattn
  monitor: val/loss_simple_ema
  scale_factor: 0.18215
  use_ema: False
  sd_locked: True
  only_mid_control: False
  learning_rate: 1e-4

  control_stage_config:
    target: model.cldm.ControlNet
    params:
      use_checkpoint: True
      image_size: 32 # unused
      in_channels: 4
      hint_channels: 4
      model_channels: 64
      attention_resolutions: [ 4, 2, 1 ]
      num_res_blocks: 1
      channel_mult: [ 1, 1, 2, 2 ]
      num_head_channels: 16
      use_spatial_transformer: True
      use_linear_in_transformer: True
      transformer_depth: 1
      context_dim: 16
      legacy: False

  unet_config:
    target: model.cldm.ControlledUnetModel
    params:
      use_checkpoint: True
      image_size: 32 # unused
      in_channels: 4
      out_channels: 4
      model_channels: 64
      attention_resolutions: [ 4, 2, 1 ]
      num_res_blocks: 1
      channel_mult: [ 1, 1, 2, 2 ]
      num_head_channels: 16
      use_spatial_transformer: True
      use_linear_in_transformer: True
      transformer_depth: 1
      context_dim: 16
      legacy: False

  first_stage_config:
    target: ldm.models.autoencoder.AutoencoderKL
    params:
      embed_dim: 4
      monitor: val/rec_loss
      ddconfig:
        double_z: true
        z_channels: 4
        resolution: 256
        in_channels: 3
        out_ch: 3
        ch: 64
        ch_mult:
        - 1
        - 1
        - 2
        - 2
        num_res_blocks: 1
        attn_resolutions: []
        dropout: 0.0
      lossconfig:
        target: torch.nn.Identity

  # Tiny OpenCLIP text tower (width 16, 3 resblocks, 2 heads, ctx 77, vocab
  # 49408); the fixture script patches open_clip.create_model_and_transforms
  # so that the upstream FrozenOpenCLIPEmbedder builds it instead of ViT-H-14.
  cond_stage_config:
    target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
    params:
      freeze: True
      layer: "penultimate"

  preprocess_config:
    target: esrgan.RRDBNet_arch.RRDBNet
    params:
      num_in_ch: 3
      num_out_ch: 3
      num_feat: 8
      num_block: 2
      num_grow_ch: 4
      scale: 4
"""

TEXT_CFG = dict(context_length=77, vocab_size=49408, width=16, heads=2, layers=3)

# (name, lr image, steps, color_fix, sr_scale)
CASES = [
    ("n1_w32h16_wavelet", "lr_w32h16.png", 1, "wavelet", 4),
    ("n2_w16h32_wavelet", "lr_w16h32.png", 2, "wavelet", 4),
    ("n3_w32h16_wavelet", "lr_w32h16.png", 3, "wavelet", 4),
    ("n5_w32h32_wavelet", "lr_w32h32.png", 5, "wavelet", 4),
    ("n5_w16h32_adain", "lr_w16h32.png", 5, "adain", 4),
    ("n5_w32h16_none", "lr_w32h16.png", 5, "none", 4),
    ("n5_w16h32_wavelet_sr2", "lr_w16h32.png", 5, "wavelet", 2),
]


# ----------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------
def make_lr_image(w: int, h: int, seed: int) -> Image.Image:
    """Small 'natural-looking' scene: sky gradient, sun, hills, texture, noise."""
    rng = np.random.RandomState(seed)
    S = 8  # draw at 8x then downsample (anti-aliased like a real photo)
    W, H = w * S, h * S
    yy = np.linspace(0, 1, H)[:, None]
    sky = np.stack([
        90 + 100 * yy + 0 * np.zeros((1, W)),
        140 + 80 * yy + 0 * np.zeros((1, W)),
        230 - 40 * yy + 0 * np.zeros((1, W)),
    ], -1)
    img = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    cx, cy, r = rng.uniform(0.2, 0.8) * W, rng.uniform(0.1, 0.35) * H, 0.12 * min(W, H)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 220, 120))
    for k, col in enumerate([(70, 120, 60), (50, 95, 45), (110, 85, 55)]):
        base = H * (0.45 + 0.17 * k)
        xs = np.linspace(0, W, 24)
        ys = base + rng.uniform(-0.08, 0.08, 24).cumsum() * H * 0.5
        poly = [(0, H)] + list(zip(xs.tolist(), ys.tolist())) + [(W, H)]
        d.polygon(poly, fill=col)
    for _ in range(6):  # a few "trees"
        x, y = rng.uniform(0, W), rng.uniform(0.55, 0.95) * H
        rr = rng.uniform(0.03, 0.07) * min(W, H)
        d.ellipse([x - rr, y - 2 * rr, x + rr, y], fill=(30, 70 + int(rng.uniform(0, 40)), 30))
        d.rectangle([x - rr / 5, y, x + rr / 5, y + rr], fill=(80, 50, 30))
    img = img.filter(ImageFilter.GaussianBlur(S * 0.4)).resize((w, h), Image.BICUBIC)
    a = np.asarray(img).astype(np.float32) + rng.normal(0, 3.0, (h, w, 3))
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------
# environment patches (CPU, tiny OpenCLIP, torch API drift)
# ----------------------------------------------------------------------------
def install_patches():
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    def tiny_create_model_and_transforms(*args, **kwargs):
        # ignore arch / pretrained path; build a tiny text tower (visual is deleted upstream)
        m = CLIP(embed_dim=16,
                 vision_cfg=CLIPVisionCfg(layers=1, width=16, head_width=8, patch_size=16, image_size=32),
                 text_cfg=CLIPTextCfg(**TEXT_CFG))
        return m, None, None

    open_clip.create_model_and_transforms = tiny_create_model_and_transforms

    # ldm CheckpointFunction.forward calls torch.get_autocast_gpu_dtype (removed/deprecated in new torch)
    if not hasattr(torch, "get_autocast_gpu_dtype"):
        torch.get_autocast_gpu_dtype = lambda: torch.get_autocast_dtype("cuda")
    # Never touch CUDA.
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self


# ----------------------------------------------------------------------------
# random weights, as a recipe (tests/fixture_weights.py)
# ----------------------------------------------------------------------------
def weight_recipe(model: torch.nn.Module, fw):
    """The recipe content of the checkpoint, ``{"state_dict": ...}`` in the model's key order: every parameter drawn
    in float16 (``fw.normal``) with the mean and std of the rules below, so that every zero conv, ControlNet input
    conv, UNet ``out``, ``proj_out``, norm, embedding and ``text_projection`` is random and non-zero; OpenCLIP's unused
    ``logit_scale`` (float16) and the DDPM buffers (float32) as they are built, as ``fw.fixed`` tensors, each distinct
    one stored once. Returns (content, fixed tensors)."""
    drawn = {}  # parameter name -> (mean, std), either a number or one per output row

    for mname, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            w = mod.weight
            fan_in = w[0].numel()
            gain = 1.0
            if mname.startswith("preprocess_model."):
                gain = 1.2 if not mname.endswith("conv_last") else 1.0
            if ".zero_convs." in mname or "middle_block_out" in mname:
                gain = 1.0   # ControlNet residuals comparable to UNet activations
            if mname.endswith("decoder.conv_in"):
                gain = 0.25   # decoder sees z / 0.18215
            if mname.endswith("decoder.conv_out"):
                gain = 0.6
            std = gain / math.sqrt(fan_in)
            moments = mname.endswith("quant_conv") and "post_quant" not in mname
            # SD-like latent scale: mean channels x5, small logvar
            drawn[f"{mname}.weight"] = (0.0, [5.0 * std] * 4 + [0.5 * std] * (w.shape[0] - 4) if moments else std)
            if mod.bias is not None:
                if mname == "preprocess_model.conv_last":
                    drawn[f"{mname}.bias"] = (0.5, 0.05)
                elif moments:
                    drawn[f"{mname}.bias"] = ([0.0] * 4 + [-2.0] * (w.shape[0] - 4), 0.02)
                else:
                    drawn[f"{mname}.bias"] = (0.0, 0.02)
        elif isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if mod.weight is not None:
                drawn[f"{mname}.weight"] = (1.0, 0.1)
                drawn[f"{mname}.bias"] = (0.0, 0.05)
        elif isinstance(mod, torch.nn.MultiheadAttention):
            drawn[f"{mname}.in_proj_weight"] = (0.0, 1.0 / math.sqrt(mod.embed_dim))
            drawn[f"{mname}.in_proj_bias"] = (0.0, 0.02)
        elif isinstance(mod, torch.nn.Embedding):
            drawn[f"{mname}.weight"] = (0.0, 0.5)
    for pname, _ in model.named_parameters():
        if pname in drawn:
            continue
        if pname.endswith("positional_embedding"):
            drawn[pname] = (0.0, 0.2)
        elif pname.endswith("text_projection"):
            drawn[pname] = (0.0, 0.25)
        elif not pname.endswith("logit_scale"):
            raise RuntimeError(f"parameter not randomised: {pname}")

    parameters = dict(model.named_parameters())
    state, fixed = {}, {}
    for k, v in model.state_dict().items():
        if k in drawn:
            state[k] = fw.normal("float16", v.shape, *drawn[k])
            continue
        state[k] = fw.fixed_once(fixed, k, v.detach().to(torch.float16 if k in parameters else torch.float32)
                                 .contiguous())
    return {"state_dict": state}, fixed


# ----------------------------------------------------------------------------
# recording wrappers around upstream methods
# ----------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.active = False
        self.draws = []        # (fn, shape, tensor)
        self.rec = {}
        self.steps_in = []     # state fed to the network at each step
        self.eps = []
        self.cnt = {}


R = Recorder()


def install_recorders():
    import model.cldm as cldm
    import model.shift_sampler as ss
    from ldm.models.diffusion import ddpm

    orig_randn, orig_randn_like = torch.randn, torch.randn_like

    def randn(*a, **k):
        out = orig_randn(*a, **k)
        if R.active:
            R.draws.append(("torch.randn", tuple(out.shape), out.detach().clone()))
        return out

    def randn_like(*a, **k):
        out = orig_randn_like(*a, **k)
        if R.active:
            R.draws.append(("torch.randn_like", tuple(out.shape), out.detach().clone()))
        return out

    torch.randn, torch.randn_like = randn, randn_like

    def first(key, val):
        R.cnt[key] = R.cnt.get(key, 0) + 1
        if key not in R.rec:
            R.rec[key] = val.detach().clone()

    o_ace = cldm.ControlLDM.apply_condition_encoder

    def ace(self, control):
        out = o_ace(self, control)
        first("c_latent", out)
        return out
    cldm.ControlLDM.apply_condition_encoder = ace

    o_glc = ddpm.LatentDiffusion.get_learned_conditioning

    def glc(self, c):
        out = o_glc(self, c)
        R.cnt["glc"] = R.cnt.get("glc", 0) + 1
        R.rec.setdefault("prompts", []).append(list(c))
        if R.cnt["glc"] == 1:
            R.rec["context"] = out.detach().clone()
        else:
            R.rec["context_negative"] = out.detach().clone()
        return out
    ddpm.LatentDiffusion.get_learned_conditioning = glc

    o_gfse = ddpm.LatentDiffusion.get_first_stage_encoding

    def gfse(self, enc):
        R.rec["posterior_mean"] = enc.mean.detach().clone()
        R.rec["posterior_logvar"] = enc.logvar.detach().clone()
        out = o_gfse(self, enc)
        first("x_hat0", out)
        return out
    ddpm.LatentDiffusion.get_first_stage_encoding = gfse

    o_dfs = ddpm.LatentDiffusion.decode_first_stage

    def dfs(self, z, *a, **k):
        R.rec["x_final"] = z.detach().clone()
        out = o_dfs(self, z, *a, **k)
        R.rec["decoded"] = ((out + 1) / 2).detach().clone()
        return out
    ddpm.LatentDiffusion.decode_first_stage = dfs

    o_pn = ss.SpacedSampler.predict_noise

    def pn(self, x, t, cond, cfg_scale, uncond):
        R.steps_in.append((int(t[0]), x.detach().clone()))
        out = o_pn(self, x, t, cond, cfg_scale, uncond)
        R.eps.append(out.detach().clone())
        return out
    ss.SpacedSampler.predict_noise = pn

    o_s3 = ss.SpacedSampler.shift_sample_3_order

    def s3(self, steps, shape, cond_img, *a, **k):
        R.rec["start"] = cond_img.detach().clone()
        R.rec["x_T_arg_is_start"] = bool(k.get("x_T") is cond_img)
        R.active = True
        try:
            out = o_s3(self, steps, shape, cond_img, *a, **k)
        finally:
            R.active = False
        R.rec["out_float"] = out.detach().clone()
        R.rec["sched"] = dict(timesteps=self.timesteps.copy(), alphas_cumprod=self.alphas_cumprod.copy(),
                              etas=self.etas.copy(), a=self.alphas_multi_one_minus_etas.copy(),
                              lambdas=self.lambdas.copy(), sigmas=self.sigmas.copy(),
                              sqrt_alphas_cumprod=self.sqrt_alphas_cumprod.copy())
        return out
    ss.SpacedSampler.shift_sample_3_order = s3


def run_official(inference, ckpt, cfg, lr_path, steps, color_fix, sr_scale, workdir):
    """Call upstream scripts/inference.py main() for a single LR image."""
    R.__init__()
    indir = os.path.join(workdir, "in")
    outdir = os.path.join(workdir, "out")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(indir)
    shutil.copy(lr_path, os.path.join(indir, "lr.png"))
    argv = sys.argv
    sys.argv = ["inference.py", "--ckpt", ckpt, "--config", cfg, "--input", indir,
                "--steps", str(steps), "--sr_scale", str(sr_scale), "--color_fix_type", color_fix,
                "--output", outdir, "--device", "cpu", "--seed", str(SEED)]
    try:
        inference.main()
    finally:
        sys.argv = argv
    return os.path.join(outdir, "lr_0.png")


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.time()
    up = require_on_pythonpath(args.upstream)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    os.chdir(up)

    install_patches()
    inference = importlib.import_module("scripts.inference") if os.path.exists(
        os.path.join(up, "scripts", "__init__.py")) else None
    if inference is None:
        spec = importlib.util.spec_from_file_location("dossr_inference", os.path.join(up, "scripts", "inference.py"))
        inference = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(inference)
    install_recorders()
    import open_clip
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from utils.common import instantiate_from_config

    commit = subprocess.run(["git", "-C", up, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

    # 1. config
    cfg_path = os.path.join(out, "tiny_cldm.yaml")
    with open(cfg_path, "w") as f:
        f.write(TINY_YAML)

    # 2. model + random weights: the recipe written (dossr_tiny.ckpt.recipe.json + .fixed.safetensors), the
    # checkpoint made from it, which the upstream then loads, and the model checked to take it strictly
    model = instantiate_from_config(OmegaConf.load(cfg_path))
    fw = tests_module("fixture_weights")
    content, fixed = weight_recipe(model, fw)
    ckpt_path = os.path.join(out, "dossr_tiny.ckpt")
    sd = fw.save_recipe(ckpt_path, "torch", WEIGHT_SEED, content, fixed)["state_dict"]
    model.load_state_dict(sd, strict=True)
    nparams = {p: sum(v.numel() for k, v in sd.items() if k.startswith(p)) for p in
               ["model.diffusion_model.", "control_model.", "first_stage_model.", "cond_encoder.",
                "cond_stage_model.model.", "preprocess_model."]}
    print("params:", nparams, "ckpt bytes:", os.path.getsize(ckpt_path))

    # zero-ControlNet-output ckpt for the sanity check
    tmp = tempfile.mkdtemp(prefix="dossr_fix_")
    sd0 = {k: (torch.zeros_like(v) if (k.startswith("control_model.zero_convs.") or
                                       k.startswith("control_model.middle_block_out.")) else v)
           for k, v in sd.items()}
    ckpt0 = os.path.join(tmp, "zero_control.ckpt")
    torch.save({"state_dict": sd0}, ckpt0)

    # inputs
    lr_specs = {"lr_w32h16.png": (32, 16, 1), "lr_w16h32.png": (16, 32, 2), "lr_w32h32.png": (32, 32, 3)}
    for name, (w, h, s) in lr_specs.items():
        make_lr_image(w, h, s).save(os.path.join(out, name))

    prompt = "clean, high-resolution, 8k"
    tokens = open_clip.tokenize([prompt])
    tokens_neg = open_clip.tokenize([""])

    cases_json = []
    sanity = []
    sched_saved = False
    for name, lr_name, steps, cfix, sr in CASES:
        tc = time.time()
        png = run_official(inference, ckpt_path, cfg_path, os.path.join(out, lr_name), steps, cfix, sr,
                           os.path.join(tmp, name))
        rec, draws = R.rec, R.draws
        # ---- checks on what we observed
        assert len(draws) == steps + 2, [d[:2] for d in draws]
        assert draws[0][0] == "torch.randn" and all(d[0] == "torch.randn_like" for d in draws[1:])
        assert len(R.steps_in) == steps and rec["x_T_arg_is_start"]
        assert R.cnt["c_latent"] == 2 and R.cnt["glc"] == 2
        assert rec["prompts"] == [[prompt], [""]]
        tensors = {
            "noise_posterior": draws[0][2], "noise_init": draws[1][2],
            "start": rec["start"], "x_hat0": rec["x_hat0"], "c_latent": rec["c_latent"],
            "posterior_mean": rec["posterior_mean"], "posterior_logvar": rec["posterior_logvar"],
            "context": rec["context"],
            "decoded": rec["decoded"], "out_float": rec["out_float"],
            "timesteps_called": torch.tensor([t for t, _ in R.steps_in], dtype=torch.int64),
        }
        for k in range(steps):
            tensors[f"noise_step_{k}"] = draws[2 + k][2]
            tensors[f"eps_{k}"] = R.eps[k]
        # x_in: state fed to the network at step k (x_in[0] = initial x_T);
        # x_steps[k]: state after step k (x_steps[-1] = final state that gets decoded)
        tensors["x_in"] = torch.stack([x for _, x in R.steps_in], 0)
        tensors["x_steps"] = torch.stack([x for _, x in R.steps_in[1:]] + [rec["x_final"]], 0)
        tensors = {k: v.contiguous().float() if v.is_floating_point() else v.contiguous()
                   for k, v in tensors.items()}
        sf = f"{name}.safetensors"
        save_file(tensors, os.path.join(out, sf), metadata={"case": name, "upstream_commit": commit})
        out_png = f"{name}_official.png"
        shutil.copy(png, os.path.join(out, out_png))
        if not sched_saved and steps == 5:
            s = rec["sched"]
            save_file({k: torch.from_numpy(np.asarray(v, dtype=np.float64 if k != "timesteps" else np.int64))
                       for k, v in s.items()}, os.path.join(out, "schedule_N5.safetensors"))
            sched_saved = True
        lr_img = Image.open(os.path.join(out, lr_name))
        o_img = Image.open(png)
        entry = dict(name=name, input=lr_name, input_size_wh=list(lr_img.size), steps=steps,
                     color_fix_type=cfix, sr_scale=sr, seed=SEED, prompt=prompt, negative_prompt="",
                     cfg_scale=1.0, strength=1.0,
                     latent_shape=list(rec["x_hat0"].shape), start_shape=list(rec["start"].shape),
                     output_size_wh=list(o_img.size), tensors=sf, output_png=out_png,
                     timesteps_called=[t for t, _ in R.steps_in],
                     draw_order=["noise_posterior (torch.randn, DiagonalGaussianDistribution.sample)",
                                 "noise_init (torch.randn_like, x_T)"] +
                                [f"noise_step_{k} (torch.randn_like, step {k}: tau {R.steps_in[k][0]} -> next)"
                                 for k in range(steps)])
        # sanity: zero ControlNet outputs
        if name in ("n5_w32h32_wavelet", "n1_w32h16_wavelet", "n5_w32h16_none"):
            png0 = run_official(inference, ckpt0, cfg_path, os.path.join(out, lr_name), steps, cfix, sr,
                                os.path.join(tmp, name + "_zc"))
            p = psnr(Image.open(png), Image.open(png0))
            diff = float((R.rec["out_float"] - rec["out_float"]).abs().mean())
            entry["psnr_vs_zero_controlnet_db"] = round(p, 2)
            sanity.append((name, p, diff))
        # self-reproducibility
        cases_json.append(entry)
        print(f"[{name}] {time.time() - tc:.1f}s out {o_img.size}")

    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(dict(upstream="AMD-AIG-AIMA/DoSSR", upstream_commit=commit, config="tiny_cldm.yaml",
                       ckpt="dossr_tiny.ckpt", weight_seed=WEIGHT_SEED,
                       text_model=dict(TEXT_CFG, layer="penultimate", embed_dim=16),
                       prompt_tokens=tokens[0].tolist(), negative_prompt_tokens=tokens_neg[0].tolist(),
                       params=nparams, cases=cases_json, torch=torch.__version__,
                       open_clip=importlib.metadata.version("open_clip_torch")), f, indent=1)
    for n, p, d in sanity:
        print(f"sanity {n}: PSNR(official, zero-controlnet) = {p:.2f} dB, mean|d out_float| = {d:.4f}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
