"""DoSSR weight files: recognition, clear refusals, conversion, and the CLI."""

import contextlib
import functools
import math
import os
import re
import shutil

import pytest
import torch

from comfyui_diffsr.cli.common import OUTPUT_FOLDER_MARK
from comfyui_diffsr.dossr_core.weights import detect, read_weights, split_controlnet_conv_in
from comfyui_diffsr.sr_common.errors import WeightFileError
from comfyui_diffsr.sr_common.known_files import canonical
from comfyui_diffsr.sr_common.names import quoted_name

FIX = os.path.join(os.path.dirname(__file__), "data", "dossr")
CKPT = os.path.join(FIX, "dossr_tiny.ckpt")


@pytest.fixture(scope="module")
def official_sd():
    return canonical(torch.load(CKPT, map_location="cpu", weights_only=True))


def save(tmp_path, name, sd):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_official_recognised_with_wrappers(official_sd, tmp_path):
    assert detect(official_sd) == "official"
    wrapped = save(tmp_path, "m.ckpt", {"state_dict": {"module." + k: v for k, v in official_sd.items()}})
    _, kind, _ = read_weights(wrapped)
    assert kind == "official"


def test_float32_file_as_the_official_loads_the_same_model(official_sd, tmp_path):
    """The official ``dossr_default.ckpt`` is float32; the fixture stores float16 values. The same values in float32
    load to the same float32 networks."""
    from comfyui_diffsr.dossr_core.model import load_dossr

    float32 = save(tmp_path, "fp32.ckpt", {"state_dict": {k: v.float() if v.is_floating_point() else v
                                                          for k, v in official_sd.items()}})
    yaml = os.path.join(FIX, "tiny_cldm.yaml")
    stored, official = (load_dossr(path, config=yaml, text_heads=2) for path in (CKPT, float32))
    for a, b in zip(stored.modules(), official.modules()):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y), name


@pytest.mark.parametrize("drop, message", [
    ("control_model.", "without the ControlNet"),
    ("cond_encoder.", "without DoSSR's condition encoder"),
])
def test_incomplete_dossr_refused(official_sd, tmp_path, drop, message):
    sd = {k: v for k, v in official_sd.items() if not k.startswith(drop)}
    with pytest.raises(WeightFileError, match=message):
        read_weights(save(tmp_path, "x.ckpt", sd))


def test_sd_checkpoint_refused(official_sd, tmp_path):
    sd = {k: v for k, v in official_sd.items()
          if k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))}
    with pytest.raises(WeightFileError, match="not a DoSSR weight file: it is a Stable Diffusion 2.x checkpoint; it "
                                              "is a base model"):
        read_weights(save(tmp_path, "sd.ckpt", sd))


def test_hint_controlnet_and_osediff_refused(tmp_path):
    hint = {"control_model.input_hint_block.0.weight": torch.zeros(1), "control_model.zero_convs.0.0.weight":
            torch.zeros(1)}
    with pytest.raises(WeightFileError, match="input_hint_block"):
        read_weights(save(tmp_path, "cn.pth", hint))
    osediff = {"rank_unet": torch.tensor(4), "state_dict_unet": {"a": torch.zeros(1)}}
    with pytest.raises(WeightFileError, match="OSEDiff"):
        read_weights(save(tmp_path, "osediff.pkl", osediff))


def test_pickled_objects_refused_not_executed(tmp_path):
    import collections

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "obj": collections.Counter()}, path)
    with pytest.raises(WeightFileError, match="weights_only|Refusing|convert"):
        read_weights(path)


def test_conv_in_split_is_exact():
    torch.manual_seed(0)
    full = torch.nn.Conv2d(8, 6, 3, padding=1)
    state = split_controlnet_conv_in({"conv_in.weight": full.weight.detach().clone()}, 4)
    x, c = torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5)
    a = torch.nn.functional.conv2d(x, state["conv_in.weight"], full.bias, padding=1)
    b = torch.nn.functional.conv2d(c, state["controlnet_cond_embedding.weight"], padding=1)
    assert torch.allclose(a + b, full(torch.cat([x, c], 1)), atol=1e-6)


