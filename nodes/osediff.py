"""OSEDiff and DAPE nodes: loaders, the modular LQ encoder → one-step UNet → VAE decode, and an all-in-one upscaler."""

import torch
from comfy_api.latest import io

from ..osediff_core.pipeline import (MAX_PROCESS_SIZE, Options, Plan, build_osediff, decoded_image,
                                     fixed_and_resized, lq_latent, one_step, osediff_upscale, preprocess)
from ..osediff_core.weights import lq_encoder_pairs, merged_value, osediff_unet_changes, read_osediff
from ..sr_common.color_fix import COLOR_FIXES, color_reference
from ..sr_common.errors import releasing_tensors
from ..sr_common.image import MAX_UPSCALE, MIN_UPSCALE, resized_alpha, scaled_size
from ..sr_common.sd21 import PRECISIONS, SCALING_FACTOR, weights_out_of_memory
from ..sr_common.tiling import is_out_of_memory, overlap_within
from . import host

CATEGORY = "image/upscaling/DiffSR"
SD21 = io.Custom("SD21_BASE")
OSEDIFF = io.Custom("OSEDIFF_MODEL")
DAPE = io.Custom("DAPE_MODEL")


def upscale_input():
    return io.Float.Input("upscale", default=4.0, min=MIN_UPSCALE, max=MAX_UPSCALE, step=0.5,
                          tooltip="Scale factor; the output is exactly round(upscale × input) pixels.")


def process_size_input():
    return io.Int.Input("process_size", default=512, min=0, max=MAX_PROCESS_SIZE, step=8,
                        tooltip="Inputs with a side below process_size / upscale are enlarged first and the result "
                                "is resized back (the official default 512; 0 = never enlarged).")


def tile_inputs():
    return [io.Int.Input("tile_latent", default=host.DEFAULT_TILES.tile_latent, min=0, max=512, step=8,
                         tooltip="Latent tile size for the UNet (96 = 768 px, the official default; 0 = never tile). "
                                 "Halved automatically on out-of-memory, with the VAE tiles."),
            io.Int.Input("tile_overlap", default=host.DEFAULT_TILES.tile_overlap, min=0, max=256, step=8,
                         tooltip="Latent tile overlap (32, the official default); one of tile_latent − 8 or more "
                                 "is lowered to tile_latent − 8.")]


DECODER_PRECISION = ("The VAE decoder's precision, set here: the model is shared with other nodes, so without it the "
                     "decode would run in whatever precision the node before it left.")


def dtype_input(what="Precision of the networks this node runs.", optional=False):
    return io.Combo.Input("dtype", options=["auto", *PRECISIONS], default="auto", optional=optional,
                          tooltip=f"{what} auto: ComfyUI's choice for the device (as for its own models: fp16 on "
                                  "most GPUs, fp32 on the CPU and where fp16 is broken or slow; --force-fp32 and "
                                  "--force-fp16 apply).")


class SD21Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffSR_SD21Loader", display_name="Load SD 2.1-base (DiffSR)", category=CATEGORY,
            description="Stable Diffusion 2.1-base for OSEDiff and DoSSR, from models/checkpoints or models/diffusers.",
            inputs=[io.Combo.Input("base", options=host.base_choices(),
                                   tooltip="v2-1_512-ema-pruned (single file) or a stable-diffusion-2-1-base "
                                           "diffusers folder (any below models/diffusers, a Hugging Face cache's "
                                           "snapshot too). SD 1.x, SDXL, 768-v, inpainting, depth, x4 upscaler and "
                                           "unCLIP models are refused. "
                                           "'download: ...' fetches Stability AI's file (5.2 GB, from a copy "
                                           "checked against its SHA-256) into models/checkpoints first.")],
            outputs=[SD21.Output(display_name="SD21_BASE")])

    @classmethod
    def execute(cls, base):
        return io.NodeOutput(host.load_base(base))


