"""DoSSR nodes: loader and upscaler (RRDB ×4 → ControlNet-guided domain-shift SDE → VAE decode)."""


import torch
from comfy_api.latest import io

from ..dossr_core.model import DEFAULT_PROMPT, load_dossr
from ..dossr_core.pipeline import (PIXEL_MULTIPLE, Options, decode, dossr_sample, dossr_upscale, fixed_and_resized,
                                   text_context)
from ..sr_common.color_fix import COLOR_FIXES
from ..sr_common.image import MAX_UPSCALE, MIN_UPSCALE, check_upscale
from ..sr_common.sd21 import SCALING_FACTOR
from ..sr_common.tiling import overlap_within
from . import host
from .osediff import CATEGORY, DECODER_PRECISION, SD21, dtype_input, tile_inputs

DOSSR = io.Custom("DOSSR_MODEL")
DEFAULT_CONFIG = "SD 2.1 (built in)"
SAMPLED = "diffsr_dossr_sampled"  # LATENT key: the DoSSR Sampler's latent as it made it (beside host.ENCODED_SIZE)


class DoSSRLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DoSSR_Loader", display_name="Load DoSSR", category=CATEGORY,
            description="DoSSR ControlNet, condition encoder and RRDB (official .ckpt or converted .safetensors).",
            inputs=[io.Combo.Input("weights", options=host.files("dossr"),
                                   tooltip="dossr_default.ckpt / dossr_onestep.ckpt or a converted .safetensors "
                                           "in models/dossr."),
                    io.Combo.Input("config", options=[DEFAULT_CONFIG] + host.controlldm_configs(), default=DEFAULT_CONFIG,
                                   tooltip="Official-style ControlLDM yaml (models/configs) for checkpoints of "
                                           "non-standard size; the SD 2.1 one is built in."),
                    SD21.Input("sd21", optional=True,
                               tooltip="SD 2.1-base to share with OSEDiff (required for a converted file; "
                                       "otherwise the .ckpt's own SD 2.1 parts are used).")],
            outputs=[DOSSR.Output(display_name="DOSSR_MODEL")])

    @classmethod
    def execute(cls, weights, config, sd21=None):
        path = host.weight_path("dossr", weights)
        yaml = None if config == DEFAULT_CONFIG else host.weight_path("configs", config)
        model = host.cached(("dossr", path, yaml), lambda: host.managed(_load_dossr(path, sd21, yaml)), owner=sd21)
        return io.NodeOutput(model)


def _load_dossr(path, sd21, yaml):
    """``load_dossr`` on the shared ``sd21`` (if any) as loaded: its VAE encoder serves as the condition encoder
    when the weights match, also after another model has cast it (``host.exact_weights``)."""
    if sd21 is None:
        return load_dossr(path, config=yaml)
    with host.exact_weights(sd21.vae.encoder, sd21.vae.quant_conv):
        return load_dossr(path, sd21, config=yaml)


class DoSSRUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DoSSR_Upscale", display_name="DoSSR Upscale (all-in-one)", category=CATEGORY,
            description="Domain-shift SDE super-resolution (DoSSR, NeurIPS 2024): ×4, other scales resized after.",
            inputs=[DOSSR.Input("model", tooltip="From 'Load DoSSR'."),
                    io.Image.Input("image", tooltip="Low-resolution image(s)."),
                    io.Int.Input("steps", default=5, min=1, max=10,
                                 tooltip="Solver steps (5 for dossr_default, 1 for dossr_onestep)."),
                    io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                                 tooltip="Seed of every random draw (posterior sample, start noise, step noises)."),
                    io.String.Input("prompt", default=DEFAULT_PROMPT, tooltip="Ignored when conditioning is connected."),
                    io.Float.Input("upscale", default=4.0, min=MIN_UPSCALE, max=MAX_UPSCALE, step=0.5,
                                   tooltip="Output scale; the model works at ×4 and other scales are resized."),
                    io.Combo.Input("color_fix", options=list(COLOR_FIXES), default="wavelet",
                                   tooltip="Colour correction against the RRDB image (official default: wavelet)."),
                    *tile_inputs(),
                    dtype_input(),
                    io.Conditioning.Input("conditioning", optional=True,
                                          tooltip="From a standard CLIP Text Encode with the SD 2.1 CLIP.")],
            outputs=[io.Image.Output()])

    @classmethod
    @host.node_run
    def execute(cls, model, image, steps, seed, prompt, upscale, color_fix, tile_latent, tile_overlap, dtype,
                conditioning=None):
        images, alpha = host.image_to_bchw(image)
        embeds = host.prompt_context(model, dtype, model.modules(), prompt, conditioning, "DoSSR Upscale")
        progress = host.Progress(len(images) * steps)

        def run(one, embeds, tile_latent, vae_tile_encode, vae_tile_decode):
            options = Options(steps=steps, seed=seed, upscale=upscale, color_fix=color_fix, tile_latent=tile_latent,
                              tile_overlap=overlap_within(tile_latent, tile_overlap),
                              vae_tile_encode=vae_tile_encode, vae_tile_decode=vae_tile_decode)
            return dossr_upscale(model, one, prompt=prompt, prompt_embeds=embeds, options=options,
                                 callback=lambda stage, done, total: progress() if stage == "sample"
                                 else host.check_interrupted())

        outs = []
        for one in images:  # not a list comprehension: before Python 3.12 its frame kept a closure over ``embeds``
            outs.append(host.with_oom_retry(run, one, embeds, tile_latent=tile_latent, **host.DEFAULT_VAE_TILES))
        return io.NodeOutput(host.bchw_to_image(outs, alpha))


def _sampler_networks(model, from_latent):
    """The networks DoSSR Sampler runs besides the text encoder: from an image, all but the VAE decoder; from a
    LATENT, the VAE decoder (the LATENT's decode), the condition encoder, the ControlNet and the UNet."""
    if from_latent:
        return [*host.vae_decoder(model.vae), model.cond_encoder, model.controlnet, model.unet]
    return [m for m in model.modules() if m is not model.vae] + [model.vae.encoder, model.vae.quant_conv]


class DoSSRSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DoSSR_Sampler", display_name="DoSSR Sampler", category=CATEGORY,
            description="RRDB ×4 → condition/LR latents → DoS-SDE sampling (or start from a LATENT at the output "
                        "size). Outputs the final latent (a standard, unscaled SD latent) and the colour reference.",
            inputs=[DOSSR.Input("model", tooltip="From 'Load DoSSR'."),
                    io.Image.Input("image", optional=True,
                                   tooltip="Low-resolution image(s): RRDB ×4 first, as the official. Connect this "
                                           "or 'latent'."),
                    io.Latent.Input("latent", optional=True,
                                    tooltip="Instead of 'image': a standard SD latent at the output size (e.g. VAE "
                                            "Encode of an image another model upscaled). It is the LR latent x̂₀; "
                                            "the condition comes from its decode."),
                    io.Int.Input("steps", default=5, min=1, max=10,
                                 tooltip="Solver steps (5 for dossr_default, 1 for dossr_onestep)."),
                    io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                                 tooltip="Seed of every random draw (posterior sample, start noise, step noises)."),
                    io.String.Input("prompt", default=DEFAULT_PROMPT, tooltip="Ignored when conditioning is connected."),
                    *tile_inputs(),
                    dtype_input(),
                    io.Conditioning.Input("conditioning", optional=True,
                                          tooltip="From a standard CLIP Text Encode with the SD 2.1 CLIP.")],
            outputs=[io.Latent.Output(display_name="LATENT",
                                      tooltip="From an image: the whole latent the model ran on, the ×4 image padded "
                                              "right and bottom to a multiple of 64 px (DoSSR VAE Decode crops it to "
                                              "the REFERENCE, whose size it records; after a standard VAE Decode, "
                                              "crop to that size)."),
                     io.Image.Output(display_name="REFERENCE", tooltip="The RRDB ×4 image (or the decoded input "
                                                                       "latent): size and colour reference.")])

    @classmethod
    @host.node_run
    def execute(cls, model, steps, seed, prompt, tile_latent, tile_overlap, dtype, image=None, latent=None,
                conditioning=None):
        if (image is None) == (latent is None):
            raise ValueError("DoSSR Sampler: connect exactly one of 'image' (LR image) and 'latent' "
                             "(SD latent at the output size).")
        alpha = None
        if latent is None:
            images, alpha = host.image_to_bchw(image)
            inputs = [(lr, None) for lr in images]
        else:
            inputs = [(None, one) for one in host.latent_samples(latent, "DoSSR Sampler").split(1)]
        embeds = host.prompt_context(model, dtype, _sampler_networks(model, latent is not None), prompt, conditioning,
                                     "DoSSR Sampler")
        progress = host.Progress(len(inputs) * steps)

        def on_stage(stage, *_):  # a step done: the progress bar (which also cancels); else a cancel check
            return progress() if stage == "sample" else host.check_interrupted()

        def run(lr, start_latent, embeds, tile_latent, vae_tile_encode, vae_tile_decode):
            o = Options(steps=steps, seed=seed, tile_latent=tile_latent,
                        tile_overlap=overlap_within(tile_latent, tile_overlap),
                        vae_tile_encode=vae_tile_encode, vae_tile_decode=vae_tile_decode)
            with torch.no_grad():
                return dossr_sample(model, text_context(model, prompt, embeds), image=lr, latent=start_latent,
                                    options=o, callback=on_stage)

        latents, starts = [], []
        for lr, start_latent in inputs:
            x, start = host.with_oom_retry(run, lr, start_latent, embeds, tile_latent=tile_latent,
                                           **host.DEFAULT_VAE_TILES)
            latents.append(x.float().cpu() / SCALING_FACTOR)
            starts.append(start.cpu())
        samples, reference = torch.cat(latents), host.bchw_to_image(starts, alpha)  # alpha: to decode
        return io.NodeOutput({"samples": samples, host.ENCODED_SIZE: list(reference.shape[1:3]), SAMPLED: samples},
                             reference)


class DoSSRDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DoSSR_VAEDecode", display_name="DoSSR VAE Decode", category=CATEGORY,
            description="Tiled VAE decode, crop to the RRDB image, colour fix against it, resize for scales other "
                        "than ×4 (8-bit quantised LANCZOS, as the official). An alpha of the REFERENCE (the LR "
                        "alpha at ×4) is resized from there: at other scales it differs slightly from DoSSR "
                        "Upscale's, which resizes the LR alpha.",
            inputs=[DOSSR.Input("model", tooltip="From 'Load DoSSR' (its VAE is the SD 2.1 one)."),
                    io.Latent.Input("latent", tooltip="From 'DoSSR Sampler' (also through Crop Latent at x 0, y 0 "
                                                      "cutting off only padding, with no node changing it: decoded "
                                                      "with the padding, which the sampler records)."),
                    io.Image.Input("reference", tooltip="REFERENCE of 'DoSSR Sampler' as it is (size and colour "
                                                        "reference: the sampler records its size in the LATENT)."),
                    io.Float.Input("upscale", default=4.0, min=MIN_UPSCALE, max=MAX_UPSCALE, step=0.5,
                                   tooltip="Output scale of the original LR image: the REFERENCE is its ×4 "
                                           "image, so the output is the REFERENCE's size × upscale/4. From a "
                                           "Sampler fed a 'latent', the REFERENCE is at that latent's size: 4 "
                                           "keeps it."),
                    io.Combo.Input("color_fix", options=list(COLOR_FIXES), default="wavelet",
                                   tooltip="Colour correction against the RRDB image (official default: wavelet)."),
                    io.Int.Input("vae_tile", default=host.DEFAULT_TILES.vae_tile_decode, min=0, max=1024, step=8,
                                 tooltip="Decoder tile size in latent pixels (0 = never tile)."),
                    dtype_input(DECODER_PRECISION, optional=True)],
            outputs=[io.Image.Output()])

    @classmethod
    @host.node_run
    def execute(cls, model, latent, reference, upscale, color_fix, vae_tile, dtype="auto"):
        check_upscale(upscale)  # NaN passes ComfyUI's min and max (the other nodes: Options, preprocess)
        host.cast_for_run(model, dtype, host.vae_decoder(model.vae))
        starts, alpha = host.image_to_bchw(reference)
        dev = model.device  # ``decode`` loads the VAE (``model.load_stage``)
        progress = host.Progress(len(starts))
        outs = []
        for start, one in host.latent_with_references(latent, starts, "DoSSR VAE Decode"):
            h, w = start.shape[-2:]
            x = _latent_to_decode(latent, one, h, w)
            with torch.no_grad():
                decoded = host.with_oom_retry(
                    lambda x, vae_tile_decode: decode(model, x.to(dev) * SCALING_FACTOR, vae_tile_decode,
                                                      host.check_interrupted), x, vae_tile_decode=vae_tile)
            outs.append(fixed_and_resized(decoded[..., :h, :w], start.to(dev), upscale, color_fix))
            progress()
        return io.NodeOutput(host.bchw_to_image(outs, alpha))


def _latent_to_decode(latent, x, height, width):
    """What to decode for ``x`` (1, 4, h, w) of ``latent`` and crop to the height × width reference; refused where it
    cannot be cropped to it. The DoSSR Sampler records its REFERENCE's size (``host.ENCODED_SIZE``) and its latent as
    made (``SAMPLED``) in the LATENT, which ComfyUI's latent nodes pass on: the size must be the reference's, and
    ``x`` the size the sampler made (its values may have changed since, by a KSampler say) or a crop of its latent
    that cut off only padding, for which that latent is decoded, padding and all (as the official decodes and crops:
    the decoder sees the padding at the image's edge). A LATENT without the record (VAE Encode, Load Latent) must be
    of a size the sampler makes (``_check_latent_covers``)."""
    encoded_size, sampled = latent.get(host.ENCODED_SIZE), latent.get(SAMPLED)
    if encoded_size is not None and tuple(encoded_size) != (height, width):
        raise ValueError(_made_for_another_size(encoded_size, height, width, by_the_sampler=sampled is not None))
    if sampled is None:
        _check_latent_covers(x, height, width)
        return x
    if x.shape[-2:] == sampled.shape[-2:]:
        return x
    uncropped = _uncropped(x, sampled, height, width)
    if uncropped is None:
        raise ValueError(_changed_since_the_sampler(x, height, width))
    return uncropped


def _made_for_another_size(encoded_size, height, width, by_the_sampler):
    """Why a LATENT recorded for an image of ``encoded_size`` (H, W) is refused against a reference of another size: it
    would be decoded and cropped to the wrong part (a REFERENCE cropped within the padding) or size. The record is the
    DoSSR Sampler's where it holds its latent (``SAMPLED``), else the OSEDiff LQ Encoder's (its LQ's size)."""
    made_h, made_w = encoded_size
    if not by_the_sampler:
        return (f"DoSSR VAE Decode: the LATENT was made by the OSEDiff LQ Encoder from a {made_w}×{made_h} px image "
                f"(it records that size), which does not match the {width}×{height} reference. Decode it with OSEDiff "
                "VAE Decode, against the image the LQ Encoder took, at its upscale and process_size.")
    return (f"DoSSR VAE Decode: the LATENT was made for a {made_w}×{made_h} px image (the DoSSR Sampler records the "
            f"size of its REFERENCE in it), which does not match the {width}×{height} reference. Connect the "
            "REFERENCE output of the DoSSR Sampler that made the latent as it is (the ×4 image, not the LR input, "
            "nor a crop or resize of it: crop or resize the decoded image instead).")


