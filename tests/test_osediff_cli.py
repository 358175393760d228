"""The osediff command end to end on the tiny model: diffusers folder, single file, conversion, refusals."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from comfyui_diffsr.cli.common import OUTPUT_FOLDER_MARK
from comfyui_diffsr.cli.osediff import main
from comfyui_diffsr.osediff_core.weights import convert_osediff
from comfyui_diffsr.sr_common.errors import WeightFileError
from comfyui_diffsr.sr_common.names import quoted_name
from comfyui_diffsr.sr_common.offload import OffloadWhenShort
from comfyui_diffsr.sr_common.sd21 import load_sd21
from comfyui_diffsr.sr_common.weights import write_safetensors

from conftest import (DATA, IEEE_FLOAT32, RIVAL_OUTPUT, copy_tiny_sd21, fifo, folder_run_with_a_rival, psnr,
                      tf32_flags)

FIX = os.path.join(DATA, "osediff")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return copy_tiny_sd21(tmp_path_factory.mktemp("base") / "tiny_sd21")


def run(args):
    return main([str(a) for a in args])


def read(path):
    return torch.from_numpy(__import__("numpy").asarray(Image.open(path)).copy()).float() / 255


def test_folder_and_single_file_give_the_same_image(base, tmp_path):
    inp = os.path.join(FIX, "in_21x27.png")
    assert run([inp, "-o", tmp_path / "a", "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
                "--process-size", "64", "--prompt", "a cat"]) == 0
    single = os.path.join(FIX, "tiny_sd21_single.safetensors")
    assert run([inp, "-o", tmp_path / "b", "--base", single, "--base-config", base, "--weights",
                os.path.join(FIX, "osediff_tiny.pkl"), "--process-size", "64", "--prompt", "a cat"]) == 0
    a, b = read(tmp_path / "a" / "in_21x27.png"), read(tmp_path / "b" / "in_21x27.png")
    assert a.shape == (108, 84, 3)  # exactly 4 × (21 × 27)
    assert psnr(a, b) > 60


def test_single_file_weights_equal_folder_weights(base):
    a = load_sd21(base)
    b = load_sd21(os.path.join(FIX, "tiny_sd21_single.safetensors"), config_dir=base)
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part


def test_an_ldm_ckpt_in_its_lightning_container_loads(base, tmp_path):
    """A .ckpt as Stability AI released SD 2.1-base (v2-1_512-ema-pruned.ckpt): the LDM state dict under
    ``state_dict``, beside ``global_step``. It loads to the weights of the diffusers folder."""
    from safetensors.torch import load_file

    path = tmp_path / "v2-1_512-ema-pruned.ckpt"
    torch.save({"global_step": 220000, "state_dict": load_file(os.path.join(FIX, "tiny_sd21_single.safetensors"))}, path)
    _same_weights(load_sd21(str(path), config_dir=base), load_sd21(base))


def test_which_single_file_loads_give_an_owned_unet(base, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from comfyui_diffsr.sr_common import sd21

    reads, read_state_dict = [], sd21.read_state_dict
    monkeypatch.setattr(sd21, "read_state_dict", lambda *a, **k: reads.append(k) or read_state_dict(*a, **k))
    sd = load_file(os.path.join(FIX, "tiny_sd21_single.safetensors"))  # fp16
    for dtype, owned in ((torch.float32, False), (torch.float16, True)):  # fp32: the file's tensors, uncopied
        path = tmp_path / f"{dtype}.safetensors"
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, path)
        loaded = load_sd21(str(path), config_dir=base)
        assert loaded.unet_owned == owned and all(p.dtype == torch.float32 for p in loaded.unet.parameters())
        assert reads[-1] == {"mmap": not owned, "float32": owned}  # fp16: read and converted in one pass
        read = load_sd21(str(path), config_dir=base, in_memory=True)  # as the osediff command loads it
        assert read.unet_owned and all(torch.equal(a, b) for a, b in zip(read.unet.parameters(),
                                                                          loaded.unet.parameters()))


def _diffusers_loaded(folder):
    """The folder through diffusers' and transformers' own loaders (the fallback of ``load_diffusers_folder``)."""
    from comfyui_diffsr.sr_common import sd21

    real = sd21._load_folder_parts
    try:
        sd21._load_folder_parts = lambda *a: None
        return load_sd21(folder)
    finally:
        sd21._load_folder_parts = real


def _same_weights(a, b):
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part


def test_folder_read_like_a_single_file_equals_diffusers_loading(base, tmp_path):
    """The standard folder layout is read by the pack's readers (fp16: converted, owned; fp32: mapped unless read
    into memory), to the weights diffusers and transformers load; old key names too (VAE attention before
    diffusers 0.14, CLIP ``position_ids``), and a part split into shards by an ``.index.json`` (as diffusers saves a
    large model, which diffusers 0.32 and older load only with accelerate installed)."""
    from safetensors.torch import load_file, save_file

    reference = _diffusers_loaded(base)
    fp16 = load_sd21(base)
    _same_weights(fp16, reference)
    assert fp16.unet_owned and fp16.vae_owned
    fp32 = copy_tiny_sd21(tmp_path / "fp32")
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        path = os.path.join(fp32, sub, name + ".safetensors")
        tensors = {k: v.float() for k, v in load_file(path).items()}
        if sub == "vae":  # as diffusers < 0.14 wrote it
            old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
            tensors = {next((k.replace(f".{n}.", f".{o}.") for n, o in old.items() if f"attentions.0.{n}." in k), k): v
                       for k, v in tensors.items()}
            assert any(".query." in k for k in tensors)
        if sub == "text_encoder":  # as transformers < 4.31 wrote it
            tensors["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        os.remove(path)
        save_file(tensors, path)
    mapped, read = load_sd21(fp32), load_sd21(fp32, in_memory=True)
    for loaded in (mapped, read):
        _same_weights(loaded, reference)
    assert not mapped.unet_owned and not mapped.vae_owned and read.unet_owned and read.vae_owned

    sharded = copy_tiny_sd21(tmp_path / "sharded")
    unet_file = os.path.join(sharded, "unet", "diffusion_pytorch_model.safetensors")
    tensors = load_file(unet_file)
    keys = sorted(tensors)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        save_file({k: tensors[k] for k in names}, os.path.join(sharded, "unet", shard))
    with open(os.path.join(sharded, "unet", "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: shard for shard, names in shards.items() for k in names}}, f)
    os.remove(unet_file)
    loaded = load_sd21(sharded)
    _same_weights(loaded, reference)
    assert loaded.unet_owned  # read by the pack's readers (fp16 shards converted as read), not by diffusers
    os.remove(os.path.join(sharded, "unet", "diffusion_pytorch_model-00002-of-00002.safetensors"))
    with pytest.raises(WeightFileError, match="names the shard .*00002-of-00002.safetensors., which is missing"):
        load_sd21(sharded)


def test_a_pickle_beside_a_parts_safetensors_file_is_not_opened(base, tmp_path):
    """A folder part with its safetensors file and a pickle beside it (the Hugging Face repository of SD 2.1-base
    has both): only the safetensors file is read, so a damaged pickle beside it does not stop the load."""
    folder = copy_tiny_sd21(tmp_path / "both")
    for sub, name in (("unet", "diffusion_pytorch_model.bin"), ("text_encoder", "pytorch_model.bin")):
        with open(os.path.join(folder, sub, name), "wb") as f:
            f.write(b"PK\x03\x04 the download stopped here")
    _same_weights(load_sd21(folder), load_sd21(base))


def test_each_folder_part_says_whether_it_was_read_into_memory(base, tmp_path):
    """``unet_owned`` and ``vae_owned`` are each their own part's: of an fp16 part converted as it is read (owned)
    and a float32 part beside it memory-mapped (not owned), either way round."""
    from safetensors.torch import load_file, save_file

    for float32_part in ("vae", "unet"):
        folder = copy_tiny_sd21(tmp_path / float32_part)
        path = os.path.join(folder, float32_part, "diffusion_pytorch_model.safetensors")
        tensors = {k: v.float() for k, v in load_file(path).items()}
        os.remove(path)
        save_file(tensors, path)
        loaded = load_sd21(folder)
        assert (loaded.unet_owned, loaded.vae_owned) == (float32_part == "vae", float32_part == "unet")


def test_converted_weights_and_python_m(base, tmp_path, child_env):
    converted = convert_osediff(os.path.join(FIX, "osediff_tiny.pkl"), str(tmp_path / "osediff.safetensors"))
    inp = os.path.join(FIX, "in_32x32.png")
    assert run([inp, "-o", tmp_path / "a", "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
                "--process-size", "64", "--upscale", "2.5"]) == 0
    env = child_env(HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "comfyui_diffsr", "osediff", inp, "-o", str(tmp_path / "b"), "--base", base,
                    "--weights", converted, "--process-size", "64", "--upscale", "2.5"], check=True, env=env)
    a, b = read(tmp_path / "a" / "in_32x32.png"), read(tmp_path / "b" / "in_32x32.png")
    assert a.shape == (80, 80, 3)
    assert torch.equal(a, b)


def test_convert_refuses_a_converted_file_by_name(tmp_path, capsys):
    """``diffsr convert osediff`` given its own output quietly wrote a copy of it; it is refused by name, as ``convert
    dossr`` refuses a converted file, and nothing is written."""
    from comfyui_diffsr.cli.convert import main as convert

    converted = str(tmp_path / "osediff.safetensors")
    assert convert(["osediff", os.path.join(FIX, "osediff_tiny.pkl"), converted]) == 0
    capsys.readouterr()
    assert convert(["osediff", converted, str(tmp_path / "again.safetensors")]) == 2
    assert capsys.readouterr().err == ("error: 'osediff.safetensors' is already a converted OSEDiff file: use it as it "
                                       "is (--weights, or the Load OSEDiff node); only osediff.pkl is converted.\n")
    assert sorted(os.listdir(tmp_path)) == ["osediff.safetensors"]


@pytest.mark.skipif(sys.platform == "win32", reason="Windows file names cannot hold ESC")
def test_convert_prints_the_name_it_wrote_as_the_messages_show_names(tmp_path, capsys):
    """``wrote <file>`` printed the output's name as it was: ESC in it could rewrite the terminal, an invisible
    U+200B made it look like another file's name; it is escaped as every message's names are (``shown_name``)."""
    from comfyui_diffsr.cli.convert import main as convert

    out = tmp_path / "osediff\u200b\x1b[2J.safetensors"
    assert convert(["osediff", os.path.join(FIX, "osediff_tiny.pkl"), str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path}/osediff\\u200b\\x1b[2J.safetensors\n"
    assert out.exists()


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="file names are Unicode there")
def test_a_name_that_is_not_utf8_prints_escaped(tmp_path, child_env):
    """A Linux file name is bytes; one that is not UTF-8 (an old Latin-1 name: 0xE9 for é) reaches Python with a
    lone surrogate for each byte that is not (U+DCE9), which a UTF-8 terminal's stdout cannot write: ``diffsr
    convert`` converted, then ended in a UnicodeEncodeError (exit status 1) on its ``wrote`` line. The messages
    escape it as ``\\udce9``, as repr() did in the errors; Python writes the name back to the same bytes."""
    out = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.safetensors"))
    env = child_env(HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8:strict")  # en_US.UTF-8's stdout
    done = subprocess.run([sys.executable, "-m", "comfyui_diffsr", "convert", "osediff",
                           os.path.join(FIX, "osediff_tiny.pkl"), out], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stdout) == (0, f"wrote {tmp_path}/caf\\udce9.safetensors\n"), done.stderr
    assert os.listdir(os.fsencode(tmp_path)) == [b"caf\xe9.safetensors"]


# a name whose characters printed raw would reverse it (U+202E), hide in it (U+200B, U+3164 Hangul filler: a
# letter, Default_Ignorable, which repr() printed as it is) or break the line; and two that print unchanged (repr()
# escaped the emoji sequence's joiner)
ODD_NAMES = [("x\u202egnp.exe", "x\\u202egnp.exe"), ("a\u200bb", "a\\u200bb"), ("line\nbreak", "line\\nbreak"),
             ("a\u3164b", "a\\u3164b"), ("Café", "Café"), ("👩\u200d💻", "👩\u200d💻")]


@pytest.mark.skipif(sys.platform == "win32", reason="Windows file names cannot hold a line break")
@pytest.mark.parametrize("name, shown", ODD_NAMES,
                         ids=["U+202E", "U+200B", "line break", "U+3164", "accented", "emoji"])
def test_the_commands_errors_show_names_as_their_other_lines_do(base, tmp_path, capsys, monkeypatch, name, shown):
    """The commands' errors named a path with repr(), their other lines (``error: <path>: ...``, ``wrote <file>``)
    with ``shown_name``: repr() printed U+3164 and the other invisible characters that are not format characters as
    they are, and escaped the joiner of an emoji sequence, so one name printed two ways. Every message names a path
    in quotes as ``shown_name`` shows it, the commands' own and those of the cores (which the nodes show too)."""
    from comfyui_diffsr.cli.main import main as diffsr

    odd, pkl = tmp_path / name, os.path.join(FIX, "osediff_tiny.pkl")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / f"{name}.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"{name}.png").write_bytes(b"made before")
    odd.with_name(f"{name}.safetensors").write_bytes(b"made before")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = ["--base", base, "--weights", pkl]
    cases = [(["osediff", f"{odd}.png", "-o", tmp_path / "o", *weights], f"Input not found: '{tmp_path}/{shown}.png'"),
             (["osediff", tmp_path / "in", "-o", tmp_path / "out", *weights],
              f"1 output file(s) exist already (e.g. '{tmp_path}/out/{shown}.png'). Choose another --output folder, "
              "pass --skip-existing to upscale only the others, or --overwrite."),
             (["convert", "osediff", f"{odd}.pkl", tmp_path / "o.safetensors"],
              f"Weight file not found: '{tmp_path}/{shown}.pkl'. Check the path or the model folder."),
             (["convert", "osediff", pkl, f"{odd}.safetensors"],
              f"'{tmp_path}/{shown}.safetensors' exists; choose another output name or delete it first."),
             (["download", "ram", "--models-dir", odd],  # (a Hugging Face file: refused offline, before any try)
              "ram: HF_HUB_OFFLINE is set, so ram_swin_large_14m.pth is not fetched from Hugging Face: unset it to "
              f"download, or put the file at '{tmp_path}/{shown}/dape/ram_swin_large_14m.pth' by hand.")]
    for args, error in cases:
        assert diffsr([str(a) for a in args]) == 2
        assert capsys.readouterr().err.splitlines()[0] == f"error: {error}", args
    assert diffsr([name]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: unknown command '{shown}'"


def test_convert_removes_the_partial_file_a_killed_conversion_left(tmp_path, capsys):
    """A conversion killed while it wrote left its hidden partial file (gigabytes) in the models folder for good: the
    next conversion into that folder removes it, with a note; a live writer's is kept."""
    from comfyui_diffsr.cli.convert import main as convert
    from comfyui_diffsr.sr_common.weights import partial_path

    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    live = partial_path(tmp_path / "other.safetensors")
    _, _, machine, rest = os.path.basename(live).split("-")
    killed = tmp_path / f".diffsr-{ended.pid}-{machine}-{rest}"  # as a killed writer on this machine leaves it
    for path in (live, killed):
        with open(path, "wb") as f:
            f.write(b"half a safetensors file")
    assert convert(["osediff", os.path.join(FIX, "osediff_tiny.pkl"), str(tmp_path / "osediff.safetensors")]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(live), "osediff.safetensors"])
    assert capsys.readouterr().err == f"note: removed 1 unfinished file(s) of a run stopped while writing " \
                                      f"(killed, or a power cut): {killed}\n"


