"""The three ways to run each method give the same output for the same settings: the commands (``osediff``,
``dossr``), the Python API (``osediff_upscale``, ``dossr_upscale``) and the ComfyUI nodes, all-in-one and modular
(run against the host stand-ins, tests/comfy_stubs), on the tiny models. They run the same computation, so the
outputs are equal bit for bit: the API's and the nodes' float images, and the commands' 8-bit files with the API's
output rounded to 8 bits. What the settings are called in each (the commands' options, the ``Options`` fields, the
node widgets, the README's command lines) has the same defaults, and ``--help`` names them.

Cases already covered elsewhere: the all-in-one OSEDiff node is the core function image by image
(test_nodes.py::test_all_in_one_equals_the_core_and_modular_graph); ``dossr`` encodes its prompt once and writes the
API's output rounded (test_dossr_pipeline.py::test_command_encodes_its_prompt_once_for_every_image); a converted
DAPE file gives the command the same prompts as the two official files (test_osediff_cli.py::
test_osediff_with_dape_prompts)."""

import argparse
import dataclasses
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from comfyui_diffsr.cli import convert as convert_command
from comfyui_diffsr.cli import dape as dape_command
from comfyui_diffsr.cli import dossr as dossr_command
from comfyui_diffsr.cli import download as download_command
from comfyui_diffsr.cli import osediff as osediff_command
from comfyui_diffsr.cli.common import read_image
from comfyui_diffsr.dossr_core import pipeline as dossr_pipeline
from comfyui_diffsr.dossr_core.model import load_dossr
from comfyui_diffsr.osediff_core import pipeline as osediff_pipeline
from comfyui_diffsr.osediff_core.weights import read_osediff
from comfyui_diffsr.sr_common.image import pil_to_tensor, tensor_to_uint8
from comfyui_diffsr.sr_common.sd21 import encode_prompt, load_sd21

from conftest import DAPE, DOSSR, DOSSR_CONFIG, OSEDIFF, RAM, copy_tiny_sd21, host_stand_ins
from workflow_schema import import_pack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A ComfyUI models folder with the tiny models; its diffusers/tiny_sd21 is the commands' --base too."""
    folder = tmp_path_factory.mktemp("models")
    copy_tiny_sd21(folder / "diffusers" / "tiny_sd21")
    for kind, paths in (("osediff", [OSEDIFF]), ("dossr", [DOSSR]), ("dape", [RAM, DAPE]), ("configs", [DOSSR_CONFIG])):
        (folder / kind).mkdir()
        for path in paths:
            shutil.copy(path, folder / kind)
    return folder


@pytest.fixture(scope="module")
def base(models):
    """The tiny SD 2.1-base folder, as the commands' --base."""
    return str(models / "diffusers" / "tiny_sd21")


@pytest.fixture(scope="module")
def nodes(models):
    name = "custom_nodes_x_diffsr_entry_points"
    with host_stand_ins(name, models):
        yield {n.define_schema().node_id: n for n in import_pack(ROOT, name)}


def run(node, **inputs):
    """``node`` executed as ComfyUI executes it: in inference mode (execution.py L662)."""
    with torch.inference_mode():
        return node.execute(**inputs).args


def written(main, image, folder, args):
    """The image file ``main`` (a command) writes on the CPU for the 8-bit ``image`` (H, W, C) saved as a PNG, as an
    array."""
    folder.mkdir()
    path = folder / "input.png"
    Image.fromarray(image).save(path)
    assert main([str(path), "-o", str(folder / "out"), "--device", "cpu", *map(str, args)]) == 0
    return np.asarray(Image.open(folder / "out" / "input.png"))


def as_node_image(image):
    """An 8-bit array (H, W[, C]) as ComfyUI's Load Image gives it: IMAGE (1, H, W, C) in [0, 1]."""
    values = torch.from_numpy(np.ascontiguousarray(image)).float() / 255
    return (values[..., None] if values.dim() == 2 else values)[None]


def random_image(height, width, channels=3, seed=0):
    shape = (height, width, channels) if channels > 1 else (height, width)
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)).to(torch.uint8).numpy()


def rounded(api_output):
    """The API's (1, C, H, W) output as the commands write it: 8 bits, rounded."""
    return tensor_to_uint8(api_output)


def as_api_image(node_image):
    """A node's IMAGE (1, H, W, C) as the API's (1, C, H, W)."""
    return node_image.movedim(-1, 1)


