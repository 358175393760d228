"""The ComfyUI nodes, run without ComfyUI against stand-ins of the host APIs (tests/comfy_stubs)."""

import os
import shutil
import types
import sys

import pytest
import torch

from conftest import (DATA, IEEE_FLOAT32, copy_tiny_sd21, cpu_float16, cpu_without_float64, fifo, host_stand_ins,
                      hugging_face_cache, official_files_served, outcome_within, psnr, sparse_file,
                      tensors_a_failure_keeps, tf32_flags)
from workflow_schema import import_pack
from comfyui_diffsr.sr_common.tiling import smaller_tiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """Import the pack as ComfyUI does: from its folder, under a module name of the host's choosing."""
    models = tmp_path_factory.mktemp("models")
    copy_tiny_sd21(models / "diffusers" / "tiny_sd21")
    (models / "osediff").mkdir()
    shutil.copy(os.path.join(DATA, "osediff", "osediff_tiny.pkl"), models / "osediff")
    (models / "dossr").mkdir()
    shutil.copy(os.path.join(DATA, "dossr", "dossr_tiny.ckpt"), models / "dossr")
    (models / "dape").mkdir()
    for name in ("ram_tiny.pth", "dape_tiny.pth"):
        shutil.copy(os.path.join(DATA, "dape", name), models / "dape")
    (models / "configs").mkdir()
    shutil.copy(os.path.join(DATA, "dossr", "tiny_cldm.yaml"), models / "configs")
    (models / "configs" / "v2-inference.yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n")
    name = "custom_nodes_x_diffsr_pack"
    with host_stand_ins(name, models):
        nodes = {n.define_schema().node_id: n for n in import_pack(ROOT, name)}
        yield sys.modules[name], nodes


def run(node, **inputs):
    """``node`` executed as ComfyUI executes it: in inference mode (execution.py L662)."""
    with torch.inference_mode():
        return node.execute(**inputs).args


def patcher_of(model, module):
    """The ComfyUI ModelPatcher that ``nodes.host`` made for ``model``'s ``module``."""
    return model._comfy_patchers[id(module)]


def own_tiny_sd21():
    """The tiny SD 2.1-base as the pack loads it, a copy of its own (not the one the loader node shares), loaded in
    inference mode as the loader node is (``run``)."""
    sd21 = sys.modules["custom_nodes_x_diffsr_pack.sr_common.sd21"]
    with torch.inference_mode():
        return sd21.load_sd21(os.path.join(os.environ["DIFFSR_TEST_MODELS"], "diffusers", "tiny_sd21"))


def test_schemas(pack):
    _, nodes = pack
    assert {"DiffSR_SD21Loader", "OSEDiff_Loader", "OSEDiff_Upscale", "OSEDiff_LQEncoder", "OSEDiff_OneStepUNet",
            "OSEDiff_VAEDecode", "DAPE_Loader", "DAPE_PromptExtractor", "DoSSR_Loader", "DoSSR_Upscale"} <= set(nodes)
    for node_id, node in nodes.items():
        schema = node.define_schema()
        assert schema.category == "image/upscaling/DiffSR" and schema.display_name
        assert all(i.tooltip for i in schema.inputs), node_id
    for node_id in ("DoSSR_Upscale", "DoSSR_Sampler"):  # a seed copied from a KSampler fits (nodes.py L1505)
        (seed,) = [i for i in nodes[node_id].define_schema().inputs if i.id == "seed"]
        assert (seed.options["min"], seed.options["max"]) == (0, 0xFFFFFFFFFFFFFFFF), node_id
    loader = nodes["DiffSR_SD21Loader"].define_schema().inputs[0]
    assert loader.choices == ["checkpoints/download: v2-1_512-ema-pruned.safetensors", "diffusers/tiny_sd21"]
    config = nodes["DoSSR_Loader"].define_schema().inputs[1]  # not ComfyUI's stock SD yamls of models/configs
    assert config.choices == ["SD 2.1 (built in)", "tiny_cldm.yaml"]
    ram, lora, _ = nodes["DAPE_Loader"].define_schema().inputs  # each offers only its own official download
    assert ram.choices == ["dape_tiny.pth", "ram_tiny.pth", "download: ram_swin_large_14m.pth"]
    assert lora.choices == ["none", "dape_tiny.pth", "ram_tiny.pth", "download: DAPE.pth"]


def test_a_missing_requirement_is_named_with_its_install_command(tmp_path, monkeypatch):
    """ComfyUI logs what comfy_entrypoint raises and starts without the pack: a package the pack needs that is
    missing, or too old or too new, is named with the command that installs the requirements."""
    import asyncio
    import importlib.util
    from importlib import metadata

    import comfyui_diffsr

    requirements = os.path.join(ROOT, "requirements.txt")  # the pack's, also where it is installed as a wheel
    monkeypatch.setattr(comfyui_diffsr, "REQUIREMENTS", requirements)
    assert comfyui_diffsr.unmet_requirements(requirements) == []  # this environment meets them
    installed = {"diffusers": "0.25.0", "safetensors": "0.4.1", "numpy": "1.24.4", "pillow": "10",
                 "transformers": "5.0.0+local"}  # Pillow 10 meets >=10.0

    def version(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name in ("yaml", "tqdm") else find_spec(name))
    assert comfyui_diffsr.unmet_requirements(requirements) == [
        "diffusers>=0.30,<1.0 (0.25.0 installed)", "pyyaml>=6.0 (not installed)", "tqdm>=4.60 (not installed)"]
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)  # yaml importable, its metadata not found: accepted
    installed.update(diffusers="1.2.0", tqdm="4.67.1")
    assert comfyui_diffsr.unmet_requirements(requirements) == ["diffusers>=0.30,<1.0 (1.2.0 installed)"]
    with pytest.raises(ImportError, match=r"^DiffSR needs diffusers>=0.30,<1.0 \(1.2.0 installed\)\. Install its "
                                          r"requirements into ComfyUI's Python: python -m pip install -r "
                                          r"\".*requirements.txt\"$"):
        asyncio.run(comfyui_diffsr.comfy_entrypoint())
    assert comfyui_diffsr.unmet_requirements(str(tmp_path / "absent.txt")) is None  # installed as a wheel


@pytest.fixture(scope="module")
def osediff_model(pack):
    _, nodes = pack
    (sd21,) = run(nodes["DiffSR_SD21Loader"], base="diffusers/tiny_sd21")
    (model,) = run(nodes["OSEDiff_Loader"], sd21=sd21, weights="osediff_tiny.pkl")
    (again,) = run(nodes["OSEDiff_Loader"], sd21=sd21, weights="osediff_tiny.pkl")
    assert again is model  # loaded once
    return sd21, model


def test_all_in_one_equals_the_core_and_modular_graph(pack, osediff_model):
    _, nodes = pack
    sd21, model = osediff_model
    image = torch.rand(2, 27, 21, 3, generator=torch.Generator().manual_seed(0))
    original = image.clone()
    (out,) = run(nodes["OSEDiff_Upscale"], model=model, image=image, prompt="a cat", upscale=4.0, process_size=64,
                 color_fix="wavelet", tile_latent=96, tile_overlap=32, dtype="fp32")
    assert out.shape == (2, 108, 84, 3) and torch.equal(image, original)
    from comfyui_diffsr.osediff_core.pipeline import Options, osediff_upscale

    with torch.no_grad():  # the node is the core function, image by image, with the node's inputs
        core = torch.cat([osediff_upscale(model, one.movedim(-1, 0)[None], prompt="a cat",
                                          options=Options(upscale=4.0, process_size=64, color_fix="wavelet"))
                          for one in image])
    assert torch.equal(out, core.clamp(0, 1).movedim(1, -1))
    (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=image, upscale=4.0, process_size=64, vae_tile=1024,
                    dtype="fp32")
    assert latent["samples"].shape == (2, 4, 14, 11)
    (x0,) = run(nodes["OSEDiff_OneStepUNet"], model=model, latent=latent, prompt="a cat", tile_latent=96,
                tile_overlap=32, dtype="fp32")
    (decoded,) = run(nodes["OSEDiff_VAEDecode"], model=model, latent=x0, reference=image, upscale=4.0,
                     process_size=64, color_fix="wavelet", vae_tile=224)
    assert torch.equal(decoded, out)  # a batch of two float (not 8-bit) images: the modular chain's output
    # CONDITIONING (as CLIP Text Encode gives it) instead of the text: the same output
    from comfyui_diffsr.sr_common.sd21 import encode_prompt

    with torch.no_grad():
        embeds = encode_prompt(sd21.text_encoder, sd21.tokenizer, ["a cat"])
    (x0c,) = run(nodes["OSEDiff_OneStepUNet"], model=model, latent=latent, prompt="ignored", tile_latent=96,
                 tile_overlap=32, dtype="fp32", conditioning=[[embeds, {"pooled_output": None}]])
    assert torch.equal(x0c["samples"], x0["samples"])


def test_rgba_grayscale_and_cancel(pack, osediff_model):
    _, nodes = pack
    _, model = osediff_model
    mm = sys.modules["comfy.model_management"]
    args = dict(model=model, prompt="", upscale=2.0, process_size=32, color_fix="wavelet", tile_latent=96, tile_overlap=32,
                dtype="fp32")
    from comfyui_diffsr.sr_common.image import with_upscaled_alpha

    rgba = torch.rand(1, 20, 24, 4)
    (out,) = run(nodes["OSEDiff_Upscale"], image=rgba, **args)
    (rgb,) = run(nodes["OSEDiff_Upscale"], image=rgba[..., :3], **args)
    alpha = with_upscaled_alpha(torch.zeros(1, 3, 40, 48), rgba[..., 3:].movedim(-1, 1))[:, 3]
    assert out.shape == (1, 40, 48, 4) and torch.equal(out[..., :3], rgb) and torch.equal(out[..., 3], alpha)
    plane = torch.rand(1, 20, 24, 1)
    (gray,) = run(nodes["OSEDiff_Upscale"], image=plane, **args)
    (as_rgb,) = run(nodes["OSEDiff_Upscale"], image=plane.repeat(1, 1, 1, 3), **args)
    assert gray.shape == (1, 40, 48, 3) and torch.equal(gray, as_rgb)
    gray_alpha = torch.cat([plane, rgba[..., 3:]], dim=-1)  # gray + alpha: the gray as RGB, the alpha kept aside
    (out,) = run(nodes["OSEDiff_Upscale"], image=gray_alpha, **args)
    assert out.shape == (1, 40, 48, 4) and torch.equal(out[..., :3], gray) and torch.equal(out[..., 3], alpha)
    image = torch.rand(1, 20, 24, 3)
    mm.interrupt_current_processing(True)
    with pytest.raises(mm.InterruptProcessingException):
        run(nodes["OSEDiff_Upscale"], image=image, **dict(args, tile_latent=8, tile_overlap=4))
    (a,) = run(nodes["OSEDiff_Upscale"], image=image, **dict(args, tile_latent=8, tile_overlap=4))
    (b,) = run(nodes["OSEDiff_Upscale"], image=image, **dict(args, tile_latent=8, tile_overlap=4))
    assert torch.equal(a, b)


def test_oom_halves_every_tile(pack, osediff_model, monkeypatch):
    module, _ = pack
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    tried = []

    def run(tile_latent, vae_tile_decode):
        tried.append((tile_latent, vae_tile_decode))
        if vae_tile_decode > 60:
            raise host.mm.OOM_EXCEPTION("out of memory")
        return tile_latent

    # 0 (never tile) starts at the default; halving keeps multiples of 8 (DoSSR needs them) down to the floor
    assert host.with_oom_retry(run, tile_latent=0, vae_tile_decode=224) == 48
    assert tried == [(0, 224), (96, 112), (48, 56)]
    smaller = lambda tiles: smaller_tiles(tiles, host.TILE_DEFAULTS)
    assert smaller({"tile_latent": 104, "vae_tile_encode": 1024}) == {"tile_latent": 48, "vae_tile_encode": 512}
    assert smaller({"tile_latent": 16, "vae_tile_encode": 128, "vae_tile_decode": 16}) is None
    from comfyui_diffsr.dossr_core.pipeline import Options as DoSSROptions

    for name in ("tile_latent", "vae_tile_encode", "vae_tile_decode"):  # one set of defaults serves both methods
        assert getattr(DoSSROptions, name) == getattr(host.DEFAULT_TILES, name)
    calls = []
    with pytest.raises(host.mm.OOM_EXCEPTION):
        host.with_oom_retry(lambda tile_latent: calls.append(tile_latent) or (_ for _ in ()).throw(
            host.mm.OOM_EXCEPTION("oom")), tile_latent=32)
    assert calls == [32, 16]
    # an allocation the CPU allocator refuses (ComfyUI --cpu) is out-of-memory too, as PyTorch reports it
    for refused in (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                                 "memory: you tried to allocate 70368744177664 bytes. Error code 12 (Cannot allocate "
                                 "memory)"),
                    RuntimeError(r"[enforce fail at ..\c10\core\impl\alloc_cpu.cpp:72] data. DefaultCPUAllocator: "
                                 "not enough memory: you tried to allocate 70368744177664 bytes.")):  # Windows
        calls.clear()
        with pytest.raises(host.mm.OOM_EXCEPTION, match="DefaultCPUAllocator"):
            host.with_oom_retry(lambda tile_latent: calls.append(tile_latent) or (_ for _ in ()).throw(refused),
                                tile_latent=32)
        assert calls == [32, 16]
    calls.clear()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # any other error: no retry
        host.with_oom_retry(lambda tile_latent: calls.append(tile_latent) or (_ for _ in ()).throw(
            RuntimeError("mat1 and mat2 shapes cannot be multiplied")), tile_latent=32)
    assert calls == [32]


def test_oom_in_the_upscale_node_retries_with_smaller_vae_tiles(pack, osediff_model, monkeypatch):
    _, nodes = pack
    pipeline = sys.modules["custom_nodes_x_diffsr_pack.nodes.osediff"]
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    seen, real = [], pipeline.osediff_upscale

    def flaky(model, image, options, **kw):
        seen.append((options.tile_latent, options.vae_tile_encode, options.vae_tile_decode))
        if len(seen) == 1:
            raise host.mm.OOM_EXCEPTION("out of memory")
        return real(model, image, options=options, **kw)

    monkeypatch.setattr(pipeline, "osediff_upscale", flaky)
    (out,) = run(nodes["OSEDiff_Upscale"], model=osediff_model[1], image=torch.rand(1, 20, 24, 3), prompt="",
                 upscale=2.0, process_size=32, color_fix="adain", tile_latent=96, tile_overlap=32, dtype="fp32")
    assert seen == [(96, 1024, 224), (48, 512, 112)] and out.shape == (1, 40, 48, 3)


def test_oom_in_the_dossr_sampler_halves_the_tile_below_its_overlap(pack, monkeypatch):
    """DoSSR Sampler with latent tiles of 32 and an overlap of 16 runs out of memory: the tile is halved to 16, and
    the overlap with it to 8 (an overlap as large as the tile is refused by the core), so the run goes on instead of
    stopping with an error about an overlap the user did not set."""
    _, nodes = pack
    sampler = sys.modules["custom_nodes_x_diffsr_pack.nodes.dossr"]
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    seen, real = [], sampler.dossr_sample

    def flaky(model, context, *, options, **kw):
        seen.append((options.tile_latent, options.tile_overlap))
        if len(seen) == 1:
            raise host.mm.OOM_EXCEPTION("out of memory")
        return real(model, context, options=options, **kw)

    monkeypatch.setattr(sampler, "dossr_sample", flaky)
    embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    latent, reference = run(nodes["DoSSR_Sampler"], model=model, image=torch.rand(1, 20, 24, 3), steps=1, seed=7,
                            prompt="", tile_latent=32, tile_overlap=16, dtype="fp32", conditioning=[[embeds, {}]])
    assert seen == [(32, 16), (16, 8)]
    assert latent["samples"].shape == (1, 4, 16, 16) and reference.shape == (1, 80, 96, 3)