def test_never_overwrites_without_flag(base, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "in_32x32.png").write_bytes(b"user file")
    args = [os.path.join(FIX, "in_32x32.png"), "-o", out, "--base", base, "--weights",
            os.path.join(FIX, "osediff_tiny.pkl"), "--process-size", "64"]
    assert run(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "in_32x32.png").read_bytes() == b"user file"
    assert run(args + ["--overwrite"]) == 0
    assert Image.open(out / "in_32x32.png").size == (128, 128)


def test_an_output_is_not_written_over_by_another_through_a_link(base, tmp_path, capsys):
    """OUTDIR/2019 a link to OUTDIR/2020: the outputs of photos/2019/a.png and photos/2020/a.png are one file. That
    is refused before anything runs, as two names of one file where names ignore case are (the second output was
    refused only when written, as if another run had made it); a link to nothing at an output name is an existing
    name too, refused before the run."""
    folder, out = tmp_path / "photos", tmp_path / "out"
    for year in ("2019", "2020"):
        (folder / year).mkdir(parents=True)
        Image.open(os.path.join(FIX, "in_32x32.png")).rotate(int(year) - 2019).save(folder / year / "a.png")
    (out / "2020").mkdir(parents=True)
    os.symlink("2020", out / "2019")
    args = [folder, "-r", "-o", out, "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
            "--process-size", "64"]
    assert run(args) == 2
    assert capsys.readouterr().err == (
        f"error: {quoted_name(folder / '2019' / 'a.png')} and {quoted_name(folder / '2020' / 'a.png')} would both be "
        f"written to {quoted_name(out / '2019' / 'a.png')} and {quoted_name(out / '2020' / 'a.png')}, one file through "
        "a link; rename one of them (nothing was upscaled).\n")
    assert os.listdir(out / "2020") == []
    assert run([folder / "2019" / "a.png", "-o", tmp_path / "first", *args[4:]]) == 0
    os.symlink(tmp_path / "elsewhere.png", tmp_path / "first" / "b.png")
    shutil.copy(folder / "2020" / "a.png", tmp_path / "b.png")
    assert run([tmp_path / "b.png", "-o", tmp_path / "first", *args[4:]]) == 2
    assert "1 output file(s) exist already" in capsys.readouterr().err
    assert os.readlink(tmp_path / "first" / "b.png") == str(tmp_path / "elsewhere.png")


