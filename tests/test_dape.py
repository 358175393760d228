"""DAPE tagger: parity with the official OSEDiff/RAM code (tiny random model, tests/data/dape)."""

import io
import json
import math
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_diffsr.osediff_core import dape
from comfyui_diffsr.osediff_core.dape import convert_dape, dape_prompt, load_dape_tagger
from comfyui_diffsr.sr_common.errors import WeightFileError

from conftest import DATA

D = os.path.join(DATA, "dape")
RAM = os.path.join(D, "ram_tiny.pth")
DAPE = os.path.join(D, "dape_tiny.pth")


@pytest.fixture(scope="module")
def fixture():
    arrays = np.load(os.path.join(D, "dape_fixture.npz"))
    with open(os.path.join(D, "dape_fixture.json"), encoding="utf-8") as f:
        meta = json.load(f)
    ups = [torch.from_numpy(arrays[f"up_{i}"]).permute(2, 0, 1)[None].float() / 255 for i in range(4)]
    smalls = [arrays[f"small_{i}"] for i in range(4)]
    return ups, smalls, torch.from_numpy(arrays["logits"]), meta["tags"]


@pytest.fixture(scope="module")
def tagger():
    return load_dape_tagger(RAM, DAPE)


def test_fixture_is_meaningful(fixture):
    _, _, _, tags = fixture
    counts = [len(t.split(", ")) if t else 0 for t in tags]
    assert all(0 < c < 300 for c in counts), counts


def test_logits_and_tags_match_official(tagger, fixture):
    ups, _, logits, tags = fixture
    for i, up in enumerate(ups):
        ours = tagger.logits(up)
        assert ours.shape == (1, 4585)
        assert (ours[0] - logits[i]).abs().max().item() < 1e-4
        assert tagger.tags(up) == [tags[i]]


def test_batch_matches_single(tagger, fixture):
    ups, _, logits, tags = fixture
    batch = torch.cat([ups[1], ups[1].flip(-1)])
    out = tagger.logits(batch)
    assert (out[0] - logits[1]).abs().max().item() < 1e-4
    assert tagger.tags(batch)[0] == tags[1]


def test_tag_encoder_lora_is_merged_through_the_tie(fixture, tmp_path):
    """The official head shares weights with tag_encoder layers 0-1, so their LoRAs count too."""
    ups, _, logits, _ = fixture
    lora = torch.load(DAPE, weights_only=True)
    for k in lora:
        if k.startswith("tag_encoder.") and ".crossattention." in k and k.endswith("lora_B"):
            lora[k] = torch.zeros_like(lora[k])
    path = tmp_path / "dape_no_te.pth"
    torch.save(lora, path)
    other = load_dape_tagger(RAM, str(path))
    assert (other.logits(ups[0])[0] - logits[0]).abs().max().item() > 1e-3


def test_prompt_format():
    assert dape_prompt("cat, dog") == "cat, dog, ,"
    assert dape_prompt("cat, dog", "sharp photo") == "cat, dog, sharp photo,"
    assert dape_prompt("", "") == ", ,"
    assert dape_prompt("cat, dog", "x", tags_only=True) == "cat, dog"


def test_exclude_and_max_tags(tagger, fixture):
    ups, _, logits, tags = fixture
    full = tags[0].split(", ")
    assert len(full) > 5
    out = tagger.tags(ups[0], exclude=[full[0], full[2].upper()])[0].split(", ")
    assert out == [t for t in full if t not in (full[0], full[2])]
    top = tagger.tags(ups[0], max_tags=3)[0].split(", ")
    assert len(top) == 3 and top == [t for t in full if t in top]  # tag-list order kept
    probs = torch.sigmoid(logits[0])
    index = {name: i for i, name in enumerate(tagger.tag_names)}
    chosen = sorted(probs[[index[t] for t in full]].tolist(), reverse=True)
    assert sorted((probs[index[t]].item() for t in top), reverse=True) == chosen[:3]
    assert tagger.tags(ups[0], max_tags=0) == [""]
    assert tagger.tags(ups[0], max_tags=1000) == [tags[0]]