# ------------------------------------------------------------------------------------------ OSEDiff
@pytest.fixture(scope="module")
def osediff_models(nodes, base):
    """(the nodes' OSEDIFF_MODEL, its SD21_BASE, the model as ``osediff`` builds it)."""
    (sd21,) = run(nodes["DiffSR_SD21Loader"], base="diffusers/tiny_sd21")
    (model,) = run(nodes["OSEDiff_Loader"], sd21=sd21, weights="osediff_tiny.pkl")
    with torch.no_grad():
        command_model = osediff_pipeline.build_osediff(load_sd21(base, in_memory=True), read_osediff(OSEDIFF),
                                                       consume=True)
    return model, sd21, command_model


def osediff_modular(nodes, model, image, prompt, *, upscale, process_size, color_fix, tile_latent, tile_overlap,
                    dtype="fp32", conditioning=None, vae_tiles=(1024, 224)):
    """OSEDiff LQ Encoder → One-Step UNet (the prompt text, or a CONDITIONING) → VAE Decode."""
    sizing = dict(upscale=upscale, process_size=process_size)
    (latent,) = run(nodes["OSEDiff_LQEncoder"], model=model, image=image, vae_tile=vae_tiles[0], dtype=dtype, **sizing)
    (x0,) = run(nodes["OSEDiff_OneStepUNet"], model=model, latent=latent, prompt=prompt, tile_latent=tile_latent,
                tile_overlap=tile_overlap, dtype=dtype,
                **({} if conditioning is None else {"conditioning": conditioning}))
    (out,) = run(nodes["OSEDiff_VAEDecode"], model=model, latent=x0, reference=image, color_fix=color_fix,
                 vae_tile=vae_tiles[1], dtype=dtype, **sizing)
    return out


def clip_text_encode(sd21, text):
    """A stand-in of ComfyUI's CLIP Text Encode (nodes.py CLIPTextEncode.encode): the SD 2.1 text encoder's
    embedding of ``text`` with its pooled output, as one CONDITIONING entry."""
    with torch.no_grad():
        embeds = encode_prompt(sd21.text_encoder, sd21.tokenizer, [text])
    return [[embeds, {"pooled_output": embeds[:, -1]}]]


# (height, width), prompt, upscale, process_size, colour fix, latent tile and overlap
OSEDIFF_CASES = {
    "53x37 x4, a prompt, adain": ((53, 37), "a cat", 4.0, 64, "adain", (96, 32)),
    "19x13 x4, no prompt, wavelet, enlarged (process size 128)": ((19, 13), "", 4.0, 128, "wavelet", (96, 32)),
    "48x40 x1, not resized, no colour fix": ((48, 40), "x", 1.0, 8, "none", (96, 32)),
    "19x13 x4, process size 0 (never enlarged)": ((19, 13), "x", 4.0, 0, "adain", (96, 32)),
    "53x37 x8": ((53, 37), "x", 8.0, 64, "adain", (96, 32)),
    "53x37 x2, latent tiles 16/8": ((53, 37), "x", 2.0, 64, "wavelet", (16, 8)),
}


@pytest.mark.parametrize("case", OSEDIFF_CASES)
def test_osediff_command_api_and_nodes_agree(nodes, base, osediff_models, tmp_path, case):
    """The same image and settings through ``osediff``, ``osediff_upscale`` (on the command's model), OSEDiff
    Upscale, and LQ Encoder → One-Step UNet → VAE Decode with the prompt text and with a CONDITIONING of it: one
    output, bit for bit (an 8-bit file of it from the command)."""
    model, sd21, command_model = osediff_models
    size, prompt, upscale, process_size, color_fix, (tile, overlap) = OSEDIFF_CASES[case]
    image = random_image(*size)
    command = written(osediff_command.main, image, tmp_path / "command", [
        "--base", base, "--weights", OSEDIFF,
        "--prompt", prompt, "--upscale", upscale, "--process-size", process_size, "--color-fix", color_fix,
        "--tile-latent", tile, "--tile-overlap", overlap])
    options = osediff_pipeline.Options(upscale=upscale, process_size=process_size, color_fix=color_fix,
                                       tile_latent=tile, tile_overlap=overlap)
    with torch.no_grad():
        api = osediff_pipeline.osediff_upscale(command_model, pil_to_tensor(Image.fromarray(image)), prompt=prompt,
                                               options=options)
    settings = dict(upscale=upscale, process_size=process_size, color_fix=color_fix, tile_latent=tile,
                    tile_overlap=overlap)
    (all_in_one,) = run(nodes["OSEDiff_Upscale"], model=model, image=as_node_image(image), prompt=prompt, dtype="fp32",
                        **settings)
    modular = osediff_modular(nodes, model, as_node_image(image), prompt, **settings)
    conditioned = osediff_modular(nodes, model, as_node_image(image), "ignored", conditioning=clip_text_encode(
        sd21, prompt), **settings)
    assert np.array_equal(command, rounded(api))
    assert torch.equal(as_api_image(all_in_one), api)
    assert torch.equal(modular, all_in_one) and torch.equal(conditioned, all_in_one)