def test_inputs_are_never_outputs(base, tmp_path, capsys):
    """An output folder that is the input folder would replace the photos by their upscales, or put the upscales
    of its JPEGs among the inputs of the next run (a resume with --skip-existing would find two inputs for one
    output): refused whatever the flags, before anything is loaded."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(os.path.join(FIX, "in_32x32.png"), folder / "photo.png")
    original = (folder / "photo.png").read_bytes()
    Image.open(folder / "photo.png").save(folder / "scan.jpg")  # its output, scan.png, would be an input next time
    for flags in ([], ["--overwrite"], ["--skip-existing"]):
        for inputs, says in (([folder], "is the input folder"), ([folder / "photo.png"], "is one of the input images"),
                             ([tmp_path / "." / "photos"], "is the input folder")):
            assert run([*inputs, "-o", folder, "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
                        "--process-size", "64", *flags]) == 2
            assert says in capsys.readouterr().err
    assert (folder / "photo.png").read_bytes() == original and sorted(os.listdir(folder)) == ["photo.png", "scan.jpg"]
    upscaled = folder / "upscaled"  # the way out the message gives: a sub-folder, left out of the search
    args = [folder, "-r", "-o", upscaled, "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
            "--process-size", "64"]
    assert run(args) == 0 and sorted(os.listdir(upscaled)) == [OUTPUT_FOLDER_MARK, "photo.png", "scan.png"]
    assert run(args + ["--skip-existing"]) == 0 and "skipping 2 of 2" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["negative overlap", "negative tile", "negative vae tile"])
def test_negative_tile_arguments_are_refused(base, tmp_path, capsys, bad):
    """A negative overlap left gaps between latent tiles, whose zero blend weights made a black image."""
    flags = {"negative overlap": ["--tile-latent", "16", "--tile-overlap", "-1"],
             "negative tile": ["--tile-latent", "-16"], "negative vae tile": ["--vae-tile-decode", "-8"]}[bad]
    assert run([os.path.join(FIX, "in_32x32.png"), "-o", tmp_path / "o", "--base", base, "--weights",
                os.path.join(FIX, "osediff_tiny.pkl"), *flags]) == 2
    assert "must be 0 or more" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("size", ["4097", "1000000000"])
def test_a_process_size_past_the_nodes_largest_is_refused(base, tmp_path, capsys, size):
    """--process-size had no upper bound, where the node's stops at 4096: 100000 enlarged a 32-px image to 25000 px
    a side and retried it at smaller tiles for minutes before running out of memory; 10⁹ ended in a MemoryError
    traceback. It is refused, naming the range, before anything is loaded."""
    assert run([os.path.join(FIX, "in_32x32.png"), "-o", tmp_path / "o", "--base", base, "--weights",
                os.path.join(FIX, "osediff_tiny.pkl"), "--process-size", size]) == 2
    assert capsys.readouterr().err == f"error: --process-size must be between 0 and 4096, got {size}\n"
    assert not (tmp_path / "o").exists()


def test_broken_png_and_unstorable_output_fail_alone(base, tmp_path, capsys):
    """A PNG with a damaged chunk (PIL raises SyntaxError) and an image whose output is wider than WebP can store
    fail on their own; the folder run goes on; an input's non-RGB (CMYK) colour profile is not given to the RGB
    output."""
    from PIL import ImageCms

    folder = tmp_path / "in"
    folder.mkdir()
    data = bytearray((Path(FIX) / "in_32x32.png").read_bytes())
    at = data.index(b"IDAT") - 4
    data[at:at + 4] = (int.from_bytes(data[at:at + 4], "big") - 10).to_bytes(4, "big")  # IDAT length off by 10
    (folder / "a_broken.png").write_bytes(bytes(data))
    Image.new("RGB", (4100, 2)).save(folder / "b_wide.png")
    cmyk = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    cmyk = cmyk[:16] + b"CMYK" + cmyk[20:]
    Image.open(os.path.join(FIX, "in_32x32.png")).convert("RGB").save(folder / "c_good.png", icc_profile=cmyk)
    assert run([folder, "-o", tmp_path / "out", "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
                "--process-size", "64", "--format", "webp"]) == 2
    err = capsys.readouterr().err
    assert "a_broken.png: Cannot read image" in err and "b_wide.png: The output would be 16400×8 px" in err, err
    assert sorted(os.listdir(tmp_path / "out")) == [OUTPUT_FOLDER_MARK, "c_good.webp"]
    assert "icc_profile" not in Image.open(tmp_path / "out" / "c_good.webp").info


def test_transparency_is_kept(base, tmp_path, capsys):
    """A logo on a transparent background keeps its alpha, upscaled bicubically as the nodes do; the RGB is what an
    opaque copy gives; an opaque RGBA file stays RGB; jpg cannot store alpha and says so."""
    import numpy as np

    from comfyui_diffsr.sr_common.image import with_upscaled_alpha

    folder = tmp_path / "in"
    folder.mkdir()
    rgb = Image.open(os.path.join(FIX, "in_32x32.png")).convert("RGB")
    disc = Image.new("L", (32, 32), 0)
    disc.paste(255, (8, 8, 24, 24))
    logo = rgb.copy()
    logo.putalpha(disc)
    logo.save(folder / "logo.png")
    rgb.save(folder / "opaque.png")
    opaque_rgba = rgb.copy()
    opaque_rgba.putalpha(255)
    opaque_rgba.save(folder / "opaque_rgba.png")
    args = [folder, "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"), "--process-size", "64"]
    assert run(args + ["-o", tmp_path / "out"]) == 0
    out = {n: Image.open(tmp_path / "out" / f"{n}.png") for n in ("logo", "opaque", "opaque_rgba")}
    assert out["logo"].mode == "RGBA" and out["opaque"].mode == out["opaque_rgba"].mode == "RGB"
    assert out["logo"].convert("RGB").tobytes() == out["opaque"].tobytes() == out["opaque_rgba"].tobytes()
    alpha = torch.from_numpy(np.asarray(disc) / np.float32(255))[None, None]
    expected = with_upscaled_alpha(torch.zeros(1, 3, 128, 128), alpha)[0, 3].mul(255).round().to(torch.uint8)
    assert torch.equal(torch.from_numpy(np.asarray(out["logo"].getchannel("A")).copy()), expected)
    assert run(args + ["-o", tmp_path / "jpg", "--format", "jpg"]) == 0
    assert "logo.png: jpg has no transparency" in capsys.readouterr().err
    assert Image.open(tmp_path / "jpg" / "logo.jpg").mode == "RGB"


def test_folder_run_goes_on_past_a_bad_image_and_resumes(base, tmp_path, capsys):
    """A folder with an unreadable file in the middle: the others are written, the bad one is named, exit 2;
    ``--skip-existing`` then leaves the written ones alone and tries only the rest."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        shutil.copy(os.path.join(FIX, "in_32x32.png"), folder / name)
    (folder / "b.png").write_bytes(b"not an image")
    args = [folder, "-o", out, "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
            "--process-size", "64"]
    assert run(args) == 2
    err = capsys.readouterr().err
    assert "b.png" in err and "Cannot read image" in err and "1 of 3 image(s) failed" in err, err
    assert f"wrote 2 image(s) to {out}" in err
    assert sorted(os.listdir(out)) == [OUTPUT_FOLDER_MARK, "a.png", "c.png"]  # no .partial left behind
    a = (out / "a.png").read_bytes()
    (out / "c.png").unlink()
    shutil.copy(os.path.join(FIX, "in_32x32.png"), folder / "b.png")
    assert run(args + ["--skip-existing"]) == 0
    assert "skipping 1 of 3" in capsys.readouterr().err
    assert (out / "a.png").read_bytes() == a and (out / "b.png").read_bytes() == a == (out / "c.png").read_bytes()
    assert run(args + ["--skip-existing"]) == 0  # nothing left to do
    assert "skipping 3 of 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(args + ["--skip-existing", "--overwrite"])


def test_skip_existing_skips_an_output_another_run_made_meanwhile(base, tmp_path, monkeypatch, capsys):
    """--skip-existing in a folder run that another run shares: an output that run made after this one planned its
    outputs is skipped with a note, as an existing one is, and left as it is (the run does not fail)."""
    import comfyui_diffsr.cli.osediff as osediff_cli

    folder, out = folder_run_with_a_rival(tmp_path, monkeypatch, os.path.join(FIX, "in_21x27.png"), osediff_cli,
                                          "osediff_upscale")
    assert run([folder, "-o", out, "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
                "--process-size", "64", "--skip-existing"]) == 0
    assert f"note: {folder / 'b.png'}: skipped: its output" in capsys.readouterr().err
    assert (out / "b.png").read_bytes() == RIVAL_OUTPUT and (out / "a.png").stat().st_size > 100


def test_an_input_with_a_long_name_is_written(base, tmp_path):
    """A name of 249 bytes (83 Japanese characters) and its suffix is a valid output name: it is written, though
    ``<name>.partial`` would pass the 255 bytes a name may have. The file written first and renamed leaves nothing
    behind, and the output has the permissions any new file of the user's has."""
    name = "長" * 83 + ".png"
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(os.path.join(FIX, "in_32x32.png"), folder / name)
    umask = os.umask(0o027)
    try:
        assert run([folder, "-o", tmp_path / "out", "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
                    "--process-size", "64"]) == 0
    finally:
        os.umask(umask)
    assert sorted(os.listdir(tmp_path / "out")) == [OUTPUT_FOLDER_MARK, name]
    assert Image.open(tmp_path / "out" / name).size == (128, 128)
    assert os.stat(tmp_path / "out" / name).st_mode & 0o777 == 0o640