def test_an_fp16_tagger_compares_the_fp16_probability_as_the_official(tagger):
    """The official fp16 run (test_osediff.py --mixed_precision fp16) computes sigmoid(fp16 logits) in fp16 and
    compares that rounded value with the float32 thresholds: at logit 0.619140625, sigmoid = 0.650023 in float32 but
    0.649902 in fp16, so a tag of threshold 0.65 is chosen by the float32 rule and not by the official fp16 run; at
    0.5751953125 (0.639960 / 0.640137) a tag of threshold 0.64 the other way round, and at 0.84716796875 (0.699973 /
    0.700195) one of threshold 0.7, which bf16 rounding (0.699219) would leave out. A probability equal to its
    threshold is not above it (the official ``>``): sigmoid(0) = 0.5 in float32, and ln 3's sigmoid is 0.75 in fp16,
    the threshold of 20 RAM tags."""
    import copy

    full, half = copy.deepcopy(tagger), copy.deepcopy(tagger).half()
    n = len(tagger.tag_names)
    pairs = [(0.619140625, 0.65), (0.5751953125, 0.64), (0.84716796875, 0.7)]  # (logit, threshold)
    logits = torch.tensor([logit for logit, _ in pairs]).repeat(n // 3 + 1)[:n][None]
    for model in (full, half):
        model.thresholds = torch.tensor([threshold for _, threshold in pairs]).repeat(n // 3 + 1)[:n]
    names = tagger.tag_names
    assert full.select(logits) == [", ".join(names[0::3])]  # 0.650023 > 0.65; 0.639960 < 0.64; 0.699973 < 0.7
    assert half.select(logits) == [", ".join(name for i, name in enumerate(names) if i % 3)]  # the other way round
    for model, logit, threshold in ((full, 0.0, 0.5), (half, math.log(3), 0.75)):
        model.thresholds = torch.full((n,), threshold)
        assert model.select(torch.full((1, n), logit)) == [""]


def test_converted_fp32_identical_and_fp16_close(tagger, fixture, tmp_path):
    ups, _, logits, tags = fixture
    out32, out16 = str(tmp_path / "dape.safetensors"), str(tmp_path / "dape16.safetensors")
    convert_dape(RAM, DAPE, out32)
    convert_dape(RAM, DAPE, out16, half=True)
    assert os.path.getsize(out16) < 0.6 * os.path.getsize(out32)
    t32 = load_dape_tagger(converted_path=out32)
    t16 = load_dape_tagger(converted_path=out16)
    for (k, a), b in zip(tagger.state_dict().items(), t32.state_dict().values()):
        assert torch.equal(a, b), k
    for i, up in enumerate(ups):
        assert (t32.logits(up) - tagger.logits(up)).abs().max().item() < 1e-6
        assert t32.tags(up) == [tags[i]]
        assert (t16.logits(up)[0] - logits[i]).abs().max().item() < 0.05
    with pytest.raises(WeightFileError, match="exists"):
        convert_dape(RAM, DAPE, out32)


def test_vision_multi_name_and_bare_state_dict(fixture, tmp_path):
    ups, _, logits, _ = fixture
    sd = torch.load(RAM, weights_only=True)["model"]
    renamed = {k.replace("tagging_head", "vision_multi"): v for k, v in sd.items()}
    torch.save({"model": renamed}, tmp_path / "vm.pth")
    torch.save(sd, tmp_path / "bare.pth")
    for name in ("vm.pth", "bare.pth"):
        t = load_dape_tagger(str(tmp_path / name), DAPE)
        assert (t.logits(ups[2])[0] - logits[2]).abs().max().item() < 1e-4
    # the head's LoRAs under the same name in the DAPE file: they count as the head's (none is taken for missing)
    lora = torch.load(DAPE, weights_only=True)
    torch.save({k.replace("tagging_head", "vision_multi"): v for k, v in lora.items()}, tmp_path / "vm_dape.pth")
    assert any(k.startswith("vision_multi.") for k in torch.load(tmp_path / "vm_dape.pth", weights_only=True))
    t = load_dape_tagger(str(tmp_path / "vm.pth"), str(tmp_path / "vm_dape.pth"))
    assert (t.logits(ups[2])[0] - logits[2]).abs().max().item() < 1e-4


def test_only_tagging_tensors_are_copied():
    """Load-time memory: the RAM file is memory-mapped and only the tagging tensors are copied
    (for the real file ~0.85 GB of ~5.6 GB; bench/bench_dape.py measures the peak)."""
    state, config = dape._state_from_official(RAM, DAPE)
    assert all(k.startswith(dape.TAGGING_PREFIXES) or k in dape.TAGGING_KEYS for k in state)
    assert not any(k.endswith(("relative_position_index", "attn_mask")) for k in state)
    assert set(state) == set(dape._expected_keys(config))
    assert config["layers"] == 2 and config["swin"]["depths"] == [2, 2, 2, 2]


def test_converted_files_in_the_wrong_option_are_named(tmp_path):
    """A converted tagger given as the RAM file would have its LoRA merged a second time (tags silently wrong): it is
    refused, and every converted file given to the wrong option is called by its kind and where it belongs."""
    from comfyui_diffsr.osediff_core.weights import convert_osediff, read_osediff

    tagger_file, osediff_file = str(tmp_path / "dape.safetensors"), str(tmp_path / "osediff.safetensors")
    convert_dape(RAM, DAPE, tagger_file)
    convert_osediff(os.path.join(os.path.dirname(D), "osediff", "osediff_tiny.pkl"), osediff_file)
    with pytest.raises(WeightFileError, match="given as the RAM weights but it is a converted DAPE tagger"):
        load_dape_tagger(tagger_file, DAPE)
    with pytest.raises(WeightFileError, match="given as the DAPE weights but it is a converted DAPE tagger"):
        load_dape_tagger(RAM, tagger_file)
    with pytest.raises(WeightFileError, match="given as a converted DAPE file but it is a converted OSEDiff file"):
        load_dape_tagger(converted_path=osediff_file)
    with pytest.raises(WeightFileError, match="not an OSEDiff checkpoint: it is a converted DAPE tagger"):
        read_osediff(tagger_file)


def test_convert_output_problems_are_one_line_errors(tmp_path):
    """A missing output folder is made; an existing output, a wrong suffix or a failed write is a WeightFileError
    (one line in the commands) and leaves no ``.partial``."""
    from comfyui_diffsr.osediff_core.weights import convert_osediff

    pkl = os.path.join(os.path.dirname(D), "osediff", "osediff_tiny.pkl")
    convert_osediff(pkl, str(tmp_path / "new" / "folder" / "o.safetensors"))
    assert os.listdir(tmp_path / "new" / "folder") == ["o.safetensors"]
    with pytest.raises(WeightFileError, match="exists"):
        convert_osediff(pkl, str(tmp_path / "new" / "folder" / "o.safetensors"))
    with pytest.raises(WeightFileError, match="must end in .safetensors"):
        convert_osediff(pkl, str(tmp_path / "o.pkl"))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(WeightFileError, match="Cannot write"):
        convert_osediff(pkl, str(tmp_path / "file" / "o.safetensors"))  # its "folder" is a file
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]


def test_wrong_kind_files_are_refused(tmp_path):
    with pytest.raises(WeightFileError, match="given as the DAPE weights but it is the RAM checkpoint"):
        load_dape_tagger(RAM, RAM)
    with pytest.raises(WeightFileError, match="given as the RAM weights but it is a DAPE LoRA file"):
        load_dape_tagger(DAPE, DAPE)
    with pytest.raises(WeightFileError, match="given as the RAM weights but it is a DAPE LoRA file"):
        load_dape_tagger(DAPE, RAM)
    osediff = tmp_path / "osediff.pkl"
    torch.save({"state_dict_unet": {"a": torch.zeros(1)}, "state_dict_vae": {}, "rank_unet": 4, "rank_vae": 4},
               osediff)
    with pytest.raises(WeightFileError, match="given as the RAM weights but it is an OSEDiff weight file"):
        load_dape_tagger(str(osediff), DAPE)
    with pytest.raises(WeightFileError, match="given as the DAPE weights but it is an OSEDiff weight file"):
        load_dape_tagger(RAM, str(osediff))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(WeightFileError):
        load_dape_tagger(str(junk), DAPE)
    with pytest.raises(WeightFileError, match="converted DAPE file"):
        load_dape_tagger(converted_path=RAM)
    with pytest.raises(WeightFileError, match="either"):
        load_dape_tagger(RAM, DAPE, converted_path=RAM)
    with pytest.raises(WeightFileError, match="both"):
        load_dape_tagger(RAM)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the evil pickle is of protocol 4
def test_code_running_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"visual_encoder.x": _Evil(str(marker))}}, evil, pickle_protocol=2)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"a.lora_A": _Evil(str(marker))}, f)
    for ram, lora in ((str(evil), DAPE), (RAM, str(evil)), (str(tmp_path / "evil.pkl"), DAPE),
                      (RAM, str(tmp_path / "evil.pkl"))):
        with pytest.raises(WeightFileError, match="Refusing|Cannot read"):
            load_dape_tagger(ram, lora)
    with pytest.raises(WeightFileError):
        load_dape_tagger(converted_path=str(evil))
    assert not marker.exists()