class SD21FromCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffSR_SD21FromCheckpoint", display_name="SD 2.1-base from Load Checkpoint (DiffSR)",
            category=CATEGORY,
            description="Share the standard Load Checkpoint's SD 2.1-base (MODEL, CLIP, VAE) with OSEDiff and DoSSR. "
                        "Refuses 768-v (v-prediction) and non-SD2 models. ComfyUI holds some of these weights in "
                        "fp16/bf16 (on a GPU; the text encoder on the CPU too; the console says which): for the "
                        "official float32 weights use Load SD 2.1-base (DiffSR).",
            inputs=[io.Model.Input("model", tooltip="MODEL of Load Checkpoint with v2-1_512-ema-pruned "
                                                   "(LoRAs applied to it are kept)."),
                    io.Clip.Input("clip", tooltip="CLIP of the same Load Checkpoint (SD 2.1 OpenCLIP-H)."),
                    io.Vae.Input("vae", tooltip="VAE of the same Load Checkpoint.")],
            outputs=[SD21.Output(display_name="SD21_BASE")])

    @classmethod
    def execute(cls, model, clip, vae):
        return io.NodeOutput(host.sd21_from_comfy(model, clip, vae))


class OSEDiffLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OSEDiff_Loader", display_name="Load OSEDiff", category=CATEGORY,
            description="OSEDiff LoRA weights (osediff.pkl or converted .safetensors) merged into SD 2.1-base.",
            inputs=[SD21.Input("sd21", tooltip="From 'Load SD 2.1-base (DiffSR)'. Left untouched (shared with DoSSR)."),
                    io.Combo.Input("weights", options=host.files("osediff", downloadable=True),
                                   tooltip="osediff.pkl (or its converted .safetensors) in models/osediff; "
                                           "osediff_face.pkl restores faces (upscale 1, color_fix none, as "
                                           "the official code runs it). 'download: ...' fetches the official "
                                           "file there first (once).")],
            outputs=[OSEDIFF.Output(display_name="OSEDIFF_MODEL")])

    @classmethod
    def execute(cls, sd21, weights):
        path = host.weight_path("osediff", weights)
        model = host.cached(("osediff", path), lambda: host.managed(load_osediff(sd21, path)), owner=sd21)
        return io.NodeOutput(model)


@releasing_tensors
def load_osediff(sd21, path):
    """OSEDiff on the shared ``sd21``, merged from its loaded weights even where another model has cast them, with
    the merged UNet and LQ encoder recomputed from ``sd21`` and the LoRA when a run needs them again in float32
    (``host.recompute_exact``): no float32 copy of them stays in memory while they run in fp16/bf16."""
    ckpt = read_osediff(path)
    unet, vae = sd21.unet, sd21.vae
    with host.exact_weights(unet, vae.encoder, vae.quant_conv):
        model = build_osediff(sd21, ckpt)
        replace, pairs = osediff_unet_changes(unet, ckpt)
    vae_pairs = lq_encoder_pairs(ckpt)
    host.recompute_exact(model.unet, lambda name: merged_value(
        name, replace[name] if name in replace else host.exact_value(unet, name), pairs))
    host.recompute_exact(model.lq_encoder, lambda name: merged_value(name, host.exact_value(vae, name), vae_pairs))
    return model


def _dape_tags(dape, images, upscale, process_size, **select):
    """The DAPE tags of each image, from its bicubic ×upscale LQ as the official (made only where the tagger reads
    it: ``lq_as_read``); the tagger on the device on its own, before the OSEDiff networks, so neither pushes the other
    out mid-run."""
    from ..osediff_core.dape import lq_as_read

    try:
        dev = host.load_on_device(dape)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        raise weights_out_of_memory(["the DAPE tagger"], [dape], host.device(), error) from error
    tags = []
    for one in images:
        host.check_interrupted()
        tags += dape.tags(lq_as_read(one, upscale=upscale, process_size=process_size).to(dev), **select)
    return tags


class OSEDiffUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OSEDiff_Upscale", display_name="OSEDiff Upscale (all-in-one)", category=CATEGORY,
            description="One-step diffusion super-resolution (OSEDiff, NeurIPS 2024).",
            inputs=[OSEDIFF.Input("model", tooltip="From 'Load OSEDiff'."),
                    io.Image.Input("image", tooltip="Low-quality image(s); an RGBA image keeps its alpha (Load "
                                                    "Image gives the alpha as a MASK: join it with 'Join Image with "
                                                    "Alpha' first)."),
                    io.String.Input("prompt", default="", multiline=True,
                                    tooltip="Prompt, encoded verbatim; with DAPE connected, added after the tags."),
                    upscale_input(),
                    process_size_input(),
                    io.Combo.Input("color_fix", options=list(COLOR_FIXES), default="adain",
                                   tooltip="Colour correction against the upscaled input (official default: adain)."),
                    *tile_inputs(),
                    dtype_input(),
                    DAPE.Input("dape", optional=True,
                               tooltip="Optional DAPE tagger: the prompt becomes '{tags}, {prompt},' as the official.")],
            outputs=[io.Image.Output()])

    @classmethod
    @host.node_run
    def execute(cls, model, image, prompt, upscale, process_size, color_fix, tile_latent, tile_overlap, dtype,
                dape=None):
        from ..osediff_core.dape import dape_prompt

        images, alpha = host.image_to_bchw(image)
        prompts = [prompt] * len(images)
        if dape is not None:
            prompts = [dape_prompt(tags, prompt) for tags in _dape_tags(dape, images, upscale, process_size)]
        embeds = host.cast_and_encode(model, dtype, model.modules(), prompts)
        progress = host.Progress(len(images))
        outs = []

        def run(one, prompt_embeds, tile_latent, vae_tile_encode, vae_tile_decode):
            options = Options(upscale=upscale, process_size=process_size, color_fix=color_fix,
                              tile_latent=tile_latent, tile_overlap=overlap_within(tile_latent, tile_overlap),
                              vae_tile_encode=vae_tile_encode, vae_tile_decode=vae_tile_decode)
            return osediff_upscale(model, one, prompt_embeds=prompt_embeds, options=options,
                                   callback=host.check_interrupted)

        for one, prompt_embeds in zip(images, embeds):
            outs.append(host.with_oom_retry(run, one, prompt_embeds, tile_latent=tile_latent,
                                            **host.DEFAULT_VAE_TILES))
            progress()
        return io.NodeOutput(host.bchw_to_image(outs, alpha))


class OSEDiffLQEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OSEDiff_LQEncoder", display_name="OSEDiff LQ Encoder", category=CATEGORY,
            description="Bicubic ×upscale, then the OSEDiff LoRA VAE encoder: a standard (unscaled) SD latent of "
                        "the upscaled image padded right and bottom to a multiple of 8 px (OSEDiff VAE Decode crops "
                        "the padding off; a standard VAE Decode keeps it).",
            inputs=[OSEDIFF.Input("model", tooltip="From 'Load OSEDiff'."),
                    io.Image.Input("image", tooltip="Low-quality image(s)."),
                    upscale_input(),
                    process_size_input(),
                    io.Int.Input("vae_tile", default=host.DEFAULT_TILES.vae_tile_encode, min=0, max=4096, step=64,
                                 tooltip="Encoder tile size in pixels (0 = never tile)."),
                    dtype_input()],
            outputs=[io.Latent.Output()])

    @classmethod
    @host.node_run
    def execute(cls, model, image, upscale, process_size, vae_tile, dtype):
        images, _ = host.image_to_bchw(image)
        host.cast_for_run(model, dtype, [model.lq_encoder])
        progress = host.Progress(len(images))
        latents = []
        for one in images:
            lq, _ = preprocess(one, upscale=upscale, process_size=process_size)
            z = host.with_oom_retry(lambda lq, vae_tile_encode: lq_latent(
                model, lq, tile=vae_tile_encode, callback=host.check_interrupted), lq, vae_tile_encode=vae_tile)
            latents.append(z.cpu() / SCALING_FACTOR)
            progress()
        return io.NodeOutput({"samples": torch.cat(latents), host.ENCODED_SIZE: list(lq.shape[-2:])})