# ------------------------------------------------------------------------------------------ DoSSR
@pytest.fixture(scope="module")
def dossr_models(nodes, tmp_path_factory):
    """(the nodes' DOSSR_MODEL, the model as ``dossr`` loads it, a prompt embedding, its --prompt-embeds file)."""
    (model,) = run(nodes["DoSSR_Loader"], weights="dossr_tiny.ckpt", config="tiny_cldm.yaml")
    embeds = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    path = tmp_path_factory.mktemp("embeds") / "prompt.safetensors"
    save_file({"prompt_embeds": embeds}, path)
    return model, load_dossr(DOSSR, config=DOSSR_CONFIG), embeds, path


def dossr_nodes(nodes, model, image, *, steps, seed, upscale, color_fix, tile_latent, tile_overlap, embeds):
    """(DoSSR Upscale's output, DoSSR Sampler → DoSSR VAE Decode's) for the same inputs; ``embeds`` None: the
    default prompt's text."""
    common = dict(model=model, image=image, steps=steps, seed=seed, prompt=dossr_pipeline.DEFAULT_PROMPT,
                  tile_latent=tile_latent, tile_overlap=tile_overlap, dtype="fp32",
                  **({} if embeds is None else {"conditioning": [[embeds, {}]]}))
    (all_in_one,) = run(nodes["DoSSR_Upscale"], upscale=upscale, color_fix=color_fix, **common)
    latent, reference = run(nodes["DoSSR_Sampler"], **common)
    (modular,) = run(nodes["DoSSR_VAEDecode"], model=model, latent=latent, reference=reference, upscale=upscale,
                     color_fix=color_fix, vae_tile=224)
    return all_in_one, modular


# (height, width), steps, upscale, colour fix, latent tile and overlap, whether the prompt is the default text
DOSSR_CASES = {
    "19x13, 1 step, x4, wavelet": ((19, 13), 1, 4.0, "wavelet", (96, 32), False),
    "19x13, 2 steps, x2.5, adain": ((19, 13), 2, 2.5, "adain", (96, 32), False),
    "19x13, 3 steps, x3, no colour fix": ((19, 13), 3, 3.0, "none", (96, 32), False),
    "19x13, 4 steps, x8": ((19, 13), 4, 8.0, "wavelet", (96, 32), False),
    "19x13, 5 steps, x4, the default prompt's text": ((19, 13), 5, 4.0, "wavelet", (96, 32), True),
    "16x20, 2 steps, x1": ((16, 20), 2, 1.0, "wavelet", (96, 32), False),
    "44x40, 1 step, latent tiles 16/8": ((44, 40), 1, 4.0, "wavelet", (16, 8), False),
}


@pytest.mark.parametrize("case", DOSSR_CASES)
def test_dossr_command_api_and_nodes_agree(nodes, dossr_models, tmp_path, case):
    """The same image, seed and settings through ``dossr``, ``dossr_upscale`` (on the command's model), DoSSR
    Upscale, and DoSSR Sampler → DoSSR VAE Decode: one output, bit for bit (an 8-bit file of it from the command):
    the noise is drawn the same way in each (a CPU generator seeded per image, in the order posterior, init,
    step_0, …)."""
    model, command_model, embeds, embeds_file = dossr_models
    size, steps, upscale, color_fix, (tile, overlap), prompt_text = DOSSR_CASES[case]
    image = random_image(*size, seed=3)
    command = written(dossr_command.main, image, tmp_path / "command", [
        "--weights", DOSSR, "--config", DOSSR_CONFIG, "--steps", steps, "--seed", 42, "--upscale", upscale,
        "--color-fix", color_fix, "--tile-latent", tile, "--tile-overlap", overlap,
        *([] if prompt_text else ["--prompt-embeds", embeds_file])])
    options = dossr_pipeline.Options(steps=steps, seed=42, upscale=upscale, color_fix=color_fix, tile_latent=tile,
                                     tile_overlap=overlap)
    prompt = {} if prompt_text else {"prompt_embeds": embeds}
    with torch.no_grad():
        api = dossr_pipeline.dossr_upscale(command_model, pil_to_tensor(Image.fromarray(image)), options=options,
                                           **prompt)
    all_in_one, modular = dossr_nodes(nodes, model, as_node_image(image), steps=steps, seed=42, upscale=upscale,
                                      color_fix=color_fix, tile_latent=tile, tile_overlap=overlap,
                                      embeds=None if prompt_text else embeds)
    assert np.array_equal(command, rounded(api))
    assert torch.equal(as_api_image(all_in_one), api)
    assert torch.equal(modular, all_in_one)


