"""Random-weight models of the real sizes for running the example workflows in the real ComfyUI (never published).

Given a full SD 2.1-base single file (the harness's ``make_tiny_sd2.py --vae kl --clip full --channel-mult 1,2,4,4
--res-blocks 2 --attn-levels 0,1,2 --middle attn``, which Load Checkpoint detects as SD2), writes into a ComfyUI
``models`` folder, under the official names the workflows use:

- ``osediff/osediff.pkl``: a random OSEDiff LoRA checkpoint in the official layout for that base
  (tests/fixture_weights.py's ``random_osediff_checkpoint``: every LoRA B non-zero);
- ``dossr/dossr_default.safetensors``: the random DoSSR parts of ``bench_dossr.random_dossr`` (full-size ControlNet,
  condition encoder, 23-block RRDB) in the ``diffsr convert dossr`` layout;
  the DoSSR workflows name ``dossr_default.ckpt``: point them at this file for the run;
- ``dape/ram_swin_large_14m.pth`` and ``dape/DAPE.pth``: the tiny DAPE test files (made from their recipes first
  where missing, as a test session makes them: ``copy_tiny_dape``).

    python bench/make_host_models.py --base MODELS/checkpoints/v2-1_512-ema-pruned.safetensors --models MODELS
"""

import argparse
import os
import shutil

import torch

from bench_dossr import random_dossr
from common import ROOT, fixture_weights

DATA = os.path.join(ROOT, "tests", "data")


def dossr_parts(model):
    """``model``'s DoSSR parts (ControlNet, condition encoder, RRDB) with the shipped SD 2.1 configs."""
    from comfyui_diffsr.dossr_core.weights import DoSSRParts, load_ldm_configs

    _, controlnet_config, vae_config = load_ldm_configs()
    return DoSSRParts(model.controlnet.state_dict(), model.cond_encoder.state_dict(), model.rrdb.state_dict(),
                      controlnet_config, vae_config)


def copy_tiny_dape(models):
    """tests/data/dape's ram_tiny.pth and dape_tiny.pth into ``models``/dape under the official names, each made
    first from its recipe by tests/fixture_weights.py where missing (or differing), as at the start of a test
    session."""
    make_checkpoint = fixture_weights().make_checkpoint
    for source, name in (("ram_tiny.pth", "ram_swin_large_14m.pth"), ("dape_tiny.pth", "DAPE.pth")):
        source = os.path.join(DATA, "dape", source)
        make_checkpoint(source + ".recipe.json")
        shutil.copy(source, os.path.join(models, "dape", name))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="full SD 2.1-base single file")
    parser.add_argument("--models", required=True, help="ComfyUI models folder to fill")
    args = parser.parse_args()
    from comfyui_diffsr.dossr_core.weights import write_converted
    from comfyui_diffsr.sr_common.sd21 import load_sd21

    sd21 = load_sd21(args.base)
    for folder in ("osediff", "dossr", "dape"):
        os.makedirs(os.path.join(args.models, folder), exist_ok=True)
    torch.save(fixture_weights().random_osediff_checkpoint(sd21.unet, sd21.vae),
               os.path.join(args.models, "osediff", "osediff.pkl"))
    del sd21
    write_converted(dossr_parts(random_dossr()[0]), os.path.join(args.models, "dossr", "dossr_default.safetensors"),
                    source="random")
    copy_tiny_dape(args.models)
    print(f"wrote {args.models}/osediff/osediff.pkl, dossr/dossr_default.safetensors, dape/")


if __name__ == "__main__":
    main()