def test_convert_without_the_matching_config_writes_nothing(tmp_path):
    """Converting with the built-in SD 2.1 config a checkpoint of another size wrote a file no loader could use (its
    stored config is the wrong one): now the mismatch is reported, naming --config, and nothing is written."""
    from comfyui_diffsr.dossr_core.weights import convert_dossr

    with pytest.raises(WeightFileError, match="ControlNet.*--config"):
        convert_dossr(CKPT, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_converted_file_refuses_reconversion_and_is_recognised(tmp_path):
    from comfyui_diffsr.dossr_core.weights import convert_dossr

    out = tmp_path / "parts.safetensors"
    convert_dossr(CKPT, out, config=os.path.join(FIX, "tiny_cldm.yaml"))
    sd, kind, meta = read_weights(out)
    assert kind == "converted" and meta["format"] == "dossr-diffusers-v1"
    assert not any(k.startswith(("unet.", "model.diffusion_model.")) for k in sd)
    with pytest.raises(WeightFileError) as refused:
        convert_dossr(out, tmp_path / "again.safetensors")
    assert str(refused.value) == ("'parts.safetensors' is already a converted DoSSR file: use it as it is (--weights, "
                                  "or the Load DoSSR node); only the official .ckpt is converted.")
    assert not os.path.exists(tmp_path / "again.safetensors")
    with pytest.raises(WeightFileError, match="exists"):
        convert_dossr(CKPT, out, config=os.path.join(FIX, "tiny_cldm.yaml"))


def test_cli_convert_says_what_it_found_of_the_condition_encoder_as_a_note(tmp_path, capsys):
    """``diffsr convert dossr`` reports on the condition encoder as a note (it read as an error without one)."""
    from comfyui_diffsr.cli.convert import main

    out = tmp_path / "parts.safetensors"
    assert main(["dossr", CKPT, str(out), "--config", os.path.join(FIX, "tiny_cldm.yaml")]) == 0
    printed = capsys.readouterr()
    assert printed.err == ("note: the condition encoder differs from the SD VAE encoder (it is always loaded from the "
                           "DoSSR file)\n")
    assert printed.out == f"wrote {out}\n" and read_weights(out)[1] == "converted"


def test_converted_file_without_its_metadata_names_the_reconversion(tmp_path):
    """A converted file whose metadata was lost (re-saved by another tool) is refused by name, with the fix."""
    from safetensors.torch import load_file, save_file

    from comfyui_diffsr.dossr_core.model import load_dossr
    from comfyui_diffsr.dossr_core.weights import convert_dossr

    out = tmp_path / "parts.safetensors"
    convert_dossr(CKPT, out, config=os.path.join(FIX, "tiny_cldm.yaml"))
    save_file(load_file(out), tmp_path / "resaved.safetensors")
    assert read_weights(tmp_path / "resaved.safetensors")[1] == "converted"
    with pytest.raises(WeightFileError, match=r"'resaved.safetensors': Converted DoSSR file without the expected "
                                              r"metadata \(format 'dossr-diffusers-v1'\).*`diffsr convert dossr`"):
        load_dossr(tmp_path / "resaved.safetensors", base=os.path.join(os.path.dirname(FIX), "osediff", "tiny_sd21"))


def test_cli_runs_and_refuses_overwrite(tmp_path):
    from safetensors.torch import load_file, save_file

    from comfyui_diffsr.cli.dossr import main

    context = load_file(os.path.join(FIX, "n1_w32h16_wavelet.safetensors"))["context"]
    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": context}, embeds)
    args = [os.path.join(FIX, "lr_w32h16.png"), "-o", str(tmp_path / "out"), "--weights", CKPT, "--config",
            os.path.join(FIX, "tiny_cldm.yaml"), "--prompt-embeds", str(embeds), "--steps", "1", "--device", "cpu",
            "--save-noise"]
    assert main(args) == 0
    assert (tmp_path / "out" / "lr_w32h16.png").exists()
    assert (tmp_path / "out" / "lr_w32h16.noise.safetensors").exists()
    assert main(args) == 2  # exists, no --overwrite
    noise = str(tmp_path / "out" / "lr_w32h16.noise.safetensors")
    drawn = load_file(noise)
    args2 = args[:2] + [str(tmp_path / "out2")] + args[3:-1] + ["--noise-file", noise, "--seed", "99"]
    assert main(args2) == 0
    from PIL import Image
    import numpy as np
    a = np.asarray(Image.open(tmp_path / "out" / "lr_w32h16.png"))
    b = np.asarray(Image.open(tmp_path / "out2" / "lr_w32h16.png"))
    assert (a == b).all()
    (tmp_path / "out" / "lr_w32h16.png").unlink()  # the noise file alone is refused too, before any work
    assert main(args) == 2
    assert not (tmp_path / "out" / "lr_w32h16.png").exists()
    # a run stopped between the noise file and its image resumes with --skip-existing: the noise file is made again
    assert main(args + ["--skip-existing"]) == 0
    assert (np.asarray(Image.open(tmp_path / "out" / "lr_w32h16.png")) == a).all()
    assert all(torch.equal(drawn[k], load_file(noise)[k]) for k in drawn)


def test_cli_skip_existing_skips_an_output_another_run_made_meanwhile(tmp_path, monkeypatch, capsys):
    """--skip-existing in a folder run that another run shares: an output that run made after this one planned its
    outputs is skipped with a note, as an existing one is, and left as it is (the run does not fail)."""
    from safetensors.torch import load_file, save_file

    import comfyui_diffsr.dossr_core.pipeline as pipeline
    from comfyui_diffsr.cli.dossr import main
    from conftest import RIVAL_OUTPUT, folder_run_with_a_rival

    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": load_file(os.path.join(FIX, "n1_w32h16_wavelet.safetensors"))["context"]}, embeds)
    folder, out = folder_run_with_a_rival(tmp_path, monkeypatch, os.path.join(FIX, "lr_w32h16.png"), pipeline,
                                          "dossr_upscale")
    assert main([str(folder), "-o", str(out), "--weights", CKPT, "--config", os.path.join(FIX, "tiny_cldm.yaml"),
                 "--prompt-embeds", str(embeds), "--steps", "1", "--device", "cpu", "--skip-existing"]) == 0
    assert f"note: {folder / 'b.png'}: skipped: its output" in capsys.readouterr().err
    assert (out / "b.png").read_bytes() == RIVAL_OUTPUT and (out / "a.png").stat().st_size > 100


def test_cli_a_noise_file_that_cannot_be_written_again_is_left_as_it_was(tmp_path, monkeypatch, capsys):
    """--overwrite --save-noise on a full disk: the earlier noise file stays, whole, beside its earlier image (it
    was deleted before the new one was written)."""
    from safetensors.torch import load_file, save_file

    import comfyui_diffsr.sr_common.weights as weights
    from comfyui_diffsr.cli.dossr import main

    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": load_file(os.path.join(FIX, "n1_w32h16_wavelet.safetensors"))["context"]}, embeds)
    args = [os.path.join(FIX, "lr_w32h16.png"), "-o", str(tmp_path / "out"), "--weights", CKPT, "--config",
            os.path.join(FIX, "tiny_cldm.yaml"), "--prompt-embeds", str(embeds), "--steps", "1", "--device", "cpu",
            "--save-noise"]
    assert main(args) == 0
    noise = tmp_path / "out" / "lr_w32h16.noise.safetensors"
    earlier = noise.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights, "save_file", disk_full)
    assert main(args + ["--overwrite", "--seed", "7"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert noise.read_bytes() == earlier and sorted(os.listdir(tmp_path / "out")) == [
        OUTPUT_FOLDER_MARK, "lr_w32h16.noise.safetensors", "lr_w32h16.png"]
    monkeypatch.undo()
    assert main(args + ["--overwrite", "--seed", "7"]) == 0 and noise.read_bytes() != earlier


def test_cli_checks_the_format_limit_at_dossrs_output_size(tmp_path, capsys):
    """DoSSR's output is ceil(upscale/4 · 4·size) (the official resize): a WebP past 16383 px at that size is
    refused for its image alone, before any work, and the folder run goes on."""
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from comfyui_diffsr.cli.dossr import main
    from comfyui_diffsr.dossr_core.pipeline import output_size

    assert output_size(4 * 2200, 8, 7.4469) == (16383 + 1, 15)  # round(7.4469 · 2200) would be 16383
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (2200, 2), "gray").save(folder / "a_wide.png")
    Image.open(os.path.join(FIX, "lr_w32h16.png")).save(folder / "b_ok.png")
    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": load_file(os.path.join(FIX, "n1_w32h16_wavelet.safetensors"))["context"]}, embeds)
    assert main([str(folder), "-o", str(tmp_path / "out"), "--weights", CKPT, "--config",
                 os.path.join(FIX, "tiny_cldm.yaml"), "--steps", "1", "--device", "cpu", "--prompt-embeds", str(embeds),
                 "--upscale", "7.4469", "--format", "webp", "--tile-latent", "0"]) == 2
    err = capsys.readouterr().err
    assert "a_wide.png: The output would be 16384×15 px" in err and "1 of 2 image(s) failed" in err
    assert sorted(os.listdir(tmp_path / "out")) == [OUTPUT_FOLDER_MARK, "b_ok.webp"]
    assert Image.open(tmp_path / "out" / "b_ok.webp").size == (math.ceil(7.4469 * 32), math.ceil(7.4469 * 16))


def test_cli_output_matches_the_official_code(tmp_path):
    """The ``dossr`` command end to end on an official fixture, given its random draws (``--noise-file``) and its
    text context (``--prompt-embeds``); the official PNG truncates to 8 bits where the command rounds."""
    import json

    from safetensors.torch import load_file, save_file

    from comfyui_diffsr.cli.common import load_image
    from comfyui_diffsr.cli.dossr import main
    from comfyui_diffsr.dossr_core.pipeline import save_noise

    with open(os.path.join(FIX, "cases.json")) as f:
        case = next(c for c in json.load(f)["cases"] if c["name"] == "n2_w16h32_wavelet")
    d = load_file(os.path.join(FIX, case["tensors"]))
    noise, embeds = tmp_path / "noise.safetensors", tmp_path / "embeds.safetensors"
    save_noise({"posterior": d["noise_posterior"], "init": d["noise_init"],
                **{f"step_{k}": d[f"noise_step_{k}"] for k in range(case["steps"])}}, noise)
    save_file({"prompt_embeds": d["context"]}, embeds)
    assert main([os.path.join(FIX, case["input"]), "-o", str(tmp_path / "out"), "--weights", CKPT, "--config",
                 os.path.join(FIX, "tiny_cldm.yaml"), "--steps", str(case["steps"]), "--noise-file", str(noise),
                 "--prompt-embeds", str(embeds), "--color-fix", case["color_fix_type"], "--device", "cpu"]) == 0
    ours = load_image(str(tmp_path / "out" / case["input"]))
    official = load_image(os.path.join(FIX, case["output_png"]))
    assert ours.shape == official.shape
    mse = torch.mean((ours.double() - official.double()) ** 2).item()
    assert 10 * torch.log10(torch.tensor(1 / mse)).item() >= 48 and (ours - official).abs().max() <= 1.5 / 255


def test_cli_out_of_memory_retry_keeps_the_draws(tmp_path, monkeypatch, capsys):
    """An out-of-memory attempt (after it drew noise) is retried with smaller tiles; the saved draws are the
    successful attempt's, the same as a run that never ran out of memory."""
    from safetensors.torch import load_file, save_file

    import comfyui_diffsr.dossr_core.pipeline as pipeline
    from comfyui_diffsr.cli.dossr import main

    context = load_file(os.path.join(FIX, "n1_w32h16_wavelet.safetensors"))["context"]
    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": context}, embeds)
    args = [os.path.join(FIX, "lr_w32h16.png"), "--weights", CKPT, "--config", os.path.join(FIX, "tiny_cldm.yaml"),
            "--prompt-embeds", str(embeds), "--steps", "2", "--device", "cpu", "--save-noise", "--tile-latent", "0"]
    assert main(args + ["-o", str(tmp_path / "plain")]) == 0
    real, tiles = pipeline.dossr_upscale, []

    def flaky(model, image, options, trace=None, **kwargs):
        tiles.append(options.tile_latent)
        if len(tiles) == 1:
            real(model, image, options=options, trace=trace, **kwargs)  # drew its noise, then "ran out"
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, image, options=options, trace=trace, **kwargs)

    monkeypatch.setattr(pipeline, "dossr_upscale", flaky)
    assert main(args + ["-o", str(tmp_path / "retried")]) == 0
    assert tiles == [0, 96] and "retrying with smaller tiles" in capsys.readouterr().err
    a, b = (load_file(tmp_path / d / "lr_w32h16.noise.safetensors") for d in ("plain", "retried"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "plain" / "lr_w32h16.png").read_bytes() == (tmp_path / "retried" / "lr_w32h16.png").read_bytes()


def test_cli_wrong_weights_message(tmp_path, capsys):
    from comfyui_diffsr.cli.dossr import main

    bad = save(tmp_path, "sd.ckpt", {"model.diffusion_model.x": torch.zeros(1)})
    assert main([os.path.join(FIX, "lr_w32h16.png"), "-o", str(tmp_path / "o"), "--weights", str(bad),
                 "--device", "cpu"]) == 2
    assert "DoSSR" in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["0", "500"])