def test_a_dossr_seed_gives_an_image_the_same_output_at_any_place_in_a_batch(nodes, dossr_models, tmp_path):
    """``dossr FOLDER --seed 5`` draws each image's noise from the seed afresh: the third image of a folder comes
    out as when it is given alone, and as the third image of a batch in DoSSR Upscale (and alone there)."""
    model, _, embeds, embeds_file = dossr_models
    images = [random_image(16, 20, seed=seed) for seed in (4, 5, 6)]
    folder = tmp_path / "folder"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index}.png")
    args = ["--weights", DOSSR, "--config", DOSSR_CONFIG, "--steps", "1", "--seed", "5", "--prompt-embeds",
            str(embeds_file), "--device", "cpu"]
    assert dossr_command.main([str(folder), "-o", str(tmp_path / "all"), *args]) == 0
    assert dossr_command.main([str(folder / "2.png"), "-o", str(tmp_path / "alone"), *args]) == 0
    third = np.asarray(Image.open(tmp_path / "all" / "2.png"))
    assert np.array_equal(third, np.asarray(Image.open(tmp_path / "alone" / "2.png")))
    settings = dict(model=model, steps=1, seed=5, prompt="", upscale=4.0, color_fix="wavelet", tile_latent=96,
                    tile_overlap=32, dtype="fp32", conditioning=[[embeds, {}]])
    (batch,) = run(nodes["DoSSR_Upscale"], image=torch.cat([as_node_image(image) for image in images]), **settings)
    (alone,) = run(nodes["DoSSR_Upscale"], image=as_node_image(images[2]), **settings)
    assert torch.equal(batch[2:], alone)
    assert np.array_equal(third, rounded(as_api_image(alone)))


# ------------------------------------------------------------------------------------------ both
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_osediff_dape_prompts_and_precision_agree(nodes, base, osediff_models, tmp_path, dtype):
    """``osediff --ram --dape --user-prompt sharp --dtype D``, OSEDiff Upscale with Load DAPE (dtype D) and the
    prompt 'sharp', and the modular chain with DAPE Prompt Extractor's text as the One-Step UNet's prompt (every
    node in dtype D): the same prompt '{tags}, sharp,' and the same output."""
    model, _, _ = osediff_models
    image = random_image(53, 37, seed=7)
    command = written(osediff_command.main, image, tmp_path / "command", [
        "--base", base, "--weights", OSEDIFF, "--ram", RAM, "--dape", DAPE, "--user-prompt", "sharp",
        "--process-size", 64, "--dtype", dtype])
    (dape,) = run(nodes["DAPE_Loader"], ram_or_converted="ram_tiny.pth", dape="dape_tiny.pth", dtype=dtype)
    settings = dict(upscale=4.0, process_size=64, color_fix="adain", tile_latent=96, tile_overlap=32)
    (all_in_one,) = run(nodes["OSEDiff_Upscale"], model=model, image=as_node_image(image), prompt="sharp",
                        dtype=dtype, dape=dape, **settings)
    (prompt,) = run(nodes["DAPE_PromptExtractor"], dape=dape, image=as_node_image(image), upscale=4.0,
                    process_size=64, user_prompt="sharp", tags_only=False, exclude="", max_tags=0)
    modular = osediff_modular(nodes, model, as_node_image(image), prompt, dtype=dtype, **settings)
    assert prompt.endswith(", sharp,") and len(prompt) > len(", sharp,")
    assert np.array_equal(command, rounded(as_api_image(all_in_one)))
    assert torch.equal(modular, all_in_one)


def read_as_node_image(path):
    """The values the commands read from ``path`` (``read_image``: RGB, 16-bit gray as its own values, its alpha)
    as an IMAGE: gray as one channel, the alpha as a fourth."""
    rgb, _, alpha = read_image(path)
    values = rgb[:, :1] if Image.open(path).mode in ("L", "I;16") else rgb
    return (values if alpha is None else torch.cat([values, alpha], dim=1)).movedim(1, -1)


FILE_KINDS = {
    "gray": lambda: Image.fromarray(random_image(20, 16, 1, seed=8)),
    "RGBA": lambda: Image.fromarray(np.dstack([random_image(20, 16, seed=9), random_image(20, 16, 1, seed=10)])),
    "16-bit gray": lambda: Image.fromarray(torch.randint(0, 65536, (20, 16), generator=torch.Generator().manual_seed(
        11)).numpy().astype(np.uint16)),
}