@pytest.mark.parametrize("method", ["osediff", "dossr"])
def test_oom_while_the_weights_load_is_named_and_not_retried(pack, osediff_model, monkeypatch, method):
    """Out of memory while ComfyUI moves a stage's weights to the device is raised at once, as ComfyUI's
    out-of-memory exception (so ComfyUI unloads its models), naming the networks and the fixes: smaller tiles
    cannot make weights fit."""
    _, nodes = pack
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    tiling = sys.modules["custom_nodes_x_diffsr_pack.sr_common.tiling"]
    image = torch.rand(1, 20, 24, 3)
    if method == "osediff":
        model = osediff_model[1]
        node, args, stage = nodes["OSEDiff_Upscale"], dict(model=model, prompt="", process_size=32), "unet"
    else:
        (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
        embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim)
        node, args = nodes["DoSSR_Upscale"], dict(model=model, prompt="", steps=2, seed=3, conditioning=[[embeds, {}]])
        stage = "unet, controlnet"
    tries, real = [], host.mm.load_models_gpu

    def full(models, *a, **kw):  # the UNet's stage does not fit
        if any(patcher.model.parts[0] is model.unet for patcher in models):
            tries.append(len(models))
            raise host.mm.OOM_EXCEPTION("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real(models, *a, **kw)

    monkeypatch.setattr(host.mm, "load_models_gpu", full)
    with pytest.raises(host.mm.OOM_EXCEPTION) as error:
        run(node, image=image, **args, upscale=2.0, color_fix="none", tile_latent=96, tile_overlap=32, dtype="fp32")
    assert tries == [len(stage.split(", "))] and isinstance(error.value, tiling.WeightsOutOfMemory)
    message = str(error.value)
    assert f"weights of {stage} (" in message and "GiB in float32) to cpu" in message
    assert "smaller tiles cannot help. To fix: close other programs that use the device or choose dtype fp16 or bf16" \
        in message and "run on the CPU" not in message  # the device is the CPU here
    assert "Tried to allocate 20.00 MiB" in str(error.value.__cause__)


def test_oom_while_the_dape_tagger_loads_is_named(pack, monkeypatch):
    """The DAPE tagger, which a node loads on its own, is named like the networks when its weights do not fit."""
    _, nodes = pack
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    tiling = sys.modules["custom_nodes_x_diffsr_pack.sr_common.tiling"]
    (dape,) = run(nodes["DAPE_Loader"], ram_or_converted="ram_tiny.pth", dape="dape_tiny.pth", dtype="bf16")

    def full(models, *a, **kw):
        raise host.mm.OOM_EXCEPTION("CUDA out of memory (simulated)")

    monkeypatch.setattr(host.mm, "load_models_gpu", full)
    with pytest.raises(tiling.WeightsOutOfMemory, match=r"weights of the DAPE tagger \(.* GiB in bfloat16\) to cpu: "
                       r".* To fix: close other programs that use the device\.$"):
        run(nodes["DAPE_PromptExtractor"], dape=dape, image=torch.rand(1, 24, 24, 3), upscale=4.0, process_size=0,
            user_prompt="", tags_only=True, exclude="", max_tags=0)


def test_nodes_compute_float32_as_ieee_float32(pack, osediff_model, monkeypatch):
    """On Ampere and later GPUs PyTorch computes float32 convolutions in TF32 unless told not to: every node that
    computes runs with it off (dtype fp32 is float32), and ComfyUI's flags are as they were after."""
    _, nodes = pack
    pipeline = sys.modules["custom_nodes_x_diffsr_pack.nodes.osediff"]
    seen, real, outside = [], pipeline.osediff_upscale, tf32_flags()
    monkeypatch.setattr(pipeline, "osediff_upscale", lambda *a, **kw: seen.append(tf32_flags()) or real(*a, **kw))
    run(nodes["OSEDiff_Upscale"], model=osediff_model[1], image=torch.rand(1, 20, 24, 3), prompt="", upscale=2.0,
        process_size=32, color_fix="none", tile_latent=0, tile_overlap=0, dtype="fp32")
    assert seen and seen[0] in IEEE_FLOAT32 and tf32_flags() == outside
    computing = {"OSEDiff_Upscale", "OSEDiff_LQEncoder", "OSEDiff_OneStepUNet", "OSEDiff_VAEDecode",
                 "DAPE_PromptExtractor", "DoSSR_Upscale", "DoSSR_Sampler", "DoSSR_VAEDecode"}
    for node_id, node in nodes.items():  # the loaders compute nothing on the device
        assert hasattr(node.execute, "__wrapped__") == (node_id in computing), node_id


def test_dossr_nodes(pack, osediff_model):
    _, nodes = pack
    (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    args = dict(model=model, image=image, steps=2, seed=3, prompt="", upscale=4.0, color_fix="wavelet",
                tile_latent=96, tile_overlap=32, dtype="fp32", conditioning=[[embeds, {}]])
    (a,) = run(nodes["DoSSR_Upscale"], **args)
    (b,) = run(nodes["DoSSR_Upscale"], **args)
    assert a.shape == (1, 128, 128, 3) and torch.equal(a, b)
    from comfyui_diffsr.dossr_core.pipeline import Options, dossr_upscale

    outs = {}
    for color_fix in ("wavelet", "adain", "none"):  # the node is the core function with the node's inputs
        (outs[color_fix],) = run(nodes["DoSSR_Upscale"], **dict(args, color_fix=color_fix))
        with torch.no_grad():
            core = dossr_upscale(model, image.movedim(-1, 1), prompt_embeds=embeds,
                                 options=Options(steps=2, seed=3, upscale=4.0, color_fix=color_fix))
        assert torch.equal(outs[color_fix], core.clamp(0, 1).movedim(1, -1)), color_fix
    assert not torch.equal(outs["adain"], outs["none"]) and not torch.equal(outs["adain"], outs["wavelet"])


class _EPS:  # comfy/model_sampling.py: the prediction type is a mixin class of the model_sampling object
    pass


class V_PREDICTION:
    pass


class SD20:  # comfy/supported_models.py SD20: the model_config class Load Checkpoint picks for SD 2.x
    def __init__(self, context_dim=1024):
        self.unet_config = {"context_dim": context_dim, "in_channels": 4, "model_channels": 320, "adm_in_channels": None}


class _Kind:
    def __init__(self, name):
        self.name = name


class FakeBaseModel:
    """comfy/model_base.py BaseModel: model_config, model_type and state_dict_for_saving (L315)."""

    def __init__(self, sd, config, model_type="EPS"):
        self.sd, self.model_config, self.model_type = sd, config, _Kind(model_type)

    def state_dict_for_saving(self, clip_state_dict=None, vae_state_dict=None, clip_vision_state_dict=None):
        out = {k: v for k, v in self.sd.items() if k.startswith("model.diffusion_model.")}
        # SD20.process_clip_state_dict_for_saving: clip_h → cond_stage_model.model; VAE gets first_stage_model.
        out.update({"cond_stage_model.model." + k[len("clip_h."):]: v for k, v in clip_state_dict.items()})
        out.update({"first_stage_model." + k: v for k, v in vae_state_dict.items()})
        if self.model_type.name == "V_PREDICTION":
            out["v_pred"] = torch.tensor([])
        return out


class FakePatcher:  # comfy/model_patcher.py ModelPatcher: .model, get_model_object (L466), what load_models_gpu uses
    def __init__(self, base, sampling=_EPS):
        self.model, self.sampling = base, sampling()
        self.load_device = self.offload_device = torch.device("cpu")

    def model_patches_models(self):
        return []

    def model_size(self):
        return 0

    def loaded_size(self):
        return 0

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        return 0

    def detach(self, unpatch_all=True):
        return self.model

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.sampling


class FakeClip:  # comfy/sd.py CLIP: get_sd (L260), load_model (L267)
    def __init__(self, sd):
        self.sd = {"clip_h." + k[len("cond_stage_model.model."):]: v for k, v in sd.items()
                   if k.startswith("cond_stage_model.model.")}

    def get_sd(self):
        return dict(self.sd)

    def load_model(self):  # returns the CLIP's ModelPatcher
        import comfy.model_patcher

        return comfy.model_patcher.ModelPatcher(torch.nn.Linear(1, 1), torch.device("cpu"), torch.device("cpu"))


class FakeVae:  # comfy/sd.py VAE.get_sd (L833)
    def __init__(self, sd):
        self.sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}

    def get_sd(self):
        return dict(self.sd)


def test_sd21_from_load_checkpoint(pack, osediff_model, monkeypatch, capsys):
    """MODEL/CLIP/VAE of the standard Load Checkpoint → the same SD 2.1-base as our own loader; 768-v, SD1 refused.
    Weights that ComfyUI holds in less than float32 (on a GPU: the UNet and text encoder in fp16, the VAE in bf16)
    are named in a note: the networks are built from those rounded values."""
    from safetensors.torch import load_file

    _, nodes = pack
    sd21, model = osediff_model
    tiny = os.path.join(os.environ["DIFFSR_TEST_MODELS"], "diffusers", "tiny_sd21")
    monkeypatch.setattr(sys.modules["custom_nodes_x_diffsr_pack.sr_common.sd21"], "shipped_config_dir", lambda: tiny)
    sd = load_file(os.path.join(DATA, "osediff", "tiny_sd21_single.safetensors"))
    node = nodes["DiffSR_SD21FromCheckpoint"]
    exact = {k: v.float() for k, v in sd.items()}
    run(node, model=FakePatcher(FakeBaseModel(exact, SD20())), clip=FakeClip(exact), vae=FakeVae(exact))
    assert "[DiffSR]" not in capsys.readouterr().out
    vae_bf16 = {k: v.bfloat16() if k.startswith("first_stage_model.") else v.float() for k, v in sd.items()}
    run(node, model=FakePatcher(FakeBaseModel(vae_bf16, SD20())), clip=FakeClip(vae_bf16), vae=FakeVae(vae_bf16))
    note = capsys.readouterr().out
    assert "Load Checkpoint holds the VAE in bfloat16: OSEDiff and DoSSR run on those rounded weights" in note, note
    assert "Load SD 2.1-base (DiffSR)" in note and "--fp32-vae" in note
    (base,) = run(node, model=FakePatcher(FakeBaseModel(sd, SD20())), clip=FakeClip(sd), vae=FakeVae(sd))
    mm = sys.modules["comfy.model_management"]
    assert mm.LOADED[-1][1] is True  # loaded with patches applied, as comfy.sd.save_checkpoint
    for ours, theirs in ((base.unet, sd21.unet), (base.vae, sd21.vae), (base.text_encoder, sd21.text_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (model2,) = run(nodes["OSEDiff_Loader"], sd21=base, weights="osediff_tiny.pkl")
    image = torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(5))
    args = dict(image=image, prompt="a dog", upscale=2.0, process_size=32, color_fix="adain", tile_latent=96,
                tile_overlap=32, dtype="fp32")
    assert torch.equal(run(nodes["OSEDiff_Upscale"], model=model2, **args)[0],
                       run(nodes["OSEDiff_Upscale"], model=model, **args)[0])
    refusals = [(FakePatcher(FakeBaseModel(sd, SD20()), sampling=V_PREDICTION), "v-prediction"),
                (FakePatcher(FakeBaseModel(sd, SD20(), model_type="V_PREDICTION")), "v-prediction"),
                (FakePatcher(FakeBaseModel(sd, type("SD15", (SD20,), {})(context_dim=768))), "SD15")]
    for patcher, message in refusals:
        with pytest.raises(Exception, match=message):
            run(node, model=patcher, clip=FakeClip(sd), vae=FakeVae(sd))


def test_dossr_modular_equals_all_in_one(pack):
    """DoSSR Sampler → DoSSR VAE Decode gives the all-in-one output; the LATENT decodes like ComfyUI's VAE Decode."""
    _, nodes = pack
    (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    image = torch.rand(2, 20, 24, 3, generator=torch.Generator().manual_seed(4))
    original = image.clone()
    embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    cond = [[embeds, {}]]
    common = dict(model=model, image=image, steps=2, seed=7, prompt="", tile_latent=96, tile_overlap=32, dtype="fp32",
                  conditioning=cond)
    for scale in (4.0, 2.0):
        (whole,) = run(nodes["DoSSR_Upscale"], upscale=scale, color_fix="wavelet", **common)
        latent, rrdb = run(nodes["DoSSR_Sampler"], **common)
        assert latent["samples"].shape == (2, 4, 16, 16) and rrdb.shape == (2, 80, 96, 3)
        (parts,) = run(nodes["DoSSR_VAEDecode"], model=model, latent=latent, reference=rrdb, upscale=scale,
                       color_fix="wavelet", vae_tile=224)
        assert parts.shape == whole.shape == (2, int(20 * scale), int(24 * scale), 3)
        assert torch.equal(parts, whole), scale  # a batch of two float images
    assert torch.equal(image, original)
    # ComfyUI's VAE Decode on an SD latent: (first_stage_model.decode(samples) + 1) / 2, clamped (comfy/sd.py VAE.decode)
    with torch.no_grad():
        standard = ((model.vae.decode(latent["samples"][:1]).sample + 1) / 2).clamp(0, 1)[..., :80, :96]
    (nofix,) = run(nodes["DoSSR_VAEDecode"], model=model, latent={"samples": latent["samples"][:1]},
                   reference=rrdb[:1], upscale=4.0, color_fix="none", vae_tile=0)
    assert torch.equal(nofix.movedim(-1, 1), standard)


def test_dossr_vae_decode_refuses_an_upscale_comfyui_lets_through(pack):
    """ComfyUI checks a FLOAT input only against its min and max, which NaN passes (an API prompt's ``"upscale":
    "nan"`` is ``float("nan")``). The other nodes refuse it by name (``check_upscale``, in ``preprocess`` and
    DoSSR's ``Options``); DoSSR VAE Decode decoded the whole LATENT, then failed in its resize ("cannot convert float
    NaN to integer"). It refuses it as they do, before decoding."""
    _, nodes = pack
    (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    latent, reference = {"samples": torch.zeros(1, 4, 8, 8)}, torch.rand(1, 64, 64, 3)
    for upscale in (float("nan"), 0.5):
        with pytest.raises(ValueError, match=rf"^`upscale` must be between 1 and 8, got {upscale:g}$"):
            run(nodes["DoSSR_VAEDecode"], model=model, latent=latent, reference=reference, upscale=upscale,
                color_fix="wavelet", vae_tile=0)
    (out,) = run(nodes["DoSSR_VAEDecode"], model=model, latent=latent, reference=reference, upscale=4.0,
                 color_fix="wavelet", vae_tile=0)
    assert out.shape == (1, 64, 64, 3)


def test_dossr_modular_keeps_alpha_and_pairs_batches(pack):
    """An RGBA image through DoSSR Sampler → DoSSR VAE Decode keeps its alpha as the all-in-one does (the REFERENCE
    carries it); a LATENT and a reference of different batch sizes are refused, not silently truncated."""
    _, nodes = pack
    (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    image = torch.rand(2, 20, 24, 4, generator=torch.Generator().manual_seed(4))
    embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    common = dict(model=model, image=image, steps=1, seed=7, prompt="", tile_latent=96, tile_overlap=32, dtype="fp32",
                  conditioning=[[embeds, {}]])
    (whole,) = run(nodes["DoSSR_Upscale"], upscale=4.0, color_fix="wavelet", **common)
    latent, reference = run(nodes["DoSSR_Sampler"], **common)
    assert reference.shape == (2, 80, 96, 4)
    (parts,) = run(nodes["DoSSR_VAEDecode"], model=model, latent=latent, reference=reference, upscale=4.0,
                   color_fix="wavelet", vae_tile=224)
    assert parts.shape == whole.shape == (2, 80, 96, 4) and torch.equal(parts[..., 3], whole[..., 3])
    with pytest.raises(ValueError, match="LATENT holds 2 image"):
        run(nodes["DoSSR_VAEDecode"], model=model, latent=latent, reference=reference[:1], upscale=4.0,
            color_fix="wavelet", vae_tile=224)


def test_inputs_that_do_not_fit_are_refused_by_name(pack, osediff_model):
    """What a graph can wire but the models cannot take is refused with what to connect instead: a CONDITIONING of
    another CLIP, a latent of another model family, a LATENT decoded against a reference it was not made from
    (which would otherwise give a corner of the image, or a stretched one)."""
    _, nodes = pack
    _, model = osediff_model
    (dossr,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    image = torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(6))
    sd15 = [[torch.randn(1, 77, 768), {"pooled_output": None}]]  # CLIP Text Encode with an SD 1.x CLIP
    with pytest.raises(ValueError, match=r"prompt embedding has shape \(1, 77, 768\).*CLIP of an SD 2.1"):
        run(nodes["OSEDiff_OneStepUNet"], model=model, latent={"samples": torch.zeros(1, 4, 8, 8)}, prompt="",
            tile_latent=0, tile_overlap=0, dtype="fp32", conditioning=sd15)
    with pytest.raises(ValueError, match=r"prompt embedding has shape \(1, 77, 768\)"):
        run(nodes["DoSSR_Upscale"], model=dossr, image=image, steps=1, seed=0, prompt="", upscale=4.0,
            color_fix="none", tile_latent=0, tile_overlap=0, dtype="fp32", conditioning=sd15)
    flux = {"samples": torch.zeros(1, 16, 8, 8)}  # SD3 / Flux: 16 channels
    for node, inputs in (("OSEDiff_OneStepUNet", dict(model=model, prompt="", tile_latent=0, tile_overlap=0,
                                                      dtype="fp32")),
                         ("OSEDiff_VAEDecode", dict(model=model, reference=image, upscale=4.0, process_size=32,
                                                    color_fix="none", vae_tile=0)),
                         ("DoSSR_Sampler", dict(model=dossr, steps=1, seed=0, prompt="", tile_latent=0,
                                                tile_overlap=0, dtype="fp32")),
                         ("DoSSR_VAEDecode", dict(model=dossr, reference=image, upscale=4.0, color_fix="none",
                                                  vae_tile=0))):
        with pytest.raises(ValueError, match=r"LATENT has shape \(1, 16, 8, 8\).*4-channel"):
            run(nodes[node], latent=flux, **inputs)
    with pytest.raises(ValueError, match=r"IMAGE batch is empty \(0 images\)"):
        run(nodes["OSEDiff_Upscale"], model=model, image=image[:0], prompt="", upscale=4.0, process_size=32,
            color_fix="none", tile_latent=0, tile_overlap=0, dtype="fp32")
    with pytest.raises(ValueError, match="LATENT batch is empty"):
        run(nodes["OSEDiff_OneStepUNet"], model=model, latent={"samples": torch.zeros(0, 4, 8, 8)}, prompt="",
            tile_latent=0, tile_overlap=0, dtype="fp32")
    (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=image, upscale=4.0, process_size=32, vae_tile=0,
                    dtype="fp32")
    assert latent["samples"].shape == (1, 4, 10, 12)
    for upscale, process_size in ((2.0, 32), (4.0, 128)):  # ×2, or the reference raised to 128 first: not this latent
        with pytest.raises(ValueError, match="the LATENT is 12×10 .*same upscale and process_size"):
            run(nodes["OSEDiff_VAEDecode"], model=model, latent=latent, reference=image, upscale=upscale,
                process_size=process_size, color_fix="none", vae_tile=0)
    embeds = torch.randn(1, 77, dossr.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    sampled, reference = run(nodes["DoSSR_Sampler"], model=dossr, image=image, steps=1, seed=0, prompt="",
                             tile_latent=0, tile_overlap=0, dtype="fp32", conditioning=[[embeds, {}]])
    largest, _ = run(nodes["DoSSR_Sampler"], model=dossr, image=image, steps=1, seed=2**64 - 1, prompt="",
                     tile_latent=0, tile_overlap=0, dtype="fp32", conditioning=[[embeds, {}]])  # KSampler's largest
    assert torch.isfinite(largest["samples"]).all() and not torch.equal(largest["samples"], sampled["samples"])
    for wrong in (image, reference[:, :40, :40]):  # the LR input as the reference; a reference smaller than it
        with pytest.raises(ValueError, match="Connect the REFERENCE output of the DoSSR Sampler"):
            run(nodes["DoSSR_VAEDecode"], model=dossr, latent=sampled, reference=wrong, upscale=4.0,
                color_fix="none", vae_tile=0)


def test_a_combined_conditioning_is_refused_by_name(pack, osediff_model):
    """A CONDITIONING of several entries (Conditioning Combine) is refused, naming the nodes that make one: the
    first entry alone was used before, silently."""
    _, nodes = pack
    _, model = osediff_model
    embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim)
    combined = [[embeds, {}], [embeds.flip(1), {}]]
    (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=torch.rand(1, 16, 16, 3), upscale=2.0,
                    process_size=32, vae_tile=1024, dtype="fp32")
    with pytest.raises(ValueError, match=r"One-Step UNet: the CONDITIONING has 2 entries .* Conditioning \(Concat\)"):
        run(nodes["OSEDiff_OneStepUNet"], model=model, latent=latent, prompt="", tile_latent=96, tile_overlap=32,
            dtype="fp32", conditioning=combined)
    (dossr,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    with pytest.raises(ValueError, match="DoSSR Sampler: the CONDITIONING has 2 entries"):
        run(nodes["DoSSR_Sampler"], model=dossr, image=torch.rand(1, 16, 16, 3), steps=1, seed=0, prompt="",
            tile_latent=96, tile_overlap=32, dtype="fp32", conditioning=combined)


def test_a_conditioning_with_sampler_settings_is_refused_by_name(pack, osediff_model):
    """An entry that carries what a sampler applies (an area and strength from Conditioning (Set Area), a mask, a
    timestep range, a ControlNet) is refused, naming it and the node that adds it: it was dropped silently. The
    pooled output CLIP Text Encode adds is no such setting."""
    _, nodes = pack
    _, model = osediff_model
    embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(3))
    (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=torch.rand(1, 32, 32, 3), upscale=2.0,
                    process_size=32, vae_tile=1024, dtype="fp32")
    one_step = dict(model=model, latent=latent, prompt="", tile_latent=96, tile_overlap=32, dtype="fp32")
    plain = run(nodes["OSEDiff_OneStepUNet"], **one_step, conditioning=[[embeds, {"pooled_output": embeds[:, 0]}]])
    area = {"pooled_output": None, "area": (8, 8, 0, 0), "strength": 0.0, "set_area_to_bounds": False}
    with pytest.raises(ValueError, match=r"One-Step UNet: the CONDITIONING carries area, strength, set_area_to_bounds "
                                         r"\(from Conditioning \(Set Area\) or a node like it\), which a sampler "
                                         r"applies"):
        run(nodes["OSEDiff_OneStepUNet"], **one_step, conditioning=[[embeds, area]])
    (dossr,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    dossr_embeds = torch.randn(1, 77, dossr.unet.config.cross_attention_dim)
    for settings, named in (({"start_percent": 0.0, "end_percent": 0.5}, "start_percent, end_percent \\(from "
                                                                         "ConditioningSetTimestepRange or"),
                            ({"control": object()}, "control \\(from Apply ControlNet or"),
                            ({"strength": 0.5}, "strength \\(from ConditioningSetAreaStrength or")):
        with pytest.raises(ValueError, match=f"DoSSR Sampler: the CONDITIONING carries {named}"):
            run(nodes["DoSSR_Sampler"], model=dossr, image=torch.rand(1, 16, 16, 3), steps=1, seed=0, prompt="",
                tile_latent=96, tile_overlap=32, dtype="fp32", conditioning=[[dossr_embeds, settings]])
    assert torch.isfinite(plain[0]["samples"]).all()


def test_a_standard_vae_encodes_latent_decodes_to_the_part_it_kept(pack, osediff_model):
    """ComfyUI's VAE Encode crops an image to a multiple of 8 px about its centre (comfy/sd.py
    ``vae_encode_crop_pixels``: 2 rows and 1 column off first here) and gives the samples alone. OSEDiff VAE Decode
    of such a latent against the whole reference gives that part, colour-fixed against that part of the reference,
    its alpha too (it refused the latent, with no way to make the graph run); where process_size enlarged the
    reference, at the output's scale. The LQ Encoder's own latent, which says what it encoded, is not taken for
    such a crop: against another reference it is refused."""
    _, nodes = pack
    _, model = osediff_model
    image = torch.rand(1, 21, 27, 4, generator=torch.Generator().manual_seed(8))
    image[..., 3] = (torch.arange(27) >= 13).float()  # a sharp alpha edge: a shifted or squeezed alpha shows
    kept = image[:, 2:18, 1:25]  # 16×24

    def vae_encoded(image):  # the samples of that image, alone, as VAE Encode gives them
        (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=image[..., :3], upscale=1.0, process_size=8,
                        vae_tile=0, dtype="fp32")
        return {"samples": latent["samples"]}

    latent = vae_encoded(kept)
    assert latent["samples"].shape == (1, 4, 2, 3)
    decode = dict(model=model, latent=latent, upscale=1.0, process_size=8, color_fix="adain", vae_tile=0)
    (whole,), (part,) = (run(nodes["OSEDiff_VAEDecode"], **decode, reference=ref) for ref in (image, kept))
    assert whole.shape == (1, 16, 24, 4)
    torch.testing.assert_close(whole, part, rtol=0, atol=1e-6)  # the colour statistics of a view: float rounding
    (tagged,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=kept, upscale=1.0, process_size=8, vae_tile=0,
                    dtype="fp32")
    with pytest.raises(ValueError, match=r"the LATENT is 3×2 \(latent px\) \(made from a 24×16 px image\), "
                                         r"but the reference at upscale 1 and process_size 8 is 27×21 px"):
        run(nodes["OSEDiff_VAEDecode"], **dict(decode, latent=tagged), reference=image)
    pipeline = sys.modules["custom_nodes_x_diffsr_pack.osediff_core.pipeline"]
    lq, plan = pipeline.preprocess(image[..., :3].movedim(-1, 1), upscale=2.0, process_size=64)  # 32 px, then ×2
    height, width = lq.shape[-2:]
    top, left, h, w = height % 8 // 2, width % 8 // 2, height // 8 * 8, width // 8 * 8
    assert (top, left) != (0, 0)
    lq_kept = lq[..., top:top + h, left:left + w].movedim(1, -1)
    latent = vae_encoded(lq_kept)
    enlarged = dict(decode, latent=latent, upscale=2.0, process_size=64)
    (whole,), (part,) = (run(nodes["OSEDiff_VAEDecode"], **args) for args in (
        dict(enlarged, reference=image[..., :3]), dict(decode, latent=latent, reference=lq_kept)))
    size = (int(w * plan.output_size[0] / width + 0.5), int(h * plan.output_size[1] / height + 0.5))
    assert whole.shape == (1, size[1], size[0], 3) and size != plan.output_size
    expected = pipeline.img.resize(part.movedim(-1, 1), size, "bicubic").clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(whole, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=f"the reference at upscale 2 and process_size 64 is {width}×{height} px, "
                                         f"whose latent is {-(-width // 8)}×{-(-height // 8)} from the OSEDiff LQ "
                                         f"Encoder \\(or {width // 8}×{height // 8} from a standard VAE Encode"):
        run(nodes["OSEDiff_VAEDecode"], **dict(enlarged, latent={"samples": latent["samples"][..., 1:]}),
            reference=image)


def test_a_latent_of_the_reference_upscaled_as_it_is_names_the_process_size_that_takes_it(pack, osediff_model):
    """VAE Encode of a small reference upscaled bicubically ×upscale (ImageScaleBy) gives a latent of that size,
    which OSEDiff VAE Decode takes only at a process_size that does not enlarge the reference first: the refusal
    names that process_size (it said to give "the encoder" the same process_size, which VAE Encode has not), and
    at that process_size the latent decodes. A LQ Encoder latent resized since (Upscale Latent) is refused as
    resized, with the standard VAE Decode as the way to decode it."""
    _, nodes = pack
    _, model = osediff_model
    image = torch.rand(1, 10, 9, 3, generator=torch.Generator().manual_seed(9))  # ×4: 36×40 px, latent 4×5 cropped

    def vae_encoded(image):  # the samples alone, as VAE Encode gives them
        (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=image, upscale=1.0, process_size=8,
                        vae_tile=0, dtype="fp32")
        return {"samples": latent["samples"]}

    latent = vae_encoded(torch.rand(1, 40, 32, 3))  # the centre 40×32 px of the 40×36 px ×4 image
    decode = dict(model=model, latent=latent, reference=image, upscale=4.0, color_fix="none", vae_tile=0)
    with pytest.raises(ValueError, match=r"the LATENT is 4×5 \(latent px\), of the reference ×4 as it is \(36×40 "
                                         r"px\); at process_size 64 .* enlarged to 64×68 px first.* Set "
                                         r"process_size to 32 "):
        run(nodes["OSEDiff_VAEDecode"], **decode, process_size=64)
    (out,) = run(nodes["OSEDiff_VAEDecode"], **decode, process_size=32)
    assert out.shape == (1, 40, 32, 3)
    (encoded,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=image, upscale=4.0, process_size=64, vae_tile=0,
                     dtype="fp32")
    resized = dict(encoded, samples=encoded["samples"][..., ::2, ::2])  # Upscale Latent keeps the other keys
    with pytest.raises(ValueError, match=r"the LATENT is 4×5 \(latent px\), but the LQ Encoder makes it 8×9 from "
                                         r"this reference .* resized or cropped since .* standard VAE Decode"):
        run(nodes["OSEDiff_VAEDecode"], **dict(decode, latent=resized), process_size=64)


def test_osediff_latent_is_a_standard_sd_latent(pack, osediff_model):
    """OSEDiff LATENT through ComfyUI's VAE Decode ((decode(samples) + 1) / 2, clamped) = OSEDiff VAE Decode
    without colour fix, bit for bit (the same decoder; the LATENT's 1/0.18215 scaling undone exactly)."""
    _, nodes = pack
    _, model = osediff_model
    image = torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(6))
    (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=image, upscale=4.0, process_size=32, vae_tile=0,
                    dtype="fp32")
    (x0,) = run(nodes["OSEDiff_OneStepUNet"], model=model, latent=latent, prompt="", tile_latent=0, tile_overlap=0,
                dtype="fp32")
    with torch.no_grad():
        standard = ((model.vae.decode(x0["samples"]).sample + 1) / 2).clamp(0, 1)
    (ours,) = run(nodes["OSEDiff_VAEDecode"], model=model, latent=x0, reference=image, upscale=4.0, process_size=32,
                  color_fix="none", vae_tile=0)
    assert torch.equal(ours.movedim(-1, 1), standard)


def test_models_are_loaded_and_unloaded_by_comfy_model_management(pack, osediff_model):
    """Each network goes to the device through load_models_gpu, fully, with a patcher of its own, stage by stage
    (the decode with its estimated activations as memory_required), and leaves it when ComfyUI frees memory; the
    text encoder goes there only for a prompt not encoded yet."""
    _, nodes = pack
    _, model = osediff_model
    mm = sys.modules["comfy.model_management"]
    latents = sys.modules["custom_nodes_x_diffsr_pack.sr_common.latents"]
    image = torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(8))
    args = dict(model=model, image=image, prompt="a prompt of this test", upscale=2.0, process_size=32,
                color_fix="adain", tile_latent=96, tile_overlap=32, dtype="fp32")
    mm.LOADED.clear()
    mm.REQUIRED.clear()
    sys.modules["custom_nodes_x_diffsr_pack.sr_common.fast_modules"].forget_folded_kernels(model.unet)
    unet_bytes = latents.denoiser_bytes(model.unet, torch.empty(1, 4, 5, 6), 96, 32)  # the kernels to fold too
    (first,) = run(nodes["OSEDiff_Upscale"], **args)
    networks = [model.lq_encoder, model.unet, model.vae]  # in the order of the stages
    patchers = [patcher_of(model, m) for m in networks]
    text = patcher_of(model, model.text_encoder)
    assert mm.LOADED == [([text], False, True)] + [([p], False, True) for p in patchers]  # force_full_load
    encode_bytes = latents.encode_moments_bytes(model.lq_encoder, torch.empty(1, 3, 40, 48), 1024)  # the ×2 LQ
    decode_bytes = latents.vae_decode_bytes(model.vae, torch.empty(1, 4, 5, 6), 224)  # its latent
    assert mm.REQUIRED == [0, encode_bytes, unet_bytes, decode_bytes] and min(mm.REQUIRED[1:]) > 0
    assert [p.model.parts[0] for p in patchers + [text]] == networks + [model.text_encoder]
    assert set(mm.loaded_models()) >= {text, *patchers}
    mm.unload_all_models()  # ComfyUI needs the memory: detach() moves the weights to the offload device
    assert not mm.loaded_models() and all(p.model.device == mm.unet_offload_device() for p in patchers)
    mm.LOADED.clear()
    (again,) = run(nodes["OSEDiff_Upscale"], **args)
    assert mm.LOADED == [([p], False, True) for p in patchers]  # the same patchers again; the prompt was cached
    assert torch.equal(first, again)
    mm.LOADED.clear()  # the modular nodes: each loads its own network only, the VAE's with their estimates
    mm.REQUIRED.clear()
    (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=image, upscale=2.0, process_size=32, vae_tile=0,
                    dtype="fp32")
    unet_bytes = latents.denoiser_bytes(model.unet, latent["samples"], 0, 0)  # untiled, the kernels folded
    (x0,) = run(nodes["OSEDiff_OneStepUNet"], model=model, latent=latent, prompt="", tile_latent=0, tile_overlap=0,
                dtype="fp32", conditioning=[[torch.randn(1, 77, model.unet.config.cross_attention_dim), {}]])
    run(nodes["OSEDiff_VAEDecode"], model=model, latent=x0, reference=image, upscale=2.0, process_size=32,
        color_fix="none", vae_tile=0)  # untiled: the same estimates here
    assert mm.LOADED == [([p], False, True) for p in patchers]
    assert mm.REQUIRED == [encode_bytes, unet_bytes, decode_bytes]


def test_a_device_short_of_memory_unloads_the_unet_for_the_decode(pack, osediff_model, monkeypatch):
    """Where the device holds the UNet and the VAE but not also the decode's activations, ComfyUI unloads the LQ
    encoder and as much of the UNet as it must for the VAE decode, as it unloads a diffusion model for its own VAE
    Decode, and loads the UNet whole again for the next image; where it has room, all stay loaded. The images are
    the same."""
    _, nodes = pack
    _, model = osediff_model
    mm = sys.modules["comfy.model_management"]
    args = dict(model=model, image=torch.rand(2, 20, 24, 3, generator=torch.Generator().manual_seed(4)), prompt="",
                upscale=2.0, process_size=32, color_fix="adain", tile_latent=96, tile_overlap=32, dtype="fp32")
    during_decode, during_unet = [], []
    patchers = lambda: [patcher_of(model, m) for m in (model.lq_encoder, model.unet, model.vae)]
    unet_loaded = lambda: patcher_of(model, model.unet).loaded_size()
    hooks = [model.vae.decoder.register_forward_pre_hook(lambda *_: during_decode.append(
                 (set(mm.loaded_models()), unet_loaded()))),
             model.unet.register_forward_pre_hook(lambda *_: during_unet.append(unet_loaded()))]
    try:
        mm.REQUIRED.clear()
        (roomy,) = run(nodes["OSEDiff_Upscale"], **args)
        encoder, unet, vae = patchers()
        assert all(loaded >= {encoder, unet, vae} for loaded, _ in during_decode)
        decode_bytes = mm.REQUIRED[-1]  # the last stage: the decode, with its estimate
        assert decode_bytes > 0 and mm.REQUIRED[-2] > 0  # the UNet's stage asks for its estimate too
        # room for the VAE, the decode's activations and half the UNet
        monkeypatch.setattr(mm, "TOTAL_MEMORY", vae.model_size() + decode_bytes + unet.model_size() // 2)
        mm.unload_all_models()
        during_decode.clear()
        during_unet.clear()
        mm.LOADED.clear()
        (tight,) = run(nodes["OSEDiff_Upscale"], **args)
    finally:
        for hook in hooks:
            hook.remove()
    assert [loaded for loaded, _ in during_decode] == [{unet, vae}, {unet, vae}]  # the encoder unloaded
    assert all(0 < part <= unet.model_size() // 2 for _, part in during_decode)  # the UNet in part
    assert during_unet == [unet.model_size()] * 2  # whole again for its own stage
    assert [call[0] for call in mm.LOADED] == [[encoder], [unet], [vae]] * 2
    assert torch.equal(tight, roomy)


def test_partial_unload_drops_the_folded_upsampler_kernels(pack, osediff_model):
    """ComfyUI frees part of a model by moving single layers (``ModelPatcher.partially_unload``): the kernels that
    ``FusedUpsample2D`` folded from them, which ComfyUI does not see, go with them; the next run folds them again
    and gives the same image."""
    _, nodes = pack
    _, model = osediff_model
    mm = sys.modules["comfy.model_management"]
    fused_type = sys.modules["custom_nodes_x_diffsr_pack.sr_common.fast_modules"].FusedUpsample2D
    args = dict(model=model, image=torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(3)), prompt="",
                upscale=2.0, process_size=32, color_fix="adain", tile_latent=0, tile_overlap=0, dtype="fp32")
    (first,) = run(nodes["OSEDiff_Upscale"], **args)
    fused = [m for m in model.vae.modules() if isinstance(m, fused_type)]
    assert fused and all(m._kernels[0] is not None for m in fused)
    assert patcher_of(model, model.vae).partially_unload(mm.unet_offload_device(), 1) > 0
    assert all(m._kernels == (None, None) for m in fused)
    (again,) = run(nodes["OSEDiff_Upscale"], **args)
    assert all(m._kernels[0] is not None for m in fused) and torch.equal(first, again)


def test_prompt_embeddings_kept_for_recent_prompts_only(pack, osediff_model):
    """A run over many prompts (DAPE over a folder: one per image) keeps the embeddings of the last 32 only, for
    OSEDiff and DoSSR alike; a prompt used again is not encoded again."""
    _, nodes = pack
    _, model = osediff_model
    (dossr,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    for encode, cache in ((model.prompt_embedding, model.prompt_cache),
                          (dossr.prompt_embedding, dossr.prompt_cache)):
        first = encode("prompt 0")
        assert encode("prompt 0") is first
        for i in range(1, 40):
            encode(f"prompt {i}")
        assert len(cache) == 32 and "prompt 0" not in cache and "prompt 39" in cache
        assert torch.equal(encode("prompt 0"), first) and len(cache) == 32


def test_dape_and_text_encoder_leave_the_device_to_the_networks(pack, osediff_model, monkeypatch):
    """With DAPE connected, the tagger tags every image first, the text encoder then encodes the new prompts, and
    the networks run last, each stage in a load_models_gpu call of its own: where the device has room for the
    networks and the decode only, ComfyUI unloads the tagger and the text encoder for them."""
    _, nodes = pack
    _, model = osediff_model
    mm = sys.modules["comfy.model_management"]
    (dape,) = run(nodes["DAPE_Loader"], ram_or_converted="ram_tiny.pth", dape="dape_tiny.pth")
    args = dict(model=model, image=torch.rand(2, 20, 24, 3, generator=torch.Generator().manual_seed(9)), prompt="",
                upscale=2.0, process_size=32, color_fix="adain", tile_latent=96, tile_overlap=32, dtype="fp32")
    (roomy,) = run(nodes["OSEDiff_Upscale"], **args, dape=dape)
    pipeline, dape_core = (sys.modules[f"custom_nodes_x_diffsr_pack.osediff_core.{m}"] for m in ("pipeline", "dape"))
    with torch.no_grad():  # the core's DAPE path, as the osediff command runs it: the tags asked for mid-run
        core = [pipeline.osediff_upscale(model, one, options=pipeline.Options(upscale=2.0, process_size=32),
                                         prompt_fn=lambda lq: dape_core.dape_prompt(dape.tags(lq)[0], ""))
                for one in args["image"].movedim(-1, 1).split(1)]
    assert torch.equal(roomy, torch.cat(core).clamp(0, 1).movedim(1, -1))
    mm.REQUIRED.clear()
    (alone,) = run(nodes["OSEDiff_Upscale"], **args)
    patchers = [patcher_of(model, m) for m in (model.lq_encoder, model.unet, model.vae)]
    tagger, text = patcher_of(dape, dape), patcher_of(model, model.text_encoder)
    room = sum(p.model_size() for p in patchers) + max(mm.REQUIRED) + 1  # the networks and the decode, no more
    monkeypatch.setattr(mm, "TOTAL_MEMORY", room)
    model.prompt_cache.clear()
    mm.unload_all_models()
    mm.LOADED.clear()
    during_decode = []
    hook = model.vae.decoder.register_forward_pre_hook(lambda *_: during_decode.append(
        {p: p.loaded_size() for p in mm.loaded_models()}))
    try:
        (tight,) = run(nodes["OSEDiff_Upscale"], **args, dape=dape)
    finally:
        hook.remove()
    calls = [call[0] for call in mm.LOADED]  # the tagger, the text encoder for each new prompt, then the stages
    assert calls[0] == [tagger] and calls[1:-6] and all(c == [text] for c in calls[1:-6])
    assert calls[-6:] == [[p] for p in patchers] * 2
    assert len(during_decode) == 2
    for loaded in during_decode:  # the networks whole; of the tagger and the text encoder no more than is left
        assert all(loaded.get(p) == p.model_size() for p in patchers)
        assert loaded.get(tagger, 0) + loaded.get(text, 0) <= room - sum(loaded[p] for p in patchers) - mm.REQUIRED[-1]
    assert torch.equal(tight, roomy) and tight.shape == alone.shape and not torch.equal(tight, alone)  # tags used


def test_with_dape_the_users_prompt_follows_the_tags(pack, osediff_model, monkeypatch):
    """OSEDiff Upscale with DAPE connected encodes '{tags}, {prompt},' as the official: the tags of the image's LQ,
    then the prompt the user typed (it was not dropped)."""
    _, nodes = pack
    _, model = osediff_model
    (dape,) = run(nodes["DAPE_Loader"], ram_or_converted="ram_tiny.pth", dape="dape_tiny.pth")
    pipeline = sys.modules["custom_nodes_x_diffsr_pack.osediff_core.pipeline"]
    image = torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        lq, _ = pipeline.preprocess(image.movedim(-1, 1), upscale=2.0, process_size=32)
        (tags,) = dape.tags(lq)
    assert tags
    encoded, encode = [], model.prompt_embedding
    monkeypatch.setattr(model, "prompt_embedding", lambda prompt, dtype=None: encoded.append(prompt)
                        or encode(prompt, dtype))
    (out,) = run(nodes["OSEDiff_Upscale"], model=model, image=image, prompt="a sharp photo", upscale=2.0,
                 process_size=32, color_fix="adain", tile_latent=96, tile_overlap=32, dtype="fp32", dape=dape)
    assert encoded == [tags + ", a sharp photo,"] and out.shape == (1, 40, 48, 3)


def test_the_dape_prompt_extractor_makes_the_lq_only_where_the_tagger_reads_it(pack, monkeypatch):
    """The DAPE Prompt Extractor (and OSEDiff Upscale's DAPE step) formed the whole ×upscale LQ to hand the tagger a
    384×384 resize of it (about 6 GB for a 12 MP photo at ×4); it is made only at the rows and columns the resize
    reads, with the same numbers there, so the tags are those of the whole LQ."""
    _, nodes = pack
    (dape,) = run(nodes["DAPE_Loader"], ram_or_converted="ram_tiny.pth", dape="dape_tiny.pth")
    pipeline, dape_core = (sys.modules[f"custom_nodes_x_diffsr_pack.osediff_core.{m}"] for m in ("pipeline", "dape"))
    image = torch.rand(1, 300, 400, 3, generator=torch.Generator().manual_seed(6))
    seen, tags = [], dape.tags
    monkeypatch.setattr(dape, "tags", lambda lq, **select: seen.append(lq) or tags(lq, **select))
    (prompt,) = run(nodes["DAPE_PromptExtractor"], dape=dape, image=image, upscale=4.0, process_size=512,
                    user_prompt="", tags_only=True, exclude="", max_tags=0)
    whole, _ = pipeline.preprocess(image.movedim(-1, 1), upscale=4.0, process_size=512)
    (given,) = seen
    rows, columns = dape_core.read_indices(whole.shape[-2]), dape_core.read_indices(whole.shape[-1])
    assert given.shape == whole.shape == (1, 3, 1200, 1600) and len(rows) < 1200 and len(columns) < 1600
    assert torch.equal(given[:, :, rows[:, None], columns], whole[:, :, rows[:, None], columns])
    assert (given == 0).float().mean() > 0.5  # the rest is not made
    assert torch.equal(dape.preprocess(given), dape.preprocess(whole)) and prompt == tags(whole)[0]


def test_dossr_loads_its_text_encoder_only_for_a_new_prompt(pack):
    """DoSSR's networks go to the device stage by stage (RRDB, encoders, ControlNet and UNet, VAE decoder); its
    text encoder only to encode a prompt not encoded yet, never for a CONDITIONING input."""
    _, nodes = pack
    mm = sys.modules["comfy.model_management"]
    (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    args = dict(model=model, image=torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1)), steps=1,
                seed=3, upscale=4.0, color_fix="wavelet", tile_latent=96, tile_overlap=32, dtype="fp32")
    calls = []
    for prompt, conditioning in (("a new prompt", None), ("a new prompt", None), ("another prompt", [[
            torch.randn(1, 77, model.unet.config.cross_attention_dim), {}]])):
        mm.LOADED.clear()
        mm.REQUIRED.clear()
        run(nodes["DoSSR_Upscale"], **args, prompt=prompt, conditioning=conditioning)
        calls.append([[p.model.parts[0] for p in call[0]] for call in mm.LOADED])
    pipeline = sys.modules["custom_nodes_x_diffsr_pack.dossr_core.pipeline"]
    encoders = list({id(m): m for m in (model.vae, pipeline.condition_encoder_network(model))}.values())
    stages = [[model.rrdb], encoders, [model.unet, model.controlnet], [model.vae]]
    assert calls == [[[model.text_encoder]] + stages, stages, stages]
    latents = sys.modules["custom_nodes_x_diffsr_pack.sr_common.latents"]  # the 128² px image's 16² latent:
    sampling = latents.denoiser_bytes(model.unet, torch.empty(1, 4, 16, 16), 96, 32, 1, latents.CONTROLLED_UNET_COPIES)
    assert mm.REQUIRED[2] == sampling > 0  # the ControlNet and UNet's stage asks for their estimate
    assert "another prompt" not in model.prompt_cache


def test_float16_on_a_cpu_that_cannot_compute_it_is_refused_by_name(pack, osediff_model, monkeypatch):
    """On a PyTorch without CPU float16 kernels (2.1), fp16 asked of a node on the CPU, or picked by "auto" under
    ComfyUI's --force-fp16, is refused with what to pick instead; bf16 runs."""
    _, nodes = pack
    _, model = osediff_model
    mm = sys.modules["comfy.model_management"]
    refused = sys.modules["custom_nodes_x_diffsr_pack.sr_common.errors"].DiffSRError
    monkeypatch.setattr(sys.modules["custom_nodes_x_diffsr_pack.sr_common.sd21"], "cpu_computes_float16", lambda: False)
    args = dict(model=model, image=torch.rand(1, 20, 24, 3), prompt="", upscale=2.0, process_size=32,
                color_fix="adain", tile_latent=96, tile_overlap=32)
    with torch.inference_mode():
        with pytest.raises(refused, match="no float16 kernels on the CPU: run fp32 or bf16"):
            run(nodes["OSEDiff_Upscale"], **args, dtype="fp16")
        monkeypatch.setattr(mm, "FP16_WORKS", True)  # as under --force-fp16
        with pytest.raises(refused, match="no float16 kernels on the CPU"):
            run(nodes["OSEDiff_Upscale"], **args, dtype="auto")
        (out,) = run(nodes["OSEDiff_Upscale"], **args, dtype="bf16")
    assert out.shape == (1, 40, 48, 3)


@cpu_float16
def test_auto_dtype_is_comfyuis_choice_for_the_device(pack, osediff_model, monkeypatch):
    """dtype "auto" runs the networks in the precision ComfyUI computes its own diffusion models in on the device
    (comfy.model_management.unet_dtype: fp16 where the GPU computes it well, else bf16 or fp32; its precision flags
    first), and where ComfyUI stores one precision and computes in another (a GTX 16xx's fp16 weights, fp8, fp64)
    in the one its manual cast computes in: never fp16 on a GTX 16xx, whose fp16 gives NaN."""
    _, nodes = pack
    _, model = osediff_model
    host, mm = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"], sys.modules["comfy.model_management"]
    asked = []
    unet_dtype = mm.unet_dtype
    monkeypatch.setattr(mm, "unet_dtype", lambda *a, **k: asked.append(k["model_params"]) or unet_dtype(*a, **k))
    cases = [(False, False, None, torch.float32), (True, True, None, torch.float16), (False, True, None, torch.bfloat16),
             (True, True, torch.float32, torch.float32), (False, True, torch.float8_e4m3fn, torch.bfloat16),
             (True, False, torch.float64, torch.float32), (True, False, torch.float16, torch.float16)]
    for store_only in (False, True):  # a GTX 16xx or 10xx: fp16 stored, fp32 computed; the rest as on other GPUs
        monkeypatch.setattr(mm, "FP16_STORE_ONLY", store_only)
        for fp16, bf16, flag, expected in cases + [(False, False, torch.float16, torch.float32)]:
            monkeypatch.setattr(mm, "FP16_WORKS", fp16)
            monkeypatch.setattr(mm, "BF16_WORKS", bf16)
            monkeypatch.setattr(mm, "UNET_FLAG", flag)
            assert host.auto_dtype(model) == expected, (store_only, fp16, bf16, flag)
    monkeypatch.setattr(mm, "FP16_WORKS", False)
    monkeypatch.setattr(mm, "BF16_WORKS", False)
    monkeypatch.setattr(mm, "UNET_FLAG", None)
    assert unet_dtype(host.device()) == torch.float16  # what ComfyUI stores there; the pack computes in float32
    assert host.auto_dtype(model) == torch.float32
    monkeypatch.setattr(mm, "FP16_STORE_ONLY", False)
    assert set(asked) == {sum(p.numel() for m in (model.unet, model.lq_encoder, model.vae) for p in m.parameters())}
    monkeypatch.setattr(mm, "UNET_FLAG", None)
    image = torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(8))
    args = dict(model=model, image=image, prompt="", upscale=2.0, process_size=32, color_fix="adain", tile_latent=96,
                tile_overlap=32)
    with torch.inference_mode():
        for fp16, expected in ((True, torch.float16), (False, torch.float32)):
            monkeypatch.setattr(mm, "FP16_WORKS", fp16)
            run(nodes["OSEDiff_Upscale"], **args, dtype="auto")
            assert model.dtype == expected
        monkeypatch.setattr(mm, "FP16_WORKS", True)
        run(nodes["OSEDiff_Upscale"], **args, dtype="fp32")  # a chosen precision stays the user's choice
        assert model.dtype == torch.float32


def test_dape_loader_precision(pack, monkeypatch):
    """Load DAPE casts the tagger once, after the LoRA merge, to its optional dtype (auto: ComfyUI's choice for the
    device, as for the other models; a workflow made before the input has none), and keeps no float32 copy."""
    import shutil

    _, nodes = pack
    mm = sys.modules["comfy.model_management"]
    folder = os.path.join(os.environ["DIFFSR_TEST_MODELS"], "dape")
    ram = os.path.join(folder, "ram_tiny_precision.pth")  # a name of its own: no tagger of other tests from cache
    shutil.copyfile(os.path.join(folder, "ram_tiny.pth"), ram)
    files = dict(ram_or_converted=os.path.basename(ram), dape="dape_tiny.pth")
    try:
        (exact,) = run(nodes["DAPE_Loader"], **files, dtype="fp32")
        monkeypatch.setattr(mm, "BF16_WORKS", True)
        (auto,) = run(nodes["DAPE_Loader"], **files)
    finally:
        os.remove(ram)
    assert {p.dtype for p in exact.parameters()} == {torch.float32} and auto is not exact
    assert {p.dtype for p in auto.parameters()} == {torch.bfloat16}
    pairs = list(zip(auto.state_dict().values(), exact.state_dict().values()))
    assert all(torch.equal(a, e.to(a.dtype)) and a.dtype == (torch.bfloat16 if e.is_floating_point() else e.dtype)
               for a, e in pairs)
    image = torch.rand(1, 24, 24, 3, generator=torch.Generator().manual_seed(4))
    prompts = [run(nodes["DAPE_PromptExtractor"], dape=tagger, image=image, upscale=4.0, process_size=0,
                   user_prompt="", tags_only=True, exclude="", max_tags=0)[0] for tagger in (exact, auto)]
    assert all(isinstance(p, str) and p for p in prompts)
    # the widgets reach the tagger: exclude drops the tags named (any case), max_tags keeps the most probable ones
    tags = prompts[0].split(", ")
    assert len(tags) >= 3, tags
    extract = lambda **widgets: run(nodes["DAPE_PromptExtractor"], dape=exact, image=image, upscale=4.0,
                                    process_size=0, user_prompt="", tags_only=True, **widgets)[0].split(", ")
    assert extract(exclude=f"{tags[1].upper()}", max_tags=0) == tags[:1] + tags[2:]
    top = extract(exclude="", max_tags=2)
    assert len(top) == 2 and top == [t for t in tags if t in top]


@cpu_float16
def test_precision_switch_casts_from_the_exact_weights(pack, osediff_model):
    """An fp16 run, then an fp32 run, computes with the loaded float32 weights, not with their fp16 rounding, also
    through modules shared between models (the SD 2.1 VAE of the OSEDiff and the VAE Decode patchers)."""
    _, nodes = pack
    _, model = osediff_model
    image = torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(8))
    args = dict(model=model, image=image, prompt="", upscale=2.0, process_size=32, color_fix="adain", tile_latent=96,
                tile_overlap=32)
    exact = {k: v.clone() for k, v in model.vae.state_dict().items()}
    with torch.inference_mode():  # as ComfyUI runs nodes (execution.py)
        (fp32,) = run(nodes["OSEDiff_Upscale"], **args, dtype="fp32")
        (fp16,) = run(nodes["OSEDiff_Upscale"], **args, dtype="fp16")
        assert model.dtype == torch.float16 and not torch.equal(fp16, fp32)  # the cast happened
        (again,) = run(nodes["OSEDiff_Upscale"], **args, dtype="fp32")
    assert model.dtype == torch.float32 and torch.equal(again, fp32)
    assert all(torch.equal(v, exact[k]) for k, v in model.vae.state_dict().items())


def test_a_precision_change_reloads_the_networks_through_comfyui(pack, osediff_model):
    """A run in another precision than the networks are loaded in: ComfyUI unloads them first, so the cast allocates
    in CPU memory (not in device memory it does not count), and it counts their new size when the run loads them
    again (a cast in place left its count at the old size: ``partially_load`` does nothing for a loaded model)."""
    _, nodes = pack
    mm = sys.modules["comfy.model_management"]
    _, model = osediff_model
    args = dict(model=model, image=torch.rand(1, 20, 24, 3), prompt="", upscale=2.0, process_size=32,
                color_fix="adain", tile_latent=96, tile_overlap=32)
    try:
        with torch.inference_mode():
            run(nodes["OSEDiff_Upscale"], **args, dtype="fp32")
            unet = patcher_of(model, model.unet)
            full = unet.loaded_size()
            unloaded, real = [], mm.LoadedModel.model_unload
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(mm.LoadedModel, "model_unload", lambda self, *a, **kw: unloaded.append(self.model)
                              or real(self, *a, **kw))
                run(nodes["OSEDiff_Upscale"], **args, dtype="bf16")
        assert unet in unloaded and unet.loaded_size() == unet.model_size() == full // 2
        for entry in mm.current_loaded_models:
            assert entry.model.loaded_size() == entry.model.model_size()
    finally:
        with torch.inference_mode():
            run(nodes["OSEDiff_Upscale"], **args, dtype="fp32")


@pytest.mark.parametrize("method", ["osediff", "dossr"])
def test_the_decode_nodes_compute_in_their_own_precision(pack, osediff_model, method):
    """A VAE Decode node sets its VAE's precision itself (dtype; auto is fp32 on the CPU): the same inputs decode to
    the same image whatever precision another node on the model ran in before, and its dtype casts the VAE only."""
    with torch.inference_mode():  # as ComfyUI runs nodes (execution.py)
        _, nodes = pack
        image = torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(5))
        if method == "osediff":
            _, model = osediff_model
            sizing = dict(upscale=2.0, process_size=32)
            (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=image, vae_tile=1024, dtype="fp32", **sizing)
            (latent,) = run(nodes["OSEDiff_OneStepUNet"], model=model, latent=latent, prompt="", tile_latent=96,
                            tile_overlap=32, dtype="fp32")
            decode = lambda **kw: run(nodes["OSEDiff_VAEDecode"], model=model, latent=latent, reference=image,
                                      color_fix="adain", vae_tile=224, **sizing, **kw)[0]
            other = lambda dtype: run(nodes["OSEDiff_Upscale"], model=model, image=image, prompt="", color_fix="adain",
                                      tile_latent=96, tile_overlap=32, dtype=dtype, **sizing)
        else:
            (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
            embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim,
                                 generator=torch.Generator().manual_seed(2))
            common = dict(model=model, image=image, steps=2, seed=3, prompt="", tile_latent=96, tile_overlap=32,
                          conditioning=[[embeds, {}]])
            latent, reference = run(nodes["DoSSR_Sampler"], **common, dtype="fp32")
            decode = lambda **kw: run(nodes["DoSSR_VAEDecode"], model=model, latent=latent, reference=reference,
                                      upscale=2.0, color_fix="wavelet", vae_tile=224, **kw)[0]
            other = lambda dtype: run(nodes["DoSSR_Upscale"], **common, upscale=2.0, color_fix="wavelet", dtype=dtype)
        first = decode()
        other("bf16")
        assert torch.equal(decode(), first)
        other("fp32")
        decode(dtype="bf16")
        unet = patcher_of(model, model.unet)
        assert unet in sys.modules["comfy.model_management"].loaded_models() and unet.loaded_size() > 0  # stays
        assert model.vae.decoder.conv_in.weight.dtype == torch.bfloat16
        assert model.unet.conv_in.weight.dtype == torch.float32
        assert torch.equal(decode(dtype="fp32"), first)


@pytest.mark.parametrize("method", ["osediff", "dossr"])
def test_modular_nodes_in_different_precisions_cast_only_the_networks_they_run(pack, osediff_model, method):
    """A modular graph whose nodes ask different precisions of one model (an fp32 encoder or sampler beside a bf16
    UNet or decode) casts nothing at its second run: each node casts the networks it runs only, so they do not cast
    each other's back and forth (on a GPU: an unload, a cast and a reload of the VAE or the UNet at every run); the
    images of both runs are the same. A network that must be cast is unloaded by ComfyUI first, also when it is part
    of one ComfyUI loaded whole (the VAE decoder of the VAE)."""
    _, nodes = pack
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    mm = sys.modules["comfy.model_management"]
    image = torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(6))
    if method == "osediff":
        _, model = osediff_model
        sizing = dict(upscale=2.0, process_size=32)

        def graph(decode_dtype="bf16"):
            (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=image, vae_tile=1024, dtype="fp32", **sizing)
            (latent,) = run(nodes["OSEDiff_OneStepUNet"], model=model, latent=latent, prompt="a modular prompt",
                            tile_latent=96, tile_overlap=32, dtype="bf16")
            return run(nodes["OSEDiff_VAEDecode"], model=model, latent=latent, reference=image, color_fix="adain",
                       vae_tile=224, dtype=decode_dtype, **sizing)[0]
        kept = {model.lq_encoder: torch.float32, model.unet: torch.bfloat16, model.text_encoder: torch.bfloat16,
                model.vae.decoder: torch.bfloat16}
    else:
        (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")

        def graph(decode_dtype="bf16"):
            latent, reference = run(nodes["DoSSR_Sampler"], model=model, image=image, steps=2, seed=3,
                                    prompt="a modular prompt", tile_latent=96, tile_overlap=32, dtype="fp32")
            return run(nodes["DoSSR_VAEDecode"], model=model, latent=latent, reference=reference, upscale=4.0,
                       color_fix="wavelet", vae_tile=224, dtype=decode_dtype)[0]
        kept = {model.unet: torch.float32, model.controlnet: torch.float32, model.vae.encoder: torch.float32,
                model.rrdb: torch.float32, model.text_encoder: torch.float32, model.vae.decoder: torch.bfloat16}
    graph()  # the first run casts what earlier runs on the model left in other precisions
    casts, cast, unloaded, real = [], host.set_precision, [], mm.LoadedModel.model_unload
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(host, "set_precision", lambda *a: casts.append(cast(*a)) or casts[-1])
        patch.setattr(mm.LoadedModel, "model_unload", lambda self, *a, **kw: unloaded.append(self.model)
                      or real(self, *a, **kw))
        first, second = graph(), graph()
        assert len(casts) == (6 if method == "osediff" else 4) and not any(casts) and not unloaded
        for module, dtype in kept.items():
            assert {p.dtype for p in module.parameters()} == {dtype}, module
        assert torch.equal(first, second)
        vae = patcher_of(model, model.vae)
        assert vae in mm.loaded_models()
        graph("fp32")
    assert casts[-1] and vae in unloaded  # the decoder cast after ComfyUI unloaded the VAE it loaded whole
    assert model.vae.decoder.conv_in.weight.dtype == torch.float32
    for entry in mm.current_loaded_models:  # ComfyUI counts the new size
        assert entry.model.loaded_size() == entry.model.model_size()


def test_a_cached_prompt_embedding_follows_the_text_encoders_precision(pack, osediff_model):
    """A prompt's embedding is encoded again once the text encoder computes in another precision, whoever cast it (a
    node casting the networks it runs, another model on the same SD 2.1-base); the earlier precision's embedding is
    not used in its place, and is again when the text encoder is back in that precision."""
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    _, model = osediff_model
    text_encoder = host.HeldModules([model.text_encoder])  # the text encoder alone, as another model casts it
    with torch.inference_mode():
        host.set_precision(text_encoder, torch.float32)
        fp32 = model.prompt_embedding("a cached prompt")
        assert fp32.dtype == torch.float32 and model.prompt_embedding("a cached prompt") is fp32
        assert host.set_precision(text_encoder, torch.bfloat16)
        bf16 = model.prompt_embedding("a cached prompt")
        assert bf16.dtype == torch.bfloat16 and 0 < (bf16.float() - fp32).abs().max() < 0.1
        assert host.set_precision(text_encoder, torch.float32)
        assert torch.equal(model.prompt_embedding("a cached prompt"), fp32)


def recorded_prompts(monkeypatch):
    """The prompts the pack's ``encode_prompt`` is called with, recorded as it runs them."""
    sd21 = sys.modules["custom_nodes_x_diffsr_pack.sr_common.sd21"]
    encoded, encode = [], sd21.encode_prompt
    monkeypatch.setattr(sd21, "encode_prompt",
                        lambda te, tok, prompts: encoded.append(prompts) or encode(te, tok, prompts))
    return encoded


def test_a_prompt_encoded_in_the_runs_precision_leaves_the_text_encoder_as_it_is(pack, osediff_model, monkeypatch):
    """A node whose prompt is cached in the run's precision does not run the text encoder, so it does not cast it
    either (another model on the same base may hold it in another precision: it would be cast back and forth at
    every run); a prompt not cached in that precision casts it and is encoded."""
    _, nodes = pack
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    _, model = osediff_model
    encoded = recorded_prompts(monkeypatch)
    latent = {"samples": torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(17))}
    one_step = lambda prompt: run(nodes["OSEDiff_OneStepUNet"], model=model, latent=latent, prompt=prompt,
                                  tile_latent=0, tile_overlap=0, dtype="bf16")[0]["samples"]
    first = one_step("a prompt cached in bf16")
    assert model.text_encoder.dtype == torch.bfloat16 and encoded == [["a prompt cached in bf16"]]
    host.set_precision(host.HeldModules([model.text_encoder]), torch.float32)  # as another model's run casts it
    assert torch.equal(one_step("a prompt cached in bf16"), first)
    assert model.text_encoder.dtype == torch.float32 and len(encoded) == 1
    one_step("a new prompt")
    assert model.text_encoder.dtype == torch.bfloat16 and encoded[-1] == ["a new prompt"]
    host.set_precision(host.HeldModules([model.text_encoder]), torch.float32)


def test_a_node_given_a_conditioning_neither_encodes_its_prompt_nor_casts_the_text_encoder(pack, osediff_model,
                                                                                         monkeypatch):
    """With a CONDITIONING the node's prompt is not used: the text encoder is not run for it, nor cast to the run's
    precision (another model on the same base may hold it in another: it would be cast back and forth)."""
    _, nodes = pack
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    _, model = osediff_model
    encoded = recorded_prompts(monkeypatch)
    host.set_precision(host.HeldModules([model.text_encoder]), torch.float32)
    embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(18))
    run(nodes["OSEDiff_OneStepUNet"], model=model, latent={"samples": torch.zeros(1, 4, 5, 6)},
        prompt="a prompt never encoded", tile_latent=0, tile_overlap=0, dtype="bf16", conditioning=[[embeds, {}]])
    assert encoded == [] and model.text_encoder.dtype == torch.float32


