"""Make the DAPE parity fixtures with the official OSEDiff ``ram`` package (tiny random model).

Run in the upstream environment (torch 2.14.1, torchvision 0.29.1, transformers 4.28.1,
timm 0.6.13, loralib 0.1.2, scipy), not in the pack's:

    PYTHONPATH=/work/upstream/OSEDiff python tools/make_dape_fixtures.py --upstream /work/upstream/OSEDiff \
        --out tests/data/dape

What it does:
- Builds the official ``RAMLora`` (``ram.models.ram_lora.ram(..., image_size=384, vit='swin_l')``)
  with tiny configs, patched in without touching the official code: Swin embed 8, depths
  2/2/2/2, heads 1/2/2/4, window 12, 384 px; Q2L head hidden 16, 2 layers, 4 heads (as the
  official), FFN 32; the same for the unused tag_encoder/text_decoder BERTs; a fake tokenizer of
  64 entries (the official one is a private local path). The hard-coded label width 512 is made
  24 (``encoder_width``, ``label_embed``, ``image_proj``, ``wordvec_proj``) to keep the files small.
  The real 4585 tags and thresholds are used.
- Writes both checkpoints as recipes (tests/fixture_weights.py; the tests make the files from them at the start of
  a session): ``ram_tiny.pth`` ({'model': state_dict} without LoRA tensors, as the real RAM file) and
  ``dape_tiny.pth`` (flat dict of every ``lora_A``/``lora_B``, as the real DAPE.pth), in the model's state-dict
  order. Every parameter is drawn ``normal(dtype, shape, mean, std)`` (``draw``): LoRA A std 1/sqrt(fan-in), LoRA
  B std 1 (all non-zero, including the tag_encoder/text_decoder LoRAs that the tagging path must ignore or, for the
  tag_encoder layers tied to the head, merge), relative position bias tables 0.5, ``label_embed`` 1, norm weights
  1 ± 0.2, other biases 0.1, other weights 1/sqrt(fan-in). A tied weight (the head's, shared with the tag_encoder;
  the text decoder's output layer) is drawn once, under its first name, and is ``same`` under the others; the
  buffers the RAM file keeps (``relative_position_index``, ``attn_mask``, ``position_ids``) are ``fixed``, each
  distinct one stored once in ``ram_tiny.pth.fixed.safetensors``.
- ``fc.bias`` is shifted once, by the mean of its recipe, so that a handful of tags pass the shipped thresholds,
  picked on a probe: the official model with the tensors made from the recipes loaded strictly (its own values
  for the buffers the RAM file leaves out), ``.eval()``. The shift is rounded to a 1e-3 grid (``fc_bias_shift``),
  so that the probe's machine-dependent last bits do not reach the recipe.
- Loads both files with the official ``ram()`` loader, calls ``.eval()`` (loralib merge), and runs the
  official ``inference_ram`` per image on the OSEDiff DAPE transform
  (``Resize((384, 384), antialias=False)`` as torchvision 0.15 did, ``Normalize``), recording the
  ``fc`` output (logits) with a forward hook and the tag strings.
"""

import argparse
import json
import math
import os
import subprocess
import types

import numpy as np
import torch

from upstream import require_on_pythonpath, tests_module

LABEL_DIM = 24
SWIN = {"vision_width": 64, "image_res": 384, "window_size": 12, "embed_dim": 8, "depths": [2, 2, 2, 2],
        "num_heads": [1, 2, 2, 4]}
BERT = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 32,
        "vocab_size": 64, "max_position_embeddings": 16}
IMAGE_SIZES = [(24, 32), (32, 32), (28, 40), (48, 16)]  # (H, W) before ×4
UPSCALE = 4
SHIFT_GRID = 1e-3  # fc.bias's shift is rounded to this grid (fc_bias_shift)
BOUNDARY_GUARD = 1e-5  # how close to a rounding boundary of that grid the unrounded shift may lie
fw = tests_module("fixture_weights")