@pytest.mark.parametrize("kind", FILE_KINDS)
@pytest.mark.parametrize("method", ["osediff", "dossr"])
def test_gray_transparent_and_16bit_files_agree_with_the_nodes(nodes, base, osediff_models, dossr_models, tmp_path,
                                                               method, kind):
    """A gray, an RGBA and a 16-bit gray file through the command, and the same values as an IMAGE (gray as one
    channel, the alpha as a fourth) through the all-in-one node and the modular chain: the same output, its alpha
    (upscaled bicubically beside the RGB) included. (ComfyUI's Load Image reads a 16-bit PNG as 8 bits; an IMAGE in
    float16 is test_nodes.py::test_a_16bit_image_is_upscaled_as_its_float32_values.)"""
    path = tmp_path / f"{kind}.png"
    FILE_KINDS[kind]().save(path)
    image = read_as_node_image(str(path))
    if method == "osediff":
        model = osediff_models[0]
        settings = dict(upscale=4.0, process_size=64, color_fix="adain", tile_latent=96, tile_overlap=32)
        assert osediff_command.main([str(path), "-o", str(tmp_path / "out"), "--base", base, "--weights", OSEDIFF,
                                     "--process-size", "64", "--device", "cpu"]) == 0
        (all_in_one,) = run(nodes["OSEDiff_Upscale"], model=model, image=image, prompt="", dtype="fp32", **settings)
        modular = osediff_modular(nodes, model, image, "", **settings)
    else:
        model, _, embeds, embeds_file = dossr_models
        assert dossr_command.main([str(path), "-o", str(tmp_path / "out"), "--weights", DOSSR, "--config",
                                   DOSSR_CONFIG, "--steps", "1", "--prompt-embeds", str(embeds_file), "--device",
                                   "cpu"]) == 0
        all_in_one, modular = dossr_nodes(nodes, model, image, steps=1, seed=42, upscale=4.0, color_fix="wavelet",
                                          tile_latent=96, tile_overlap=32, embeds=embeds)
    command = np.asarray(Image.open(tmp_path / "out" / f"{kind}.png"))
    assert command.shape == (80, 64, 4 if kind == "RGBA" else 3)
    assert np.array_equal(command, rounded(as_api_image(all_in_one)))
    assert torch.equal(modular, all_in_one)


def test_dossr_decode_resizes_the_references_alpha_at_other_scales(nodes, dossr_models):
    """At scales other than ×4, DoSSR VAE Decode has only the REFERENCE's alpha, the LR alpha upscaled ×4, and
    resizes that one to the output (bicubically, as every alpha), where DoSSR Upscale resizes the LR alpha: their
    colours are equal, their alphas a bicubic resize apart (README, DoSSR VAE Decode)."""
    from comfyui_diffsr.sr_common.image import resized_alpha

    model, _, embeds, _ = dossr_models
    image = as_node_image(np.dstack([random_image(20, 16, seed=12), random_image(20, 16, 1, seed=13)]))
    common = dict(model=model, image=image, steps=1, seed=42, prompt="", tile_latent=96, tile_overlap=32,
                  dtype="fp32", conditioning=[[embeds, {}]])
    latent, reference = run(nodes["DoSSR_Sampler"], **common)
    (all_in_one,) = run(nodes["DoSSR_Upscale"], upscale=2.0, color_fix="wavelet", **common)
    (modular,) = run(nodes["DoSSR_VAEDecode"], model=model, latent=latent, reference=reference, upscale=2.0,
                     color_fix="wavelet", vae_tile=224)
    assert modular.shape == all_in_one.shape == (1, 40, 32, 4)
    assert torch.equal(modular[..., :3], all_in_one[..., :3])
    x4_alpha = reference[..., 3:].movedim(-1, 1)
    assert torch.equal(modular[..., 3:].movedim(-1, 1), resized_alpha(x4_alpha, (40, 32)))
    assert not torch.equal(modular[..., 3], all_in_one[..., 3])


def test_the_output_does_not_depend_on_the_strides_of_the_input(osediff_models, dossr_models):
    """One image in the layouts the entry points hand over, a file read (``pil_to_tensor``: its batch stride is 3, not
    C·H·W), a ComfyUI IMAGE (channels last) and contiguous: one output from each pipeline. Convolutions take their
    memory layout from their input's strides; an image not resized went into OSEDiff's encoder (×1), and every one
    into DoSSR's RRDB, as it came, and a node's output was 1 level in 255 off the command's."""
    _, _, command_model = osediff_models
    _, dossr_model, embeds, _ = dossr_models

    def layouts(image):
        return {"file": pil_to_tensor(Image.fromarray(image)), "IMAGE": as_api_image(as_node_image(image)),
                "contiguous": pil_to_tensor(Image.fromarray(image)).contiguous()}

    image, lr = layouts(random_image(48, 40, seed=14)), layouts(random_image(16, 12, seed=15))
    assert image["file"].stride()[0] == 3 and image["IMAGE"].is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        osediff = {name: osediff_pipeline.osediff_upscale(command_model, one, prompt="", options=osediff_pipeline.Options(
            upscale=1, process_size=8, color_fix="none")) for name, one in image.items()}
        dossr = {name: dossr_pipeline.dossr_upscale(dossr_model, one, prompt_embeds=embeds,
                                                    options=dossr_pipeline.Options(steps=1)) for name, one in lr.items()}
    for outputs in (osediff, dossr):
        assert torch.equal(outputs["file"], outputs["IMAGE"]) and torch.equal(outputs["file"], outputs["contiguous"])