class OSEDiffOneStep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OSEDiff_OneStepUNet", display_name="OSEDiff One-Step UNet", category=CATEGORY,
            description="ε = UNet(z, t=999, prompt); x0 = (z − √(1−ᾱ)ε)/√ᾱ. Latent in, latent out (unscaled).",
            inputs=[OSEDIFF.Input("model", tooltip="From 'Load OSEDiff'."),
                    io.Latent.Input("latent", tooltip="From 'OSEDiff LQ Encoder'."),
                    io.Conditioning.Input("conditioning", optional=True,
                                          tooltip="From a standard CLIP Text Encode with the SD 2.1 CLIP; "
                                                  "overrides the prompt text."),
                    io.String.Input("prompt", default="", multiline=True,
                                    tooltip="Prompt text when no conditioning is connected (e.g. from DAPE)."),
                    *tile_inputs(),
                    dtype_input()],
            outputs=[io.Latent.Output()])

    @classmethod
    @host.node_run
    def execute(cls, model, latent, prompt, tile_latent, tile_overlap, dtype, conditioning=None):
        z_all = host.latent_samples(latent, "OSEDiff One-Step UNet") * SCALING_FACTOR
        embeds = host.prompt_context(model, dtype, [model.unet], prompt, conditioning, "OSEDiff One-Step UNet")
        progress = host.Progress(z_all.shape[0])
        outs = []

        def run(z, embeds, tile_latent):
            return one_step(model, z, embeds, tile=tile_latent, overlap=overlap_within(tile_latent, tile_overlap),
                            callback=host.check_interrupted)

        for z in z_all.split(1):
            outs.append(host.with_oom_retry(run, z, embeds, tile_latent=tile_latent).cpu() / SCALING_FACTOR)
            progress()
        return io.NodeOutput(dict(latent, samples=torch.cat(outs)))


class OSEDiffDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OSEDiff_VAEDecode", display_name="OSEDiff VAE Decode", category=CATEGORY,
            description="Tiled VAE decode, colour fix against the upscaled reference, crop to exactly round(upscale × "
                        "input) (of a standard VAE Encode's latent: its centre part).",
            inputs=[OSEDIFF.Input("model", tooltip="From 'Load OSEDiff' (its VAE decoder is the frozen SD one)."),
                    io.Latent.Input("latent", tooltip="From 'OSEDiff One-Step UNet'. Of a standard VAE Encode of the "
                                                      "upscaled reference, which crops it to a multiple of 8 px: "
                                                      "the output is that centre part (a reference with a side "
                                                      "under process_size / upscale is enlarged first: set "
                                                      "process_size to at most that side × upscale)."),
                    io.Image.Input("reference", tooltip="The low-quality input image (for colour fix and size)."),
                    upscale_input(),
                    process_size_input(),
                    io.Combo.Input("color_fix", options=list(COLOR_FIXES), default="adain", tooltip="Colour correction."),
                    io.Int.Input("vae_tile", default=host.DEFAULT_TILES.vae_tile_decode, min=0, max=1024, step=8,
                                 tooltip="Decoder tile size in latent pixels (0 = never tile)."),
                    dtype_input(DECODER_PRECISION, optional=True)],
            outputs=[io.Image.Output()])

    @classmethod
    @host.node_run
    def execute(cls, model, latent, reference, upscale, process_size, color_fix, vae_tile, dtype="auto"):
        host.cast_for_run(model, dtype, host.vae_decoder(model.vae))
        images, alpha = host.image_to_bchw(reference)
        progress = host.Progress(len(images))
        outs, alphas = [], []
        pairs = host.latent_with_references(latent, images, "OSEDiff VAE Decode")
        for index, (one, x0) in enumerate(pairs):
            lq, plan = preprocess(one, upscale=upscale, process_size=process_size)
            lq_size = tuple(lq.shape[-2:])
            lq, plan, box = _encoded_part(x0, latent.get(host.ENCODED_SIZE), lq, plan, upscale, process_size,
                                          one.shape[-2:])
            out = host.with_oom_retry(lambda x0, vae_tile_decode: decoded_image(
                model, x0 * SCALING_FACTOR, plan.crop, tile=vae_tile_decode, callback=host.check_interrupted),
                x0, vae_tile_decode=vae_tile)
            outs.append(fixed_and_resized(out, color_reference(lq.to(out.device), color_fix), plan, color_fix))
            if alpha is not None:
                alphas.append(_alpha_part(alpha[index:index + 1], box, lq_size))
            progress()
        return io.NodeOutput(host.bchw_to_image(outs, torch.cat(alphas) if alphas else None))