def patch_upstream(upstream):
    require_on_pythonpath(upstream)
    from ram.models import ram_lora, utils

    class TinyBertConfig(ram_lora.BertConfig):
        encoder_width = property(lambda self: LABEL_DIM, lambda self, value: None)

        @classmethod
        def from_json_file(cls, path):
            cfg = super(TinyBertConfig, cls).from_json_file(path)
            for k, v in BERT.items():
                setattr(cfg, k, v)
            if "med_config" in os.fspath(path):
                cfg.num_hidden_layers = 3  # tag_encoder deeper than the head: layer 2 must be ignored
            return cfg

    real_read_json = utils.read_json

    def read_json(path):
        if "configs/swin/" in os.fspath(path):
            return dict(SWIN)
        return real_read_json(path)

    class FakeTokenizer:
        def __len__(self):
            return BERT["vocab_size"]

        def __call__(self, text):
            return types.SimpleNamespace(input_ids=[1] * (len(text.split()) + 2))

    ram_lora.BertConfig = TinyBertConfig
    ram_lora.read_json = utils.read_json = read_json
    ram_lora.init_tokenizer = utils.init_tokenizer = lambda: FakeTokenizer()
    return ram_lora


def shrink_label_width(model):
    width = model.image_proj.in_features
    model.image_proj = torch.nn.Linear(width, LABEL_DIM)
    model.wordvec_proj = torch.nn.Linear(LABEL_DIM, model.wordvec_proj.out_features)


def draw(name, p):
    """The recipe entry of parameter ``name``."""
    dtype, shape = str(p.dtype).removeprefix("torch."), p.shape
    if name.endswith("lora_A"):
        return fw.normal(dtype, shape, 0, 1 / math.sqrt(shape[1]))
    if name.endswith("lora_B"):
        return fw.normal(dtype, shape, 0, 1)
    if "relative_position_bias_table" in name:
        return fw.normal(dtype, shape, 0, 0.5)
    if name == "label_embed":
        return fw.normal(dtype, shape, 0, 1)
    if p.dim() == 1 and "norm" in name.lower() and name.endswith("weight"):
        return fw.normal(dtype, shape, 1, 0.2)
    if p.dim() == 1:
        return fw.normal(dtype, shape, 0, 0.1)
    return fw.normal(dtype, shape, 0, 1 / math.sqrt(p[0].numel()))