# ------------------------------------------------------------------------------------------ defaults
PARSERS = {"osediff": osediff_command.build_parser(), "dossr": dossr_command.build_parser(),
           "dape": dape_command.build_parser()}


def test_each_installed_command_names_itself_in_its_usage():
    """``dape --help`` said ``usage: diffsr dape`` though the README and pyproject.toml's scripts call it ``dape``, as
    ``osediff`` and ``dossr`` name themselves: each script's usage line names the script."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the test extra installs tomli, the same parser before the stdlib had it
        import tomli as tomllib
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert {name: PARSERS[name].prog for name in scripts if name in PARSERS} == {name: name for name in PARSERS}


def subcommand_parsers():
    """{'diffsr convert osediff' etc.: its parser} for the subcommands of ``diffsr convert``, and ``diffsr
    download``'s."""
    (kinds,) = [a for a in convert_command.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {f"diffsr convert {kind}": parser for kind, parser in kinds.choices.items()} | {
        "diffsr download": download_command.build_parser()}


EVERY_PARSER = PARSERS | subcommand_parsers()


def option_default(command, dest):
    (action,) = [a for a in PARSERS[command]._actions if a.dest == dest]
    return action.default


def shown_default(value):
    """A default as a help text or the README writes it: 4 for 4.0."""
    return f"{value:g}" if isinstance(value, float) else str(value)


@pytest.mark.parametrize("command", PARSERS)
def test_help_names_every_default(command):
    """Every option of ``osediff``, ``dossr`` and ``diffsr dape`` that has a default (not an empty text, off, or
    chosen at run time: --device, --dtype) says it in --help, as its value."""
    parser = PARSERS[command]
    for action in parser._actions:
        if action.default in (None, False, "", argparse.SUPPRESS) or not action.option_strings:
            continue
        shown = (action.help or "") % dict(vars(action), prog=parser.prog)  # as argparse expands it
        assert "default" in shown and shown_default(action.default) in shown, (action.option_strings, shown)


@pytest.mark.parametrize("command, options", [("osediff", osediff_pipeline.Options),
                                              ("dossr", dossr_pipeline.Options)])
def test_the_commands_defaults_are_the_apis(command, options):
    """Each option of the command that is a field of the API's ``Options`` has that field's default."""
    fields = {f.name: f.default for f in dataclasses.fields(options)}
    shared = [a.dest for a in PARSERS[command]._actions if a.dest in fields]
    assert len(shared) >= 9, shared
    assert {dest: option_default(command, dest) for dest in shared} == {dest: fields[dest] for dest in shared}


# node: {widget: (command, option)} where they differ in name or the widget's default is not its own command's
NODE_WIDGETS = {
    "OSEDiff_Upscale": {"upscale": ("osediff", "upscale"), "process_size": ("osediff", "process_size"),
                        "color_fix": ("osediff", "color_fix"), "tile_latent": ("osediff", "tile_latent"),
                        "tile_overlap": ("osediff", "tile_overlap"), "prompt": ("osediff", "user_prompt")},
    "OSEDiff_LQEncoder": {"upscale": ("osediff", "upscale"), "process_size": ("osediff", "process_size"),
                          "vae_tile": ("osediff", "vae_tile_encode")},
    "OSEDiff_OneStepUNet": {"tile_latent": ("osediff", "tile_latent"), "tile_overlap": ("osediff", "tile_overlap"),
                            "prompt": ("osediff", "user_prompt")},
    "OSEDiff_VAEDecode": {"upscale": ("osediff", "upscale"), "process_size": ("osediff", "process_size"),
                          "color_fix": ("osediff", "color_fix"), "vae_tile": ("osediff", "vae_tile_decode")},
    "DAPE_PromptExtractor": {"upscale": ("dape", "upscale"), "process_size": ("dape", "process_size"),
                             "user_prompt": ("dape", "user_prompt"), "tags_only": ("dape", "tags_only"),
                             "exclude": ("dape", "exclude"), "max_tags": ("dape", "max_tags")},
    "DoSSR_Upscale": {name: ("dossr", name) for name in ("steps", "seed", "prompt", "upscale", "color_fix",
                                                         "tile_latent", "tile_overlap")},
    "DoSSR_Sampler": {name: ("dossr", name) for name in ("steps", "seed", "prompt", "tile_latent", "tile_overlap")},
    "DoSSR_VAEDecode": {"upscale": ("dossr", "upscale"), "color_fix": ("dossr", "color_fix"),
                        "vae_tile": ("dossr", "vae_tile_decode")},
}


@pytest.mark.parametrize("node", NODE_WIDGETS)
def test_the_nodes_widget_defaults_are_the_commands(nodes, node):
    """Each widget of the nodes that a command has as an option has its default (OSEDiff's prompt widgets: the text
    after DAPE's tags, or alone, as --user-prompt, empty), and every widget with a default is listed (dtype aside:
    'auto', which the commands say as no --dtype)."""
    widgets = {i.id: i.default for i in nodes[node].define_schema().inputs if i.default is not None}
    assert set(widgets) - {"dtype"} == set(NODE_WIDGETS[node])
    assert {name: widgets[name] for name in NODE_WIDGETS[node]} == {
        name: option_default(*option) for name, option in NODE_WIDGETS[node].items()}


def readme_command_lines(comments=False):
    """{command: its line(s) in the README's ``## Command line`` block} for the commands of ``EVERY_PARSER`` (a
    ``diffsr convert`` line under 'diffsr convert KIND'); their comments too where ``comments``."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    commands, name = {}, None
    for line in block.splitlines():
        if line and not line[0].isspace():
            name = max((c for c in EVERY_PARSER if line.startswith(c + " ")), key=len, default=None)
        if name and (comments or not line.lstrip().startswith("#")):
            commands[name] = commands.get(name, "") + " " + (line if comments else line.split("#")[0])
    return commands


@pytest.mark.parametrize("command", EVERY_PARSER)
def test_the_readmes_command_lines_name_every_option_and_no_other(command):
    """The README's command lines name each option the command has (by one of its names; --help aside), and no
    option it lacks; ``diffsr download``'s line (with its comment) names each file it fetches."""
    parser = EVERY_PARSER[command]
    line = readme_command_lines()[command]
    named = set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", line))
    options = [a.option_strings for a in parser._actions if a.option_strings and "--help" not in a.option_strings]
    assert named - {o for names in options for o in names} == set(), f"the README names options {command} lacks"
    assert [names for names in options if not named & set(names)] == [], f"the README leaves out {command}'s"
    for action in parser._actions:
        if not action.option_strings and action.choices:
            words = set(re.findall(r"[\w-]+", readme_command_lines(comments=True)[command]))
            assert set(action.choices) - words == set(), command


@pytest.mark.parametrize("command", PARSERS)
def test_the_readmes_command_lines_show_the_defaults(command):
    """In the README's command lines, an option written with a value (``[--upscale 4]``) has that default, and one
    written with its choices (``[--color-fix adain|wavelet|none]``) has those choices, its default first (but
    --device and --dtype, chosen at run time)."""
    line = readme_command_lines()[command]
    shown = re.findall(r"\[(--[a-z-]+) ([a-z0-9.|]+)\]", line)
    assert len(shown) >= 2, line
    for option, value in shown:
        if option in ("--device", "--dtype"):
            continue
        (action,) = [a for a in PARSERS[command]._actions if option in a.option_strings]
        if "|" in value:
            assert value.split("|")[0] == action.default and set(value.split("|")) == set(action.choices), option
        else:
            assert value == shown_default(action.default), option


def test_the_readmes_node_table_lists_every_node_and_no_other(nodes):
    """The README's table of nodes (its first column: display names, two to a row joined by ' / ') names each node
    of the pack by its display name, and no other."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        table = f.read().split("| node | in → out |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split(" | ")[0].removeprefix("| ") for line in table.strip().splitlines()[1:]]
    listed = [name for row in rows for name in row.split(" / ")]
    assert sorted(listed) == sorted(node.define_schema().display_name for node in nodes.values())


def test_the_readmes_node_table_names_the_types_the_nodes_take_and_give(nodes):
    """Each row of the README's table of nodes names, after its arrow (up to the first parenthesis), exactly the
    types its nodes output, and before it (parentheses left out) only types they take. The rows 'Load DAPE (RAM +
    LoRA) / DAPE Prompt Extractor | IMAGE → STRING' and 'Load DoSSR / DoSSR Upscale (all-in-one) | IMAGE → IMAGE'
    left out the loaders' DAPE_MODEL and DOSSR_MODEL."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        table = f.read().split("| node | in → out |", 1)[1].split("\n\n", 1)[0]
    schemas = {schema.display_name: schema for schema in (node.define_schema() for node in nodes.values())}
    io_types = {port.io_type for schema in schemas.values() for port in schema.inputs + schema.outputs}
    named = lambda text: {word for word in re.findall(r"[A-Z][A-Z0-9_]+", text) if word in io_types}
    for line in table.strip().splitlines()[1:]:
        names, in_out = line.removeprefix("| ").split(" | ", 1)
        taken, given = in_out.split(" → ", 1)
        row = [schemas[name] for name in names.split(" / ")]
        assert named(given.split("(", 1)[0]) == {port.io_type for schema in row for port in schema.outputs}, names
        taken_types = {port.io_type for schema in row for port in schema.inputs}
        assert named(re.sub(r"\([^)]*\)", "", taken)) <= taken_types, names