def test_an_output_name_too_long_to_write_fails_alone_before_its_upscale(base, tmp_path, capsys, monkeypatch):
    """A 255-byte input name whose output name is longer (``.webp`` for ``.png``): that image fails alone, named,
    before it is upscaled, and the folder run goes on (it stopped the run after the upscale, and so every
    --skip-existing resume, at the same image)."""
    import comfyui_diffsr.cli.osediff as command

    folder = tmp_path / "in"
    folder.mkdir()
    long = "x" * 251 + ".png"
    for name in ("a.png", long, "z.png"):
        shutil.copy(os.path.join(FIX, "in_32x32.png"), folder / name)
    upscaled, real = [], command.osediff_upscale
    monkeypatch.setattr(command, "osediff_upscale", lambda *args, **kwargs: upscaled.append(1) or real(*args, **kwargs))
    assert run([folder, "-o", tmp_path / "out", "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
                "--process-size", "64", "--format", "webp"]) == 2
    err = capsys.readouterr().err
    assert f"{folder / long}: The output '{'x' * 251}.webp' would be named with more than 255 bytes" in err, err
    assert "1 of 3 image(s) failed" in err and len(upscaled) == 2
    assert sorted(os.listdir(tmp_path / "out")) == [OUTPUT_FOLDER_MARK, "a.webp", "z.webp"]


def test_a_file_names_length_is_counted_as_its_file_system_counts_it(monkeypatch):
    """Bytes on Linux and macOS; UTF-16 code units on Windows, where 100 Japanese characters (300 bytes in UTF-8)
    make a name that fits."""
    from comfyui_diffsr.cli.common import name_length

    assert name_length("長" * 100 + ".png") == (304, "bytes")
    monkeypatch.setattr(os, "name", "nt")
    assert name_length("長" * 100 + ".png") == (104, "UTF-16 code units") and name_length("😀") == (2, "UTF-16 code units")


def test_an_output_name_of_the_longest_length_is_taken_and_one_byte_more_is_not():
    """255 bytes is the most a file name may have, and such a name is written (a 251-byte stem and .png): the check
    refuses only a longer one."""
    from comfyui_diffsr.cli.common import check_output_name
    from comfyui_diffsr.sr_common.errors import ImageInputError

    check_output_name(os.path.join("out", "x" * 251 + ".png"))
    with pytest.raises(ImageInputError, match="more than 255 bytes"):
        check_output_name(os.path.join("out", "x" * 252 + ".png"))


def test_an_input_folder_that_cannot_be_read_is_named(base, tmp_path, monkeypatch, capsys):
    """A folder the user may not list is refused on one line with the reason, before the (missing) weights are
    read; a sub-folder that cannot be searched is still only left out, with a warning."""
    folder = tmp_path / "photos"
    (folder / "locked").mkdir(parents=True)
    shutil.copy(os.path.join(FIX, "in_32x32.png"), folder / "a.png")
    locked, scandir = {str(folder)}, os.scandir

    def listing(path="."):
        if os.fspath(path) in locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", listing)  # as chmod 0 does, also for root
    assert run([folder, "-o", tmp_path / "out", "--base", base, "--weights", tmp_path / "missing.pkl"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: Cannot read the input folder {quoted_name(folder)}: Permission denied. "
                                "Check that you may list it, or give its images by name."], err
    locked = {str(folder / "locked")}
    assert run([folder, "-r", "-o", tmp_path / "out", "--base", base, "--weights",
                os.path.join(FIX, "osediff_tiny.pkl"), "--process-size", "64"]) == 0
    assert f"warning: cannot search {quoted_name(folder / 'locked')}: Permission denied" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == [OUTPUT_FOLDER_MARK, "a.png"]


@pytest.mark.parametrize("seed", ["99999999999999999999", str(2**64), str(-2**63 - 1), "1.5"])
def test_a_seed_a_generator_cannot_take_is_refused_before_loading(base, tmp_path, capsys, seed):
    """--seed is −2⁶³ to 2⁶⁴ − 1, every seed ``torch.Generator.manual_seed`` takes (a negative s draws as
    2⁶⁴ + s): said when the arguments are read, not once per image after the models are loaded."""
    with pytest.raises(SystemExit) as stopped:
        run([os.path.join(FIX, "in_32x32.png"), "-o", tmp_path / "out", "--base", base, "--weights",
             tmp_path / "missing.pkl", "--seed", seed])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --seed: must be an integer from -2^63 to 2^64 - 1, got {seed!r}" in err, err


@pytest.mark.parametrize("quality", ["0", "101", "high"])
def test_a_quality_out_of_range_is_named(base, tmp_path, capsys, quality):
    with pytest.raises(SystemExit):
        run([os.path.join(FIX, "in_32x32.png"), "-o", tmp_path / "out", "--base", base, "--weights",
             tmp_path / "missing.pkl", "--format", "jpg", "--quality", quality])
    assert f"argument --quality: must be an integer from 1 to 100, got {quality!r}" in capsys.readouterr().err


def test_the_largest_seed_samples(base, tmp_path):
    """The ends of the range, 2⁶⁴ − 1 and −2⁶³, seed the posterior sample."""
    for seed in (2**64 - 1, -2**63):
        assert run([os.path.join(FIX, "in_32x32.png"), "-o", tmp_path / str(seed), "--base", base, "--weights",
                    os.path.join(FIX, "osediff_tiny.pkl"), "--process-size", "64", "--sample-mode", "sample",
                    "--seed", str(seed)]) == 0


def test_recursive_folder_run_mirrors_the_sub_folders(base, tmp_path, capsys):
    """``--recursive`` upscales the images of the sub-folders too, into the same sub-folders of the output; hidden
    folders, links to folders and an output folder inside the input folder are not searched, so a second run finds
    the same inputs. Without it only the folder's own images are taken, and a folder whose images are all in
    sub-folders says to use it."""
    folder, out = tmp_path / "photos", tmp_path / "photos" / "upscaled"
    image = os.path.join(FIX, "in_32x32.png")
    for name in ("a.png", "2019/c.png", "2019/beach/b.png", ".thumbnails/d.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / name)
    (folder / "notes.txt").write_text("not an image")
    os.symlink(folder, folder / "2019" / "loop")
    args = [folder, "-o", out, "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
            "--process-size", "64"]
    assert run(args) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                  if p.is_file()) == [OUTPUT_FOLDER_MARK, "a.png"]
    assert run(args + ["--recursive", "--skip-existing"]) == 0
    err = capsys.readouterr().err
    assert "skipping 1 of 3" in err and f"wrote 2 image(s) to {out}" in err, err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == [OUTPUT_FOLDER_MARK, "2019/beach/b.png", "2019/c.png", "a.png"]
    assert len({(out / name).read_bytes() for name in written[1:]}) == 1  # the same input everywhere
    assert run(args + ["-r", "--skip-existing"]) == 0  # the outputs inside photos/ are not taken as inputs
    assert "skipping 3 of 3" in capsys.readouterr().err
    (folder / "2019" / "c.png").unlink()
    assert run([folder / "2019", "-o", tmp_path / "o", "--base", base, "--weights",
                os.path.join(FIX, "osediff_tiny.pkl")]) == 2
    assert "sub-folders are searched with --recursive" in capsys.readouterr().err


def test_a_recursive_run_leaves_out_the_output_folders_earlier_runs_made(base, tmp_path, capsys):
    """``-r photos -o photos/up1``, then ``-r photos -o photos/up2``: the second run upscaled up1's upscales as well
    (only its own output folder was left out). A folder a run makes for its outputs is marked
    (``.diffsr-output-folder``), and a later ``-r`` search leaves it out with a note; given as INPUT it is searched. A
    folder that exists already is not marked (it may hold the user's photos), so its images stay inputs."""
    from comfyui_diffsr.cli.common import find_images

    folder = tmp_path / "photos"
    (folder / "2019").mkdir(parents=True)
    for name in ("a.png", "2019/b.png"):
        shutil.copy(os.path.join(FIX, "in_32x32.png"), folder / name)
    weights = ["--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"), "--process-size", "64"]
    assert run([folder, "-r", "-o", folder / "out" / "up1", *weights]) == 0
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "2019/b.png", "a.png", f"out/up1/{OUTPUT_FOLDER_MARK}", "out/up1/2019/b.png", "out/up1/a.png"]
    capsys.readouterr()
    assert run([folder, "-r", "-o", folder / "up2", *weights]) == 0
    err = capsys.readouterr().err
    assert f"note: left out 1 output folder(s) of earlier runs ({folder / 'out' / 'up1'}: a run made them" in err, err
    assert f"wrote 2 image(s) to {folder / 'up2'}" in err, err
    assert sorted(p.relative_to(folder / "up2").as_posix() for p in (folder / "up2").rglob("*")
                  if p.is_file()) == [OUTPUT_FOLDER_MARK, "2019/b.png", "a.png"]
    assert [name for _, name in find_images([str(folder / "out" / "up1")], recursive=True)] == ["a", "2019/b"]
    assert "note" not in capsys.readouterr().err  # given as INPUT: searched, without a note
    mine = folder / "mine"  # the user's own folder, given as -o: not marked, its photos stay inputs
    mine.mkdir()
    assert run([folder / "a.png", "-o", mine, *weights]) == 0 and os.listdir(mine) == ["a.png"]
    assert [name for _, name in find_images([str(folder)], recursive=True)] == ["a", "2019/b", "mine/a"]