def test_cli_prints_prompts_and_converts(fixture, tmp_path, capsys, monkeypatch):
    from comfyui_diffsr.cli.convert import main as convert_main
    from comfyui_diffsr.cli.dape import main

    _, smalls, _, tags = fixture
    paths = []
    for i in (0, 1):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(smalls[i]).save(p)
        paths.append(str(p))
    # --process-size 0: no short-side enlargement, so DAPE sees exactly the ×4 bicubic LQ of the fixture
    assert main(paths + ["--ram", RAM, "--dape", DAPE, "--process-size", "0", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{paths[0]}\t{tags[0]}, ,", f"{paths[1]}\t{tags[1]}, ,"]
    out = str(tmp_path / "dape.safetensors")
    assert convert_main(["dape", "--ram", RAM, "--dape", DAPE, "-o", out]) == 0
    capsys.readouterr()
    folder = tmp_path / "convert"  # a folder named as a command is an input like any other
    folder.mkdir()
    Image.fromarray(smalls[0]).save(folder / "img0.png")
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "--dape", out, "--process-size", "0", "--no-names", "--tags-only", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == tags[0]
    first = tags[1].split(", ")[0]
    assert main([paths[1], "--weights", out, "--process-size", "0", "--no-names", "--tags-only",
                 "--exclude", first, "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == ", ".join(tags[1].split(", ")[1:])
    assert main([paths[1], "--dape", out, "--process-size", "0", "--no-names", "--prompt", "hi",
                 "--max-tags", "2", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip().endswith(", hi,")
    assert main([paths[1], "--ram", DAPE, "--dape", RAM, "--device", "cpu"]) == 2
    assert "RAM weights" in capsys.readouterr().err
    bad = tmp_path / "img0b.png"  # between the two: named on stderr, the others still printed, exit 2
    bad.write_bytes(b"not an image")
    assert main([paths[0], str(bad), paths[1], "--dape", out, "--process-size", "0", "--no-names", "--device",
                 "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{tags[0]}, ,", "<failed>", f"{tags[1]}, ,"]
    assert "img0b.png: Cannot read image" in captured.err and "1 of 3 image(s) failed" in captured.err
    nested = tmp_path / "album" / "2019" / "img1.png"  # --recursive: the sub-folders' images too
    nested.parent.mkdir(parents=True)
    Image.fromarray(smalls[1]).save(nested)
    Image.fromarray(smalls[0]).save(tmp_path / "album" / "img0.png")
    assert main([str(tmp_path / "album"), "-r", "--dape", out, "--process-size", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{tmp_path / 'album' / 'img0.png'}\t{tags[0]}, ,",
                                                    f"{nested}\t{tags[1]}, ,"]


def test_cli_takes_osediffs_user_prompt_option(fixture, tmp_path, capsys):
    """The text after the tags is --user-prompt, as in ``diffsr osediff`` (whose --prompt skips DAPE), so a prompt
    checked here is given to osediff the same way; --prompt stays the same option for older scripts."""
    from comfyui_diffsr.cli.dape import main

    _, smalls, _, tags = fixture
    image = tmp_path / "img0.png"
    Image.fromarray(smalls[0]).save(image)
    common = [str(image), "--ram", RAM, "--dape", DAPE, "--process-size", "0", "--no-names", "--device", "cpu"]
    assert main(common + ["--user-prompt", "high quality"]) == 0
    assert capsys.readouterr().out == f"{tags[0]}, high quality,\n"
    assert main(common + ["--prompt", "high quality"]) == 0
    assert capsys.readouterr().out == f"{tags[0]}, high quality,\n"


def test_cli_recursive_help_speaks_of_no_outputs():
    """dape prints prompts and writes no files: its -r help does not promise outputs that mirror the sub-folders or
    an output folder left out, as osediff's does."""
    from comfyui_diffsr.cli.dape import build_parser
    from comfyui_diffsr.cli.osediff import build_parser as osediff_parser

    def recursive_help(parser):
        return next(a.help for a in parser._actions if "--recursive" in a.option_strings)

    assert recursive_help(build_parser()) == (
        "also the images in the sub-folders of a folder INPUT (hidden folders, links to folders and the output folders "
        "runs made are left out; a folder's hidden files, such as macOS's ._IMG.jpg, are never taken)")
    assert "the outputs mirror the sub-folders" in recursive_help(osediff_parser())
    assert "the output folder and the output folders earlier runs made are left out" in recursive_help(osediff_parser())


def test_cli_a_file_that_is_not_an_image_is_named_by_its_path(fixture, tmp_path, capsys):
    """A text file named .png is refused naming the file and what it is not, not with PIL's message about the
    file object it read (``<_io.BufferedReader name=...>``); the other images are still tagged."""
    from comfyui_diffsr.cli.dape import main

    _, smalls, _, tags = fixture
    (tmp_path / "a_notes.png").write_text("not an image")
    Image.fromarray(smalls[1]).save(tmp_path / "b.png")
    assert main([str(tmp_path), "--ram", RAM, "--dape", DAPE, "--process-size", "0", "--no-names",
                 "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["<failed>", f"{tags[1]}, ,"]
    notes = str(tmp_path / "a_notes.png")
    assert captured.err.splitlines()[0] == (f"error: {notes}: Cannot read image: it is not an image, or in a format "
                                            "Pillow cannot read. Export it as PNG or JPEG.")


def test_cli_an_animation_is_tagged_by_its_first_frame(fixture, tmp_path, capsys):
    """An animated GIF gives the tags of its first frame, with a note that does not speak of upscaling (dape
    upscales nothing)."""
    from comfyui_diffsr.cli.dape import main

    _, smalls, _, tags = fixture
    first, second = (Image.fromarray(smalls[i]).quantize(256).convert("RGB") for i in (0, 1))
    first.save(tmp_path / "anim.gif", save_all=True, append_images=[second])
    Image.open(tmp_path / "anim.gif").convert("RGB").save(tmp_path / "first.png")  # the first frame as decoded
    common = ["--ram", RAM, "--dape", DAPE, "--process-size", "0", "--no-names", "--device", "cpu"]
    assert main([str(tmp_path / "anim.gif"), *common]) == 0
    assert main([str(tmp_path / "first.png"), *common]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == captured.out.splitlines()[1]
    assert captured.err == f"note: {tmp_path / 'anim.gif'}: 2 frames (an animation or a multi-page file); only the " \
                           "first is read\n"


def test_cli_names_an_excluded_tag_that_is_not_a_tag(fixture, tmp_path, capsys):
    """--exclude with a misspelt tag (which would leave the tag meant in every prompt) says so on stderr; the tags
    it does name, in any case, are still left out."""
    from comfyui_diffsr.cli.dape import main

    _, smalls, _, tags = fixture
    image = tmp_path / "img1.png"
    Image.fromarray(smalls[1]).save(image)
    first = tags[1].split(", ")[0]
    assert main([str(image), "--ram", RAM, "--dape", DAPE, "--process-size", "0", "--no-names", "--tags-only",
                 "--exclude", f"{first.upper()}, dalmation ,no such tag", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == ", ".join(tags[1].split(", ")[1:])
    assert captured.err == ("note: --exclude: 'dalmation' (did you mean 'dalmatian'?), 'no such tag': not among DAPE's "
                            "tags (check the spelling)\n")


def test_cli_max_tags_0_keeps_every_tag_as_the_node(fixture, tmp_path, capsys):
    """--max-tags 0 means all tags, as max_tags 0 on the DAPE Prompt Extractor node (a setting copied from a
    workflow gave an empty prompt); N keeps the N most probable."""
    from comfyui_diffsr.cli.dape import main

    _, smalls, _, tags = fixture
    image = tmp_path / "img1.png"
    Image.fromarray(smalls[1]).save(image)
    common = [str(image), "--ram", RAM, "--dape", DAPE, "--process-size", "0", "--no-names", "--tags-only",
              "--device", "cpu"]
    assert main(common + ["--max-tags", "0"]) == 0
    assert capsys.readouterr().out == f"{tags[1]}\n"
    assert main(common + ["--max-tags", "1"]) == 0
    assert capsys.readouterr().out.strip() in tags[1].split(", ")
    assert main(common + ["--max-tags", "-1"]) == 2
    assert "--max-tags must be 0 (all tags) or more" in capsys.readouterr().err


def test_cli_a_damaged_multi_page_file_fails_alone(fixture, tmp_path, capsys):
    """A 2-page TIFF cut at a third (PIL raises TypeError as it counts the pages) is named on one line; the images
    after it are still tagged, and the command exits with status 2."""
    from comfyui_diffsr.cli.dape import main

    _, smalls, _, tags = fixture
    pages = io.BytesIO()
    Image.fromarray(smalls[0]).save(pages, format="TIFF", save_all=True, append_images=[Image.fromarray(smalls[1])])
    cut = tmp_path / "a_pages.tif"
    cut.write_bytes(pages.getvalue()[:len(pages.getvalue()) // 3])
    Image.fromarray(smalls[1]).save(tmp_path / "b.png")
    assert main([str(tmp_path), "--ram", RAM, "--dape", DAPE, "--process-size", "0", "--no-names",
                 "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["<failed>", f"{tags[1]}, ,"]
    assert f"error: {cut}: Cannot read image" in captured.err and "1 of 2 image(s) failed" in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                                                 "can't allocate memory: you tried to allocate 2304000000 bytes."),
                                    MemoryError()], ids=["cpu-allocator", "memory-error"])
def test_cli_an_image_too_large_for_memory_fails_alone(fixture, tmp_path, capsys, monkeypatch, error):
    """A photo whose ×upscale LQ does not fit in memory (PyTorch's CPU allocator refuses it, or Python's
    MemoryError) is named on one line with the fix; the images after it are still tagged, exit status 2."""
    from comfyui_diffsr.cli.dape import main

    _, smalls, _, tags = fixture
    Image.fromarray(smalls[0]).resize((64, 48)).save(tmp_path / "a_large.png")
    Image.fromarray(smalls[1]).save(tmp_path / "b.png")
    lq_as_read = dape.lq_as_read

    def lq_without_memory_for_the_large(image, **sizing):
        if image.shape[-1] == 64:
            raise error
        return lq_as_read(image, **sizing)

    monkeypatch.setattr(dape, "lq_as_read", lq_without_memory_for_the_large)
    assert main([str(tmp_path), "--ram", RAM, "--dape", DAPE, "--process-size", "0", "--upscale", "8", "--no-names",
                 "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["<failed>", f"{tags[1]}, ,"]
    assert (f"error: {tmp_path / 'a_large.png'}: out of memory: DAPE tags the image enlarged ×8, as OSEDiff does. "
            "Give a smaller --upscale, or downscale the image.") in captured.err
    assert "1 of 2 image(s) failed" in captured.err and "Traceback" not in captured.err


def test_cli_no_names_keeps_one_line_per_input(fixture, tmp_path, capsys, monkeypatch):
    """With --no-names the Nth line is the Nth image's prompt, as a script pairs them (``paste names.txt -``): an
    image that failed (unreadable; out of memory) printed no line, and every later prompt came a line early, beside
    the name before its own. It prints a line of its own (``<failed>``), and is named on stderr as before (exit
    status 2)."""
    from comfyui_diffsr.cli.dape import main

    _, smalls, _, tags = fixture
    paths = [tmp_path / name for name in ("img0.png", "notes.png", "img1.png", "large.png")]
    Image.fromarray(smalls[0]).save(paths[0])
    paths[1].write_text("not an image")
    Image.fromarray(smalls[1]).save(paths[2])
    Image.fromarray(smalls[1]).resize((64, 48)).save(paths[3])
    lq_as_read = dape.lq_as_read

    def lq_without_memory_for_the_large(image, **sizing):
        if image.shape[-1] == 64:
            raise MemoryError()
        return lq_as_read(image, **sizing)

    monkeypatch.setattr(dape, "lq_as_read", lq_without_memory_for_the_large)
    common = ["--ram", RAM, "--dape", DAPE, "--process-size", "0", "--device", "cpu"]
    assert main([*map(str, paths), *common, "--no-names"]) == 2
    captured = capsys.readouterr()
    assert captured.out == f"{tags[0]}, ,\n<failed>\n{tags[1]}, ,\n<failed>\n"
    assert f"error: {paths[1]}: Cannot read image" in captured.err
    assert f"error: {paths[3]}: out of memory" in captured.err
    assert main([*map(str, paths), *common]) == 2  # named lines say whose they are: a failed image has none
    assert capsys.readouterr().out == f"{paths[0]}\t{tags[0]}, ,\n{paths[2]}\t{tags[1]}, ,\n"


def test_cli_no_names_tells_a_failed_image_from_one_without_tags(fixture, tmp_path, capsys):
    """``--no-names --tags-only`` printed an empty line both for an image that got no tags and for one that failed
    (named on stderr alone), so a script reading stdout took an unreadable file for an image without tags. A failed
    image prints ``<failed>``, which no tag list or prompt can be (each starts with a tag's letter or digit, or ", "
    without tags); an image without tags keeps its empty line. A --user-prompt holding a line break split each
    image's line in two; it is refused (the tokenizer reads it as a space), a carriage return or U+2028 too."""
    from comfyui_diffsr.cli.dape import FAILED_LINE, main

    assert all(name[0].isalnum() and name[0] != FAILED_LINE[0] for name in dape.read_tag_data()[0])
    _, smalls, _, tags = fixture
    black, broken, photo = tmp_path / "black.png", tmp_path / "broken.png", tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(black)  # the tiny tagger finds no tag in it
    broken.write_text("not an image")
    Image.fromarray(smalls[1]).save(photo)
    common = ["--ram", RAM, "--dape", DAPE, "--process-size", "0", "--no-names", "--device", "cpu"]
    assert main([str(black), str(broken), str(photo), *common, "--tags-only"]) == 2
    assert capsys.readouterr().out.split("\n") == ["", "<failed>", tags[1], ""]
    assert main([str(black), str(broken), *common]) == 2
    assert capsys.readouterr().out.split("\n") == [", ,", "<failed>", ""]
    for broken_line in ("high\nquality", "high\rquality", "high\u2028quality"):  # each a line break to splitlines
        assert main([str(photo), *common, "--user-prompt", broken_line]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and "--user-prompt holds a line break" in captured.err
    assert main([str(photo), *common, "--user-prompt", "high quality"]) == 0


@pytest.mark.skipif(sys.platform == "win32", reason="Windows file names cannot hold tabs or line breaks")
def test_cli_names_with_tabs_and_line_breaks_stay_one_line(fixture, tmp_path, capsys):
    from comfyui_diffsr.cli.common import escaped_name
    from comfyui_diffsr.cli.dape import main

    _, smalls, _, tags = fixture
    odd = tmp_path / "a\tb\nc\\d\re.png"
    Image.fromarray(smalls[0]).save(odd)
    plain = tmp_path / "plain.png"
    Image.fromarray(smalls[1]).save(plain)
    assert main([str(odd), str(plain), "--ram", RAM, "--dape", DAPE, "--process-size", "0", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[-1] == "" and len(lines) == 3  # two lines, each ended by its line break
    assert lines[0] == "\\" + str(tmp_path).replace("\\", "\\\\") + "/a\\tb\\nc\\\\d\\re.png\t" + f"{tags[0]}, ,"
    assert lines[1] == f"{plain}\t{tags[1]}, ,"
    assert escaped_name("x/y.png") == "x/y.png"
    assert escaped_name("back\\slash.png") == "\\back\\\\slash.png"


def unescaped_name(field):
    """The name a ``<file>`` field of ``diffsr dape`` stands for, by the rule the README gives."""
    if not field.startswith("\\"):
        return field
    return re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)",
                  lambda m: {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}.get(m[1]) or chr(int(m[1][1:], 16)),
                  field[1:])


def test_cli_names_with_terminal_controls_are_escaped_on_stdout(fixture, tmp_path, capsys):
    """A file name holding ESC (a terminal's escape sequence: here one that sets the window title and one that
    clears the screen), another control character or a bidirectional control (U+202E prints the name reversed) went
    to stdout as it was; it is escaped as the messages show it, on a line starting with a backslash, and every
    ``<file>`` field gives its name back by the README's rule."""
    from comfyui_diffsr.cli.common import escaped_name, shown_name
    from comfyui_diffsr.cli.dape import main

    _, smalls, _, tags = fixture
    odd = tmp_path / "a\x1b]0;owned\x07b\x1b[2J\u202egnp.exe\x7f.png"
    Image.fromarray(smalls[0]).save(odd)
    assert main([str(odd), "--ram", RAM, "--dape", DAPE, "--process-size", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out == f"\\{tmp_path}/a\\x1b]0;owned\\x07b\\x1b[2J\\u202egnp.exe\\x7f.png\t{tags[0]}, ,\n"
    for name in (str(odd), "a\tb\nc\\d\re.png", "\\x1b.png", "\\\\u202e\u2028.png", "👩\u200d💻 Café.png", "x\\",
                 "\u3164.png", "photo\ufe0f\u2800.png"):
        field = escaped_name(name)
        assert unescaped_name(field) == name and shown_name(field) == field and "\\u200d" not in field, field
    invisible = "a\u200bb\u200dc\xad\ufeff\U000e0041.png"  # names that print as another's: "abc.png"
    assert escaped_name(invisible) == "\\a\\u200bb\\u200dc\\xad\\ufeff\\U000e0041.png"
    assert unescaped_name(escaped_name(invisible)) == invisible


@pytest.mark.skipif(sys.platform != "linux", reason="a file name of bytes that are not UTF-8: Linux file systems")
def test_cli_names_not_utf8_and_a_closed_pipe(fixture, tmp_path, child_env):
    """A name whose bytes are not UTF-8 is printed as those bytes (as sha256sum does), even where stdout is strict
    UTF-8; a reader that stops (``dape … | head -1``) ends the command quietly with SIGPIPE's status."""
    _, smalls, _, tags = fixture
    odd = os.path.join(os.fsencode(tmp_path), b"bad\xffname.png")
    Image.fromarray(smalls[0]).save(os.fsdecode(odd))  # a str path: Pillow < 10.1 takes no bytes one
    command = [sys.executable, "-m", "comfyui_diffsr", "dape", str(tmp_path), "--ram", RAM, "--dape", DAPE,
               "--process-size", "0", "--device", "cpu"]
    env = child_env(PYTHONIOENCODING="utf-8:strict")
    done = subprocess.run(command, capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout == odd + b"\t" + f"{tags[0]}, ,".encode() + b"\n"
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    with os.fdopen(write, "wb") as closed:
        stopped = subprocess.run(command, stdout=closed, stderr=subprocess.PIPE, env=env, timeout=300)
    assert stopped.returncode == 141 and b"Traceback" not in stopped.stderr and b"Broken" not in stopped.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="a file name of bytes that are not UTF-8: Linux file systems")
@pytest.mark.parametrize("encoding", ["cp1252", "cp1252:strict"])
def test_cli_names_its_stdout_encoding_lacks(fixture, tmp_path, encoding, child_env):
    """On Windows a stdout that is a file or pipe writes the code page, strictly (cp1252): a name it lacks (写真,
    an emoji, Łódź) ended ``dape`` with a UnicodeEncodeError half way through a folder, its other images untagged.
    Each such character is escaped, on a line starting with a backslash that gives the name back; a name that is
    not UTF-8 still prints as its bytes, and the others as they are."""
    _, smalls, _, tags = fixture
    names = ["a.png", "caf\u00e9.png", "x\udce9.png", "\u0141\u00f3d\u017a.png", "\u5199\u771f.png", "\U0001f469.png"]
    for name in names:
        Image.fromarray(smalls[0]).save(tmp_path / name)
    command = [sys.executable, "-m", "comfyui_diffsr", "dape", str(tmp_path), "--ram", RAM, "--dape", DAPE,
               "--process-size", "0", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, env=child_env(PYTHONIOENCODING=encoding), timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    folder, prompt = str(tmp_path).encode() + b"/", f"\t{tags[0]}, ,".encode()
    fields = [folder + b"a.png", folder + b"caf\xe9.png", folder + b"x\xe9.png",
              b"\\" + folder + b"\\u0141\xf3d\\u017a.png", b"\\" + folder + b"\\u5199\\u771f.png",
              b"\\" + folder + b"\\U0001f469.png"]
    assert done.stdout == b"".join(field + prompt + b"\n" for field in fields)
    assert [unescaped_name(field.decode("cp1252")) for field in fields[3:]] == [str(tmp_path / n) for n in names[3:]]


def test_low_precision_runs(fixture):
    ups, _, logits, _ = fixture
    t = load_dape_tagger(RAM, DAPE, dtype=torch.bfloat16)
    assert t.label_embed.dtype == torch.bfloat16 and t.thresholds.dtype == torch.float32
    out = t.logits(ups[0])
    assert out.dtype == torch.float32 and (out[0] - logits[0]).abs().max().item() < 0.5


@pytest.mark.parametrize("flags", [["--upscale", "0"], ["--upscale", "9"], ["--upscale", "1.5", "--official-sizing"],
                                   ["--process-size", "-1"], ["--process-size", "4097"],
                                   ["--process-size", "1000000000"]])
def test_cli_refuses_sizes_osediff_refuses(tmp_path, capsys, flags):
    """DAPE tags the LQ that OSEDiff sees, so it takes the sizes OSEDiff takes (--upscale 0 divided by zero)."""
    from comfyui_diffsr.cli.dape import main

    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(image)
    assert main([str(image), "--ram", RAM, "--dape", DAPE, "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert "must be" in err or "integer --upscale" in err, err


def test_preprocess_downscales_as_the_official_without_antialias(tagger):
    """The official RAM transform (torchvision 0.15 Resize on a tensor) resizes bilinearly without antialiasing: a
    768×768 LQ halved to 384 is exactly the mean of each 2×2 block, normalised with ImageNet's mean and std. An
    antialiased resize blurs over more pixels and the tags drift from the official ones."""
    image = torch.rand(1, 3, 768, 768, generator=torch.Generator().manual_seed(5))
    box = image.reshape(1, 3, 384, 2, 384, 2).mean(dim=(3, 5))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = tagger.preprocess(image)
    assert out.shape == (1, 3, 384, 384) and out.dtype == torch.float32
    torch.testing.assert_close(out, (box - mean) / std, atol=1e-5, rtol=0)


# (height, width, upscale, process size, official sizing): the ×upscale LQ shrunk to 384 (by 1.01 to 5.4), kept at
# 384 on one side or both, enlarged to it; fractional scales; small images enlarged first (a thin one capped);
# heights of several horizontal strips (ENLARGE_STRIP 64) with a part strip; 896 and 3200 px, lengths where PyTorch's
# float32 source position of a 384 px output lands just below a pixel that the exact position reaches. With official
# sizing: the ×upscale LQ shrunk to a multiple of 8 on both sides (formed whole); on one (made where read), down or
# across, at ×2, ×3, ×4, odd sides; sides of multiples of 8, left as they are (made where read): small images
# enlarged, ×8, ×2, ×1, 5000 px across and down
LQ_SIZES = [(30, 40, 4, 0, False), (97, 131, 4, 0, False), (100, 100, 3.84, 0, False), (96, 200, 4, 0, False),
            (50, 200, 2.5, 0, False), (77, 33, 7.3, 0, False), (200, 150, 1, 0, False), (200, 150, 1.3, 0, False),
            (13, 400, 8, 0, False), (150, 97, 4, 0, False), (130, 70, 1.5, 0, False), (97, 224, 4, 0, False),
            (40, 800, 4, 0, False), (20, 30, 4, 512, False), (5, 90, 4, 512, False), (300, 170, 2.7, 512, False),
            (61, 83, 3, 512, True), (129, 97, 2, 0, True), (100, 1251, 4, 0, True), (64, 48, 4, 512, True),
            (30, 40, 4, 512, True), (75, 41, 8, 0, True), (52, 300, 2, 0, True), (16, 5000, 1, 0, True),
            (1250, 10, 4, 0, True), (101, 200, 4, 0, True), (200, 101, 4, 0, True), (257, 160, 3, 0, True),
            (160, 257, 3, 0, True), (251, 300, 2, 0, True), (300, 251, 2, 0, True), (5, 999, 3, 0, True)]


@pytest.mark.parametrize("eight_bit", [True, False], ids=["8-bit", "16-bit"])
def test_the_tagger_reads_the_same_numbers_from_lq_as_read_as_from_the_whole_lq(tagger, eight_bit):
    """diffsr dape forms OSEDiff's ×upscale LQ only at the rows and columns the tagger's resize to 384 reads
    (lq_as_read): there, and so in what the tagger reads and in its tags, the numbers must be the whole LQ's, bit for
    bit, on PIL's 8-bit path and on its float path (a 16-bit image)."""
    from comfyui_diffsr.osediff_core.pipeline import preprocess

    generator = torch.Generator().manual_seed(3)
    for height, width, upscale, process_size, official in LQ_SIZES:
        image = torch.randint(0, 256, (1, 3, height, width), generator=generator) / 255
        if not eight_bit:
            image = torch.randint(0, 65536, (1, 3, height, width), generator=generator) / 65535
        sizing = dict(upscale=upscale, process_size=process_size, official_sizing=official)
        whole, ours = preprocess(image, **sizing)[0], dape.lq_as_read(image, **sizing)
        case = (height, width, upscale, process_size, official)
        assert ours.shape == whole.shape, case
        rows, columns = dape.read_indices(whole.shape[-2])[:, None], dape.read_indices(whole.shape[-1])
        assert torch.equal(ours[..., rows, columns], whole[..., rows, columns]), case
        assert torch.equal(tagger.preprocess(ours), tagger.preprocess(whole)), case


def peak_memory_kb():
    """This process's peak resident memory (VmHWM) since it was last reset (``/proc/self/clear_refs``: 5)."""
    with open("/proc/self/status", encoding="ascii") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read())[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak memory is read from /proc (Linux)")
@pytest.mark.parametrize("height, width, share", [(1500, 2000, 0.5), (1500, 2001, 1), (1501, 2000, 1)])
def test_official_sizing_makes_the_lq_only_where_read_where_it_shrinks_one_side_or_none(height, width, share):
    """diffsr dape --official-sizing formed OSEDiff's whole ×upscale LQ (5.98 GB at the peak for a 4000×3000 photo
    at ×4, not 0.89 GB) though its shrink to a multiple of 8 leaves an even-sized photo at ×4 as it is: there the LQ
    is made only where the tagger reads it, as without. A 2000×1500 photo at ×4: the whole LQ is 576 MB (float32),
    the peak grows by less than half of that. With one odd side the shrink is one LANCZOS pass across or down, made
    at the lines the tagger's reads need: 2001×1500 grew the peak by 2.2 GB, now by 0.34 GB, less than the whole
    LQ (both odd: two passes in an order Pillow picks by its version, the LQ formed whole)."""
    image = torch.randint(0, 256, (1, 3, height, width), generator=torch.Generator().manual_seed(4)) / 255
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")  # the peak from here
    except OSError as e:
        pytest.skip(f"the peak memory cannot be reset here ({e})")
    before = peak_memory_kb()
    lq = dape.lq_as_read(image, upscale=4, process_size=512, official_sizing=True)
    grown = (peak_memory_kb() - before) * 1024
    assert lq.shape == (1, 3, 6000, 8000) and grown < lq.numel() * 4 * share, grown


def test_a_16_bit_image_whose_lines_read_are_of_8_bits_is_formed_whole():
    """PIL resizes an image on its 8-bit path where every value is of 8 bits (``is_8bit``), the whole ×upscale LQ's
    choice: a 16-bit image of 8 bits (within 1e-4) but at a pixel the tagger's lines do not reach takes the float
    path, which a shrink of those lines alone would not, and gives other numbers there. Its LQ is formed whole."""
    from comfyui_diffsr.osediff_core.pipeline import preprocess

    columns = dape.read_indices(8000)  # of the 4000 px wide image at ×2
    far = next(c for c in range(100, 3900) if not any(2 * c - 8 <= int(read) <= 2 * c + 9 for read in columns))
    image = torch.full((1, 3, 5, 4000), 100 / 255 + 1e-7)
    image[..., 2, far] = 0.12345  # not of 8 bits
    sizing = dict(upscale=2, process_size=0, official_sizing=True)  # 10 rows shrunk to 8: one pass, down
    whole, ours = preprocess(image, **sizing)[0], dape.lq_as_read(image, **sizing)
    rows = dape.read_indices(8)[:, None]
    assert torch.equal(ours[..., rows, columns], whole[..., rows, columns])
    assert not torch.equal(whole[..., rows, columns], torch.full_like(whole[..., rows, columns], 100 / 255))


@pytest.mark.parametrize("length", [1, 2, 383, 385, 1000, 499_999, 1_500_007, 2_000_003, 4_000_037])
def test_read_indices_are_every_pixel_the_resize_reads(length):
    """The tagger's resize to 384 reads nothing but ``read_indices``: a line with other pixels zeroed resizes to the
    same numbers. Past a million pixels (a 250000×1 panorama strip at ×8) PyTorch's float32 source position is off
    by more than a pixel, and a fixed three candidates from the lowest it may be missed the pixels it read."""
    import torch.nn.functional as F

    line = torch.rand(1, 1, 1, length, generator=torch.Generator().manual_seed(length)) + 0.5
    read = torch.zeros_like(line)
    read[..., dape.read_indices(length)] = line[..., dape.read_indices(length)]
    resized = [F.interpolate(x, size=(1, 384), mode="bilinear", align_corners=False, antialias=False)
               for x in (line, read)]
    assert torch.equal(*resized)


def test_an_lq_too_large_to_map_is_out_of_memory():
    """lq_as_read's LQ is an anonymous memory map (zeros_taken_when_written): where the system refuses it, that is a
    MemoryError, which diffsr dape names as out of memory, not mmap's OSError (a traceback)."""
    from comfyui_diffsr.sr_common.image import zeros_taken_when_written

    with pytest.raises(MemoryError, match="Cannot map 4611686014132420608 bytes"):
        zeros_taken_when_written((1, 3, 2 ** 30, 2 ** 30 // 3))


def forced_logits(tagger, chosen):
    """Logits (1, num_tags) that choose exactly the tags named in ``chosen`` (far above / below every threshold)."""
    logits = torch.full((1, len(tagger.tag_names)), -20.0)
    for name in chosen:
        logits[0, tagger.tag_names.index(name)] = 20.0
    return logits


def test_exclude_removes_capitalised_tags_in_any_case(tagger):
    """RAM's tag list has capitalised tags ("American shorthair", "French fries"): excluding one, written as in the
    list or in lower case, removes it (a case-sensitive match left it in the prompt), and is a known tag."""
    logits = forced_logits(tagger, ["American shorthair", "cat", "dog"])
    assert tagger.select(logits) == ["American shorthair, cat, dog"]
    for written in ("American shorthair", "american shorthair", "AMERICAN SHORTHAIR"):
        assert tagger.select(logits, exclude=[written]) == ["cat, dog"], written
    # and none of them is taken for a misspelling (the CLI's note, the node's refusal)
    assert tagger.unknown_tags(["American shorthair", "american shorthair", "AMERICAN SHORTHAIR", " Cat "]) == []


def test_exclude_ignores_spaces_around_a_tag(tagger):
    """An exclude list typed as "cat , dog" gives " cat " and " dog": spaces around a tag do not stop it being
    excluded."""
    logits = forced_logits(tagger, ["American shorthair", "cat", "dog"])
    assert tagger.select(logits, exclude=[" cat "]) == tagger.select(logits, exclude=["cat"]) == [
        "American shorthair, dog"]
    assert tagger.select(logits, exclude=["\tdog\n", " American shorthair"]) == ["cat"]


def test_converted_file_with_a_tensor_of_the_wrong_shape_names_it(tmp_path):
    """A converted DAPE file whose tensor has another shape than the stored architecture (edited, or written by
    another tool) is refused as a weight file naming the tensor, not with PyTorch's load_state_dict error."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    good, bad = str(tmp_path / "dape.safetensors"), str(tmp_path / "bad.safetensors")
    convert_dape(RAM, DAPE, good)
    with safe_open(good, "pt") as f:
        meta = f.metadata()
    state = load_file(good)
    key = "image_proj.weight"
    rows, cols = state[key].shape
    state[key] = torch.zeros(rows, cols + 1)
    save_file(state, bad, metadata=meta)
    with pytest.raises(WeightFileError, match=rf"image_proj\.weight has shape \({rows}, {cols + 1}\) in the file, "
                                              rf"\({rows}, {cols}\) expected"):
        load_dape_tagger(converted_path=bad)


def test_convert_refuses_a_wrong_output_name_before_reading_the_weights(tmp_path):
    """``convert dape`` to a name not ending in .safetensors is refused at once, before the RAM file (5.6 GB for the
    real one) is read: here the inputs do not even exist and the output name is what is named."""
    with pytest.raises(WeightFileError, match=r"^The output .*dape\.pth.* must end in \.safetensors"):
        convert_dape(str(tmp_path / "absent_ram.pth"), str(tmp_path / "absent_dape.pth"), str(tmp_path / "dape.pth"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["osediff", "dape", "dossr"])
def test_convert_names_an_output_problem_before_reading_the_input(tmp_path, capsys, kind):
    """``diffsr convert`` to an output that exists, or whose folder is a file, is refused before the input is read
    (the official DoSSR ckpt and RAM file are 5 GB or more): here the input does not even exist, and the output is
    what is named; nothing is written."""
    from comfyui_diffsr.cli.convert import main

    absent = str(tmp_path / "absent.pth")
    taken, blocker = tmp_path / "taken.safetensors", tmp_path / "a_file"
    taken.write_bytes(b"earlier")
    blocker.write_bytes(b"")
    not_a_folder = r"a_file.out\.safetensors': .*a_file' is not a writable folder"
    for out, message in ((taken, "taken.safetensors' exists; choose another output name"),
                         (blocker / "out.safetensors", not_a_folder)):
        args = {"dape": ["dape", "--ram", absent, "--dape", absent, "-o", str(out)]}.get(kind, [kind, absent, str(out)])
        assert main(args) == 2
        assert re.search(message, capsys.readouterr().err)
    assert taken.read_bytes() == b"earlier" and sorted(os.listdir(tmp_path)) == ["a_file", "taken.safetensors"]


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links need a privilege on Windows")
def test_convert_refuses_an_output_that_is_a_link_to_nothing(tmp_path, capsys):
    """An output name held by a link to nothing is taken, as by a file, and named before the input is read (it was
    found only when the finished file was moved into place, as 'check that its folder is writable')."""
    from comfyui_diffsr.cli.convert import main

    os.symlink(tmp_path / "nowhere", tmp_path / "link.safetensors")
    assert main(["osediff", str(tmp_path / "absent.pkl"), str(tmp_path / "link.safetensors")]) == 2
    assert "link.safetensors' exists; choose another output name" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["link.safetensors"]


def test_cli_refuses_converted_weights_given_with_ram_or_dape(tmp_path, capsys):
    """--weights (a converted tagger) with --ram or --dape too: which file tags the images would be a guess, so
    the command refuses, before any weights are read."""
    from comfyui_diffsr.cli.dape import main

    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16), "gray").save(image)
    for extra in (["--ram", RAM], ["--dape", DAPE]):
        assert main([str(image), "--weights", str(tmp_path / "missing.safetensors"), *extra, "--device", "cpu"]) == 2
        assert "Give --weights (converted) alone" in capsys.readouterr().err


QKV = "visual_encoder.layers.0.blocks.0.attn.qkv"
QUERY = "tagging_head.encoder.layer.{}.crossattention.self.query"


def _small_state():
    """A tagging state of two head layers and one Swin qkv (hidden 6), zeros: enough for ``merge_dape``."""
    state = {f"{QKV}.weight": torch.zeros(18, 6)}
    state.update({QUERY.format(i) + ".weight": torch.zeros(6, 6) for i in range(2)})
    return state


@pytest.mark.parametrize("lora, message", [
    ({f"{QKV}.lora_A": torch.ones(15, 6), f"{QKV}.lora_B": torch.ones(12, 7)}, r"shapes \(15, 6\) / \(12, 7\) do "
                                                                                r"not fit 2 groups"),
    ({f"{QKV}.lora_A": torch.ones(16, 6), f"{QKV}.lora_B": torch.ones(12, 4)}, r"lora_B has rank 4, lora_A rank 8"),
    ({"visual_encoder.layers.1.blocks.0.attn.qkv.lora_A": torch.ones(16, 6),
      "visual_encoder.layers.1.blocks.0.attn.qkv.lora_B": torch.ones(12, 8)},
     r"no matching weight visual_encoder\.layers\.1\.blocks\.0\.attn\.qkv\.weight in the RAM checkpoint: the DAPE "
     r"and RAM files do not belong together"),
    ({f"{QKV}.lora_A": torch.ones(16, 5), f"{QKV}.lora_B": torch.ones(12, 8)},
     r"gives \(18, 5\) but visual_encoder\.layers\.0\.blocks\.0\.attn\.qkv\.weight is \(18, 6\): the DAPE and RAM "
     r"files do not belong together"),
    ({"text_decoder.x.lora_A": torch.ones(8, 6), "text_decoder.x.lora_B": torch.ones(6, 8)},
     r"the DAPE file lacks the LoRA of 3 of the 3 tagging modules DAPE adapts \(visual_encoder\.layers\.0\.blocks\.0"
     r"\.attn\.qkv, tagging_head\.encoder\.layer\.0\.crossattention\.self\.query, tagging_head\.encoder\.layer\.1"
     r"\.crossattention\.self\.query\): it is damaged or partly saved; download DAPE\.pth again"),
], ids=["groups", "rank", "no-weight", "shape", "nothing-on-the-path"])
def test_merge_dape_refusals_name_the_problem(lora, message):
    """LoRA shapes that do not split into the q/v groups, a lora_B of another rank, a LoRA for a weight RAM lacks or
    of another shape, and a file with nothing on the tagging path: each refused with what is wrong."""
    with pytest.raises(WeightFileError, match=message):
        dape.merge_dape(_small_state(), lora, 2)


def test_a_head_with_a_layer_gap_is_not_a_tagging_head():
    """Head layers must be 0..n-1: layers 0 and 2 alone are refused (a layer is missing)."""
    state = {f"tagging_head.encoder.layer.{i}.crossattention.self.query.weight": torch.zeros(1) for i in (0, 2)}
    with pytest.raises(WeightFileError, match=r"no tagging head"):
        dape.model_config(state)


@pytest.mark.parametrize("which, change, message", [
    ("dape", lambda sd: {**sd, next(iter(sd)): sd[next(iter(sd))].long()},
     r"'dape\.pth': the DAPE LoRA tensor '.*lora_[AB]' is int64, but weights must be floating-point"),
    ("ram", lambda sd: {"model": {**sd["model"], "fc.weight": sd["model"]["fc.weight"].long()}},
     r"'ram\.pth': the RAM tensor 'fc\.weight' is int64, but weights must be floating-point"),
    ("ram", lambda sd: {"model": {k: v for k, v in sd["model"].items() if k != "fc.bias"}},
     r"The RAM checkpoint 'ram\.pth' lacks 1 tagging tensors \(e\.g\. \['fc\.bias'\]\); the file is incomplete"),
    ("ram", lambda sd: {"model": {**sd["model"], "label_embed": sd["model"]["label_embed"][:10]}},
     r"'ram\.pth' \+ 'dape\.pth': the weights have 10 tags but the shipped RAM tag list has 4585: not the RAM "
     r"4585-tag model"),
], ids=["dape-int64", "ram-int64", "ram-missing-a-tagging-tensor", "ram-of-10-tags"])
def test_damaged_official_files_are_named(tmp_path, which, change, message):
    """Integer LoRA or RAM tensors, a RAM file missing a tagging tensor, and a RAM model of another tag count: each
    refused naming the file and the tensor or count."""
    files = {"ram": RAM, "dape": DAPE}
    paths = {name: str(tmp_path / f"{name}.pth") for name in files}
    for name, src in files.items():
        sd = torch.load(src, weights_only=True)
        torch.save(change(sd) if name == which else sd, paths[name])
    with pytest.raises(WeightFileError, match=message):
        load_dape_tagger(paths["ram"], paths["dape"])


def _without(*prefixes):
    return lambda sd: {k: v for k, v in sd.items() if not k.startswith(prefixes)}


@pytest.mark.parametrize("drop, message", [
    (_without("visual_encoder.layers.2.", "visual_encoder.layers.3."),
     r"^'ram_tiny\.pth' \+ 'dape\.pth': the DAPE file lacks the LoRA of 4 of the 12 tagging modules DAPE adapts "
     r"\(visual_encoder\.layers\.2\.blocks\.0\.attn\.qkv, visual_encoder\.layers\.2\.blocks\.1\.attn\.qkv, "
     r"visual_encoder\.layers\.3\.blocks\.0\.attn\.qkv, \.\.\.\): it is damaged or partly saved; download "
     r"DAPE\.pth again\.$"),
    (_without("tagging_head.encoder.layer.1.crossattention.self.query."),
     r"lacks the LoRA of 1 of the 12 tagging modules DAPE adapts \(tagging_head\.encoder\.layer\.1\.crossattention"
     r"\.self\.query\): it is damaged"),
], ids=["half-the-swin-layers", "a-head-query"])
def test_a_dape_file_missing_part_of_the_tagging_lora_is_refused(tmp_path, drop, message):
    """DAPE.pth holds the LoRA of every Swin ``attn.qkv`` and every tagging-head cross-attention query and key: a file
    that lacks some (the Swin layers of its second half, one head query) would tag with a partly adapted model; it
    is refused naming how many are missing and the first few."""
    path = tmp_path / "dape.pth"
    torch.save(drop(torch.load(DAPE, weights_only=True)), path)
    with pytest.raises(WeightFileError, match=message):
        load_dape_tagger(RAM, str(path))


def test_a_dape_file_without_the_loras_off_the_tagging_path_loads(tmp_path):
    """The text decoder's and the tag encoder's LoRAs are not needed: the tag encoder's, merged where its lowest
    layers share the head's weights, never trained in SeeSR's DAPE (its B is zero in DAPE.pth), so a file without
    them loads, and tags as the full file less their (here non-zero) share."""
    path = tmp_path / "dape.pth"
    torch.save(_without("text_decoder.", "tag_encoder.")(torch.load(DAPE, weights_only=True)), path)
    tagger = load_dape_tagger(RAM, str(path))
    full = load_dape_tagger(RAM, DAPE)
    head = "tagging_head.encoder.layer.0.crossattention.self.query.weight"
    qkv = "visual_encoder.layers.3.blocks.1.attn.qkv.weight"
    assert torch.equal(tagger.state_dict()[qkv], full.state_dict()[qkv])
    assert not torch.equal(tagger.state_dict()[head], full.state_dict()[head])


def test_converted_file_with_an_extra_tensor_and_its_dtype_metadata(tmp_path):
    """A converted tagger with a tensor the tagger lacks is refused naming it; fp16 conversion says fp16 in its
    metadata (fp32 otherwise)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    for half, dtype in ((True, "fp16"), (False, "fp32")):
        out = tmp_path / f"{dtype}.safetensors"
        convert_dape(RAM, DAPE, str(out), half=half)
        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        assert meta["dtype"] == dtype
    save_file(dict(load_file(out), extra=torch.zeros(1)), tmp_path / "extra.safetensors", metadata=meta)
    with pytest.raises(WeightFileError, match=r"'extra\.safetensors': the weights do not fit the tagger: missing \[\], "
                                              r"unexpected \['extra'\]"):
        load_dape_tagger(converted_path=str(tmp_path / "extra.safetensors"))