def test_the_nodes_take_the_sizes_the_commands_take(nodes, capsys):
    """upscale and process_size in the OSEDiff nodes and DAPE Prompt Extractor range as ``osediff`` and ``diffsr
    dape`` take them: 1 to 8, and 0 (no input enlarged) to 4096. ``dossr`` took an --upscale in (0, 16], where its
    nodes take 1 to 8: ``dossr --upscale 12`` made a 48× LANCZOS enlargement of the ×4 result, 0.5 an output smaller
    than the input; it takes the nodes' 1 to 8, as every command and API does."""
    from comfyui_diffsr.cli.common import check_sizing_args

    for upscale, process_size in ((1, 0), (8, osediff_pipeline.MAX_PROCESS_SIZE)):
        check_sizing_args(argparse.Namespace(upscale=upscale, process_size=process_size, official_sizing=False))
    for node in ("OSEDiff_Upscale", "OSEDiff_LQEncoder", "OSEDiff_VAEDecode", "DAPE_PromptExtractor",
                 "DoSSR_Upscale", "DoSSR_VAEDecode"):
        widgets = {i.id: i.options for i in nodes[node].define_schema().inputs}
        assert (widgets["upscale"]["min"], widgets["upscale"]["max"]) == (1, 8), node
        if node.startswith("DoSSR"):
            continue
        assert (widgets["process_size"]["min"], widgets["process_size"]["max"]) == (
            0, osediff_pipeline.MAX_PROCESS_SIZE), node
    for upscale in ("12", "0.5"):  # refused before anything is read
        assert dossr_command.main(["missing.png", "-o", "out", "--weights", "missing.ckpt", "--upscale", upscale]) == 2
        assert capsys.readouterr().err == f"error: --upscale must be between 1 and 8, got {upscale}\n"


