"""DoSSR nodes: loader and upscaler (RRDB ×4 → ControlNet-guided domain-shift SDE → VAE decode)."""

from comfy_api.latest import io

from ..dossr_core.model import DEFAULT_PROMPT, load_dossr
from ..dossr_core.pipeline import Options, dossr_upscale
from ..sr_common.color_fix import COLOR_FIXES
from . import host
from .osediff import CATEGORY, DTYPES, SD21, pick_dtype, tile_inputs

DOSSR = io.Custom("DOSSR_MODEL")
DEFAULT_CONFIG = "SD 2.1 (built in)"


class DoSSRLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DoSSR_Loader", display_name="Load DoSSR", category=CATEGORY,
            description="DoSSR ControlNet, condition encoder and RRDB (official .ckpt or converted .safetensors).",
            inputs=[io.Combo.Input("weights", options=host.files("dossr"),
                                   tooltip="dossr_default.ckpt / dossr_onestep.ckpt or a converted .safetensors "
                                           "in models/dossr."),
                    io.Combo.Input("config", options=[DEFAULT_CONFIG] + host.files("configs"), default=DEFAULT_CONFIG,
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
        return io.NodeOutput(host.cached(("dossr", path, yaml, id(sd21)), lambda: load_dossr(path, sd21, config=yaml)))


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
                    io.Int.Input("seed", default=42, min=0, max=2**63 - 1, control_after_generate=True,
                                 tooltip="Seed of every random draw (posterior sample, start noise, step noises)."),
                    io.String.Input("prompt", default=DEFAULT_PROMPT, tooltip="Ignored when conditioning is connected."),
                    io.Float.Input("upscale", default=4.0, min=1.0, max=8.0, step=0.5,
                                   tooltip="Output scale; the model works at ×4 and other scales are resized."),
                    io.Combo.Input("color_fix", options=list(COLOR_FIXES), default="wavelet",
                                   tooltip="Colour correction against the RRDB image (official default: wavelet)."),
                    *tile_inputs(),
                    io.Combo.Input("dtype", options=list(DTYPES), default="auto", tooltip="Network precision."),
                    io.Conditioning.Input("conditioning", optional=True,
                                          tooltip="From a standard CLIP Text Encode with the SD 2.1 CLIP.")],
            outputs=[io.Image.Output()])

    @classmethod
    def execute(cls, model, image, steps, seed, prompt, upscale, color_fix, tile_latent, tile_overlap, dtype,
                conditioning=None):
        images, alpha = host.image_to_bchw(image)
        dev = host.device()
        host.move(model.modules(), dev, pick_dtype(dtype, dev))
        model.prompt_cache.clear()
        progress = host.Progress(len(images) * steps)
        embeds = conditioning[0][0][:1] if conditioning is not None else None
        try:
            outs = []
            for one in images:
                def run(tile):
                    options = Options(steps=steps, seed=seed, upscale=upscale, color_fix=color_fix, tile_latent=tile,
                                      tile_overlap=min(tile_overlap, max(tile - 8, 0)))
                    return dossr_upscale(model, one, prompt=prompt, prompt_embeds=embeds, options=options,
                                         callback=lambda stage, done, total: progress() if stage == "sample"
                                         else host.mm.throw_exception_if_processing_interrupted())
                outs.append(host.with_oom_retry(run, tile_latent))
        finally:
            host.move(model.modules(), host.offload_device())
        return io.NodeOutput(host.bchw_to_image(outs, alpha))


NODES = [DoSSRLoader, DoSSRUpscale]