def _encoded_part(latent, encoded_size, lq, plan, upscale, process_size, reference_size):
    """The part of ``lq`` (the reference at this upscale and process_size) that ``latent`` was encoded from, the
    plan of its output, and that part as a box (top, left, H, W) of ``lq``'s size (None: all of it). A latent of the
    LQ Encoder (``encoded_size`` its LQ's size) is all of it, padded to a multiple of 8; one of ComfyUI's VAE Encode
    (no ``encoded_size``) may be its centre cropped to a multiple of 8 (``comfy/sd.py``
    ``VAE.vae_encode_crop_pixels``), whose output is that part at the output's scale. Any other latent was not made
    from ``lq`` and is refused (``_not_encoded_from``): it would be decoded to a corner of the image, or a stretched
    one."""
    height, width = lq.shape[-2:]
    if encoded_size is None or tuple(encoded_size) == (height, width):
        if tuple(latent.shape[-2:]) == host.padded_latent_size((height, width)):
            return lq, plan, None
        cropped = _cropped((height, width))
        if encoded_size is None and tuple(latent.shape[-2:]) == cropped and min(cropped) > 0:
            h, w = 8 * cropped[0], 8 * cropped[1]
            top, left = height % 8 // 2, width % 8 // 2
            out_width, out_height = plan.output_size
            size = (max(1, int(w * out_width / width + 0.5)), max(1, int(h * out_height / height + 0.5)))
            return lq[..., top:top + h, left:left + w], Plan((h, w), size), (top, left, h, w)
    raise ValueError(_not_encoded_from(latent, encoded_size, (height, width), reference_size, upscale, process_size))


def _cropped(size):
    """The latent size (h, w) of an image of ``size`` (H, W) cropped to a multiple of 8 (ComfyUI's VAE Encode)."""
    return size[0] // 8, size[1] // 8