def test_the_readme_gives_the_scales_taken():
    """The README's Output paragraph still said ``dossr`` takes "any scale above 0 up to 16" once it took the nodes'
    1 to 8 (``check_upscale``), which refuses 12 and 0.5. Every scale range the README states is MIN_UPSCALE to
    MAX_UPSCALE."""
    from comfyui_diffsr.sr_common.image import MAX_UPSCALE, MIN_UPSCALE

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        ranges = re.findall(r"scales? (?:from|above|between) ([0-9.]+) (?:to|up to|and) ([0-9.]+)", f.read())
    assert ranges and {(float(low), float(high)) for low, high in ranges} == {(MIN_UPSCALE, MAX_UPSCALE)}, ranges


def test_the_readme_gives_the_steps_taken(nodes, capsys):
    """The README says ``dossr --steps`` takes 1 to T1 − 1 and the DoSSR nodes 1 to 10: the command refuses T1 and 0,
    and both nodes' ``steps`` widget ranges as the README says."""
    from comfyui_diffsr.dossr_core.schedule import T1

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        said = re.search(r"the command takes (\d+) to (\d+),\s+spaced over the t₁ = (\d+) steps, the nodes (\d+) to "
                         r"(\d+)", f.read())
    assert said and tuple(map(int, said.groups())) == (1, T1 - 1, T1, 1, 10)
    for node in ("DoSSR_Upscale", "DoSSR_Sampler"):
        steps = {i.id: i.options for i in nodes[node].define_schema().inputs}["steps"]
        assert (steps["min"], steps["max"]) == (1, 10), node
    for steps in (0, T1):
        assert dossr_command.main(["missing.png", "-o", "out", "--weights", "missing.ckpt", "--steps", str(steps)]) == 2
        assert capsys.readouterr().err == f"error: --steps must be 1 to {T1 - 1}, got {steps} (the paper uses 1 to 5)\n"