def recipes(model):
    """The contents of ``ram_tiny.pth`` and ``dape_tiny.pth`` for ``model``'s state dict, and the fixed tensors of
    the first. A tied parameter is drawn under its first name, the later ones are ``same``; equal buffers are one
    fixed tensor, named by the first of them."""
    params = dict(model.named_parameters(remove_duplicate=False))
    first_name, fixed, ram, lora = {}, {}, {}, {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            lora[key] = draw(key, params[key])
        elif key in params:
            first = first_name.setdefault(id(params[key]), key)
            ram[key] = draw(key, params[key]) if first == key else fw.same(f"model/{first}")
        # The real file also holds the Swin buffers the official loader drops (relative_position_index,
        # attn_mask); keep only some of them here, for size (stage 0 masks alone are 5 MB).
        elif not (("attn_mask" in key and ".layers.2." not in key)
                  or ("relative_position_index" in key and ".layers.3." not in key)):
            ram[key] = fw.fixed_once(fixed, key, value)
    return {"model": ram}, lora, fixed


def fc_bias_shift(kth):
    """``SHIFT_GRID · round((kth - 1e-3) / SHIFT_GRID)``: the median image's k-th tag (logit margin ``kth`` on the
    probe) then sits 0.5e-3 to 1.5e-3 above its threshold. Rounded so that the recipe does not depend on the machine:
    the probe's logits move by up to ~1e-6 with the kernels (1.3e-6 seen), far less than the grid; ``kth - 1e-3``
    within BOUNDARY_GUARD of a rounding boundary (where that noise could pick the other grid value) is refused."""
    shift = round((kth - 1e-3) / SHIFT_GRID) * SHIFT_GRID
    to_boundary = SHIFT_GRID / 2 - abs(kth - 1e-3 - shift)
    if to_boundary < BOUNDARY_GUARD:
        raise SystemExit(f"fc.bias shift {kth - 1e-3!r} lies {to_boundary:.1e} from a rounding boundary of the "
                         f"{SHIFT_GRID} grid: the recipe could differ between machines (try another --seed)")
    return round(shift, 6)


def make_inputs(seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    smalls, ups = [], []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        if i == 0:
            a = rng.integers(0, 256, (h, w, 3))
        elif i == 1:
            a = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 128 / (h + w)], -1)
        elif i == 2:
            a = (((xx // 4 + yy // 4) % 2) * 200 + 30)[..., None].repeat(3, -1) * np.array([1.0, 0.6, 0.3])
        else:
            a = np.stack([128 + 100 * np.sin(xx / 3.0), 128 + 100 * np.cos(yy / 2.0), 60 + 0 * xx], -1)
        small = np.clip(a, 0, 255).astype(np.uint8)
        up = Image.fromarray(small).resize((w * UPSCALE, h * UPSCALE), Image.BICUBIC)
        smalls.append(small)
        ups.append(np.asarray(up).copy())
    return smalls, ups


def run_official(model, ups):
    from ram import inference_ram
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize((384, 384), antialias=False),
                             transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    captured = []
    hook = model.fc.register_forward_hook(lambda m, i, o: captured.append(o.squeeze(-1).detach().clone()))
    tags = []
    for up in ups:
        lq = transforms.ToTensor()(up).unsqueeze(0)  # as test_osediff: ToTensor(PIL) → [0, 1]
        tags.append(inference_ram(tf(lq), model)[0])
    hook.remove()
    return torch.cat(captured), tags


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tags-per-image", type=int, default=6)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ram_lora = patch_upstream(args.upstream)

    probe = ram_lora.RAMLora(image_size=384, vit="swin_l")
    shrink_label_width(probe)
    ram_content, lora_content, fixed = recipes(probe)
    smalls, ups = make_inputs(args.seed)

    # pick fc.bias so that about --tags-per-image tags pass per image (on the probe, merged by eval())
    ram_sd = fw.build_tree(ram_content, args.seed, fixed)["model"]
    lora_sd = fw.build_tree(lora_content, args.seed, {})
    left_out = {k: v for k, v in probe.state_dict().items() if k not in ram_sd and k not in lora_sd}
    assert all("attn_mask" in k or "relative_position_index" in k for k in left_out), list(left_out)
    probe.load_state_dict({**ram_sd, **lora_sd, **left_out}, strict=True)
    probe.eval()
    logits, _ = run_official(probe, ups)
    margin = logits - torch.logit(probe.class_threshold)
    kth = margin.topk(args.tags_per_image, dim=1).values[:, -1].median().item()
    shift = fc_bias_shift(kth)
    print(f"k-th margin (median image): {kth!r}, fc.bias shift: {shift!r}")
    dtype, shape, mean, std = ram_content["model"]["fc.bias"]["__normal__"]
    ram_content["model"]["fc.bias"] = fw.normal(dtype, shape, mean - shift, std)

    ram_file, dape_file = os.path.join(args.out, "ram_tiny.pth"), os.path.join(args.out, "dape_tiny.pth")
    fw.save_recipe(ram_file, "torch", args.seed, ram_content, fixed)
    fw.save_recipe(dape_file, "torch", args.seed, lora_content)

    # the official path: construct, load both files, eval() (merge), generate_tag
    official = ram_lora.RAMLora(image_size=384, vit="swin_l")
    shrink_label_width(official)
    ram_lora.load_checkpoint_swinlarge(official, ram_file, {"image_size": 384, "vit": "swin_l"})
    official.load_state_dict(torch.load(dape_file, weights_only=True), strict=False)
    official.eval()
    logits, tags = run_official(official, ups)
    thr = official.class_threshold
    probs = torch.sigmoid(logits)
    closest = (probs - thr).abs().min().item()
    counts = [len(t.split(", ")) if t else 0 for t in tags]
    print("tags per image:", counts)
    for t in tags:
        print("  ", t)
    print("closest |p - thr|:", closest)

    arrays = {f"small_{i}": s for i, s in enumerate(smalls)}
    arrays.update({f"up_{i}": u for i, u in enumerate(ups)})
    arrays["logits"] = logits.numpy().astype(np.float32)
    np.savez_compressed(os.path.join(args.out, "dape_fixture.npz"), **arrays)
    commit = subprocess.run(["git", "-C", args.upstream, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    import loralib
    import torchvision
    import transformers

    meta = {"tags": tags, "upscale": UPSCALE, "image_sizes_hw": IMAGE_SIZES, "closest_prob_to_threshold": closest,
            "upstream_commit": commit, "seed": args.seed, "swin": SWIN, "bert": BERT, "label_dim": LABEL_DIM,
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                         "transformers": transformers.__version__, "loralib": getattr(loralib, "__version__", "0.1.2")}}
    with open(os.path.join(args.out, "dape_fixture.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