def test_cli_steps_out_of_range_are_refused_before_loading(tmp_path, capsys, steps):
    """Outside 1-499 the schedule cannot be built; said once, before any model is read, not once per image."""
    from comfyui_diffsr.cli.dossr import main

    assert main([os.path.join(FIX, "lr_w32h16.png"), "-o", str(tmp_path / "o"), "--weights",
                 str(tmp_path / "missing.ckpt"), "--steps", steps]) == 2
    assert "--steps must be 1 to 499" in capsys.readouterr().err


def test_cli_prompt_and_prompt_embeds_are_exclusive(tmp_path, capsys):
    """--prompt-embeds replaces the prompt: both together are refused, not one of them dropped."""
    from comfyui_diffsr.cli.dossr import main

    with pytest.raises(SystemExit) as stopped:
        main([os.path.join(FIX, "lr_w32h16.png"), "-o", str(tmp_path / "o"), "--weights", CKPT, "--prompt", "a cat",
              "--prompt-embeds", str(tmp_path / "embeds.safetensors")])
    assert stopped.value.code == 2
    assert "argument --prompt-embeds: not allowed with argument --prompt" in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["99999999999999999999", str(-2**63 - 1), "1.5"])
def test_cli_seed_out_of_range_is_refused_before_loading(tmp_path, capsys, seed):
    """Outside −2⁶³ to 2⁶⁴ − 1 a generator cannot take it: said once, before any model is read."""
    from comfyui_diffsr.cli.dossr import main

    with pytest.raises(SystemExit):
        main([os.path.join(FIX, "lr_w32h16.png"), "-o", str(tmp_path / "o"), "--weights",
              str(tmp_path / "missing.ckpt"), "--seed", seed])
    assert f"argument --seed: must be an integer from -2^63 to 2^64 - 1, got {seed!r}" in capsys.readouterr().err


def test_cli_the_largest_seed_draws(tmp_path):
    """The ends of the range, 2⁶⁴ − 1 and −2⁶³, seed every draw."""
    from safetensors.torch import load_file, save_file

    from comfyui_diffsr.cli.dossr import main

    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": load_file(os.path.join(FIX, "n1_w32h16_wavelet.safetensors"))["context"]}, embeds)
    for seed in (2**64 - 1, -2**63):
        assert main([os.path.join(FIX, "lr_w32h16.png"), "-o", str(tmp_path / str(seed)), "--weights", CKPT,
                     "--config", os.path.join(FIX, "tiny_cldm.yaml"), "--prompt-embeds", str(embeds), "--steps", "1",
                     "--device", "cpu", "--seed", str(seed)]) == 0