def test_inputs_that_differ_only_in_their_suffix_keep_it_and_other_clashes_are_refused(base, tmp_path, capsys):
    """photo.jpg and photo.png of one folder would both become photo.png: each keeps its suffix (photo.jpg.png,
    photo.png.png), also where only the case of the name differs too (PHOTO.jpg). IMG.png and img.png would be one
    file where names ignore case: refused with both names, before the (here missing) weights are read; nothing is
    written. macOS's hidden ._photo.png beside them is not an input."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("photo.png", "photo.jpg", "b.png"):
        Image.open(os.path.join(FIX, "in_32x32.png")).save(folder / name)
    (folder / "._photo.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    weights = os.path.join(FIX, "osediff_tiny.pkl")
    assert run([folder, "-o", tmp_path / "out", "--base", base, "--weights", weights, "--process-size", "64"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == [OUTPUT_FOLDER_MARK, "b.png", "photo.jpg.png", "photo.png.png"]
    (folder / "photo.jpg").rename(folder / "PHOTO.jpg")
    assert run([folder, "-o", tmp_path / "out2", "--base", base, "--weights", weights, "--process-size", "64"]) == 0
    assert sorted(os.listdir(tmp_path / "out2")) == [OUTPUT_FOLDER_MARK, "PHOTO.jpg.png", "b.png", "photo.png.png"]
    capsys.readouterr()
    (folder / "PHOTO.jpg").unlink()
    Image.open(os.path.join(FIX, "in_32x32.png")).save(folder / "PHOTO.png")
    assert run([folder, "-o", tmp_path / "out3", "--base", base, "--weights", tmp_path / "missing.pkl"]) == 2
    err = capsys.readouterr().err
    assert "would both be written to" in err and "one file where names ignore case" in err, err
    assert "PHOTO.png" in err and "rename one of them (nothing was upscaled)" in err
    assert not (tmp_path / "out3").exists()


def test_an_output_that_is_an_input_under_another_name_is_refused(base, tmp_path, capsys):
    """An output name that is an input file under another name (a hard link here; on Windows and macOS also the
    input's name in another case, e.g. photo.PNG for photo.png) is refused even with --overwrite: the input would
    be replaced."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(os.path.join(FIX, "in_32x32.png"), folder / "photo.jpg")
    (tmp_path / "out").mkdir()
    os.link(folder / "photo.jpg", tmp_path / "out" / "photo.png")
    original = (folder / "photo.jpg").read_bytes()
    assert run([folder / "photo.jpg", "-o", tmp_path / "out", "--base", base, "--weights",
                os.path.join(FIX, "osediff_tiny.pkl"), "--process-size", "64", "--overwrite"]) == 2
    assert "is one of the input images" in capsys.readouterr().err
    assert (folder / "photo.jpg").read_bytes() == original


@pytest.mark.parametrize("failure", [
    torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 140737488355328 bytes. Error code 12 (Cannot allocate memory)")])
def test_out_of_memory_retries_with_smaller_tiles(base, tmp_path, monkeypatch, capsys, failure):
    """The command halves its tiles on out-of-memory, on the GPU or in the CPU allocator, as the nodes do; an image
    still out of memory at the smallest tiles fails alone."""
    import comfyui_diffsr.cli.osediff as command

    real, seen, flags, outside = command.osediff_upscale, [], set(), tf32_flags()

    def limited(model, image, options, **kwargs):
        seen.append((image.shape[-1], options.tile_latent, options.tile_overlap, options.vae_tile_decode))
        flags.add(tf32_flags())  # float32 as IEEE float32 (TF32 off on a GPU), in every attempt
        if image.shape[-1] > 40 or options.vae_tile_decode > 56:
            raise failure
        return real(model, image, options=options, **kwargs)

    monkeypatch.setattr(command, "osediff_upscale", limited)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.open(os.path.join(FIX, "in_32x32.png")).save(folder / "small.png")
    Image.open(os.path.join(FIX, "in_32x32.png")).resize((48, 48)).save(folder / "wide.png")
    args = [folder, "-o", tmp_path / "out", "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
            "--process-size", "64", "--tile-latent", "40", "--tile-overlap", "36"]
    assert run(args) == 2
    err = capsys.readouterr().err
    assert seen[:3] == [(32, 40, 36, 224), (32, 16, 8, 112), (32, 16, 8, 56)], seen
    assert "retrying with smaller tiles" in err and "wide.png: out of memory even at the smallest tiles" in err, err
    assert sorted(os.listdir(tmp_path / "out")) == [OUTPUT_FOLDER_MARK, "small.png"]
    assert len(flags) == 1 and flags <= set(IEEE_FLOAT32) and tf32_flags() == outside
    direct = tmp_path / "direct"
    assert run([folder / "small.png", "-o", direct, "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
                "--process-size", "64", "--tile-latent", "16", "--tile-overlap", "8", "--vae-tile-decode", "56"]) == 0
    assert (direct / "small.png").read_bytes() == (tmp_path / "out" / "small.png").read_bytes()


def test_weights_that_do_not_fit_stop_the_run_at_once(base, tmp_path, monkeypatch, capsys):
    """Out of memory while a stage's weights go to the device is not retried with smaller tiles, which cannot help,
    and stops the run (no image could run): one line names the networks and the fixes."""
    real, tries = OffloadWhenShort.__call__, []

    def full(self, model, networks, activation_bytes):
        if any(m is model.unet for m in networks):
            tries.append(activation_bytes)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, model, networks, activation_bytes)

    monkeypatch.setattr(OffloadWhenShort, "__call__", full)
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(os.path.join(FIX, "in_32x32.png"), folder / name)
    assert run([folder, "-o", tmp_path / "out", "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
                "--process-size", "64", "--prompt", ""]) == 2
    err = capsys.readouterr().err
    assert len(tries) == 1 and "retrying" not in err, err
    assert "error: Out of memory while moving the weights of unet (" in err and "in float32) to cpu" in err, err
    assert "To fix: close other programs that use the device or choose dtype fp16 or bf16" in err, err
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")
    # in 16 bits already, a 16-bit dtype is no fix
    assert run([folder, "-o", tmp_path / "out", "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
                "--process-size", "64", "--prompt", "", "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "in bfloat16) to cpu" in err and "To fix: close other programs that use the device." in err, err


def test_a_run_stopped_by_weights_that_do_not_fit_still_sums_up(base, tmp_path, monkeypatch, capsys):
    """Weights that stop the run mid-folder: what was written and what failed are listed first, then how many images
    are left, then the error."""
    real, tries = OffloadWhenShort.__call__, []

    def full_later(self, model, networks, activation_bytes):
        if any(m is model.unet for m in networks):
            tries.append(activation_bytes)
            if len(tries) == 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, model, networks, activation_bytes)

    monkeypatch.setattr(OffloadWhenShort, "__call__", full_later)
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "c.png", "d.png"):
        shutil.copy(os.path.join(FIX, "in_32x32.png"), folder / name)
    (folder / "b.png").write_bytes(b"not an image")
    assert run([folder, "-o", tmp_path / "out", "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
                "--process-size", "64", "--prompt", ""]) == 2
    err = capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == [OUTPUT_FOLDER_MARK, "a.png"]
    summary = ["wrote 1 image(s) to", "error: 1 of 4 image(s) failed:", "error: stopped with 2 image(s) left",
               "error: Out of memory while moving the weights of unet"]
    assert all(line in err for line in summary) and sorted(summary, key=err.index) == summary, err


def test_command_output_matches_the_official_code(base, tmp_path):
    """The ``osediff`` command end to end (its loading, the folder run with reading and writing on helper threads,
    the PNG it writes) on two official fixtures in one folder: untiled, and latent-tiled with the official tiling."""
    with open(os.path.join(FIX, "cases.json")) as f:
        cases = {c["name"]: c for c in json.load(f)["cases"]}
    for name in ("a32_adain", "e40x32_latent_tiled"):
        case = cases[name]
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(os.path.join(FIX, case["input"]), folder / case["input"])
        assert run([folder, "-o", tmp_path / "out" / name, "--base", base, "--weights",
                    os.path.join(FIX, "osediff_tiny.pkl"), "--official-sizing", "--process-size",
                    case["process_size"], "--prompt", case["prompt"], "--color-fix", case["color_fix"],
                    "--tile-latent", case["tile_latent"], "--tile-overlap", case["tile_overlap"]]) == 0
        ours = read(tmp_path / "out" / name / case["input"])
        official = read(os.path.join(FIX, case["output"]))
        # measured 83.6 / 81.5 dB (82.3 / 70.3 with the narrower networks of earlier fixtures); PNG against PNG: see
        # test_osediff_parity.min_psnr
        assert ours.shape == official.shape and psnr(ours, official) >= 60, f"{name}: {psnr(ours, official):.2f} dB"


def test_command_sampling_options_reach_the_pipeline(base, tmp_path):
    """``--sample-mode sample --seed 7`` (exact sizing) against the official float output of that case: the 8-bit
    PNG is within rounding of it (measured 0.56 of a level); another seed, or the mean, is not."""
    from safetensors.torch import load_file

    with open(os.path.join(FIX, "cases.json")) as f:
        case = next(c for c in json.load(f)["cases"] if c["name"] == "c21x27_exact_sample")
    official = load_file(os.path.join(FIX, case["tensors"]))["out_float"].float()[0].permute(1, 2, 0)  # as read()
    args = [os.path.join(FIX, case["input"]), "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
            "--process-size", case["process_size"], "--prompt", case["prompt"], "--color-fix", case["color_fix"]]
    distance = {}
    for label, flags in (("seed 7", ["--sample-mode", "sample", "--seed", "7"]),
                         ("seed 8", ["--sample-mode", "sample", "--seed", "8"]), ("mean", [])):
        assert run(args + ["-o", tmp_path / label, *flags]) == 0
        ours = read(tmp_path / label / case["input"])
        distance[label] = (ours - official).abs().max().item() * 255
    assert distance["seed 7"] <= 0.6 and distance["seed 8"] > 2 and distance["mean"] > 2, distance


def test_photo_orientation_and_colour_profile_are_kept(base, tmp_path):
    """A photo stored sideways with an EXIF orientation is upscaled upright, as viewers and ComfyUI's Load Image show
    it, and the output carries the input's ICC profile (its colours keep their meaning) and its EXIF tags (camera,
    date taken), less the orientation, the maker note and the old pixel size, which is set to the output's (in the
    Exif block and, where a phone wrote it there too, in the first IFD)."""
    from PIL import ExifTags, ImageCms

    from comfyui_diffsr.cli.common import load_image

    upright = Image.open(os.path.join(FIX, "in_32x32.png")).convert("RGB").crop((0, 0, 32, 20))
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown after a 90° clockwise turn
    exif[0x010F], exif[0x0110] = "Camera maker", "Model 1"
    exif[0x0100], exif[0x0101] = 20, 32  # the pixel size in the first IFD too, as some phones write it
    exif[ExifTags.IFD.Exif] = {0x9003: "2019:07:01 10:00:00", 0xA002: 20, 0xA003: 32, 0x927C: b"vendor" * 50}

    def kept_exif(image):
        exif = image.getexif()
        sub = exif.get_ifd(ExifTags.IFD.Exif)
        assert 0x0112 not in exif and 0x927C not in sub
        assert (sub[0xA002], sub[0xA003]) == (exif[0x0100], exif[0x0101]) == image.size
        return exif[0x010F], exif[0x0110], sub[0x9003]
    folder = tmp_path / "in"
    folder.mkdir()
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "photo.png", exif=exif, icc_profile=profile)
    upright.save(folder / "plain.png")
    assert torch.equal(load_image(folder / "photo.png"), load_image(folder / "plain.png"))
    assert run([folder, "-o", tmp_path / "out", "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
                "--process-size", "64"]) == 0
    photo, plain = (Image.open(tmp_path / "out" / name) for name in ("photo.png", "plain.png"))
    assert photo.size == (128, 80) and photo.tobytes() == plain.tobytes()
    assert photo.info.get("icc_profile") == profile and "icc_profile" not in plain.info
    assert kept_exif(photo) == ("Camera maker", "Model 1", "2019:07:01 10:00:00") and not plain.getexif()
    # lossy formats: the same image, named and encoded so; the random model's output is noise-like, which WebP's
    # half-resolution colour loses much of (JPEG is written with full-resolution colour: 36 dB, 24 dB with 4:2:0)
    for fmt, kind, min_db in (("jpg", "JPEG", 33), ("webp", "WEBP", 20)):
        assert run([folder / "photo.png", "-o", tmp_path / "out", "--base", base, "--weights",
                    os.path.join(FIX, "osediff_tiny.pkl"), "--process-size", "64", "--format", fmt]) == 0
        lossy = Image.open(tmp_path / "out" / f"photo.{fmt}")
        assert lossy.format == kind and lossy.size == (128, 80) and lossy.info.get("icc_profile") == profile
        assert kept_exif(lossy) == kept_exif(photo)
        assert psnr(read(tmp_path / "out" / f"photo.{fmt}"), read(tmp_path / "out" / "photo.png")) > min_db
    with pytest.raises(SystemExit):
        run([folder, "-o", tmp_path / "q", "--base", base, "--weights", "x", "--format", "jpg", "--quality", "0"])


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "I;16"])
def test_tiffs_are_turned_upright_once_in_every_mode(tmp_path, mode, compression):
    """A TIFF with each EXIF orientation reads as the same pixels, turned, saved as a PNG without one. Pillow turns a
    TIFF as it loads it: on 10.0 ``exif_transpose`` turned it again; on 13.0 an uncompressed L, RGBA or 16-bit one
    with orientation 5-8 opened by path came out scrambled."""
    import numpy as np

    from comfyui_diffsr.cli.common import read_image

    pixels = np.random.default_rng(0).integers(0, 256, (20, 28, 4), dtype=np.uint8)
    stored = {"RGB": lambda: Image.fromarray(pixels[..., :3]), "L": lambda: Image.fromarray(pixels[..., 0]),
              "RGBA": lambda: Image.fromarray(pixels),
              "I;16": lambda: Image.fromarray(pixels[..., 0].astype("<u2") * 257 + 3)}[mode]
    turns = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored().save(tmp_path / "photo.tif", exif=exif.tobytes(), **({"compression": compression} if compression
                                                                       else {}))
        upright = stored() if orientation == 1 else stored().transpose(turns[orientation])
        upright.save(tmp_path / "upright.png")
        (image, _, alpha), (expected, _, expected_alpha) = (read_image(tmp_path / name)
                                                             for name in ("photo.tif", "upright.png"))
        assert image.shape == expected.shape and torch.equal(image, expected), (mode, compression, orientation)
        assert (alpha is None) == (mode != "RGBA") and (alpha is None or torch.equal(alpha, expected_alpha))