def test_dossr_sampler_from_a_latent_casts_only_what_it_runs(pack):
    """From a LATENT, DoSSR Sampler runs the VAE decoder, the condition encoder, the ControlNet and the UNet (and the
    text encoder for a prompt): the RRDB keeps the precision another node left."""
    _, nodes = pack
    (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    host.set_precision(model.rrdb, torch.float32)
    latent = {"samples": torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(18))}
    run(nodes["DoSSR_Sampler"], model=model, latent=latent, steps=1, seed=0, prompt="", tile_latent=0, tile_overlap=0,
        dtype="bf16")
    assert model.rrdb.conv_first.weight.dtype == torch.float32
    for network in (model.unet, model.controlnet, model.vae.decoder, model.cond_encoder):
        assert {p.dtype for p in network.parameters()} == {torch.bfloat16}
    host.cast_for_run(model, "fp32")


@cpu_float16
def test_16bit_runs_keep_no_float32_copy_of_the_merged_osediff_weights(pack):
    """Once OSEDiff runs in fp16, nothing keeps the float32 values of its merged UNet and LQ encoder (3.5 GB at full
    size): a later fp32 run recomputes them from the SD 2.1 weights and the LoRA, bit for bit."""
    _, nodes = pack
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    sd21 = own_tiny_sd21()
    (model,) = run(nodes["OSEDiff_Loader"], sd21=sd21, weights="osediff_tiny.pkl")
    merged = [{k: v.clone() for k, v in part.state_dict().items()} for part in (model.unet, model.lq_encoder)]
    args = dict(model=model, image=torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(8)), prompt="",
                upscale=2.0, process_size=32, color_fix="adain", tile_latent=96, tile_overlap=32)
    with torch.inference_mode():
        (fp32,) = run(nodes["OSEDiff_Upscale"], **args, dtype="fp32")
        (fp16,) = run(nodes["OSEDiff_Upscale"], **args, dtype="fp16")
        for part in (model.unet, model.lq_encoder):
            assert {p.dtype for p in part.parameters()} == {torch.float16}
            kept = [e for m in part.modules() for e in host._exact.get(m, {}).values()]
            assert kept and all(isinstance(e, host.Recomputed) and not e.held for e in kept)
        (again,) = run(nodes["OSEDiff_Upscale"], **args, dtype="fp32")
        assert torch.equal(again, fp32)
        for part, values in zip((model.unet, model.lq_encoder), merged):
            assert all(torch.equal(v, values[k]) for k, v in part.state_dict().items())
        (fp16_again,) = run(nodes["OSEDiff_Upscale"], **args, dtype="fp16")
        assert torch.equal(fp16_again, fp16)


