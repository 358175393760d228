"""Interop numbers against the real ComfyUI: its Load Checkpoint objects vs our own SD 2.1-base loading.

Runs in the ComfyUI venv with a ComfyUI checkout (never committed) on PYTHONPATH, on a full SD 2.1-base single file
and an OSEDiff weight file:

    PYTHONPATH=$COMFYUI_DIR $COMFY_VENV/bin/python bench/host_interop.py \
        --ckpt v2-1_512-ema-pruned.safetensors --osediff osediff.pkl [--out interop.json]

Measures (CPU, fp32):
1. "SD 2.1-base from Load Checkpoint" (state_dict_for_saving of ComfyUI's MODEL/CLIP/VAE) vs our file loader:
   the number of differing tensors (0 expected).
2. CONDITIONING of the standard CLIP Text Encode vs our CLIP encoding: max |Δ| per prompt; and the OSEDiff x0
   latent from each (PSNR of the decoded images).
3. Our OSEDiff LATENT through ComfyUI's VAE.decode (the standard VAE Decode) vs our decoder: PSNR.
"""

import argparse
import importlib
import json

from common import import_pack_as_comfyui, psnr_db


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--osediff", required=True)
    parser.add_argument("--size", type=int, default=32, help="LR image side (×4 output)")
    parser.add_argument("--out")
    args = parser.parse_args()

    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import torch
    import comfy.sd

    pack = import_pack_as_comfyui().__name__
    host, sd21_mod, pipeline, weights = (importlib.import_module(f"{pack}.{name}") for name in (
        "nodes.host", "sr_common.sd21", "osediff_core.pipeline", "osediff_core.weights"))

    import gc

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(args.ckpt, output_vae=True, output_clip=True)[:3]
    shared = host.sd21_from_comfy(model, clip, vae)
    del model  # keep the peak memory down: one SD 2.1 copy at a time besides ComfyUI's CLIP and VAE
    gc.collect()
    ours = sd21_mod.load_sd21(args.ckpt)
    differing = []
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours, name).state_dict(), getattr(shared, name).state_dict()
        differing += [f"{name}.{k}" for k in a if k not in b or not torch.equal(a[k], b[k])]
    del ours, a, b
    gc.collect()
    result = {"load_checkpoint_vs_file": {"differing_tensors": len(differing), "examples": differing[:5]}}

    osediff = pipeline.build_osediff(shared, weights.read_osediff(args.osediff), consume=True)
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    lq, _ = pipeline.preprocess(image, upscale=4, process_size=4 * args.size)
    with torch.no_grad():
        z = pipeline.encode_lq(osediff.lq_encoder, lq, tile=0)
        conditioning = {}
        for prompt in ("", "a photo of a cat", "clean, high-resolution, 8k, sharp"):
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))[0][0].float()
            own = sd21_mod.encode_prompt(osediff.text_encoder, osediff.tokenizer, [prompt]).float()
            x0_comfy = pipeline.one_step_x0(z, pipeline.predict_eps(osediff.unet, z, cond, tile=0))
            x0_ours = pipeline.one_step_x0(z, pipeline.predict_eps(osediff.unet, z, own, tile=0))
            img_comfy = pipeline.decode_latent(osediff.vae, x0_comfy, tile=0) * 0.5 + 0.5
            img_ours = pipeline.decode_latent(osediff.vae, x0_ours, tile=0) * 0.5 + 0.5
            conditioning[prompt or "(empty)"] = {"max_abs_diff": float((cond - own).abs().max()),
                                                 "osediff_output_psnr_db": psnr_db(img_comfy.clamp(0, 1),
                                                                                img_ours.clamp(0, 1))}
        result["clip_text_encode_vs_ours"] = conditioning
        latent = x0_ours / sd21_mod.SCALING_FACTOR  # the LATENT our One-Step UNet node outputs
        standard = vae.decode(latent).movedim(-1, 1)  # the standard VAE Decode node: IMAGE [B, H, W, C]
        own = (pipeline.decode_latent(osediff.vae, x0_ours, tile=0) * 0.5 + 0.5).clamp(0, 1)
        result["standard_vae_decode_vs_ours_psnr_db"] = psnr_db(standard, own)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