def test_a_tiffs_exif_is_kept_as_a_jpegs(base, tmp_path):
    """A TIFF keeps its EXIF in its first page's tags, beside the tags that lay out its pixels: its output keeps the
    tags a JPEG with the same EXIF keeps (camera, dates, exposure, GPS; less the orientation and the maker note,
    with the output's pixel size), and none of that layout. (Upright: Pillow 10.0 turns a TIFF by its orientation
    as it loads it, and exif_transpose turns it again.)"""
    from PIL import ExifTags

    exif = Image.Exif()
    exif[0x0112] = 1  # upright
    exif[0x010F], exif[0x0110], exif[0x0132] = "Camera maker", "Model 1", "2019:07:01 10:00:00"
    exif[ExifTags.IFD.Exif] = {0x9003: "2019:07:01 10:00:00", 0x829A: (1, 250), 0xA002: 20, 0xA003: 32,
                               0x927C: b"vendor" * 50}
    exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: (52.0, 31.0, 12.0)}
    folder = tmp_path / "in"
    folder.mkdir()
    photo = Image.open(os.path.join(FIX, "in_32x32.png")).convert("RGB").crop((0, 0, 32, 20))
    for name in ("photo.jpg", "photo.tif"):
        photo.save(folder / name, exif=exif.tobytes())
    assert run([folder, "-o", tmp_path / "out", "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
                "--process-size", "64"]) == 0

    def tags(path):
        image = Image.open(path)
        kept = image.getexif()
        return image.size, dict(kept), kept.get_ifd(ExifTags.IFD.Exif), kept.get_ifd(ExifTags.IFD.GPSInfo)

    size, ifd0, sub, gps = tags(tmp_path / "out" / "photo.tif.png")
    assert (size, ifd0, sub, gps) == tags(tmp_path / "out" / "photo.jpg.png")
    assert size == (128, 80) and (sub[0xA002], sub[0xA003]) == size and 0x927C not in sub
    assert {tag: ifd0[tag] for tag in (0x010F, 0x0110, 0x0132)} == {0x010F: "Camera maker", 0x0110: "Model 1",
                                                                     0x0132: "2019:07:01 10:00:00"}
    assert set(ifd0) == {0x010F, 0x0110, 0x0132, ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo}  # no orientation, no layout
    assert sub[0x829A] == (1, 250) and gps[1] == "N"


def make_ldm_variant(tmp_path, name, mutate):
    from safetensors.torch import load_file

    sd = load_file(os.path.join(FIX, "tiny_sd21_single.safetensors"))
    mutate(sd)
    path = tmp_path / name
    write_safetensors(sd, path)
    return str(path)