def test_osediff_merged_into_a_base_another_model_has_cast(pack, osediff_model):
    """A DoSSR run in fp16 casts the shared SD 2.1 UNet and VAE; an OSEDiff loaded on that base afterwards still
    merges its LoRA into the loaded float32 weights (same output as on a fresh base), and the cast stays."""
    _, nodes = pack
    _, reference = osediff_model
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    sd21 = own_tiny_sd21()
    loaded = [{k: v.clone() for k, v in m.state_dict().items()} for m in (sd21.unet, sd21.vae)]
    other = host.HeldModules([sd21.unet, sd21.vae, sd21.text_encoder])  # what a DoSSR model shares of the base
    assert host.set_precision(other, torch.float16)
    with host.exact_weights(sd21.unet, sd21.vae):
        assert all(torch.equal(v, values[k]) for m, values in zip((sd21.unet, sd21.vae), loaded)
                   for k, v in m.state_dict().items())
    assert {p.dtype for p in other.parameters()} == {torch.float16}
    (model,) = run(nodes["OSEDiff_Loader"], sd21=sd21, weights="osediff_tiny.pkl")
    assert {p.dtype for p in other.parameters()} == {torch.float16}
    args = dict(image=torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(8)), prompt="", upscale=2.0,
                process_size=32, color_fix="adain", tile_latent=96, tile_overlap=32, dtype="fp32")
    with torch.inference_mode():
        (out,) = run(nodes["OSEDiff_Upscale"], model=model, **args)
        (expected,) = run(nodes["OSEDiff_Upscale"], model=reference, **args)
    assert torch.equal(out, expected)