def test_cli_a_noise_file_name_too_long_is_refused_before_the_run(tmp_path, capsys):
    """An input whose output name fits but whose noise file name (14 bytes longer) would not: the image fails alone,
    named, before it is upscaled; without --save-noise it is written."""
    from safetensors.torch import load_file, save_file

    from comfyui_diffsr.cli.dossr import main

    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": load_file(os.path.join(FIX, "n1_w32h16_wavelet.safetensors"))["context"]}, embeds)
    name = "x" * 245 + ".png"
    shutil.copy(os.path.join(FIX, "lr_w32h16.png"), tmp_path / name)
    args = [str(tmp_path / name), "--weights", CKPT, "--config", os.path.join(FIX, "tiny_cldm.yaml"),
            "--prompt-embeds", str(embeds), "--steps", "1", "--device", "cpu"]
    assert main(args + ["-o", str(tmp_path / "noise"), "--save-noise"]) == 2
    assert "would be named with more than 255 bytes" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "noise") or not os.listdir(tmp_path / "noise")
    assert main(args + ["-o", str(tmp_path / "plain")]) == 0
    assert sorted(os.listdir(tmp_path / "plain")) == [OUTPUT_FOLDER_MARK, name]


def test_cli_gamma_and_noise_errors_reach_the_run(tmp_path, capsys):
    """``--gamma`` reaches the sampler (the command's PNG is the core's output at that γ, rounded to 8 bits, and
    differs from γ = 1); a noise file that cannot be read is refused in its own words."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from comfyui_diffsr.cli.dossr import main
    from comfyui_diffsr.dossr_core.model import load_dossr
    from comfyui_diffsr.dossr_core.pipeline import Options, dossr_upscale
    from comfyui_diffsr.sr_common.image import pil_to_tensor

    context = load_file(os.path.join(FIX, "n1_w32h16_wavelet.safetensors"))["context"]
    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": context}, embeds)
    lr = os.path.join(FIX, "lr_w32h16.png")
    common = [lr, "--weights", CKPT, "--config", os.path.join(FIX, "tiny_cldm.yaml"), "--prompt-embeds", str(embeds),
              "--steps", "3", "--seed", "5", "--device", "cpu"]
    for gamma in ("0.5", "1"):
        assert main(common + ["-o", str(tmp_path / gamma), "--gamma", gamma]) == 0
    half, one = (np.asarray(Image.open(tmp_path / g / "lr_w32h16.png")).astype(int) for g in ("0.5", "1"))
    model = load_dossr(CKPT, config=os.path.join(FIX, "tiny_cldm.yaml"))
    core = dossr_upscale(model, pil_to_tensor(Image.open(lr)), prompt_embeds=context,
                         options=Options(steps=3, seed=5, gamma=0.5))
    core8 = (core[0].permute(1, 2, 0).clamp(0, 1) * 255).round().numpy().astype(int)
    assert np.abs(half - core8).max() <= 1 and np.abs(half - one).max() > 2
    (tmp_path / "bad.safetensors").write_bytes(b"not a noise file")
    assert main(common + ["-o", str(tmp_path / "bad"), "--noise-file", str(tmp_path / "bad.safetensors")]) == 2
    assert "Cannot read the noise file" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_every_dossr_option_reaches_the_run(tmp_path, monkeypatch):
    """Each option of the command reaches the core's Options, or the writer, at a value none has by default (the
    run itself is a stand-in here: the parity of the run is tested above)."""
    import comfyui_diffsr.dossr_core.pipeline as P
    from comfyui_diffsr.cli import common
    from comfyui_diffsr.cli.dossr import main

    seen = {}

    def run(model, image, *, options, **kwargs):
        seen["options"] = options
        height, width = P.output_size(4 * image.shape[-2], 4 * image.shape[-1], options.upscale)
        return torch.zeros(1, 3, height, width)

    monkeypatch.setattr(P, "dossr_upscale", run)
    monkeypatch.setattr(common, "save_image", lambda image, path, metadata, quality, alpha, overwrite: seen.update(
        quality=quality, overwrite=overwrite))
    assert main([os.path.join(FIX, "lr_w32h16.png"), "-o", str(tmp_path / "out"), "--weights", CKPT, "--config",
                 os.path.join(FIX, "tiny_cldm.yaml"), "--device", "cpu", "--steps", "2", "--seed", "9", "--gamma",
                 "0.7", "--upscale", "2", "--color-fix", "adain", "--tile-latent", "48", "--tile-overlap", "24",
                 "--vae-tile-encode", "512", "--vae-tile-decode", "64", "--vae-tile-mode", "exact", "--format", "jpg",
                 "--quality", "20", "--overwrite"]) == 0
    assert seen["options"] == P.Options(steps=2, seed=9, gamma=0.7, upscale=2.0, color_fix="adain", tile_latent=48,
                                        tile_overlap=24, vae_tile_encode=512, vae_tile_decode=64,
                                        vae_tile_mode="exact")
    assert seen["quality"] == 20 and seen["overwrite"] is True


def test_cli_refuses_a_noise_file_for_several_images_and_a_gamma_out_of_range(tmp_path, capsys):
    """--noise-file holds the draws of one image: with two inputs it is refused, and so is a --gamma outside [0, 1],
    both before the (here missing) weights are read and with nothing written."""
    from comfyui_diffsr.cli.dossr import main

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(os.path.join(FIX, "lr_w32h16.png"), folder / name)
    common = ["-o", str(tmp_path / "out"), "--weights", str(tmp_path / "missing.ckpt"), "--device", "cpu"]
    assert main([str(folder), *common, "--noise-file", str(tmp_path / "noise.safetensors")]) == 2
    assert "give exactly one input image" in capsys.readouterr().err
    for gamma in ("1.5", "-0.1"):
        assert main([str(folder / "a.png"), *common, "--gamma", gamma]) == 2
        assert "--gamma must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _tiny_yaml(tmp_path, change, wrap=False):
    """The tiny fixture's yaml with ``change(params)`` applied (``wrap``: under ``model:`` as the official files)."""
    import yaml

    with open(os.path.join(FIX, "tiny_cldm.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    change(config["params"])
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump({"model": config} if wrap else config), encoding="utf-8")
    return str(path)


def test_config_fields_come_from_the_yaml(tmp_path):
    """The UNet's out_channels, the ControlNet's hint_channels and transformer_depth and the VAE scale_factor are read from the yaml (not
    taken from in_channels or the SD default); a yaml under ``model:`` gives the same configs."""
    from comfyui_diffsr.dossr_core.weights import load_ldm_configs

    def change(p):
        p["unet_config"]["params"]["out_channels"] = 8
        p["control_stage_config"]["params"]["hint_channels"] = 3
        p["scale_factor"] = 0.5
        p["control_stage_config"]["params"]["transformer_depth"] = 2
    unet, controlnet, vae = load_ldm_configs(_tiny_yaml(tmp_path, change))
    assert (unet["out_channels"], unet["in_channels"]) == (8, 4)
    assert (controlnet["conditioning_channels"], controlnet["in_channels"]) == (3, 4)
    assert vae["scaling_factor"] == 0.5
    assert (controlnet["transformer_layers_per_block"], unet["transformer_layers_per_block"]) == (2, 1)
    assert load_ldm_configs(_tiny_yaml(tmp_path, change, wrap=True)) == load_ldm_configs(_tiny_yaml(tmp_path, change))


def test_a_yaml_without_the_model_parts_is_named(tmp_path):
    from comfyui_diffsr.dossr_core.weights import load_ldm_configs

    path = _tiny_yaml(tmp_path, lambda p: p.pop("unet_config"))
    with pytest.raises(WeightFileError, match=r"is not a DoSSR/ControlLDM config: expected `params` with "
                                              r"\['control_stage_config', 'unet_config', 'first_stage_config'\]"):
        load_ldm_configs(path)


@pytest.mark.parametrize("write, message", [
    (lambda path: path.write_bytes(open(os.path.join(FIX, "lr_w32h32.png"), "rb").read()),
     r"'.*config.png' is not a DoSSR/ControlLDM config: it is not a text file\. Pass the official-style yaml"),
    (lambda path: path.write_text("model: 5\n"), r"is not a DoSSR/ControlLDM config: expected `params`"),
    (lambda path: path.write_text("params: {control_stage_config: 1, unet_config: 2, first_stage_config: 3}\n"),
     r"The DoSSR config '.*config.png' has a field of the wrong kind \('int' object is not subscriptable\)\. Pass"),
    (lambda path: path.write_text(open(_tiny_yaml(path.parent, lambda p: p["control_stage_config"]["params"].pop(
        "model_channels"))).read()), r"The DoSSR config '.*config.png' lacks 'model_channels'\. Pass the official"),
], ids=["an-image", "model-not-a-mapping", "parts-not-mappings", "a-field-missing"])
def test_a_config_that_is_not_a_controlldm_yaml_is_named_on_convert(tmp_path, capsys, write, message):
    """``diffsr convert dossr --config`` given an image, or a yaml whose parts are not mappings or lack a field, is
    refused in one line naming the config (not a UnicodeDecodeError / AttributeError / KeyError traceback), and
    nothing is written."""
    from comfyui_diffsr.cli.convert import main

    config = tmp_path / "config.png"
    write(config)
    assert main(["dossr", CKPT, str(tmp_path / "x.safetensors"), "--config", str(config)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("text, detail", [
    ("model:\n  params:\n    channels: [1, 2\n    depth: 3\n",
     "expected ',' or ']', but got ':' at line 4, column 10 (while parsing a flow sequence from line 3, column 15)"),
    ("model: \x07\n", 'unacceptable character #x0007: special characters are not allowed in "{config}", position 7'),
], ids=["unclosed-bracket", "control-character"])
def test_a_config_that_is_not_valid_yaml_is_named_on_one_line(tmp_path, capsys, text, detail):
    """A YAML syntax error in ``--config`` came out as PyYAML's text, over several lines; it is one line naming the
    file, the line and column (from 1, as editors count) and the fix, and nothing is written."""
    from comfyui_diffsr.cli.convert import main
    from comfyui_diffsr.dossr_core.weights import CONFIG_ADVICE

    config = tmp_path / "cldm.yaml"
    config.write_text(text, encoding="utf-8")
    assert main(["dossr", CKPT, str(tmp_path / "x.safetensors"), "--config", str(config)]) == 2
    assert capsys.readouterr().err == (f"error: The DoSSR config {quoted_name(config)} is not valid YAML: "
                                       f"{detail.format(config=config)}. Correct the file there. {CONFIG_ADVICE}\n")
    assert os.listdir(tmp_path) == ["cldm.yaml"]


def test_convert_with_a_yaml_of_another_vae_writes_nothing(tmp_path):
    """A yaml whose ControlNet fits the checkpoint but whose VAE does not: refused naming the condition encoder and
    --config, and nothing is written."""
    from comfyui_diffsr.dossr_core.weights import convert_dossr

    yaml = _tiny_yaml(tmp_path, lambda p: p["first_stage_config"]["params"]["ddconfig"].update(ch=32))
    with pytest.raises(WeightFileError, match="condition encoder.*--config"):
        convert_dossr(CKPT, tmp_path / "x.safetensors", config=yaml)
    assert sorted(os.listdir(tmp_path)) == ["changed.yaml"]


@pytest.mark.parametrize("use", ["convert", "load"])
def test_a_yaml_whose_networks_cannot_be_built_is_named_not_the_file(tmp_path, use):
    """A yaml whose VAE cannot be built (16 channels in GroupNorm's 32 groups) is named as the config to change, not
    as a damaged file, when converting and when loading an official ckpt; nothing is written."""
    from comfyui_diffsr.dossr_core.model import load_dossr
    from comfyui_diffsr.dossr_core.weights import convert_dossr

    yaml = _tiny_yaml(tmp_path, lambda p: p["first_stage_config"]["params"]["ddconfig"].update(ch=16))
    with pytest.raises(WeightFileError) as refused:
        if use == "convert":
            convert_dossr(CKPT, tmp_path / "x.safetensors", config=yaml)
        else:
            load_dossr(CKPT, config=yaml)
    assert re.search(r"The condition encoder of the DoSSR config 'changed.yaml' cannot be built \(ValueError: .*\)\. "
                     r"Pass the official-style yaml the checkpoint was trained with as --config", str(refused.value))
    assert "damaged" not in str(refused.value)
    assert sorted(os.listdir(tmp_path)) == ["changed.yaml"]


@pytest.mark.parametrize("change, message", [
    (lambda sd: dict(sd, **{"control_model.input_blocks.0.0.weight": sd["control_model.input_blocks.0.0.weight"][:, :4]}),
     r"The ControlNet input conv has shape \(64, 4, 3, 3\); DoSSR's takes 8 channels"),
], ids=["controlnet-without-the-condition-input"])
def test_incomplete_official_parts_are_named_and_nothing_is_written(official_sd, tmp_path, change, message):
    """A ControlNet input conv without the condition latent's channels is named with its shape; nothing is written."""
    from comfyui_diffsr.dossr_core.weights import convert_dossr

    src = save(tmp_path, "broken.ckpt", {"state_dict": change(dict(official_sd))})
    with pytest.raises(WeightFileError, match=message):
        convert_dossr(src, tmp_path / "x.safetensors", config=os.path.join(FIX, "tiny_cldm.yaml"))
    assert not (tmp_path / "x.safetensors").exists()


def test_converted_file_stores_info_source_and_fp16(official_sd, tmp_path):
    """``info`` says whether the condition encoder equals the VAE encoder, as a direct comparison of the official
    ldm keys does; the converted file keeps it and the source name in its metadata, and fp16 conversion of a float32
    file stores every tensor as float16."""
    from comfyui_diffsr.dossr_core.weights import convert_dossr, parts_from_converted

    cond = {k[len("cond_encoder."):]: v for k, v in official_sd.items() if k.startswith("cond_encoder.")}
    equal = all(torch.equal(v, official_sd["first_stage_model." + k]) for k, v in cond.items())
    float32 = save(tmp_path, "fp32.ckpt", {k: v.float() if v.is_floating_point() else v for k, v in official_sd.items()})
    info = convert_dossr(float32, tmp_path / "a.safetensors", config=os.path.join(FIX, "tiny_cldm.yaml"),
                         dtype=torch.float16)
    assert info == {"cond_encoder_equals_vae_encoder": equal}
    sd, _, meta = read_weights(tmp_path / "a.safetensors")
    assert meta["source"] == "fp32.ckpt"
    assert parts_from_converted(sd, meta).info == info
    assert {v.dtype for v in sd.values()} == {torch.float16}  # the fixture's float16 values: exact
    assert all(torch.equal(v, official_sd["preprocess_model." + k[len("rrdb."):]]) for k, v in sd.items()
               if k.startswith("rrdb."))
    # the same check on a file whose condition encoder is the VAE encoder
    same = dict(official_sd, **{"cond_encoder." + k: official_sd["first_stage_model." + k] for k in cond})
    info = convert_dossr(save(tmp_path, "same.ckpt", same), tmp_path / "b.safetensors",
                         config=os.path.join(FIX, "tiny_cldm.yaml"))
    assert info == {"cond_encoder_equals_vae_encoder": True}


def test_base_parts_missing_from_the_official_file_name_base(official_sd):
    """An official file without the SD 2.1 UNet asks for --base."""
    from comfyui_diffsr.dossr_core.weights import base_from_official, load_ldm_configs

    sd = {k: v for k, v in official_sd.items() if not k.startswith("model.diffusion_model.")}
    with pytest.raises(WeightFileError, match=r"lacks the SD 2.1 parts \['model.diffusion_model.'\]; pass --base"):
        base_from_official(sd, load_ldm_configs(os.path.join(FIX, "tiny_cldm.yaml")))


def test_text_encoder_heads_follow_open_clip(monkeypatch):
    """OpenCLIP's text tower has width // 64 heads (16 for SD 2.1's 1024-wide ViT-H), unless given; sized from the
    tensors (meta tensors here: only the shapes are read, the weights are not loaded)."""
    from comfyui_diffsr.dossr_core import weights
    from comfyui_diffsr.sr_common.known_files import OPEN_CLIP_PREFIX

    class Shapes(dict):  # every key there: the shapes the sizing reads are given below, the rest any
        def __contains__(self, key):
            return True

        def __missing__(self, key):
            return torch.empty(3 * 1024, 1024, device="meta")

    p = OPEN_CLIP_PREFIX
    sd = Shapes({p + "token_embedding.weight": torch.empty(100, 1024, device="meta"),
                 p + "positional_embedding": torch.empty(77, 1024, device="meta"),
                 **{f"{p}transformer.resblocks.{i}.mlp.c_fc.weight": torch.empty(4096, 1024, device="meta")
                    for i in range(2)},
                 p + "transformer.resblocks.0.attn.in_proj_weight": torch.empty(3 * 1024, 1024, device="meta")})
    monkeypatch.setattr(weights, "_load", lambda module, state, what: module)
    config = weights.text_encoder_from_open_clip(sd).config
    assert (config.num_attention_heads, config.hidden_size, config.num_hidden_layers) == (16, 1024, 1)
    assert weights.text_encoder_from_open_clip(sd, num_heads=8).config.num_attention_heads == 8


@pytest.mark.parametrize("kind", ["fifo", "huge"])
def test_a_fifo_or_a_huge_file_for_the_yaml_is_not_read(tmp_path, kind):
    """A FIFO named *.yaml given as the DoSSR config (--config, the loader's config) was opened as a file: the read
    waited for a writer for ever (ComfyUI's worker hung); a huge text file was parsed whole (PyYAML stops only at a
    character YAML does not allow). Each is refused by name as no config file, as a model folder's JSON configs are
    (at most 1 MB: the ControlLDM yamls are under 3 KB), with the fix."""
    from conftest import fifo, outcome_within

    from comfyui_diffsr.dossr_core.weights import CONFIG_ADVICE, load_ldm_configs

    path = str(tmp_path / "cldm_v21.yaml")
    expected = "a FIFO (a named pipe)" if kind == "fifo" else "2.0 MB, and the pack reads config files of at most 1 MB"
    with contextlib.ExitStack() as stack:
        if kind == "fifo":
            stack.enter_context(fifo(path))
        else:
            with open(_tiny_yaml(tmp_path, lambda p: None)) as f, open(path, "w") as out:
                out.write(f.read() + "# a long comment\n" * ((2 << 20) // 17))
        how, error = outcome_within(lambda: load_ldm_configs(path))
    assert how == "raised" and isinstance(error, WeightFileError), error
    assert str(error) == f"{quoted_name(path)} is not a config file: it is {expected}. {CONFIG_ADVICE}"


def test_a_yaml_saved_with_a_byte_order_mark_reads_as_without(tmp_path):
    """A yaml saved with a UTF-8 byte order mark (Notepad's 'UTF-8 with BOM') is read as the same yaml without it, as
    the official code reads it (OmegaConf: PyYAML skips the mark)."""
    import codecs

    from comfyui_diffsr.dossr_core.weights import load_ldm_configs

    path = tmp_path / "cldm_bom.yaml"
    with open(os.path.join(FIX, "tiny_cldm.yaml"), "rb") as f:
        path.write_bytes(codecs.BOM_UTF8 + f.read())
    assert load_ldm_configs(str(path)) == load_ldm_configs(os.path.join(FIX, "tiny_cldm.yaml"))


@pytest.mark.parametrize("base, refusal", [
    ("missing", r"^Base model not found: '.*missing'"),
    ("without-unet", r"^'without-unet' is not a diffusers Stable Diffusion folder: missing \['unet'\]"),
    ("bad-config", r"^unet/config\.json in '.*bad-config' is not JSON"),
    ("bad-config-folder", r"^'.*bad-config-folder' has no readable unet/config\.json"),
    ("bom-tokenizer", r"^merges\.txt in '.*bom-tokenizer.tokenizer' starts with a UTF-8 byte order mark")])
def test_a_wrong_base_is_refused_before_the_dossr_weights_are_read(tmp_path, monkeypatch, base, refusal):
    """``load_dossr`` read the DoSSR weights (GBs) before it looked at ``base``: a base path that was missing, or a
    folder that is not SD 2.1-base by its configs, was refused only after that read, and where both were wrong the
    DoSSR file's error came first. The base's cheap checks come first now: nothing is read (the reader spied on), and
    of two wrong files the base is named."""
    from comfyui_diffsr.dossr_core import model as dossr_model
    from comfyui_diffsr.dossr_core import weights as dossr_weights

    from conftest import copy_tiny_sd21

    folder, config_folder = str(tmp_path / base), None
    if base == "without-unet":
        shutil.rmtree(os.path.join(copy_tiny_sd21(folder), "unet"))
    elif base == "bad-config":
        with open(os.path.join(copy_tiny_sd21(folder), "unet", "config.json"), "w") as f:
            f.write("{")
    elif base == "bom-tokenizer":  # a tokenizer file load_sd21 refuses (_check_tokenizer_files)
        import codecs
        tokenizer = os.path.join(copy_tiny_sd21(folder), "tokenizer")
        with open(os.path.join(tokenizer, "merges.txt"), "rb") as f:
            merges = f.read()
        with open(os.path.join(tokenizer, "merges.txt"), "wb") as f:
            f.write(codecs.BOM_UTF8 + merges)
    elif base == "bad-config-folder":  # a single file's config folder (--base-config) without its configs
        folder, config_folder = os.path.join(os.path.dirname(FIX), "osediff", "tiny_sd21_single.safetensors"), folder
        os.makedirs(config_folder)
    read = []
    monkeypatch.setattr(dossr_weights, "read_state_dict", lambda *a, **k: read.append(a) or {})
    with pytest.raises(WeightFileError, match=refusal):
        dossr_model.load_dossr(CKPT, folder, base_config=config_folder)
    assert read == []
    monkeypatch.undo()
    with pytest.raises(WeightFileError, match=refusal):  # the DoSSR file missing too: the base named
        dossr_model.load_dossr(tmp_path / "dossr_missing.ckpt", folder, base_config=config_folder)


@pytest.fixture(scope="module")
def dossr_bases(tmp_path_factory):
    """The tiny DoSSR fixture converted, and bases of its size: a diffusers folder of the official file's own SD 2.1
    parts (their configs and weights as ``save_pretrained`` names them, the shipped tokenizer), and a single file of
    them (its configs: that folder). The weights are saved contiguous: diffusers 0.30's ``save_pretrained`` refuses
    the views the official file's VAE is read as."""
    from safetensors.torch import save_file

    from comfyui_diffsr.dossr_core.model import load_dossr
    from comfyui_diffsr.dossr_core.weights import convert_dossr
    from comfyui_diffsr.sr_common.sd21 import shipped_config_dir

    root = tmp_path_factory.mktemp("dossr_bases")
    weights, folder, single = str(root / "parts.safetensors"), str(root / "sd21"), str(root / "sd21.safetensors")
    convert_dossr(CKPT, weights, config=os.path.join(FIX, "tiny_cldm.yaml"))
    own = load_dossr(CKPT, config=os.path.join(FIX, "tiny_cldm.yaml"))
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        module = getattr(own, part)
        os.makedirs(os.path.join(folder, part))
        if part == "text_encoder":  # a transformers config
            module.config.save_pretrained(os.path.join(folder, part))
        else:
            module.save_config(os.path.join(folder, part))
        save_file({k: v.contiguous() for k, v in module.state_dict().items()},
                  os.path.join(folder, part, f"{name}.safetensors"), metadata={"format": "pt"})
    shutil.copytree(os.path.join(shipped_config_dir(), "tokenizer"), os.path.join(folder, "tokenizer"))
    sd = torch.load(CKPT, weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in sd.items()
               if k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))}, single)
    return weights, folder, single


@pytest.mark.parametrize("layout", ["folder", "single-file"])
def test_the_base_part_configs_are_read_once_across_the_check_and_the_load(dossr_bases, monkeypatch, layout):
    """``load_dossr`` checks its base (``check_sd21``) before it reads the DoSSR weights, and loads it
    (``load_sd21``) after: the unet/, vae/ and text_encoder/ config.json of a base folder (of a single file's config
    folder) were read by both, twice each. The check's are passed on to the load: each is read once."""
    from comfyui_diffsr.dossr_core import model as dossr_model
    from comfyui_diffsr.sr_common import sd21

    weights, folder, single = dossr_bases
    base, base_config = (folder, None) if layout == "folder" else (single, folder)
    read, real_read = [], sd21.read_config_bytes
    monkeypatch.setattr(sd21, "read_config_bytes", lambda path: read.append(os.path.relpath(path)) or real_read(path))
    model = dossr_model.load_dossr(weights, base, base_config=base_config)
    assert model.unet.config.cross_attention_dim == model.controlnet.config.cross_attention_dim
    for part in ("unet", "vae", "text_encoder"):
        reads = [path for path in read if path.endswith(os.path.join(part, "config.json"))]
        assert len(reads) == 1, reads


def _base_of_family(sd, family):
    """The tiny SD 2.1-base single file's state dict ``sd`` as one of another family tells it (``sd_family``): SD 1.x
    (its UNet projecting with 1×1 convolutions), SDXL (an sgm embedder), SD 2.x 768 v-prediction (the spread of the
    last output block's first norm bias)."""
    unet = "model.diffusion_model."
    if family == "sd1":
        return {k: v[:, :, None, None] if k.startswith(unet) and k.endswith((".proj_in.weight", ".proj_out.weight"))
                else v for k, v in sd.items()}
    if family == "sdxl":
        return dict(sd, **{"conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": torch.zeros(4)})
    bias = max((k for k in sd if k.startswith(f"{unet}output_blocks.") and k.endswith(".transformer_blocks.0.norm1.bias")),
               key=lambda k: int(k.split(".")[3]))
    return dict(sd, **{bias: torch.randn(sd[bias].shape, generator=torch.Generator().manual_seed(0)) * 0.5})


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd2-v"])
def test_a_single_file_base_of_another_family_is_refused_before_the_dossr_weights_are_read(
        tmp_path, monkeypatch, family, suffix):
    """A single-file base of another family (SD 1.5, SDXL, SD 2.1-v 768) passed ``check_sd21``, which looked at its
    config folder and tokenizer only: it was refused once read, after the DoSSR weights (GBs). Its family is told
    first now, from its tensors memory-mapped (a safetensors file, a zip pickle): neither the DoSSR weights nor the
    base are read (their readers spied on), and the base is named."""
    from safetensors.torch import load_file, save_file

    from comfyui_diffsr.dossr_core import model as dossr_model
    from comfyui_diffsr.dossr_core import weights as dossr_weights
    from comfyui_diffsr.sr_common import sd21
    from comfyui_diffsr.sr_common.known_files import KNOWN

    sd = _base_of_family(load_file(os.path.join(os.path.dirname(FIX), "osediff", "tiny_sd21_single.safetensors")),
                         family)
    path = str(tmp_path / f"{family}{suffix}")
    if suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save({"state_dict": sd}, path)
    read = []
    monkeypatch.setattr(dossr_weights, "read_state_dict", lambda *a, **k: read.append(a) or {})
    monkeypatch.setattr(sd21, "_read_base_file", lambda *a, **k: read.append(a) or ({}, False))
    with pytest.raises(WeightFileError, match=rf"^'{re.escape(family + suffix)}' is not Stable Diffusion 2\.1-base: "
                                              rf"it is {re.escape(KNOWN[family].what)}\. Use the whole SD 2\.1-base"):
        dossr_model.load_dossr(CKPT, path)
    assert read == []


@pytest.mark.parametrize("use", ["convert", "load"])
def test_a_wrong_yaml_is_refused_before_the_dossr_weights_are_read(tmp_path, monkeypatch, use):
    """``convert_dossr`` and ``load_dossr`` read the ckpt (GBs) before the yaml given with ``--config`` (a few KB):
    one missing, or not a ControlLDM yaml, was refused only after that read. The yaml comes first now: nothing is
    read (the reader spied on), and of two wrong files the yaml is named."""
    from comfyui_diffsr.dossr_core import model as dossr_model
    from comfyui_diffsr.dossr_core import weights as dossr_weights

    def run(weights, config):
        if use == "convert":
            return dossr_weights.convert_dossr(weights, tmp_path / "x.safetensors", config=config)
        return dossr_model.load_dossr(weights, config=config)

    yaml = tmp_path / "cldm.yaml"
    yaml.write_text("model: 5\n")
    read = []
    monkeypatch.setattr(dossr_weights, "read_state_dict", lambda *a, **k: read.append(a) or {})
    for config, refusal in ((yaml, r"'.*cldm\.yaml' is not a DoSSR/ControlLDM config: expected `params`"),
                            (tmp_path / "missing.yaml", r"^Cannot read the DoSSR config '.*missing\.yaml'")):
        with pytest.raises(WeightFileError, match=refusal):
            run(CKPT, config)
        assert read == []
        with pytest.raises(WeightFileError, match=refusal):  # the DoSSR file missing too: the yaml named
            run(tmp_path / "dossr_missing.ckpt", config)
    assert sorted(os.listdir(tmp_path)) == ["cldm.yaml"]


@pytest.mark.parametrize("stop", ["weights-out-of-memory", "ctrl-c", "output-not-written"])
def test_a_folder_run_holds_none_of_the_tensors_of_a_failed_image(tmp_path, monkeypatch, stop):
    """A folder run with ``--save-noise`` (a trace of every step): the second image runs out of memory at every tile
    size (it fails alone, the run goes on) and the third stops the run (weights out of memory, Ctrl-C, its output
    cannot be written). None of the second image's tensors is alive as the third runs, nor any of the third's once
    the stopping error, kept to be raised again after the summary, is raised: that of the writer held the output
    and the loop's frame (its image), in a cycle that only the garbage collector frees."""
    from safetensors.torch import load_file, save_file

    import comfyui_diffsr.cli.dossr as command
    from comfyui_diffsr.cli import common
    from comfyui_diffsr.sr_common.errors import DiffSRError
    from comfyui_diffsr.sr_common.tiling import WeightsOutOfMemory
    from conftest import MadeTensors

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(os.path.join(FIX, "lr_w32h16.png"), folder / f"{name}.png")
    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": load_file(os.path.join(FIX, "n1_w32h16_wavelet.safetensors"))["context"]}, embeds)
    # raised anew each time: an error the test kept would hold its frames
    failures = {"b.png": torch.cuda.OutOfMemoryError,
                "c.png": {"weights-out-of-memory": WeightsOutOfMemory, "ctrl-c": KeyboardInterrupt}.get(stop)}
    made, alive_then, real_upscale_all, real_save = {}, {}, command.upscale_all, common.save_image

    def fail(name):
        raise failures[name]("CUDA out of memory (simulated)")

    def shapes_alive(name):  # less the tensors the first image's run made or returned that are alive (embeds)
        first = {id(t) for t in made["a.png"].alive()}
        return [tuple(t.shape) for t in made[name].alive() if id(t) not in first]

    def upscale_all(pairs, upscale_one, *args, **kwargs):
        def observed(image, out):
            name = os.path.basename(out)
            alive_then[name] = {earlier: shapes_alive(earlier) for earlier in made if earlier == "b.png"}
            made[name] = MadeTensors(functools.partial(fail, name), fail_at=100 if failures.get(name) else math.inf)
            with made[name]:
                return upscale_one(image, out)
        return real_upscale_all(pairs, observed, *args, **kwargs)

    def save(image01, path, *rest):
        if stop == "output-not-written" and path.endswith("c.png"):
            raise DiffSRError(f"Cannot write {path!r}: No space left on device.")
        return real_save(image01, path, *rest)

    monkeypatch.setattr(command, "upscale_all", upscale_all)
    monkeypatch.setattr(common, "save_image", save)
    status = command.main([str(folder), "-o", str(tmp_path / "out"), "--weights", CKPT, "--config",
                           os.path.join(FIX, "tiny_cldm.yaml"), "--prompt-embeds", str(embeds), "--steps", "2",
                           "--device", "cpu", "--save-noise", "--tile-latent", "8", "--tile-overlap", "4"])
    assert status == (130 if stop == "ctrl-c" else 2)
    assert sorted(os.listdir(tmp_path / "out")) == [OUTPUT_FOLDER_MARK, "a.noise.safetensors", "a.png"] + (
        ["c.noise.safetensors"] if stop == "output-not-written" else [])
    assert len(made["b.png"].made) > 10 and len(made["c.png"].made) > 10
    assert alive_then["c.png"] == {"b.png": []}
    assert shapes_alive("c.png") == []