def test_wrong_base_models_are_refused(base, tmp_path):
    def sd1(sd):  # CLIP-L in transformers' keys; the UNet's transformers project with 1×1 convolutions
        for k in [k for k in sd if k.startswith("cond_stage_model.model.")]:
            sd[k.replace("cond_stage_model.model.", "cond_stage_model.transformer.text_model.")] = sd.pop(k)
        for k in [k for k in sd if k.endswith((".proj_in.weight", ".proj_out.weight"))]:
            sd[k] = sd[k][:, :, None, None]

    def sdxl(sd):
        sd["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(1)

    def v_pred(sd):
        key = max((k for k in sd if k.startswith("model.diffusion_model.output_blocks.")
                   and k.endswith(".1.transformer_blocks.0.norm1.bias")),
                  key=lambda k: int(k.split(".")[3]))
        sd[key] = torch.randn_like(sd[key].float()) * 0.5

    def not_sd(sd):
        for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
            del sd[k]

    for name, mutate, words in (("sd15.safetensors", sd1, "1.x"), ("sdxl.safetensors", sdxl, "SDXL"),
                                ("v2-1_768.safetensors", v_pred, "768 v-prediction"),
                                ("parts.safetensors", not_sd,
                                 "not Stable Diffusion 2.1-base: it is Stable Diffusion parts without the UNet")):
        with pytest.raises(WeightFileError, match=words):
            load_sd21(make_ldm_variant(tmp_path, name, mutate), config_dir=base)
    with pytest.raises(WeightFileError, match="OSEDiff weight file"):
        torch.save(torch.load(os.path.join(FIX, "osediff_tiny.pkl"), weights_only=True), tmp_path / "o.ckpt")
        load_sd21(str(tmp_path / "o.ckpt"))


def test_an_input_that_is_a_fifo_is_named_so(tmp_path):
    """A FIFO (or a device) given as an input image was "Input not found" (it exists, but is no regular file, so it is
    never opened: its read would wait for a writer); it is named as what it is."""
    from comfyui_diffsr.cli.common import find_images
    from comfyui_diffsr.sr_common.errors import DiffSRError

    with fifo(tmp_path / "photo.png") as path:
        with pytest.raises(DiffSRError, match=r"^'.*/photo\.png' is not an image file: it is a FIFO \(a named pipe\)\. "
                                              r"Give the image file itself\.$"):
            find_images([path])
        os.symlink(path, tmp_path / "linked.png")  # a link is named as what it leads to
        with pytest.raises(DiffSRError, match=r"^'.*/linked\.png' is not an image file: it is a FIFO \(a named pipe\)"):
            find_images([str(tmp_path / "linked.png")])
    if os.path.exists("/dev/null"):
        with pytest.raises(DiffSRError, match=r"^'/dev/null' is not an image file: it is a device\."):
            find_images(["/dev/null"])


def test_an_input_that_is_a_dangling_link_is_not_found(tmp_path):
    """A link whose file is gone exists as a link only: it is "Input not found" naming it, not a FileNotFoundError
    traceback from looking up what it is."""
    from comfyui_diffsr.cli.common import find_images
    from comfyui_diffsr.sr_common.errors import DiffSRError

    os.symlink(tmp_path / "deleted.png", tmp_path / "photo.png")
    with pytest.raises(DiffSRError, match=r"^Input not found: '.*/photo\.png'$"):
        find_images([str(tmp_path / "photo.png")])


def test_cli_reports_clear_errors(base, tmp_path, capsys):
    assert run([os.path.join(FIX, "in_32x32.png"), "-o", tmp_path, "--base", base, "--weights",
                os.path.join(FIX, "tiny_sd21_single.safetensors")]) == 2
    assert "not an OSEDiff checkpoint" in capsys.readouterr().err
    assert run([str(tmp_path / "missing.png"), "-o", tmp_path, "--base", base, "--weights", "x"]) == 2
    assert "Input not found" in capsys.readouterr().err
    assert run([os.path.join(FIX, "in_32x32.png"), "-o", tmp_path, "--base", base, "--weights", "x",
                "--upscale", "9"]) == 2
    assert "--upscale must be between 1 and 8" in capsys.readouterr().err
    (tmp_path / "a_file").write_bytes(b"")
    assert run([os.path.join(FIX, "in_32x32.png"), "-o", tmp_path / "a_file" / "out", "--base", base, "--weights",
                "x"]) == 2  # found before the (missing) weights are read
    assert "Cannot write the output folder" in capsys.readouterr().err


def test_an_output_sub_folder_that_is_a_file_is_refused_before_anything_runs(base, tmp_path, capsys):
    """With -r, an output sub-folder that is a file of the user's is found as the outputs are planned (as the output
    folder itself is): before the models load, not once the images before it are upscaled, with an errno message and
    an advice (--skip-existing) that meets the same file again. The file is left as it was."""
    photos = tmp_path / "photos"
    (photos / "2019").mkdir(parents=True)
    shutil.copy(os.path.join(FIX, "in_32x32.png"), photos / "a.png")
    shutil.copy(os.path.join(FIX, "in_32x32.png"), photos / "2019" / "b.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "2019").write_bytes(b"my notes")
    assert run([photos, "-r", "-o", out, "--base", base, "--weights", "x"]) == 2  # before the (missing) weights
    err = capsys.readouterr().err
    assert re.search(r"Cannot write the output folder '.*out/2019': it is a file, not a folder", err), err
    assert sorted(os.listdir(out)) == ["2019"] and (out / "2019").read_bytes() == b"my notes"


def test_osediff_with_dape_prompts(base, tmp_path, monkeypatch):
    """`osediff --ram --dape` tags the upscaled LQ and uses '{tags}, {user prompt},' as the prompt; a converted DAPE
    file as --dape alone gives the same."""
    from comfyui_diffsr.osediff_core.dape import convert_dape, dape_prompt, load_dape_tagger
    from comfyui_diffsr.osediff_core.pipeline import Options, build_osediff, osediff_upscale, preprocess
    from comfyui_diffsr.osediff_core.weights import read_osediff
    from comfyui_diffsr.sr_common.image import pil_to_tensor

    ram, dape = os.path.join(DATA, "dape", "ram_tiny.pth"), os.path.join(DATA, "dape", "dape_tiny.pth")
    inp = os.path.join(FIX, "in_32x32.png")
    stages = []  # the networks of each stage, in order: the tagger is one, loaded like the model's networks
    monkeypatch.setattr(OffloadWhenShort, "__call__", lambda self, model, networks, activation_bytes:
                        stages.append([type(m).__name__ for m in networks]))
    assert run([inp, "-o", tmp_path, "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
                "--process-size", "64", "--ram", ram, "--dape", dape, "--user-prompt", "sharp"]) == 0
    assert stages == [["DAPETagger"], ["CLIPTextModel"], ["ModuleDict"], ["UNet2DConditionModel"],
                      ["AutoencoderKL"]], stages
    monkeypatch.undo()
    image = pil_to_tensor(Image.open(inp))
    lq, _ = preprocess(image, upscale=4, process_size=64)
    prompt = dape_prompt(load_dape_tagger(ram_path=ram, dape_path=dape).tags(lq)[0], "sharp")
    assert prompt.endswith(", sharp,") and len(prompt) > len(", sharp,")
    model = build_osediff(load_sd21(base), read_osediff(os.path.join(FIX, "osediff_tiny.pkl")))
    expected = osediff_upscale(model, image, prompt=prompt, options=Options(process_size=64))
    got = read(tmp_path / "in_32x32.png")
    assert psnr(got, expected[0].permute(1, 2, 0)) > 45
    plain = osediff_upscale(model, image, prompt="", options=Options(process_size=64))
    assert psnr(got, plain[0].permute(1, 2, 0)) < psnr(got, expected[0].permute(1, 2, 0))
    converted = tmp_path / "dape.safetensors"  # `diffsr convert dape`: --dape alone then gives the same prompts
    convert_dape(ram, dape, converted)
    assert run([inp, "-o", tmp_path / "converted", "--base", base, "--weights", os.path.join(FIX, "osediff_tiny.pkl"),
                "--process-size", "64", "--dape", converted, "--user-prompt", "sharp"]) == 0
    assert (tmp_path / "converted" / "in_32x32.png").read_bytes() == (tmp_path / "in_32x32.png").read_bytes()


def test_a_prompt_given_with_dape_says_dape_is_not_used(base, tmp_path, capsys):
    """--prompt replaces DAPE's prompt: given with --dape, a note says DAPE is not used and names --user-prompt (the
    text after the tags), rather than the DAPE files being quietly left unread."""
    ram, dape = os.path.join(DATA, "dape", "ram_tiny.pth"), os.path.join(DATA, "dape", "dape_tiny.pth")
    assert run([os.path.join(FIX, "in_32x32.png"), "-o", tmp_path, "--base", base, "--weights",
                os.path.join(FIX, "osediff_tiny.pkl"), "--process-size", "64", "--ram", ram, "--dape", dape,
                "--prompt", "a photo"]) == 0
    err = capsys.readouterr().err
    assert ("note: DAPE is not used: --prompt replaces its prompt (the tags are not made); to add text after DAPE's "
            "tags, give it as --user-prompt instead of --prompt\n") in err
    assert "--user-prompt goes with" not in err and (tmp_path / "in_32x32.png").exists()


def test_float16_on_a_cpu_that_cannot_compute_it_is_refused_by_name(base, tmp_path, monkeypatch, capsys):
    """PyTorch 2.1 has no float16 convolution or layer norm on the CPU: ``--dtype fp16 --device cpu`` says so and
    what to pick instead, before loading anything, rather than failing inside a network."""
    from comfyui_diffsr.sr_common import sd21

    monkeypatch.setattr(sd21, "cpu_computes_float16", lambda: False)
    args = [os.path.join(FIX, "in_32x32.png"), "-o", tmp_path / "out", "--base", base,
            "--weights", os.path.join(FIX, "osediff_tiny.pkl"), "--device", "cpu"]
    assert run(args + ["--dtype", "fp16"]) == 2
    assert "no float16 kernels on the CPU: run fp32 or bf16" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert run(args + ["--dtype", "bf16", "--process-size", "64"]) == 0


def test_every_osediff_option_reaches_the_run(base, tmp_path, monkeypatch):
    """Each option of the command reaches the core's Options, the prompt, or the writer, at a value none has by
    default (the run itself is a stand-in here: its parity is tested above)."""
    import comfyui_diffsr.cli.osediff as command
    from comfyui_diffsr.cli import common
    from comfyui_diffsr.osediff_core.pipeline import Options
    from comfyui_diffsr.sr_common.image import scaled_size

    seen = {}

    def upscale(model, image, *, prompt_embeds, prompt_fn, options):
        seen.update(options=options, embeds=prompt_embeds)
        width, height = scaled_size(image.shape[-1], image.shape[-2], options.upscale)
        return torch.zeros(1, 3, height, width)

    monkeypatch.setattr(command, "osediff_upscale", upscale)
    monkeypatch.setattr(common, "save_image", lambda image, path, metadata, quality, alpha, overwrite: seen.update(
        quality=quality, overwrite=overwrite))
    assert run([os.path.join(FIX, "in_32x32.png"), "-o", tmp_path / "out", "--base", base, "--weights",
                os.path.join(FIX, "osediff_tiny.pkl"), "--device", "cpu", "--prompt", "a dog", "--upscale", "2",
                "--process-size", "64", "--official-sizing", "--color-fix", "wavelet", "--sample-mode", "sample",
                "--seed", "9", "--tile-latent", "48", "--tile-overlap", "24", "--vae-tile-encode", "512",
                "--vae-tile-decode", "64", "--vae-tile-mode", "exact", "--format", "webp", "--quality", "20",
                "--overwrite"]) == 0
    assert seen["options"] == Options(upscale=2.0, process_size=64, official_sizing=True, color_fix="wavelet",
                                      sample_mode="sample", seed=9, tile_latent=48, tile_overlap=24,
                                      vae_tile_encode=512, vae_tile_decode=64, vae_tile_mode="exact")
    assert seen["quality"] == 20 and seen["overwrite"] is True
    model = load_sd21(base)
    from comfyui_diffsr.sr_common.sd21 import encode_prompt

    with torch.no_grad():
        expected = encode_prompt(model.text_encoder, model.tokenizer, ["a dog"])
    torch.testing.assert_close(seen["embeds"], expected, atol=1e-5, rtol=1e-5)  # the command's own attention path
    assert not torch.allclose(expected, encode_prompt(model.text_encoder, model.tokenizer, [""]), atol=1e-3)


def test_a_prompt_longer_than_clips_77_tokens_is_cut(base):
    """CLIP takes 77 tokens: a longer prompt (DAPE's tags and a user prompt can pass it) is truncated as the
    official pipeline's tokenizer call does, not an error: 200 words give the encoding of their first 75."""
    from comfyui_diffsr.sr_common.sd21 import encode_prompt

    sd = load_sd21(base)
    with torch.no_grad():
        long = encode_prompt(sd.text_encoder, sd.tokenizer, ["cat " * 200])
        cut = encode_prompt(sd.text_encoder, sd.tokenizer, ["cat " * 75])
    assert long.shape[1] == 77 and torch.equal(long, cut)


def test_ram_without_dape_is_refused_before_loading(base, tmp_path, capsys):
    """--ram alone would be ignored silently (no DAPE tags, a plain empty prompt): refused, naming --dape, before the
    (here missing) weights are read."""
    assert run([os.path.join(FIX, "in_32x32.png"), "-o", tmp_path / "out", "--base", base, "--weights",
                tmp_path / "missing.pkl", "--ram", tmp_path / "ram.pth"]) == 2
    assert "--ram needs --dape" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_image_given_twice_is_one_input(tmp_path):
    """The same photo given by name, again, and through its folder (and a link to it) is upscaled once, not refused
    as two inputs that would write one output."""
    from comfyui_diffsr.cli.common import find_images, plan_outputs

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(os.path.join(FIX, "in_32x32.png"), folder / "photo.png")
    os.symlink(folder / "photo.png", tmp_path / "link.png")
    photo = str(folder / "photo.png")
    images = find_images([photo, photo, str(folder), str(tmp_path / "link.png")])
    assert images == [(photo, "photo")]
    assert plan_outputs(images, str(tmp_path / "out")) == [(photo, str(tmp_path / "out" / "photo.png"))]


def test_a_folders_photos_that_pillow_does_not_read_are_counted_in_a_note(tmp_path, capsys):
    """A .jfif (a JPEG as a browser saves it) is an input. An iPhone's HEIC photos and camera raw files in an input
    folder are left out with a note that counts them by suffix (any case) and says to export them, and its GIFs
    (taken by name only) with another; hidden ones and other files (notes.txt) are not counted, and those of a
    sub-folder only where it is searched (-r). A folder of HEIC photos alone is then also refused, as having no
    images."""
    from comfyui_diffsr.cli.common import find_images
    from comfyui_diffsr.sr_common.errors import DiffSRError

    folder = tmp_path / "photos"
    (folder / "2019").mkdir(parents=True)
    for name in ("a.png", "b.JFIF"):  # a browser's name for a JPEG it saves: an input
        shutil.copy(os.path.join(FIX, "in_32x32.png"), folder / name)
    for name in ("IMG_1.HEIC", "IMG_2.heic", "RAW_3.dng", "._IMG_1.HEIC", "notes.txt", "2019/IMG_4.heic"):
        (folder / name).write_bytes(b"\0" * 16)
    for name in ("wave.gif", "2019/dance.GIF", "._wave.gif"):  # taken by name only (mostly animations)
        Image.new("RGB", (8, 8)).save(folder / name, format="GIF")
    inputs = [(str(folder / "a.png"), "a"), (str(folder / "b.JFIF"), "b")]
    assert find_images([str(folder)]) == inputs
    err = capsys.readouterr().err
    assert err == ("note: left out 1 GIF(s): a folder's GIFs are not taken (mostly animations); give one by name to "
                   "upscale its first frame.\nnote: left out 3 photo(s) in formats Pillow does not read (.dng: 1, "
                   ".heic: 2); to upscale them, export them as PNG or JPEG first.\n"), err
    assert find_images([str(folder)], recursive=True) == inputs
    err = capsys.readouterr().err
    assert "left out 2 GIF(s)" in err, err
    assert "left out 4 photo(s) in formats Pillow does not read (.dng: 1, .heic: 3)" in err, err
    with pytest.raises(DiffSRError, match="No images found"):
        find_images([str(folder / "2019")])
    assert "left out 1 photo(s) in formats Pillow does not read (.heic: 1)" in capsys.readouterr().err
    shutil.copy(os.path.join(FIX, "in_32x32.png"), folder / "2019" / "b.png")
    find_images([str(folder / "2019" / "b.png")])  # a file given by name: nothing searched, nothing left out
    assert capsys.readouterr().err == ""


def test_names_are_one_file_where_a_case_insensitive_file_system_makes_them_one(tmp_path):
    """Straße.png and Strasse.png are two files on every file system (NTFS, exFAT, APFS fold one character at a
    time), but str.casefold made them one and the run was refused; A/a, Ä/ä, ẞ/ß, ς/σ and é written as one
    character or as e and an accent (one name on macOS) are still refused."""
    from comfyui_diffsr.cli.common import find_images, plan_outputs
    from comfyui_diffsr.sr_common.errors import DiffSRError

    def planned(*names):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        for name in names:
            shutil.copy(os.path.join(FIX, "in_32x32.png"), folder / name)
        return [os.path.basename(out) for _, out in plan_outputs(find_images([str(folder)]), str(tmp_path / "out"))]

    assert planned("Straße.png", "Strasse.png") == ["Strasse.png", "Straße.png"]
    assert planned("Straße.png", "STRASSE.jpg") == ["STRASSE.png", "Straße.png"]
    for pair in (("A.png", "a.png"), ("Ä.png", "ä.png"), ("ẞ.png", "ß.png"), ("ς.png", "σ.png"),
                 ("caf\u00e9.png", "cafe\u0301.png")):
        with pytest.raises(DiffSRError, match="one file where names ignore case"):
            planned(*pair)


def test_an_output_folder_named_by_another_path_is_still_left_out(tmp_path, child_env):
    """The output folder inside the input folder, named by another path to the same folder (on macOS: spelled in
    another case, which its real path keeps; here: a bind mount), is left out of the search, and as the input folder
    it is refused (by path alone, its earlier outputs were searched as inputs)."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs a mount namespace (unshare -rm) for a bind mount")
    folder, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    (folder / "upscaled").mkdir(parents=True)
    elsewhere.mkdir()
    for name in ("a.png", "upscaled/a.png"):
        shutil.copy(os.path.join(FIX, "in_32x32.png"), folder / name)
    search = ("import sys; from comfyui_diffsr.cli.common import find_images; from comfyui_diffsr.sr_common.errors "
              "import DiffSRError\ntry: print(find_images([sys.argv[1]], True, sys.argv[2]))\n"
              "except DiffSRError as e: print(e)")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount --bind "$1" "$2" && "$3" -c "$4" "$5" "$2" && "$3" '
                           '-c "$4" "$1" "$2"', "sh", folder / "upscaled", elsewhere, sys.executable, search, folder],
                          capture_output=True, text=True, check=True, env=child_env())
    searched, refused = done.stdout.splitlines()
    assert searched == str([(str(folder / "a.png"), "a")])
    assert refused.startswith(f"--output {quoted_name(elsewhere)} is the input folder "
                              f"{quoted_name(folder / 'upscaled')}:")


@pytest.mark.parametrize("command", ["osediff", "dossr", "dape"])
@pytest.mark.parametrize("where", ["first", "after another input"])
def test_an_input_named_with_a_leading_dash_is_pointed_out(tmp_path, monkeypatch, capsys, command, where):
    """An image named -photo.png reads as an option: argparse's error ('the following arguments are required:
    INPUT', or 'unrecognized arguments') does not say so; the commands add how to give it."""
    import importlib

    monkeypatch.chdir(tmp_path)
    shutil.copy(os.path.join(FIX, "in_32x32.png"), "-photo.png")
    shutil.copy(os.path.join(FIX, "in_32x32.png"), "b.png")
    inputs = ["-photo.png"] if where == "first" else ["b.png", "-photo.png"]
    main_of = importlib.import_module(f"comfyui_diffsr.cli.{command}").main
    with pytest.raises(SystemExit) as exited:
        main_of([*inputs, "-o", "out", "--weights", "x"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert ("'-photo.png' is a file, read as an option: give it as './-photo.png', or after the options and --"
            in err), err