def test_dossr_shares_the_vae_encoder_of_a_base_another_model_has_cast(pack):
    """DoSSR's condition encoder is the shared VAE encoder when their loaded weights match, also after an OSEDiff
    run in fp16 has cast that VAE."""
    from safetensors.torch import load_file, safe_open, save_file

    _, nodes = pack
    pkg = "custom_nodes_x_diffsr_pack"
    host, sd21_module = sys.modules[f"{pkg}.nodes.host"], sys.modules[f"{pkg}.sr_common.sd21"]
    dossr_model, dossr_weights = sys.modules[f"{pkg}.dossr_core.model"], sys.modules[f"{pkg}.dossr_core.weights"]
    models = os.environ["DIFFSR_TEST_MODELS"]
    ckpt, config = os.path.join(models, "dossr", "dossr_tiny.ckpt"), os.path.join(models, "configs", "tiny_cldm.yaml")
    own = dossr_model.load_dossr(ckpt, config=config)
    base = sd21_module.SD21(own.unet, own.vae, own.text_encoder, own.tokenizer)
    converted = os.path.join(models, "dossr", "dossr_vae_condition.safetensors")
    dossr_weights.convert_dossr(ckpt, converted, config=config)
    with safe_open(converted, "pt") as f:
        metadata = f.metadata()
    vae_encoder = {"encoder": base.vae.encoder, "quant_conv": base.vae.quant_conv}
    tensors = load_file(converted) | {f"cond_encoder.{part}.{k}": v.clone() for part, module in vae_encoder.items()
                                      for k, v in module.state_dict().items()}
    save_file(tensors, converted, metadata=metadata)
    try:
        assert host.set_precision(host.HeldModules([base.vae, base.text_encoder]), torch.float16)
        (model,) = run(nodes["DoSSR_Loader"], weights="dossr_vae_condition.safetensors", config="SD 2.1 (built in)",
                       sd21=base)
        assert model.cond_encoder.encoder is base.vae.encoder and base.vae.encoder.conv_in.weight.dtype == torch.float16
    finally:
        os.remove(converted)


def test_models_sharing_a_network_share_its_patcher(pack):
    """Two models on one SD 2.1-base share its UNet, VAE and text encoder, and with them one ModelPatcher each, so
    ComfyUI counts, loads and unloads each network once; DoSSR's condition encoder, when it is the VAE's encoder,
    goes with the VAE instead of in a patcher of its own: no tensor on the device is in two loaded patchers."""
    import shutil

    from safetensors.torch import load_file, safe_open, save_file

    _, nodes = pack
    pkg = "custom_nodes_x_diffsr_pack"
    host, sd21_module = sys.modules[f"{pkg}.nodes.host"], sys.modules[f"{pkg}.sr_common.sd21"]
    dossr_model, dossr_weights = sys.modules[f"{pkg}.dossr_core.model"], sys.modules[f"{pkg}.dossr_core.weights"]
    mm = sys.modules["comfy.model_management"]
    models = os.environ["DIFFSR_TEST_MODELS"]
    ckpt, config = os.path.join(models, "dossr", "dossr_tiny.ckpt"), os.path.join(models, "configs", "tiny_cldm.yaml")
    own = dossr_model.load_dossr(ckpt, config=config)
    base = sd21_module.SD21(own.unet, own.vae, own.text_encoder, own.tokenizer)
    files = [os.path.join(models, "dossr", f"dossr_shared_{i}.safetensors") for i in (1, 2)]
    dossr_weights.convert_dossr(ckpt, files[0], config=config)
    with safe_open(files[0], "pt") as f:
        metadata = f.metadata()
    tensors = load_file(files[0]) | {f"cond_encoder.{part}.{k}": v.clone()
                                     for part, module in (("encoder", base.vae.encoder),
                                                          ("quant_conv", base.vae.quant_conv))
                                     for k, v in module.state_dict().items()}
    save_file(tensors, files[0], metadata=metadata)
    shutil.copyfile(files[0], files[1])
    try:
        first, second = (run(nodes["DoSSR_Loader"], weights=os.path.basename(f), config="SD 2.1 (built in)",
                             sd21=base)[0] for f in files)
        assert first is not second and first.vae is second.vae is base.vae
        assert first.cond_encoder.encoder is base.vae.encoder
        assert first.cond_encoder not in host.networks(first) and first.vae in host.networks(first)
        args = dict(image=torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1)), steps=1, seed=3,
                    prompt="shared", upscale=4.0, color_fix="wavelet", tile_latent=96, tile_overlap=32, dtype="fp32")
        mm.unload_all_models()
        mm.LOADED.clear()
        for model in (first, second):
            run(nodes["DoSSR_Upscale"], model=model, **args)
        for module in (base.unet, base.vae, base.text_encoder):
            assert patcher_of(first, module) is patcher_of(second, module)
        stages = [[second.text_encoder], [second.rrdb], [second.vae], [second.unet, second.controlnet], [second.vae]]
        assert [call[0] for call in mm.LOADED[5:]] == [[patcher_of(second, m) for m in s] for s in stages]
        loaded = mm.loaded_models()
        held = [{id(t): t for t in p.model.state_dict().values()} for p in loaded]
        assert all(a.keys().isdisjoint(b.keys()) for i, a in enumerate(held) for b in held[i + 1:])
        distinct = {k: t for h in held for k, t in h.items()}
        assert sum(p.model_size() for p in loaded) == sum(t.nelement() * t.element_size() for t in distinct.values())
    finally:
        for f in files:
            os.remove(f)


def test_dossr_sampler_from_a_latent(pack):
    """DoSSR Sampler takes a standard SD latent at the output size instead of an LR image."""
    _, nodes = pack
    (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    common = dict(model=model, steps=2, seed=7, prompt="", tile_latent=96, tile_overlap=32, dtype="fp32",
                  conditioning=[[embeds, {}]])
    latent = {"samples": torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(9))}
    out, reference = run(nodes["DoSSR_Sampler"], latent=latent, **common)
    assert out["samples"].shape == (2, 4, 12, 10) and torch.isfinite(out["samples"]).all()
    assert reference.shape == (2, 96, 80, 3)
    again, _ = run(nodes["DoSSR_Sampler"], latent=latent, **common)
    assert torch.equal(out["samples"], again["samples"])
    (image,) = run(nodes["DoSSR_VAEDecode"], model=model, latent=out, reference=reference, upscale=4.0,
                   color_fix="wavelet", vae_tile=224)
    assert image.shape == (2, 96, 80, 3)
    for both in ({}, {"latent": latent, "image": torch.rand(1, 8, 8, 3)}):
        with pytest.raises(ValueError, match="exactly one"):
            run(nodes["DoSSR_Sampler"], **both, **common)


@cpu_float16
def test_models_are_freed_when_comfyui_lets_go(pack):
    """Loaders share one instance per file while it is used and keep nothing alive on their own: once ComfyUI lets
    go of the models, one garbage collection (ComfyUI runs one after a prompt) frees them with their patchers, the
    float32 values kept for their casts and the SD 2.1-base they were built on."""
    import gc
    import weakref

    _, nodes = pack
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    mm = sys.modules["comfy.model_management"]
    mm.LOADED.clear()
    gc.collect()  # models of earlier tests that only ComfyUI still held: the loaders below load afresh
    kept_aside, cached_before = len(host._exact), set(host._cache.keys())
    sd21 = own_tiny_sd21()
    (osediff,) = run(nodes["OSEDiff_Loader"], sd21=sd21, weights="osediff_tiny.pkl")
    (dossr,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    (same,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    assert same is dossr
    (dape,) = run(nodes["DAPE_Loader"], ram_or_converted="ram_tiny.pth", dape="dape_tiny.pth")
    assert isinstance(dape, torch.nn.Module)  # a model that is one module
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # fp16: exact values kept aside (DoSSR, the SD 2.1 VAE) or recomputable (OSEDiff)
        run(nodes["OSEDiff_Upscale"], model=osediff, image=image, prompt="freed", upscale=2.0, process_size=32,
            color_fix="adain", tile_latent=96, tile_overlap=32, dtype="fp16", dape=dape)
        run(nodes["DoSSR_Upscale"], model=dossr, image=image, steps=1, seed=0, prompt="freed", upscale=4.0,
            color_fix="wavelet", tile_latent=96, tile_overlap=32, dtype="fp16")
    patchers = [p for m in (osediff, dossr, dape) for p in m._comfy_patchers.values()]
    assert len(patchers) == 4 + 6 + 1 and set(patchers) <= set(mm.loaded_models())
    assert len(host._exact) > kept_aside
    gone = [weakref.ref(x) for x in (osediff, dossr, dape, sd21.unet, sd21.vae, sd21.text_encoder, *patchers)]
    del sd21, osediff, dossr, same, dape, patchers
    mm.LOADED.clear()
    gc.collect()
    assert [ref() for ref in gone] == [None] * len(gone)
    assert None not in mm.loaded_models() and len(host._exact) == kept_aside
    assert set(host._cache.keys()) <= cached_before


def test_model_folders_from_extra_model_paths_are_kept(pack, monkeypatch, tmp_path):
    """An ``osediff:`` entry of extra_model_paths.yaml (ComfyUI registers it before the packs, with no extensions,
    folder_paths.add_model_folder_path L230) keeps its folder first; models/osediff is added after it, and the
    loader lists the weight files of both."""
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    folder_paths = sys.modules["folder_paths"]
    extra = tmp_path / "shared_models" / "osediff"
    extra.mkdir(parents=True)
    shutil.copy(os.path.join(DATA, "osediff", "osediff_tiny.pkl"), extra / "osediff_shared.pkl")
    (extra / "readme.txt").write_text("not weights")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "osediff", ([str(extra)], set()))
    host.register_model_folders()
    host.register_model_folders()  # ComfyUI may ask for the node list again
    paths, extensions = folder_paths.folder_names_and_paths["osediff"]
    assert paths == [str(extra), os.path.join(folder_paths.models_dir, "osediff")]
    assert {".pkl", ".safetensors"} <= extensions
    assert host.files("osediff") == ["osediff_shared.pkl", "osediff_tiny.pkl"]


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "no-content-length"])
def test_loader_download_option(pack, monkeypatch, tmp_path, with_length):
    """'download: osediff.pkl' in the OSEDiff loader fetches the official file (here from 127.0.0.1) into
    models/osediff with a progress bar, verified, then loads it; nothing is fetched for a plain choice."""
    _, nodes = pack
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    folder_paths = sys.modules["folder_paths"]
    served = tmp_path / "served"
    with official_files_served({"osediff": os.path.join(DATA, "osediff", "osediff_tiny.pkl")}, host.OFFICIAL, served,
                               with_length=with_length):
        target = tmp_path / "models_osediff"
        monkeypatch.setitem(folder_paths.folder_names_and_paths, "osediff", ([str(target)], {".pkl"}))
        schema = nodes["OSEDiff_Loader"].define_schema()
        assert {"download: osediff.pkl", "download: osediff_face.pkl"} <= set(schema.inputs[1].choices)
        (sd21,) = run(nodes["DiffSR_SD21Loader"], base="diffusers/tiny_sd21")
        bars = len(sys.modules["comfy.utils"].BARS)
        (model,) = run(nodes["OSEDiff_Loader"], sd21=sd21, weights="download: osediff.pkl")
        assert (target / "osediff.pkl").read_bytes() == (served / "osediff.pkl").read_bytes()
        assert not (target / "osediff.pkl.partial").exists()
        bar = sys.modules["comfy.utils"].BARS[bars]
        assert bar.current == bar.total == (served / "osediff.pkl").stat().st_size  # unknown size: done of done
        (served / "osediff.pkl").unlink()  # the second time the local file is used, nothing is fetched
        assert host.weight_path("osediff", "download: osediff.pkl") == str(target / "osediff.pkl")
        assert model.unet is not None


def test_loader_download_sets_a_damaged_file_aside_and_hashes_it_once(pack, monkeypatch, tmp_path):
    """A damaged official file in the loader's models folder is moved aside as ``.bad`` and fetched again; it is
    hashed once (a 5 GB file takes seconds), not once by the folder search and again by the fetch."""
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    download = sys.modules["custom_nodes_x_diffsr_pack.sr_common.download"]
    folder_paths = sys.modules["folder_paths"]
    target = tmp_path / "models_osediff"
    target.mkdir()
    damaged = b"\x80" + b"0" * 1000
    (target / "osediff.pkl").write_bytes(damaged)
    hashed = []
    digests = download.file_digests
    monkeypatch.setattr(download, "file_digests", lambda path: hashed.append(path) or digests(path))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "osediff", ([str(target)], {".pkl"}))
    with official_files_served({"osediff": os.path.join(DATA, "osediff", "osediff_tiny.pkl")}, host.OFFICIAL,
                               tmp_path / "served"):
        assert host.weight_path("osediff", "download: osediff.pkl") == str(target / "osediff.pkl")
    assert (target / "osediff.pkl.bad").read_bytes() == damaged
    assert (target / "osediff.pkl").read_bytes() == (tmp_path / "served" / "osediff.pkl").read_bytes()
    assert hashed.count(str(target / "osediff.pkl")) == 1, hashed


def test_loader_file_missing_names_where_to_get_it(pack):
    """A shared workflow names files by their official names; one not on disk is refused (when the loader runs:
    ComfyUI does not check a V3 combo's value before) with where to put it and, for an official file, the download
    choice of that loader; nothing is fetched."""
    _, nodes = pack
    (sd21,) = run(nodes["DiffSR_SD21Loader"], base="diffusers/tiny_sd21")
    with pytest.raises(FileNotFoundError, match=r"'osediff\.pkl' is not in models/osediff: put it in .*osediff and "
                                                r"refresh the node lists \(R\), or choose 'download: osediff\.pkl' in "
                                                r"this loader"):
        run(nodes["OSEDiff_Loader"], sd21=sd21, weights="osediff.pkl")
    with pytest.raises(FileNotFoundError, match=r"'DAPE\.pth' is not in models/dape: .*'download: DAPE\.pth'"):
        run(nodes["DAPE_Loader"], ram_or_converted="ram_tiny.pth", dape="DAPE.pth")
    with pytest.raises(FileNotFoundError, match=r"'dossr_default\.ckpt' is not in models/dossr: put it in .*dossr and "
                                                r"refresh the node lists \(R\) \(dossr_default\.ckpt and "
                                                r"dossr_onestep\.ckpt are linked from the README of "
                                                r"https://github\.com/AMD-AIG-AIMA/DoSSR\)"):
        run(nodes["DoSSR_Loader"], weights="dossr_default.ckpt", config="tiny_cldm.yaml")
    with pytest.raises(FileNotFoundError, match=r"'v2-1_512-ema-pruned\.safetensors' is not in models/checkpoints: "
                                                r".*'download: v2-1_512-ema-pruned\.safetensors'"):
        run(nodes["DiffSR_SD21Loader"], base="checkpoints/v2-1_512-ema-pruned.safetensors")


def test_a_link_to_nothing_in_a_model_folder_names_its_target(pack, tmp_path):
    """ComfyUI lists a link whose file was moved or deleted (os.walk) but finds no file there (folder_paths
    get_full_path: isfile): the loader said the file was not in models/checkpoints, to be put there. A link to a
    folder that exists is not called one to nothing."""
    _, nodes = pack
    link = os.path.join(os.environ["DIFFSR_TEST_MODELS"], "checkpoints", "v2-1_512-ema-pruned.safetensors")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink("/moved/away/v2-1_512-ema-pruned.safetensors", link)
    try:
        with pytest.raises(FileNotFoundError, match=r"'v2-1_512-ema-pruned\.safetensors' in models/checkpoints is a "
                                                    r"link to '/moved/away/v2-1_512-ema-pruned\.safetensors', which "
                                                    r"does not exist"):
            run(nodes["DiffSR_SD21Loader"], base="checkpoints/v2-1_512-ema-pruned.safetensors")
        os.remove(link)
        os.symlink(tmp_path, link)  # a link to a folder that exists (not one above it: a cycle): no file, nothing moved
        with pytest.raises(FileNotFoundError, match=r"^'v2-1_512-ema-pruned\.safetensors' is not in models/"
                                                    r"checkpoints: "):
            run(nodes["DiffSR_SD21Loader"], base="checkpoints/v2-1_512-ema-pruned.safetensors")
    finally:
        os.remove(link)


@pytest.mark.parametrize("method", ["osediff_tiles", "dossr_steps"])
def test_cancel_mid_run_stops_within_one_unit_and_rerun_is_identical(pack, osediff_model, monkeypatch, method):
    """The user presses Cancel after the 2nd tile / step: the node raises at the very next check, and the next
    run gives exactly the output of a run that was never interrupted."""
    _, nodes = pack
    mm = sys.modules["comfy.model_management"]
    if method == "osediff_tiles":
        node = nodes["OSEDiff_Upscale"]
        args = dict(model=osediff_model[1], image=torch.rand(1, 40, 48, 3, generator=torch.Generator().manual_seed(3)),
                    prompt="", upscale=2.0, process_size=32, color_fix="adain", tile_latent=8, tile_overlap=4,
                    dtype="fp32")
    else:
        (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
        embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
        node = nodes["DoSSR_Upscale"]
        args = dict(model=model, image=torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1)), steps=5,
                    seed=3, prompt="", upscale=4.0, color_fix="wavelet", tile_latent=96, tile_overlap=32, dtype="fp32",
                    conditioning=[[embeds, {}]])
    (uninterrupted,) = run(node, **args)
    checks = []  # one entry per cancel check: was Cancel pressed before it?
    real_check = mm.throw_exception_if_processing_interrupted

    def check():  # OSEDiff checks between tiles, DoSSR between steps (and stages)
        checks.append(mm.processing_interrupted())
        real_check()
        if len(checks) == 2:
            mm.interrupt_current_processing(True)  # Cancel pressed during the unit after the 2nd check

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", check)
    with pytest.raises(mm.InterruptProcessingException):
        run(node, **args)
    assert checks == [False, False, True]  # stopped at the first check after Cancel: within one tile / step
    monkeypatch.undo()
    (again,) = run(node, **args)
    assert torch.equal(again, uninterrupted)


def test_under_novram_the_networks_are_still_loaded_whole(pack, monkeypatch):
    """ComfyUI started with --novram gives every load a budget of 0.1 bytes, whatever ``force_full_load`` asks
    (model_management.py L683), and then moves only the layers it can stream (comfy.ops); plain torch layers stayed on
    the CPU while the run computed on the GPU ("Expected all tensors to be on the same device"). They are loaded
    whole, and ComfyUI counts them (the meta device stands in for the GPU)."""
    host, mm = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"], sys.modules["comfy.model_management"]
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("meta"))
    monkeypatch.setattr(mm, "unet_offload_device", lambda: torch.device("meta"))  # where it goes when done here
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    holder, net = types.SimpleNamespace(), torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv2d(2, 2, 3))
    assert host.load_on_device(holder, net) == torch.device("meta")
    assert {p.device.type for p in net.parameters()} == {"meta"}
    (patcher,) = holder._comfy_patchers.values()
    assert patcher.loaded_size() == patcher.model_size() > 0


def test_a_module_leaves_the_device_with_the_last_patcher_that_counted_it(pack, monkeypatch):
    """A model freed while the SD21_BASE it was built on stays (the user picked other OSEDiff weights): its patchers
    go, ComfyUI no longer counts the shared VAE and text encoder, so they leave the device as ComfyUI's unload would
    move them (the meta device stands in for the offload device, the CPU for the GPU)."""
    import gc

    host, mm = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"], sys.modules["comfy.model_management"]
    monkeypatch.setattr(mm, "unet_offload_device", lambda: torch.device("meta"))
    first, second, shared = types.SimpleNamespace(), types.SimpleNamespace(), torch.nn.Linear(4, 4)
    host.load_on_device(first, shared)
    host.load_on_device(second, shared)
    assert first._comfy_patchers == second._comfy_patchers  # one patcher for the module
    del first
    gc.collect()
    assert shared.weight.device.type == "cpu"  # the other model still counts it there
    del second
    mm.LOADED.clear()  # the stand-in's record of the calls, which holds their patchers
    gc.collect()
    assert shared.weight.device.type == "meta"