def _not_encoded_from(latent, encoded_size, lq_size, reference_size, upscale, process_size):
    """Why OSEDiff VAE Decode refuses ``latent`` against a reference of ``reference_size`` (H, W), whose LQ at this
    upscale and process_size is ``lq_size``, with the fix: a latent recorded as made from that LQ (``encoded_size``:
    by the LQ Encoder, or the DoSSR Sampler from its REFERENCE) and resized since (Upscale Latent); one of the
    reference ×upscale not enlarged (VAE Encode of a small image upscaled by Upscale Image By), which the largest
    process_size p with p // upscale <= its short side takes, as ``enlarge_small`` enlarges no side then; else one of
    another image, upscale or process_size."""
    h, w = latent.shape[-2:]
    if encoded_size is not None and tuple(encoded_size) == tuple(lq_size):
        made_h, made_w = host.padded_latent_size(lq_size)
        return (f"OSEDiff VAE Decode: the LATENT is {w}×{h} (latent px), but the LQ Encoder makes it "
                f"{made_w}×{made_h} from this reference at upscale {upscale:g} and process_size {process_size}: it "
                "was resized or cropped since (by Upscale Latent or a node like it), or made by the DoSSR Sampler "
                "(padded to 64 px: decode that with DoSSR VAE Decode), and this node decodes a latent at the size it "
                "was encoded. Connect the One-Step UNet's LATENT as it is, or decode the resized one with the standard "
                "VAE Decode.")
    as_is_w, as_is_h = scaled_size(reference_size[1], reference_size[0], upscale)
    as_is_size = max((p for p in range(8, process_size, 8) if p // upscale <= min(reference_size)), default=None)
    if encoded_size is None and as_is_size and (h, w) in (host.padded_latent_size((as_is_h, as_is_w)), _cropped((as_is_h, as_is_w))):
        return (f"OSEDiff VAE Decode: the LATENT is {w}×{h} (latent px), of the reference ×{upscale:g} as it is "
                f"({as_is_w}×{as_is_h} px); at process_size {process_size} this node (as the LQ Encoder) takes a "
                f"reference with a side under {process_size // upscale:g} px enlarged to {lq_size[1]}×{lq_size[0]} px "
                f"first. Set process_size to {as_is_size} (or less) to decode this latent.")
    made = "" if encoded_size is None else f" (made from a {encoded_size[1]}×{encoded_size[0]} px image)"
    padded, cropped = host.padded_latent_size(lq_size), _cropped(lq_size)
    return (f"OSEDiff VAE Decode: the LATENT is {w}×{h} (latent px){made}, but the reference at upscale {upscale:g} and "
            f"process_size {process_size} is {lq_size[1]}×{lq_size[0]} px, whose latent is {padded[1]}×{padded[0]} "
            f"from the OSEDiff LQ Encoder (or {cropped[1]}×{cropped[0]} from a standard VAE Encode, which crops to a "
            "multiple of 8). Connect the image that was encoded, and give the encoder and this node the same upscale "
            "and process_size.")


def _alpha_part(alpha, box, lq_size):
    """``alpha`` (1, 1, h, w) of the reference, cut to ``box`` of ``_encoded_part`` (``resized_alpha`` to the LQ's
    size ``lq_size`` first); all of it where ``box`` is None."""
    if box is None:
        return alpha
    top, left, h, w = box
    return resized_alpha(alpha, lq_size)[..., top:top + h, left:left + w]


class DAPELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        local = host.files("dape")
        ram, lora = (host.DOWNLOAD + host.OFFICIAL[k].filename for k in ("ram", "dape"))
        return io.Schema(
            node_id="DAPE_Loader", display_name="Load DAPE (RAM + LoRA)", category=CATEGORY,
            description="The DAPE prompt extractor: RAM Swin-L tagger with the DAPE LoRA merged.",
            inputs=[io.Combo.Input("ram_or_converted", options=local + [ram],
                                   tooltip="ram_swin_large_14m.pth, or a converted DAPE .safetensors (then dape = none). "
                                           "'download: ...' fetches the official file into models/dape first."),
                    io.Combo.Input("dape", options=["none"] + local + [lora], default="none",
                                   tooltip="DAPE.pth (LoRA); 'none' when the first file is a converted one."),
                    dtype_input("The tagger's precision (the official code runs it in fp16).", optional=True)],
            outputs=[DAPE.Output(display_name="DAPE_MODEL")])

    @classmethod
    def execute(cls, ram_or_converted, dape, dtype="auto"):
        first = host.weight_path("dape", ram_or_converted)
        second = None if dape == "none" else host.weight_path("dape", dape)
        files = dict(converted_path=first) if second is None else dict(ram_path=first, dape_path=second)
        return io.NodeOutput(host.cached(("dape", first, second, dtype), lambda: _load_dape(files, dtype)))


@releasing_tensors
def _load_dape(files, dtype):
    """``load_dape_tagger(**files)`` in the precision of the ``dtype`` widget (``host.in_precision``)."""
    from ..osediff_core.dape import load_dape_tagger

    return host.in_precision(load_dape_tagger(**files), dtype)


class DAPEPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DAPE_PromptExtractor", display_name="DAPE Prompt Extractor", category=CATEGORY,
            description="Tags of the (×upscale bicubic) input as the OSEDiff prompt '{tags}, {user prompt},'.",
            inputs=[DAPE.Input("dape", tooltip="From 'Load DAPE'."),
                    io.Image.Input("image", tooltip="The low-quality image (first image of a batch is used)."),
                    upscale_input(),
                    process_size_input(),
                    io.String.Input("user_prompt", default="", tooltip="Appended after the tags."),
                    io.Boolean.Input("tags_only", default=False, tooltip="Output only the tags."),
                    io.String.Input("exclude", default="",
                                    tooltip="Comma-separated RAM tags never to output (a name that is no tag is "
                                            "refused)."),
                    io.Int.Input("max_tags", default=0, min=0, max=4585,
                                 tooltip="Keep at most this many (most probable) tags; 0 = all.")],
            outputs=[io.String.Output()])

    @classmethod
    @host.node_run
    def execute(cls, dape, image, upscale, process_size, user_prompt, tags_only, exclude, max_tags):
        from ..osediff_core.dape import dape_prompt, misspelt_tags, tag_list

        exclude = tag_list(exclude)
        unknown = dape.unknown_tags(exclude)
        if unknown:  # a misspelt tag would leave the one meant in the prompt, unsaid
            raise ValueError(f"DAPE Prompt Extractor: exclude names {misspelt_tags(unknown)}, not among DAPE's tags; "
                             "correct the spelling or remove it from exclude.")
        images, _ = host.image_to_bchw(image)
        (tags,) = _dape_tags(dape, images[:1], upscale, process_size, max_tags=max_tags or None, exclude=exclude)
        return io.NodeOutput(dape_prompt(tags, user_prompt, tags_only))


NODES = [SD21Loader, SD21FromCheckpoint, OSEDiffLoader, OSEDiffUpscale, OSEDiffLQEncoder, OSEDiffOneStep,
         OSEDiffDecode, DAPELoader, DAPEPrompt]