def _uncropped(latent, sampled, height, width):
    """The one of the ``sampled`` latents (the sampler's, of a height × width reference) that ``latent`` (1, 4, h, w)
    is a crop of that cut off only padding, or None: it covers the reference, ⌈H/8⌉ × ⌈W/8⌉ latent px, holds those
    as sampled (Crop Latent at x 0 and y 0; Latent From Batch and Repeat Latent Batch keep them), and is no larger
    than the sampler's (LatentConcat holds it top-left too, and more). Compared where the sampler's latent is (the
    CPU): under --gpu-only a KSampler leaves its LATENT on the GPU (comfy/sample.py, intermediate_device)."""
    over_h, over_w = host.padded_latent_size((height, width))
    part = latent[..., :over_h, :over_w].to(sampled.device)
    (h, w), (sampled_h, sampled_w) = latent.shape[-2:], sampled.shape[-2:]
    if part.shape[-2:] != (over_h, over_w) or h > sampled_h or w > sampled_w:
        return None
    return next((one for one in sampled.split(1) if torch.equal(part, one[..., :over_h, :over_w])), None)


def _changed_since_the_sampler(latent, height, width):
    """Why a LATENT the DoSSR Sampler made for a height × width reference is refused at another size than it made,
    with another part over the image or larger: it was resized (Upscale Latent), cropped into the image (Crop Latent),
    grown (LatentConcat), or cropped and changed by another node, in either order (then nothing shows that only
    padding was cut)."""
    (h, w), (over_h, over_w) = latent.shape[-2:], host.padded_latent_size((height, width))
    return (f"DoSSR VAE Decode: the LATENT decodes to {8 * w}×{8 * h} px; the DoSSR Sampler made it for this "
            f"{width}×{height} reference, but it is neither the latent it made (that size) nor a crop of it that cut "
            "off only padding (the part over the image as sampled): it was resized, cropped into the image or grown "
            "since (by Upscale Latent, Crop Latent, LatentConcat or a node like it), or cropped and changed by "
            "another node (a KSampler), which leaves nothing to show that only padding was cut. Connect the "
            "sampler's LATENT at its own size (through a KSampler or any node that keeps it), or Crop Latent of it "
            f"at x 0 and y 0, width at least {8 * over_w} and height at least {8 * over_h}, with "
            "no node changing it since the sampler (this node crops to the REFERENCE itself); decode a resized "
            "latent with the standard VAE Decode.")


def _check_latent_covers(latent, height, width):
    """Refuse a latent without the sampler's record of another size than the sampler makes for the reference: from an
    image, the reference (the ×4 image) padded right and bottom to a multiple of 64 px; from a LATENT, the reference's
    own size. Otherwise the decode would be cropped to a corner (the LR image given as the reference, a latent
    resized by Upscale Latent) or be smaller than the reference."""
    h, w = latent.shape[-2:]
    padded = (-(-height // PIXEL_MULTIPLE) * PIXEL_MULTIPLE, -(-width // PIXEL_MULTIPLE) * PIXEL_MULTIPLE)
    if (8 * h, 8 * w) not in ((height, width), padded):
        raise ValueError(f"DoSSR VAE Decode: the LATENT decodes to {8 * w}×{8 * h} px, which does not match the "
                         f"{width}×{height} reference. Connect the REFERENCE output of the DoSSR Sampler that made the "
                         "latent (the ×4 image, not the LR input), and its LATENT as it is (decode a latent resized "
                         "since, by Upscale Latent or a node like it, with the standard VAE Decode).")


NODES = [DoSSRLoader, DoSSRUpscale, DoSSRSampler, DoSSRDecode]