def test_a_model_that_is_one_module_goes_when_comfyui_lets_go(pack, monkeypatch):
    """A model that is one module (the DAPE tagger) keeps the ModelPatcher that ComfyUI loads it through. That
    patcher held the module: a reference cycle, so a tagger ComfyUI had let go of (the DAPE loader's file or dtype
    changed) stayed in memory, and in ComfyUI's list of loaded models, until a garbage collection (seen in ComfyUI
    0.3.64: two taggers alive after a change of dtype). It is freed at once now, and its patcher still moves all of
    it, the parameter and buffer of its own too (the meta device stands in for the GPU)."""
    import gc
    import weakref

    host, mm = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"], sys.modules["comfy.model_management"]

    class Tagger(torch.nn.Module):  # a parameter of its own, as DAPETagger's label_embed, beside a submodule
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Parameter(torch.ones(3, 4))
            self.proj = torch.nn.Linear(4, 4)
            self.register_buffer("scale", torch.ones(4))

    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("meta"))
    tagger = Tagger()
    assert host.load_on_device(tagger) == torch.device("meta")
    assert {name: t.device.type for name, t in tagger.state_dict().items()} == dict.fromkeys(
        ["embed", "scale", "proj.weight", "proj.bias"], "meta")
    (patcher,) = tagger._comfy_patchers.values()
    assert patcher in mm.loaded_models() and patcher.model_size() == (12 + 4 + 16 + 4) * 4
    gone = [weakref.ref(tagger), weakref.ref(patcher)]
    mm.LOADED.clear()  # the stand-in's record of the calls, which holds their patchers
    gc.disable()
    try:
        del tagger, patcher
        assert [ref() for ref in gone] == [None, None]
    finally:
        gc.enable()
    assert None not in mm.loaded_models()


def test_the_modular_vae_nodes_can_be_cancelled_between_tiles(pack, osediff_model, monkeypatch):
    """OSEDiff LQ Encoder and VAE Decode check for Cancel after every VAE tile, not only after each image."""
    _, nodes = pack
    mm = sys.modules["comfy.model_management"]
    model = osediff_model[1]
    image = torch.rand(1, 64, 56, 3, generator=torch.Generator().manual_seed(4))
    checks = []
    real_check = mm.throw_exception_if_processing_interrupted
    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", lambda: checks.append(1) or real_check())
    with torch.inference_mode():  # as ComfyUI runs nodes
        (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=image, upscale=4.0, process_size=64,
                        vae_tile=64, dtype="fp32")
        assert len(checks) > 2, checks  # 224 x 256 px in 64 px tiles, then the image's progress
        checks.clear()
        run(nodes["OSEDiff_VAEDecode"], model=model, latent=latent, reference=image, upscale=4.0, process_size=64,
            color_fix="adain", vae_tile=8)
        assert len(checks) > 2, checks  # a 28 x 32 latent in 8 px tiles (with 11 px margins)


def test_other_sd2_models_and_a_checkpoint_without_clip_are_refused_by_name(pack):
    """What Load Checkpoint gives for a model with SD 2's text width that is not SD 2.1-base is refused, naming what
    it is, before anything is loaded: an SD 2.x inpainting UNet (9 input channels), SD 2.1 unCLIP (an ADM input;
    its ComfyUI family SD21UnclipH starts with SD2), a model of another family, and a checkpoint with no text
    encoder (Load Checkpoint's CLIP is None)."""
    _, nodes = pack
    mm = sys.modules["comfy.model_management"]
    node = nodes["DiffSR_SD21FromCheckpoint"]
    inpaint, unclip = SD20(), type("SD21UnclipH", (SD20,), {})()
    inpaint.unet_config["in_channels"] = 9
    unclip.unet_config["adm_in_channels"] = 1024
    other = type("SD_X4Upscaler", (SD20,), {})()  # ComfyUI's name of a family with SD 2's text width
    loads = len(mm.LOADED)
    for config, named in ((inpaint, r"is SD20 \(UNet context_dim 1024, in_channels 9\), not Stable Diffusion "
                                    r"2\.1-base"),
                          (unclip, r"is SD21UnclipH \(UNet context_dim 1024, in_channels 4\), not"),
                          (other, r"is SD_X4Upscaler \(UNet context_dim 1024, in_channels 4\), not")):
        with pytest.raises(Exception, match=named):
            run(node, model=FakePatcher(FakeBaseModel({}, config)), clip=FakeClip({}), vae=FakeVae({}))
    with pytest.raises(Exception, match=r"Load Checkpoint gave no CLIP \(the checkpoint has no text encoder\)"):
        run(node, model=FakePatcher(FakeBaseModel({}, SD20())), clip=None, vae=FakeVae({}))
    assert len(mm.LOADED) == loads  # refused before ComfyUI loads anything


def comfyui_diffusers_loader_paths(root):
    """What ComfyUI's own DiffusersLoader offers for a models/diffusers ``root`` (nodes.py L584-589 at a125cd8: every
    folder below it holding a model_index.json, links followed, by its path there)."""
    return [os.path.relpath(folder, root) for folder, _, names in os.walk(root, followlinks=True)
            if "model_index.json" in names]


def test_the_base_loader_offers_the_diffusers_pipelines_below_models_diffusers(pack, monkeypatch, tmp_path):
    """Load SD 2.1-base offered only the folders right inside models/diffusers holding a unet/ folder: not a Hugging
    Face cache kept there (models--org--name/snapshots/<revision>, its files links into ../../blobs) nor a pipeline
    in a sub-folder, which ComfyUI's DiffusersLoader lists. It offers every pipeline with a UNet that one lists, and
    a pipeline folder without its model_index.json; not a ControlNet or VAE alone, a pipeline without a UNet, notes.
    Each one offered loads."""
    _, nodes = pack
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    folder_paths = sys.modules["folder_paths"]
    root = tmp_path / "diffusers"
    _, snapshot = hugging_face_cache(root, copy_tiny_sd21(tmp_path / "download"))
    copy_tiny_sd21(root / "SD2" / "stable-diffusion-2-1-base")
    os.symlink(copy_tiny_sd21(tmp_path / "elsewhere" / "sd21"), root / "linked")
    os.remove(copy_tiny_sd21(root / "without_index") + "/model_index.json")
    (root / "a_controlnet").mkdir()
    (root / "a_controlnet" / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    (root / "no_unet" / "transformer").mkdir(parents=True)
    (root / "no_unet" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (root / "notes.txt").write_text("not a model")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(root)], ["folder"]))
    cache_snapshot = os.path.relpath(snapshot, root)
    assert host.diffusers_folders() == sorted([os.path.join("SD2", "stable-diffusion-2-1-base"), "linked",
                                               cache_snapshot, "without_index"])
    assert set(comfyui_diffusers_loader_paths(root)) - set(host.diffusers_folders()) == {"no_unet"}
    choices = [c for c in nodes["DiffSR_SD21Loader"].define_schema().inputs[0].choices if c.startswith("diffusers/")]
    assert choices == [f"diffusers/{name}" for name in host.diffusers_folders()]
    expected = own_tiny_sd21()
    for choice in choices:
        (sd21,) = run(nodes["DiffSR_SD21Loader"], base=choice)
        for part in ("unet", "vae", "text_encoder"):
            assert all(torch.equal(a, b) for a, b in zip(getattr(sd21, part).state_dict().values(),
                                                         getattr(expected, part).state_dict().values())), choice


def test_the_base_loader_lists_pipelines_by_names_alone(pack, monkeypatch, tmp_path):
    """The list of diffusers pipelines, which ComfyUI makes at start-up and at each /object_info, reads no file in
    them (``is_unet_pipeline`` looks at names): a FIFO named model_index.json (a read would wait for a writer for
    ever, and ComfyUI's start-up with it) or a huge unet/config.json does not hold it up."""
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    folder_paths = sys.modules["folder_paths"]
    root = tmp_path / "diffusers"
    for name in ("piped", "huge"):
        copy_tiny_sd21(root / name)
    os.remove(root / "piped" / "model_index.json")
    os.remove(root / "huge" / "unet" / "config.json")
    sparse_file(root / "huge" / "unet" / "config.json")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(root)], ["folder"]))
    with fifo(root / "piped" / "model_index.json"):
        assert outcome_within(host.diffusers_folders) == ("returned", ["huge", "piped"])


def test_the_base_loader_lists_a_pipeline_once_through_links_that_loop(pack, monkeypatch, tmp_path):
    """Links back to a folder above (a loop) in models/diffusers: the walk of the list, which ComfyUI runs at start to
    register the nodes and at each /object_info and prompt, followed them as ComfyUI's DiffusersLoader does, and
    listed a pipeline under ever longer names (sd21/up/sd21/..., 40 deep, as far as the system resolves links); two
    links to '.' made it endless. Each folder is walked once: a link to one walked already is not followed."""
    import threading

    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    folder_paths = sys.modules["folder_paths"]
    root = tmp_path / "diffusers"
    copy_tiny_sd21(root / "sd21")
    os.symlink("..", root / "sd21" / "up")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(root)], ["folder"]))
    assert host.diffusers_folders() == ["sd21"]
    for name in ("a", "b"):
        os.symlink(".", root / name)
    listed = []
    walk = threading.Thread(target=lambda: listed.append(host.diffusers_folders()), daemon=True)
    walk.start()
    walk.join(60)
    assert listed == [["sd21"]]


def windows_paths(monkeypatch, host):
    """Within the test, ``host`` sees paths as on Windows: ``os.sep`` ``\\``, ``os.path`` ntpath's, whose names
    reach this computer's files with either separator (as Windows' own do)."""
    import ntpath

    def on_disk(call):
        return lambda path, *args, **kwargs: call(os.fspath(path).replace("\\", "/"), *args, **kwargs)

    path = types.SimpleNamespace(**{name: getattr(ntpath, name) for name in ntpath.__all__})
    path.isdir, path.isfile, path.exists = on_disk(os.path.isdir), on_disk(os.path.isfile), on_disk(os.path.exists)
    windows = types.SimpleNamespace(**{**vars(os), "path": path, "sep": "\\", "altsep": "/",
                                       "stat": on_disk(os.stat), "walk": on_disk(os.walk)})
    monkeypatch.setattr(host, "os", windows)


@pytest.mark.skipif(os.name == "nt", reason="Windows is simulated on a POSIX system")
@pytest.mark.parametrize("saved_on", ["windows", "linux"])
def test_a_nested_diffusers_pipeline_is_found_by_its_name_on_the_other_system(pack, monkeypatch, tmp_path, saved_on):
    """The list names a pipeline in a sub-folder of models/diffusers by its path there, SD2\\plain on Windows and
    SD2/plain on Linux: a workflow saved on Windows did not find the folder on Linux (a name with a backslash, a
    character Linux allows in a folder's name). The name with the other separator is tried where the exact one is
    not found; a folder named so exactly comes first."""
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    folder_paths = sys.modules["folder_paths"]
    root = tmp_path / "diffusers"
    nested = copy_tiny_sd21(root / "SD2" / "plain")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(root)], ["folder"]))
    linux_name = host.diffusers_folders()
    windows_paths(monkeypatch, host)
    windows_name = host.diffusers_folders()
    assert (linux_name, windows_name) == (["SD2/plain"], ["SD2\\plain"])
    name = windows_name[0] if saved_on == "windows" else linux_name[0]
    if saved_on == "windows":
        monkeypatch.undo()  # run on Linux
        monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(root)], ["folder"]))
    assert os.path.samefile(host.base_path(f"diffusers/{name}").replace("\\", "/"), nested)
    if saved_on == "windows":  # a folder Linux names so is taken first
        literal = copy_tiny_sd21(root / "SD2\\plain")
        assert host.base_path(f"diffusers/{name}") == literal


@pytest.mark.skipif(os.name == "nt", reason="a backslash is a separator on Windows")
def test_a_file_in_a_sub_folder_is_found_by_its_windows_name_on_linux(pack, monkeypatch, tmp_path):
    """ComfyUI on Windows lists a weight file in a sub-folder of models/<folder> as SD2\\v2-1.safetensors, and a
    workflow saved there names it so: on Linux no file had that name (a backslash is a character of a Linux name), and
    the loader said the file was not in models/osediff. The name with the other separator is tried where the exact one
    is not found; a file Linux names so exactly comes first."""
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    folder_paths = sys.modules["folder_paths"]
    root = tmp_path / "osediff"
    (root / "SD2").mkdir(parents=True)
    shutil.copy(os.path.join(DATA, "osediff", "osediff_tiny.pkl"), root / "SD2" / "osediff.pkl")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "osediff", ([str(root)], {".pkl"}))
    assert host.weight_path("osediff", "SD2\\osediff.pkl") == str(root / "SD2" / "osediff.pkl")
    shutil.copy(os.path.join(DATA, "osediff", "osediff_tiny.pkl"), root / "SD2\\osediff.pkl")
    assert host.weight_path("osediff", "SD2\\osediff.pkl") == str(root / "SD2\\osediff.pkl")
    with pytest.raises(FileNotFoundError, match=r"^'SD2\\other\.pkl' is not in models/osediff: "):
        host.weight_path("osediff", "SD2\\other.pkl")


@pytest.mark.parametrize("system", ["linux", "windows"])
@pytest.mark.parametrize("name", ["../outside/sd21", "..\\outside\\sd21", "{outside}", "{outside_backslashed}",
                                  "D:\\outside\\sd21", "\\\\server\\share\\sd21"],
                         ids=["dot-dot", "dot-dot-backslashed", "absolute", "absolute-backslashed", "other-drive",
                              "network-share"])
def test_the_base_loader_takes_no_folder_outside_models_diffusers(pack, monkeypatch, tmp_path, name, system):
    """ComfyUI checks a V3 combo's value only when the node runs, so a prompt sent to its API may name any base: a
    'diffusers/' name going out of models/diffusers ('..', or a whole path) loaded that folder. The name is taken
    below models/diffusers, as ComfyUI's get_full_path takes a file's (folder_paths.py L282); so is the name with the
    other system's separator, tried where the exact one is not found. On Windows a whole path on another drive (or a
    network share) has no path relative to models/diffusers: it raised os.path.relpath's ValueError ("path is on
    mount 'D:', start on mount 'C:'") rather than saying the folder is not there."""
    _, nodes = pack
    folder_paths = sys.modules["folder_paths"]
    outside = copy_tiny_sd21(tmp_path / "outside" / "sd21")
    (tmp_path / "diffusers").mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(tmp_path / "diffusers")], ["folder"]))
    if system == "windows":
        windows_paths(monkeypatch, sys.modules["custom_nodes_x_diffsr_pack.nodes.host"])
    with pytest.raises(FileNotFoundError, match=r"^Diffusers folder '.*' not found in models/diffusers\.$"):
        run(nodes["DiffSR_SD21Loader"], base="diffusers/" + name.format(
            outside=outside, outside_backslashed=outside.replace("/", "\\")))


def test_loader_download_finds_the_file_in_any_models_folder(pack, monkeypatch, tmp_path):
    """A 'download:' choice whose verified file is already in another models/osediff path (extra_model_paths.yaml's
    first, ComfyUI's own after it) uses that file: nothing is fetched, no second copy is written."""
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    folder_paths = sys.modules["folder_paths"]
    first, second = tmp_path / "shared_osediff", tmp_path / "models_osediff"
    first.mkdir()
    second.mkdir()
    shutil.copy(os.path.join(DATA, "osediff", "osediff_tiny.pkl"), second / "osediff.pkl")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "osediff", ([str(first), str(second)], {".pkl"}))
    with official_files_served({"osediff": os.path.join(DATA, "osediff", "osediff_tiny.pkl")}, host.OFFICIAL,
                               tmp_path / "served") as requests:
        assert host.weight_path("osediff", "download: osediff.pkl") == str(second / "osediff.pkl")
    assert requests == [] and os.listdir(first) == []


def test_a_download_can_be_cancelled(pack, monkeypatch, tmp_path):
    """Cancel pressed while a loader fetches an official file stops the download (it checks as data arrives): the
    file is not put in place, and the next run fetches it."""
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    mm = sys.modules["comfy.model_management"]
    folder_paths = sys.modules["folder_paths"]
    target = tmp_path / "models_osediff"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "osediff", ([str(target)], {".pkl"}))
    with official_files_served({"osediff": os.path.join(DATA, "osediff", "osediff_tiny.pkl")}, host.OFFICIAL,
                               tmp_path / "served"):
        mm.interrupt_current_processing(True)
        try:
            with pytest.raises(mm.InterruptProcessingException):
                host.weight_path("osediff", "download: osediff.pkl")
        finally:
            mm.interrupt_current_processing(False)
        assert not (target / "osediff.pkl").exists()
        assert host.weight_path("osediff", "download: osediff.pkl") == str(target / "osediff.pkl")
    assert (target / "osediff.pkl").read_bytes() == (tmp_path / "served" / "osediff.pkl").read_bytes()


def bar_updates(monkeypatch):
    """(current, total) of every ComfyUI progress bar after each of its updates, in order."""
    utils = sys.modules["comfy.utils"]
    updates, update = [], utils.ProgressBar.update_absolute

    def recorded(self, value, total=None, preview=None):
        update(self, value, total, preview)
        updates.append((self.current, self.total))

    monkeypatch.setattr(utils.ProgressBar, "update_absolute", recorded)
    return updates


def test_progress_bars_count_images_and_steps(pack, osediff_model, monkeypatch):
    """The progress bar of each node goes up by one per image (OSEDiff, the VAE nodes) or per image and step
    (DoSSR), over the whole batch."""
    _, nodes = pack
    _, model = osediff_model
    updates = bar_updates(monkeypatch)
    images = torch.rand(2, 20, 24, 3, generator=torch.Generator().manual_seed(11))
    run(nodes["OSEDiff_Upscale"], model=model, image=images, prompt="", upscale=2.0, process_size=32,
        color_fix="none", tile_latent=96, tile_overlap=32, dtype="fp32")
    assert updates == [(1, 2), (2, 2)]
    (dossr,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    embeds = torch.randn(1, 77, dossr.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    common = dict(model=dossr, seed=1, prompt="", tile_latent=96, tile_overlap=32, dtype="fp32",
                  conditioning=[[embeds, {}]])
    updates.clear()
    run(nodes["DoSSR_Upscale"], **common, image=images, steps=1, upscale=4.0, color_fix="none")
    assert updates == [(1, 2), (2, 2)]
    updates.clear()
    latent, reference = run(nodes["DoSSR_Sampler"], **common, image=images[:1], steps=2)
    assert updates == [(1, 2), (2, 2)]
    updates.clear()
    run(nodes["DoSSR_VAEDecode"], model=dossr, latent=latent, reference=reference, upscale=4.0, color_fix="none",
        vae_tile=0)
    assert updates == [(1, 1)]


def test_oom_retry_frees_comfyuis_cache_before_each_retry(pack):
    """After out-of-memory, ComfyUI's cache is emptied (soft_empty_cache) before the run is tried again with smaller
    tiles: the failed attempt's blocks are given back first."""
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    mm = sys.modules["comfy.model_management"]
    tried, emptied = [], len(mm.EMPTIED)

    def run(tile_latent):
        tried.append((tile_latent, len(mm.EMPTIED) - emptied))
        if len(tried) < 3:
            raise mm.OOM_EXCEPTION("out of memory")
        return tile_latent

    assert host.with_oom_retry(run, tile_latent=64) == 16
    assert tried == [(64, 0), (32, 1), (16, 2)]


def test_the_dape_prompt_extractor_can_be_cancelled(pack):
    """Cancel pressed before the DAPE Prompt Extractor tags its image stops it."""
    _, nodes = pack
    mm = sys.modules["comfy.model_management"]
    (dape,) = run(nodes["DAPE_Loader"], ram_or_converted="ram_tiny.pth", dape="dape_tiny.pth")
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(nodes["DAPE_PromptExtractor"], dape=dape, image=torch.rand(1, 24, 24, 3), upscale=4.0,
                process_size=0, user_prompt="", tags_only=True, exclude="", max_tags=0)
    finally:
        mm.interrupt_current_processing(False)


def test_dape_prompt_extractor_tags_the_first_image_and_trims_exclusions(pack):
    """The DAPE Prompt Extractor tags the first image of a batch (its one STRING output); tags to exclude are
    matched without the spaces around the commas, wherever they are in the list."""
    _, nodes = pack
    (dape,) = run(nodes["DAPE_Loader"], ram_or_converted="ram_tiny.pth", dape="dape_tiny.pth")
    image = torch.rand(1, 24, 24, 3, generator=torch.Generator().manual_seed(4))
    extract = lambda image, exclude="": run(nodes["DAPE_PromptExtractor"], dape=dape, image=image, upscale=4.0,
                                            process_size=0, user_prompt="", tags_only=True, exclude=exclude,
                                            max_tags=0)[0]
    tags = extract(image).split(", ")
    assert len(tags) >= 2, tags
    batch = torch.cat([image, torch.rand(1, 24, 24, 3, generator=torch.Generator().manual_seed(5))])
    assert extract(batch) == ", ".join(tags)
    assert extract(image, exclude=f" ,  {tags[1]} ,").split(", ") == tags[:1] + tags[2:]


def test_dape_prompt_extractor_refuses_an_exclude_tag_that_is_not_a_tag(pack):
    """A misspelt tag in exclude would leave the tag meant in every prompt, and the node has no other way to say so:
    it is refused by name, with the tag most likely meant."""
    _, nodes = pack
    (dape,) = run(nodes["DAPE_Loader"], ram_or_converted="ram_tiny.pth", dape="dape_tiny.pth")
    image = torch.rand(1, 24, 24, 3, generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError) as refused:
        run(nodes["DAPE_PromptExtractor"], dape=dape, image=image, upscale=4.0, process_size=0, user_prompt="",
            tags_only=True, exclude="Dog, dalmation, no such tag", max_tags=0)
    assert str(refused.value) == ("DAPE Prompt Extractor: exclude names 'dalmation' (did you mean 'dalmatian'?), "
                                  "'no such tag', not among DAPE's tags; correct the spelling or remove it from "
                                  "exclude.")


def test_the_lq_encoder_retries_out_of_memory_with_a_smaller_tile(pack, osediff_model, monkeypatch):
    """OSEDiff LQ Encoder out of memory: the encode is tried again with its VAE tile halved, not with the same."""
    _, nodes = pack
    _, model = osediff_model
    osediff = sys.modules["custom_nodes_x_diffsr_pack.nodes.osediff"]
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    tiles, real = [], osediff.lq_latent

    def flaky(model, lq, tile, **kw):
        tiles.append(tile)
        if len(tiles) == 1:
            raise host.mm.OOM_EXCEPTION("out of memory")
        return real(model, lq, tile=tile, **kw)

    monkeypatch.setattr(osediff, "lq_latent", flaky)
    (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=torch.rand(1, 16, 16, 3), upscale=2.0,
                    process_size=32, vae_tile=256, dtype="fp32")
    assert tiles == [256, 128] and latent["samples"].shape == (1, 4, 4, 4)


def test_the_one_step_unet_keeps_what_the_lq_encoder_encoded(pack, osediff_model):
    """The LQ Encoder's note of the size it encoded goes through OSEDiff One-Step UNet with the latent, so OSEDiff VAE
    Decode still refuses a reference the latent was not made from (it would take the latent for a VAE Encode crop of
    it)."""
    _, nodes = pack
    _, model = osediff_model
    image = torch.rand(1, 45, 51, 3, generator=torch.Generator().manual_seed(8))
    (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=image[:, 2:42, 1:49], upscale=1.0, process_size=8,
                    vae_tile=0, dtype="fp32")  # the part of it VAE Encode would keep
    (x0,) = run(nodes["OSEDiff_OneStepUNet"], model=model, latent=latent, prompt="", tile_latent=0, tile_overlap=0,
                dtype="fp32")
    with pytest.raises(ValueError, match=r"the LATENT is 6×5 \(latent px\) \(made from a 48×40 px image\)"):
        run(nodes["OSEDiff_VAEDecode"], model=model, latent=x0, reference=image, upscale=1.0, process_size=8,
            color_fix="none", vae_tile=0)


def test_the_modular_osediff_graph_keeps_each_images_alpha(pack, osediff_model):
    """An RGBA batch through LQ Encoder → One-Step UNet → VAE Decode keeps each image's own alpha, as the all-in-one
    node does."""
    _, nodes = pack
    _, model = osediff_model
    image = torch.rand(2, 20, 24, 4, generator=torch.Generator().manual_seed(12))
    image[1, ..., 3] = 1 - image[0, ..., 3]
    sizing = dict(upscale=2.0, process_size=32)
    (whole,) = run(nodes["OSEDiff_Upscale"], model=model, image=image, prompt="", color_fix="none", tile_latent=96,
                   tile_overlap=32, dtype="fp32", **sizing)
    (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=image, vae_tile=0, dtype="fp32", **sizing)
    (x0,) = run(nodes["OSEDiff_OneStepUNet"], model=model, latent=latent, prompt="", tile_latent=96, tile_overlap=32,
                dtype="fp32")
    (parts,) = run(nodes["OSEDiff_VAEDecode"], model=model, latent=x0, reference=image, color_fix="none", vae_tile=0,
                   **sizing)
    assert parts.shape == whole.shape == (2, 40, 48, 4)
    assert torch.equal(parts[..., 3], whole[..., 3]) and not torch.equal(parts[0, ..., 3], parts[1, ..., 3])


def test_a_vae_encode_crop_of_an_enlarged_reference_keeps_its_alpha_in_place(pack, osediff_model):
    """OSEDiff VAE Decode of ComfyUI's VAE Encode crop of a reference that process_size enlarged: the alpha is cut
    from the enlarged reference's alpha where the image was, so an alpha edge stays where the image's edge is."""
    _, nodes = pack
    _, model = osediff_model
    pipeline = sys.modules["custom_nodes_x_diffsr_pack.osediff_core.pipeline"]
    image = torch.rand(1, 17, 21, 4, generator=torch.Generator().manual_seed(8))
    image[..., 3] = (torch.arange(21) >= 10).float()  # the edge at x = 10 of 21
    lq, _ = pipeline.preprocess(image[..., :3].movedim(-1, 1), upscale=2.0, process_size=64)
    height, width = lq.shape[-2:]
    top, left, h, w = height % 8 // 2, width % 8 // 2, height // 8 * 8, width // 8 * 8
    (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, vae_tile=0, dtype="fp32", upscale=1.0, process_size=8,
                    image=lq[..., top:top + h, left:left + w].movedim(1, -1))
    (out,) = run(nodes["OSEDiff_VAEDecode"], model=model, latent={"samples": latent["samples"]}, reference=image,
                 upscale=2.0, process_size=64, color_fix="none", vae_tile=0)
    scale = out.shape[2] / w  # output px per px of the crop
    assert left == 3  # 78 px enlarged: VAE Encode keeps 72 of them
    edge = (10 / 21 * width - left) * scale  # the image's edge in the output
    row = out[0, out.shape[1] // 2, :, 3]
    crossing = int((row < 0.5).sum())  # the alpha edge: columns left of it are transparent
    assert abs(crossing - edge) <= 1.5, (crossing, edge)


def test_dossr_decode_refuses_a_latent_that_does_not_fit_its_reference(pack):
    """DoSSR VAE Decode refuses a LATENT padded by 64 px or more beyond its reference (the sampler pads by less)
    and a LATENT of fewer images than the reference (it decoded only those, silently)."""
    _, nodes = pack
    (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    decode = dict(model=model, upscale=4.0, color_fix="none", vae_tile=0)
    with pytest.raises(ValueError, match=r"the LATENT decodes to 96×144 px, which does not match the 96×80 reference"):
        run(nodes["DoSSR_VAEDecode"], latent={"samples": torch.zeros(1, 4, 18, 12)}, reference=torch.rand(1, 80, 96, 3),
            **decode)
    with pytest.raises(ValueError, match=r"the LATENT holds 1 image\(s\) but the reference 2"):
        run(nodes["DoSSR_VAEDecode"], latent={"samples": torch.zeros(1, 4, 10, 12)}, reference=torch.rand(2, 80, 96, 3),
            **decode)


def test_dossr_decode_refuses_a_latent_resized_since_the_sampler(pack):
    """The sampler's LATENT is the REFERENCE padded to a multiple of 64 px (from an image) or the REFERENCE's size
    (from a latent); resized a little since (Upscale Latent By 1.2: 10 → 12 latent px, 96 px for an 80 px
    reference), it was decoded and cropped to its top-left corner, a zoomed part of the image, silently. Now it is
    refused, naming the standard VAE Decode for a resized latent; the sampler's own latents still decode."""
    _, nodes = pack
    (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    common = dict(model=model, steps=1, seed=7, prompt="", tile_latent=0, tile_overlap=0, dtype="fp32",
                  conditioning=[[embeds, {}]])
    decode = dict(model=model, upscale=4.0, color_fix="none", vae_tile=0)
    from_image = run(nodes["DoSSR_Sampler"], image=torch.rand(1, 16, 16, 3), **common)  # ×4: 64×64, latent 8×8
    from_latent = run(nodes["DoSSR_Sampler"], latent={"samples": torch.randn(1, 4, 10, 9)}, **common)
    for latent, reference in (from_image, from_latent):
        (image,) = run(nodes["DoSSR_VAEDecode"], latent=latent, reference=reference, **decode)
        assert image.shape == reference.shape
        grown = torch.nn.functional.interpolate(latent["samples"], scale_factor=1.2, mode="nearest")
        assert 8 * grown.shape[-2] < reference.shape[1] + 64  # within the padding the check allowed
        with pytest.raises(ValueError, match=r"does not match the \d+×\d+ reference\. .* its LATENT as it is .* "
                                             r"standard VAE Decode"):
            run(nodes["DoSSR_VAEDecode"], latent={"samples": grown}, reference=reference, **decode)


def dossr_sampled(nodes, lr_image):
    """(DOSSR_MODEL, the DoSSR Sampler's LATENT and REFERENCE for ``lr_image``, a DoSSR VAE Decode of a LATENT
    against a reference, the REFERENCE unless given, at ×4 without colour fix)."""
    (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    latent, reference = run(nodes["DoSSR_Sampler"], model=model, image=lr_image, steps=1, seed=7, prompt="",
                            tile_latent=0, tile_overlap=0, dtype="fp32", conditioning=[[embeds, {}]])

    def decode(latent, against=reference):
        return run(nodes["DoSSR_VAEDecode"], model=model, latent=latent, reference=against, upscale=4.0,
                   color_fix="none", vae_tile=0)[0]
    return model, latent, reference, decode


def test_dossr_decode_checks_the_reference_size_the_sampler_recorded(pack):
    """The DoSSR Sampler records its REFERENCE's size in the LATENT, which ComfyUI's latent nodes pass on. A REFERENCE
    cropped within the padding (90×90 of a 100×96 one, both 128 px padded) was decoded and cropped to it silently:
    now refused. Crop Latent cutting off only padding (x 0, y 0, to ⌈the reference / 8⌉ or more) was refused: now
    decoded as the sampler's LATENT, padding and all (the crop alone decodes otherwise at the cut edges), also through
    Latent From Batch and Repeat Latent Batch. A crop into the image, or a latent resized by
    Upscale Latent By, is refused naming the fix; one the sampler's size with other values (a KSampler) decodes."""
    _, nodes = pack
    import nodes as comfy_nodes  # tests/comfy_stubs/nodes.py: ComfyUI's latent nodes

    crop = comfy_nodes.LatentCrop().crop
    image = torch.rand(2, 24, 25, 3, generator=torch.Generator().manual_seed(3))
    model, latent, reference, decode = dossr_sampled(nodes, image)
    assert latent["samples"].shape == (2, 4, 16, 16) and reference.shape == (2, 96, 100, 3)  # 128×128 px padded
    whole = decode(latent)
    with torch.no_grad():  # ComfyUI's VAE Decode, (decode(samples) + 1) / 2 clamped (comfy/sd.py VAE.decode), cropped
        standard = ((model.vae.decode(latent["samples"]).sample + 1) / 2).clamp(0, 1)[..., :96, :100]
    assert torch.allclose(whole, standard.movedim(1, -1), atol=1e-4)
    with pytest.raises(ValueError, match=r"the LATENT was made for a 100×96 px image .* does not match the 90×90 "
                                         r"reference\. Connect the REFERENCE output of the DoSSR Sampler"):
        decode(latent, reference[:, :90, :90])
    for width, height in ((104, 96), (104, 128), (128, 96), (112, 104)):  # at least 13×12 latent px
        (cropped,) = crop(latent, width, height, 0, 0)
        assert torch.equal(decode(cropped), whole), (width, height)  # with the padding, as the sampler's LATENT
    (one,) = comfy_nodes.LatentFromBatch().frombatch(cropped, 1, 1)
    assert torch.equal(decode(one, reference[1:]), whole[1:])
    (repeated,) = comfy_nodes.RepeatLatentBatch().repeat(one, 2)
    assert torch.equal(decode(repeated, reference[1:].repeat(2, 1, 1, 1)), whole[1:].repeat(2, 1, 1, 1))
    changed = dict(latent, samples=latent["samples"] * 0.5)  # another node's values at the sampler's size: decoded
    assert decode(changed).shape == whole.shape
    upscale_by = comfy_nodes.LatentUpscaleBy().upscale
    for name, wrong in (("cuts 4 px of the width", crop(latent, 96, 96, 0, 0)),
                        ("from y 8: 8 px of the top cut", crop(latent, 104, 96, 0, 8)),
                        ("resized within the padding", upscale_by(latent, "nearest-exact", 0.875)),
                        ("resized beyond it", upscale_by(latent, "bilinear", 1.2)),
                        ("of another node's values", crop(changed, 104, 96, 0, 0))):
        with pytest.raises(ValueError, match=r"it was resized, cropped into the image or grown since .*Crop Latent of "
                                             r"it at x 0 and y 0, width at least 104 and height at least 96, .*; "
                                             r"decode a resized latent with the standard VAE Decode"):
            decode(wrong[0])
            pytest.fail(name)


def test_dossr_decode_refuses_a_crop_into_the_image_of_the_reference_size(pack):
    """Crop Latent from x 8 of the sampler's 128×64 px latent for a 96×64 reference gives a latent of the reference's
    own size (which the sampler makes from a LATENT): it was decoded shifted by 8 px, silently. Now it is refused; the
    crop from x 0 decodes."""
    _, nodes = pack
    import nodes as comfy_nodes  # tests/comfy_stubs/nodes.py: ComfyUI's latent nodes

    _, latent, reference, decode = dossr_sampled(nodes, torch.rand(1, 16, 24, 3))
    assert latent["samples"].shape == (1, 4, 8, 16) and reference.shape == (1, 64, 96, 3)
    (shifted,) = comfy_nodes.LatentCrop().crop(latent, 96, 64, 8, 0)
    with pytest.raises(ValueError, match="the DoSSR Sampler made it for this 96×64 reference"):
        decode(shifted)
    (cropped,) = comfy_nodes.LatentCrop().crop(latent, 96, 64, 0, 0)
    assert torch.equal(decode(cropped), decode(latent))


def test_dossr_decode_refuses_a_latent_grown_past_the_sampler_s(pack):
    """LatentConcat (comfy_extras/nodes_latent.py L147-168: the first latent's keys, the second beside it) of the
    sampler's LATENT and another holds the sampler's latent top-left: it was decoded as the sampler's alone, the other
    latent dropped silently. A crop is no larger than what it was cut from: now refused, as before the record."""
    _, nodes = pack
    _, latent, _, decode = dossr_sampled(nodes, torch.rand(1, 16, 24, 3))
    assert latent["samples"].shape == (1, 4, 8, 16)
    other = torch.randn(1, 4, 8, 16)
    for dim in (-1, -2):  # LatentConcat at x, at y
        concatenated = dict(latent, samples=torch.cat((latent["samples"], other), dim=dim))
        with pytest.raises(ValueError, match=r"it was resized, cropped into the image or grown since \(by "
                                             r"Upscale Latent, Crop Latent, LatentConcat"):
            decode(concatenated)
            pytest.fail(f"concatenated at {dim}")


def test_dossr_decode_names_the_routes_that_decode_a_latent_a_node_changed(pack):
    """A LATENT cropped to its padding and changed by another node (a KSampler: ``latent.copy()``, new samples), in
    either order, is refused (nothing shows that only padding was cut); the message told to 'crop off only its
    padding before any node that changes it', a route it refuses. Now it names the ones that decode: the LATENT at
    the sampler's size through nodes that change its values, or Crop Latent with no node changing it."""
    _, nodes = pack
    import nodes as comfy_nodes  # tests/comfy_stubs/nodes.py: ComfyUI's latent nodes

    crop = comfy_nodes.LatentCrop().crop
    _, latent, _, decode = dossr_sampled(nodes, torch.rand(1, 24, 25, 3))
    changed = dict(latent, samples=latent["samples"] * 0.5)
    (cropped,) = crop(latent, 104, 96, 0, 0)
    routes = {"cropped, then changed": dict(cropped, samples=cropped["samples"] * 0.5),
              "changed, then cropped": crop(changed, 104, 96, 0, 0)[0]}
    for route, wrong in routes.items():
        with pytest.raises(ValueError, match=r"Connect the sampler's LATENT at its own size \(through a KSampler or "
                                             r"any node that keeps it\), or Crop Latent of it at x 0 and y 0, width at "
                                             r"least 104 and height at least 96, with no node changing it since the "
                                             r"sampler"):
            decode(wrong)
            pytest.fail(route)
    decode(changed)  # the routes it names
    decode(cropped)


def test_osediff_decode_does_not_take_a_dossr_latent_for_the_lq_encoders(pack, osediff_model):
    """The DoSSR Sampler records its REFERENCE's size under the key the OSEDiff LQ Encoder records its LQ's size: a
    DoSSR latent at OSEDiff VAE Decode was said to be one 'the LQ Encoder made' (resized since, or of its 'encoded'
    size). Now the message says what the LQ Encoder makes and names DoSSR VAE Decode for the DoSSR Sampler's."""
    _, nodes = pack
    _, model = osediff_model
    image = torch.rand(1, 24, 25, 3, generator=torch.Generator().manual_seed(3))
    _, latent, _, _ = dossr_sampled(nodes, image)  # 100×96 px, 128×128 px padded
    decode = dict(model=model, latent=latent, reference=image, upscale=4.0, color_fix="none", vae_tile=0)
    with pytest.raises(ValueError, match=r"the LATENT is 16×16 \(latent px\), but the LQ Encoder makes it 13×12 "
                                         r"from this reference .* or made by the DoSSR Sampler \(padded to 64 px: "
                                         r"decode that with DoSSR VAE Decode\)"):
        run(nodes["OSEDiff_VAEDecode"], **decode, process_size=0)
    with pytest.raises(ValueError, match=r"the LATENT is 16×16 \(latent px\) \(made from a 100×96 px image\), but "
                                         r"the reference at upscale 4 and process_size 512 is 532×512 px"):
        run(nodes["OSEDiff_VAEDecode"], **decode, process_size=512)


def test_dossr_decode_names_the_lq_encoder_for_an_osediff_latent(pack, osediff_model):
    """The OSEDiff LQ Encoder records the size of its LQ under the key the DoSSR Sampler records its REFERENCE's: its
    LATENT (or the One-Step UNet's, which keeps it) at DoSSR VAE Decode against the LR image was said to be made by
    'the DoSSR Sampler', whose REFERENCE to connect. Now the message names the LQ Encoder and OSEDiff VAE Decode."""
    _, nodes = pack
    _, model = osediff_model
    image = torch.rand(1, 24, 25, 3, generator=torch.Generator().manual_seed(3))
    (encoded,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=image, upscale=4.0, process_size=0, vae_tile=0,
                     dtype="fp32")
    (dossr,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    with pytest.raises(ValueError, match=r"DoSSR VAE Decode: the LATENT was made by the OSEDiff LQ Encoder from a "
                                         r"100×96 px image \(it records that size\), which does not match the 25×24 "
                                         r"reference\. Decode it with OSEDiff VAE Decode"):
        run(nodes["DoSSR_VAEDecode"], model=dossr, latent=encoded, reference=image, upscale=4.0, color_fix="none",
            vae_tile=0)


def test_a_precision_change_encodes_the_prompt_again(pack, osediff_model):
    """Prompt embeddings are kept in the precision the text encoder ran in: a run in another precision encodes its
    prompt again, so an fp32 run after a bf16 one gives the output of an fp32 run alone (not one computed from the
    bf16 rounding of its prompt's embedding)."""
    _, nodes = pack
    _, model = osediff_model
    args = dict(model=model, image=torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(13)),
                prompt="a prompt encoded in bf16", upscale=2.0, process_size=32, color_fix="adain", tile_latent=96,
                tile_overlap=32)
    with torch.inference_mode():  # as ComfyUI runs nodes
        model.prompt_cache.clear()
        (alone,) = run(nodes["OSEDiff_Upscale"], **args, dtype="fp32")
        model.prompt_cache.clear()
        run(nodes["OSEDiff_Upscale"], **args, dtype="bf16")
        (after,) = run(nodes["OSEDiff_Upscale"], **args, dtype="fp32")
    assert torch.equal(after, alone)


def test_the_rounded_weights_note_names_floating_point_parts_only(pack):
    """The note on weights Load Checkpoint holds in less than float32 names the parts by their floating-point
    tensors; an integer tensor (an index or a counter kept with the weights) is no rounded weight."""
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    sd = {"model.diffusion_model.out.2.weight": torch.zeros(2), "first_stage_model.decoder.conv_in.weight":
          torch.zeros(2), "cond_stage_model.model.token_embedding.weight": torch.zeros(2),
          "cond_stage_model.model.position_ids": torch.arange(2)}
    assert host.reduced_precision_parts(sd) == ""
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(2, dtype=torch.float16)
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, dtype=torch.bfloat16)
    assert host.reduced_precision_parts(sd) == "the UNet in float16, the VAE in bfloat16"


def test_a_refused_conditioning_casts_nothing(pack, osediff_model):
    """A CONDITIONING the node refuses is refused before the model is cast to the node's dtype: the networks stay in
    the precision they were in (no cast, no reload of weights for a run that does not happen)."""
    _, nodes = pack
    _, model = osediff_model
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    (dossr,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    host.cast_for_run(model, "fp32")
    host.cast_for_run(dossr, "fp32")
    combined = lambda m: [[torch.randn(1, 77, m.unet.config.cross_attention_dim), {}]] * 2
    with pytest.raises(ValueError, match="the CONDITIONING has 2 entries"):
        run(nodes["OSEDiff_OneStepUNet"], model=model, latent={"samples": torch.zeros(1, 4, 5, 6)}, prompt="",
            tile_latent=0, tile_overlap=0, dtype="bf16", conditioning=combined(model))
    with pytest.raises(ValueError, match="the CONDITIONING has 2 entries"):
        run(nodes["DoSSR_Sampler"], model=dossr, image=torch.rand(1, 20, 24, 3), steps=1, seed=0, prompt="",
            tile_latent=0, tile_overlap=0, dtype="bf16", conditioning=combined(dossr))
    assert {p.dtype for m in (model, dossr) for p in m.unet.parameters()} == {torch.float32}


def test_unload_drops_comfyuis_entry_and_frees_its_cache(pack):
    """``host.unload`` (before a cast) unloads a network as ComfyUI's free_memory does: the entry leaves ComfyUI's
    list of loaded models (a stale entry would be counted, and unloaded again), and its cache is emptied after."""
    host, mm = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"], sys.modules["comfy.model_management"]
    holder, net, other = types.SimpleNamespace(), torch.nn.Linear(4, 4), torch.nn.Linear(2, 2)
    host.load_on_device(holder, net, other)
    patchers = [patcher_of(holder, m) for m in (net, other)]
    assert set(patchers) <= set(mm.loaded_models())
    emptied = len(mm.EMPTIED)
    host.unload([net])
    assert patchers[0] not in mm.loaded_models() and patchers[1] in mm.loaded_models()
    assert len(mm.EMPTIED) == emptied + 1


def test_unload_leaves_networks_that_share_only_a_module_without_weights(pack):
    """Two networks holding one module without weights (diffusers < 0.33 gives every UNet and ControlNet one shared
    SiLU): unloading one for a cast of it, or of a part of it, leaves the other loaded."""
    host, mm = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"], sys.modules["comfy.model_management"]
    silu = torch.nn.SiLU()
    holder = types.SimpleNamespace()
    net, other = torch.nn.Sequential(torch.nn.Linear(4, 4), silu), torch.nn.Sequential(torch.nn.Linear(2, 2), silu)
    for cast in (net, net[0]):
        host.load_on_device(holder, net, other)
        host.unload([cast])
        assert patcher_of(holder, net) not in mm.loaded_models() and patcher_of(holder, other) in mm.loaded_models()


def test_a_16bit_image_is_upscaled_as_its_float32_values(pack, osediff_model):
    """An IMAGE in float16 or bfloat16 (as some nodes give it) is upscaled as the same values in float32."""
    _, nodes = pack
    _, model = osediff_model
    args = dict(model=model, prompt="", upscale=2.0, process_size=32, color_fix="adain", tile_latent=96,
                tile_overlap=32, dtype="fp32")
    image = torch.rand(1, 20, 24, 3, generator=torch.Generator().manual_seed(14))
    for dtype in (torch.float16, torch.bfloat16):
        (expected,) = run(nodes["OSEDiff_Upscale"], image=image.to(dtype).float(), **args)
        (out,) = run(nodes["OSEDiff_Upscale"], image=image.to(dtype), **args)
        assert out.dtype == torch.float32 and torch.equal(out, expected), dtype
    (dossr,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    samples = torch.randn(1, 4, 10, 12, generator=torch.Generator().manual_seed(2))
    decode = dict(model=dossr, latent={"samples": samples}, upscale=4.0, color_fix="wavelet", vae_tile=0)
    reference = torch.rand(1, 80, 96, 4, generator=torch.Generator().manual_seed(3))  # an RRDB image with alpha
    (expected,) = run(nodes["DoSSR_VAEDecode"], reference=reference.half().float(), **decode)
    (out,) = run(nodes["DoSSR_VAEDecode"], reference=reference.half(), **decode)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_a_conditioning_is_its_first_prompt_embedding(pack, osediff_model):
    """A CONDITIONING whose entry holds a batch of embeddings gives the first one (these nodes encode one prompt for
    every image); an empty CONDITIONING is refused by name."""
    _, nodes = pack
    _, model = osediff_model
    embeds = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(15))
    one_step = dict(model=model, latent={"samples": torch.rand(1, 4, 5, 6, generator=torch.Generator().manual_seed(1))},
                    prompt="", tile_latent=0, tile_overlap=0, dtype="fp32")
    (first,) = run(nodes["OSEDiff_OneStepUNet"], **one_step, conditioning=[[embeds[:1], {}]])
    (batch,) = run(nodes["OSEDiff_OneStepUNet"], **one_step, conditioning=[[embeds, {}]])
    assert batch["samples"].shape == (1, 4, 5, 6) and torch.equal(batch["samples"], first["samples"])
    with pytest.raises(ValueError, match=r"One-Step UNet: the CONDITIONING has 0 entries"):
        run(nodes["OSEDiff_OneStepUNet"], **one_step, conditioning=[])


def test_a_16bit_latent_is_taken_as_its_float32_values(pack, osediff_model):
    """A LATENT in float16 (as some nodes give it) gives the output of the same values in float32."""
    _, nodes = pack
    _, model = osediff_model
    samples = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(16)).half()
    one_step = dict(model=model, prompt="", tile_latent=0, tile_overlap=0, dtype="fp32")
    (expected,) = run(nodes["OSEDiff_OneStepUNet"], latent={"samples": samples.float()}, **one_step)
    (out,) = run(nodes["OSEDiff_OneStepUNet"], latent={"samples": samples}, **one_step)
    assert out["samples"].dtype == torch.float32 and torch.equal(out["samples"], expected["samples"])


def test_a_mask_or_hooks_alone_is_refused_by_name(pack, osediff_model):
    """A CONDITIONING entry carrying only a mask (a regional-prompt node) or CLIP hooks (Set CLIP Hooks adds them
    alone) is refused naming it, as the other sampler settings are."""
    _, nodes = pack
    _, model = osediff_model
    embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim)
    one_step = dict(model=model, latent={"samples": torch.zeros(1, 4, 5, 6)}, prompt="", tile_latent=0, tile_overlap=0,
                    dtype="fp32")
    for settings, named in (({"mask": torch.ones(1, 8, 8)}, r"mask \(from Conditioning \(Set Mask\) or"),
                            ({"hooks": object()}, r"hooks \(from Set CLIP Hooks or")):
        with pytest.raises(ValueError, match=f"One-Step UNet: the CONDITIONING carries {named}"):
            run(nodes["OSEDiff_OneStepUNet"], **one_step, conditioning=[[embeds, settings]])


def test_oom_in_the_osediff_nodes_halves_the_tile_below_its_overlap(pack, osediff_model, monkeypatch):
    """OSEDiff Upscale and One-Step UNet with latent tiles of 32 and an overlap of 24 run out of memory: the tile is
    halved to 16 and the overlap kept below it (8), so the run goes on instead of stopping with an error about an
    overlap the user did not set."""
    _, nodes = pack
    _, model = osediff_model
    osediff = sys.modules["custom_nodes_x_diffsr_pack.nodes.osediff"]
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    seen = []

    def flaky(real, tiles):
        def run(*args, **kw):
            seen.append(tiles(kw))
            if len(seen) == 1:
                raise host.mm.OOM_EXCEPTION("out of memory")
            return real(*args, **kw)
        return run

    monkeypatch.setattr(osediff, "osediff_upscale", flaky(osediff.osediff_upscale, lambda kw: (
        kw["options"].tile_latent, kw["options"].tile_overlap)))
    (out,) = run(nodes["OSEDiff_Upscale"], model=model, image=torch.rand(1, 20, 24, 3), prompt="", upscale=2.0,
                 process_size=32, color_fix="none", tile_latent=32, tile_overlap=24, dtype="fp32")
    assert seen == [(32, 24), (16, 8)] and out.shape == (1, 40, 48, 3)
    seen.clear()
    monkeypatch.setattr(osediff, "one_step", flaky(osediff.one_step, lambda kw: (kw["tile"], kw["overlap"])))
    (x0,) = run(nodes["OSEDiff_OneStepUNet"], model=model, latent={"samples": torch.zeros(1, 4, 5, 6)}, prompt="",
                tile_latent=32, tile_overlap=24, dtype="fp32")
    assert seen == [(32, 24), (16, 8)] and x0["samples"].shape == (1, 4, 5, 6)


def test_dossr_loader_builds_a_model_per_config(pack):
    """Load DoSSR gives one model per weights file and config: another config for the same file builds another model
    (from that yaml), not the one of the config chosen before."""
    _, nodes = pack
    configs = os.path.join(os.environ["DIFFSR_TEST_MODELS"], "configs")
    shutil.copyfile(os.path.join(configs, "tiny_cldm.yaml"), os.path.join(configs, "tiny_cldm_copy.yaml"))
    try:
        (first,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
        (other,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm_copy.yaml")
        (again,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    finally:
        os.remove(os.path.join(configs, "tiny_cldm_copy.yaml"))
    assert again is first and other is not first


def test_the_modular_nodes_run_in_their_dtype(pack, osediff_model, monkeypatch):
    """OSEDiff One-Step UNet and DoSSR Sampler cast the networks they run to their dtype widget (the model is shared:
    another node may have left it in any precision), with a prompt as with a CONDITIONING."""
    _, nodes = pack
    _, model = osediff_model
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    (dossr,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    seen = []

    class Stop(Exception):
        pass

    def stop(*args, **kw):  # the core is called: the precision its networks hold now
        seen.append({p.dtype for p in args[0].unet.parameters()})
        raise Stop

    for module in ("osediff", "dossr"):
        monkeypatch.setattr(sys.modules[f"custom_nodes_x_diffsr_pack.nodes.{module}"],
                            "one_step" if module == "osediff" else "dossr_sample", stop)
    embeds = lambda m: [[torch.randn(1, 77, m.unet.config.cross_attention_dim), {}]]
    one_step = dict(model=model, latent={"samples": torch.rand(1, 4, 5, 6)}, prompt="", tile_latent=0, tile_overlap=0)
    sampler = dict(model=dossr, image=torch.rand(1, 20, 24, 3), steps=1, seed=0, prompt="", tile_latent=0,
                   tile_overlap=0)
    try:
        for node, inputs, m in (("OSEDiff_OneStepUNet", one_step, model), ("DoSSR_Sampler", sampler, dossr)):
            for conditioning in (None, embeds(m)):
                for dtype, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                    with pytest.raises(Stop):
                        run(nodes[node], **inputs, dtype=dtype, conditioning=conditioning)
                    assert seen.pop() == {expected}, (node, dtype)
    finally:
        host.cast_for_run(model, "fp32")
        host.cast_for_run(dossr, "fp32")


def test_dossr_loader_builds_a_model_per_base(pack):
    """Load DoSSR with an SD21_BASE connected builds its model on that base, not the one it built for the same file
    without a base (or on another base) before."""
    _, nodes = pack
    sd21_module, dossr_model = (sys.modules[f"custom_nodes_x_diffsr_pack.{m}"] for m in ("sr_common.sd21",
                                                                                         "dossr_core.model"))
    models = os.environ["DIFFSR_TEST_MODELS"]
    own = dossr_model.load_dossr(os.path.join(models, "dossr", "dossr_tiny.ckpt"),
                                 config=os.path.join(models, "configs", "tiny_cldm.yaml"))
    base = sd21_module.SD21(own.unet, own.vae, own.text_encoder, own.tokenizer)
    (alone,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    (shared,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml", sd21=base)
    assert shared is not alone and shared.unet is base.unet and alone.unet is not base.unet


def test_a_cached_model_is_forgotten_with_the_base_it_was_built_on(pack):
    """A model built on a base (``host.cached`` with an owner) is no longer served once that base is freed, even
    while ComfyUI still holds the model: a new base (which may get the freed one's id) gets a model of its own."""
    import gc

    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]

    class Base:
        pass

    base = Base()
    model = host.cached(("a model of this test",), lambda: torch.nn.Linear(1, 1), owner=base)
    assert host.cached(("a model of this test",), lambda: torch.nn.Linear(1, 1), owner=base) is model
    key = (id(base), "a model of this test")
    assert key in host._cache
    del base
    gc.collect()
    assert key not in host._cache and isinstance(model, torch.nn.Linear)  # the model itself is still held here


def test_the_nodes_form_no_float64_on_a_device_without_it(pack, osediff_model):
    """On a device without float64 (Apple's MPS; the CPU taken for one) OSEDiff Upscale and the modular graphs, with
    latent tiles and VAE tiles, form no float64 tensor, and their images stay close to those of float64."""
    module, nodes = pack
    _, model = osediff_model
    (dossr,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    image = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(0))  # a 24×32 latent at ×4
    embeds = torch.randn(1, 77, dossr.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    tiles = dict(tile_latent=16, tile_overlap=8, dtype="fp32")

    def images():
        osediff = dict(model=model, upscale=4.0, process_size=64)
        (whole,) = run(nodes["OSEDiff_Upscale"], image=image, prompt="a cat", color_fix="wavelet", **osediff, **tiles)
        (latent,) = run(nodes["OSEDiff_LQEncoder"], image=image, vae_tile=64, dtype="fp32", **osediff)
        (x0,) = run(nodes["OSEDiff_OneStepUNet"], model=model, latent=latent, prompt="a cat", **tiles)
        (parts,) = run(nodes["OSEDiff_VAEDecode"], latent=x0, reference=image, color_fix="wavelet", vae_tile=8,
                       **osediff)
        common = dict(model=dossr, image=image, steps=2, seed=3, prompt="", conditioning=[[embeds, {}]], **tiles)
        latent, start = run(nodes["DoSSR_Sampler"], **common)
        (dossr_parts,) = run(nodes["DoSSR_VAEDecode"], model=dossr, latent=latent, reference=start, upscale=4.0,
                             color_fix="wavelet", vae_tile=8)
        return whole, parts, dossr_parts

    wide = images()
    with cpu_without_float64(model, dossr, package=module.__name__):
        narrow = images()
    assert [psnr(a, b) >= 100 for a, b in zip(narrow, wide)] == [True] * 3  # measured 132, 124 and 133 dB


def test_the_config_list_reads_no_fifo_nor_huge_yaml(pack, monkeypatch, tmp_path):
    """The DoSSR loader's config list, which ComfyUI makes at start-up and at each /object_info, reads the yamls of
    models/configs to tell the ControlLDM ones: a FIFO named *.yaml there was opened and read, which waited for a
    writer for ever (ComfyUI's start-up with it). It is left out of the list, as a huge file is; the ControlLDM
    yaml beside them is listed."""
    host = sys.modules["custom_nodes_x_diffsr_pack.nodes.host"]
    folder_paths = sys.modules["folder_paths"]
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy(os.path.join(DATA, "dossr", "tiny_cldm.yaml"), configs)
    sparse_file(configs / "huge.yaml", head=b"control_stage_config:\n")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "configs", ([str(configs)], {".yaml"}))
    with fifo(configs / "piped.yaml"):
        assert outcome_within(host.controlldm_configs) == ("returned", ["tiny_cldm.yaml"])


def test_a_loader_node_running_out_of_memory_holds_none_of_what_it_loaded(pack, monkeypatch):
    """Out of memory in the OSEDiff loader as it merged the LoRA into its copy of the UNet, or in the DAPE loader as it
    cast the tagger it had loaded: the error ComfyUI keeps (in a cycle of frames that only the garbage collector
    frees) held the OSEDiff checkpoint read, or the whole tagger, so the user's retry ran out of memory again."""
    import importlib
    import weakref

    _, nodes = pack
    osediff, dape, host = (importlib.import_module(f"custom_nodes_x_diffsr_pack.{name}")
                           for name in ("nodes.osediff", "osediff_core.dape", "nodes.host"))
    kept, real_read, real_load = [], osediff.read_osediff, dape.load_dape_tagger

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    def read(path):
        ckpt = real_read(path)
        kept.extend(weakref.ref(t) for part in ("state_dict_unet", "state_dict_vae") for t in ckpt[part].values())
        return ckpt

    monkeypatch.setattr(osediff, "read_osediff", read)
    monkeypatch.setattr(osediff, "build_osediff", out_of_memory)
    with pytest.raises(MemoryError) as error:
        run(nodes["OSEDiff_Loader"], sd21=own_tiny_sd21(), weights="osediff_tiny.pkl")
    monkeypatch.setattr(dape, "load_dape_tagger", lambda **files: kept.append(weakref.ref(
        tagger := real_load(**files))) or tagger)
    monkeypatch.setattr(host, "move_module", out_of_memory)
    with pytest.raises(MemoryError) as error_too:
        run(nodes["DAPE_Loader"], ram_or_converted="ram_tiny.pth", dape="dape_tiny.pth", dtype="fp32")
    assert len(kept) > 2
    assert [ref for ref in kept if ref() is not None] == [], (error, error_too)  # the errors kept, as ComfyUI does


def run_node_inputs(nodes, name, model, dape):
    """``name``'s inputs for a run over a batch of two images (the modular nodes' from the nodes before them)."""
    image = torch.rand(2, 20, 24, 3, generator=torch.Generator().manual_seed(5))
    osediff = dict(model=model, upscale=2.0, process_size=32, dtype="fp32")
    if name == "DAPE_PromptExtractor":
        return dict(dape=dape, image=image[:1], upscale=4.0, process_size=0, user_prompt="", tags_only=False,
                    exclude="", max_tags=0)
    if name == "OSEDiff_Upscale":
        return dict(osediff, image=image, prompt="", color_fix="adain", tile_latent=8, tile_overlap=4)
    encoder = dict(osediff, image=image, vae_tile=1024)
    if name == "OSEDiff_LQEncoder":
        return encoder
    (latent,) = run(nodes["OSEDiff_LQEncoder"], **encoder)
    one_step = dict(model=model, latent=latent, prompt="", tile_latent=8, tile_overlap=4, dtype="fp32")
    if name == "OSEDiff_OneStepUNet":
        return one_step
    if name == "OSEDiff_VAEDecode":
        (x0,) = run(nodes["OSEDiff_OneStepUNet"], **one_step)
        return dict(osediff, latent=x0, reference=image, color_fix="adain", vae_tile=16)
    (dossr,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    sampling = dict(model=dossr, steps=2, seed=3, prompt="", tile_latent=8, tile_overlap=4, dtype="fp32",
                    conditioning=[[torch.randn(1, 77, dossr.unet.config.cross_attention_dim), {}]])
    if name == "DoSSR_Upscale":
        return dict(sampling, image=image, upscale=4.0, color_fix="wavelet")
    if name == "DoSSR_Sampler":
        return dict(sampling, image=image)
    latent, reference = run(nodes["DoSSR_Sampler"], **sampling, image=image)
    return dict(model=dossr, latent=latent, reference=reference, upscale=4.0, color_fix="wavelet", vae_tile=16,
                dtype="fp32")


RUN_NODES = ["OSEDiff_Upscale", "OSEDiff_LQEncoder", "OSEDiff_OneStepUNet", "OSEDiff_VAEDecode", "DAPE_PromptExtractor",
             "DoSSR_Upscale", "DoSSR_Sampler", "DoSSR_VAEDecode"]


# the DAPE Prompt Extractor checks for Cancel only before it tags its one image: no cancel half way
@pytest.mark.parametrize("name, failure", [(name, failure) for name in RUN_NODES
                                           for failure in ("out-of-memory", "cancel", "a-bug")
                                           if (name, failure) != ("DAPE_PromptExtractor", "cancel")])
def test_a_run_node_failing_midway_holds_none_of_the_tensors_it_made(pack, osediff_model, name, failure):
    """A run that fails half way (out of memory at every tile size, Cancel pressed, an unexpected error): the error
    ComfyUI keeps (execution.py L557-592, in a cycle of frames only the garbage collector frees) held every tensor
    the run had made, the image, its latents, tiles and decoded outputs and the outputs of the batch's images done
    before (gigabytes on a GPU), so the user's retry ran out of memory again. None of them outlives the failure;
    what the models keep (their weights, cached prompts) was there before the run."""
    _, nodes = pack
    mm = sys.modules["comfy.model_management"]
    (dape,) = run(nodes["DAPE_Loader"], ram_or_converted="ram_tiny.pth", dape="dape_tiny.pth", dtype="fp32")
    inputs = run_node_inputs(nodes, name, osediff_model[1], dape)
    run(nodes[name], **inputs)  # the models' casts, folded kernels and prompt cache made

    def fail():
        if failure == "out-of-memory":
            raise mm.OOM_EXCEPTION("CUDA out of memory (simulated)")
        if failure == "a-bug":
            raise KeyError("a bug")
        mm.interrupt_current_processing(True)

    raised = {"out-of-memory": mm.OOM_EXCEPTION, "cancel": mm.InterruptProcessingException, "a-bug": KeyError}
    alive, error = tensors_a_failure_keeps(lambda: run(nodes[name], **inputs), fail, raised[failure])
    mm.interrupt_current_processing(False)
    assert alive == [], error  # the error kept, as ComfyUI keeps it
