"""The README's sample command as ``tools/upscale_sample.sh`` runs it (less its pip installs), against a server on
127.0.0.1 that serves the official file names: ``python -m comfyui_diffsr download sd21-base osediff --models-dir
models``, then ``python -m comfyui_diffsr osediff sample/astronaut_128.png -o output --base … --weights …
--skip-existing``; run again, nothing is fetched and the output is kept."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from comfyui_diffsr.cli.main import main
from comfyui_diffsr.sr_common import download
from comfyui_diffsr.sr_common.image import pil_to_tensor

from conftest import DATA, copy_tiny_sd21, official_files_served, psnr

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample", "astronaut_128.png")
SD21_FILE = "v2-1_512-ema-pruned.safetensors"


@pytest.fixture()
def official_server(tmp_path):
    """The tiny SD 2.1 single file and the tiny osediff.pkl under their official names, each pinned by the hash kind
    of its real source: the SD 2.1 file by its SHA-256, osediff.pkl by its git blob id."""
    served = tmp_path / "served"
    with official_files_served({"sd21-base": os.path.join(DATA, "osediff", "tiny_sd21_single.safetensors"),
                                "osediff": os.path.join(DATA, "osediff", "osediff_tiny.pkl")},
                               download.OFFICIAL, served) as requests:
        yield served, requests


def test_sample_command_fetches_once_then_upscales_and_keeps_its_output(official_server, tmp_path, capsys):
    served, requests = official_server
    models, output = tmp_path / "models", tmp_path / "output"
    base_config = copy_tiny_sd21(tmp_path / "tiny_config")  # the real file needs none: its config is shipped
    fetch = ["download", "sd21-base", "osediff", "--models-dir", str(models)]
    upscale = ["osediff", SAMPLE, "-o", str(output), "--base", str(models / "checkpoints" / SD21_FILE),
               "--weights", str(models / "osediff" / "osediff.pkl"), "--skip-existing", "--base-config", base_config]

    assert main(fetch) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(models / "checkpoints" / SD21_FILE), str(models / "osediff" / "osediff.pkl")]
    for path in printed:
        assert open(path, "rb").read() == (served / os.path.basename(path)).read_bytes()
        assert os.path.isfile(path + ".sha256") and not os.path.exists(path + ".partial")
    assert main(upscale) == 0
    result = output / "astronaut_128.png"
    assert Image.open(result).size == (512, 512)
    written, stamp = result.read_bytes(), result.stat().st_mtime_ns

    fetched = len(requests)
    assert main(fetch) == 0 and main(upscale) == 0
    assert len(requests) == fetched == 2  # nothing fetched the second time
    assert result.read_bytes() == written and result.stat().st_mtime_ns == stamp


def test_a_download_that_does_not_verify_puts_nothing_in_place(official_server, tmp_path, capsys):
    served, _ = official_server
    for name in ("osediff.pkl", SD21_FILE):
        (served / name).write_bytes(b"not the official file")
    models = tmp_path / "models"
    assert main(["download", "osediff", "--models-dir", str(models)]) == 2
    assert "git blob id" in capsys.readouterr().err
    assert main(["download", "sd21-base", "--models-dir", str(models)]) == 2
    assert "SHA-256" in capsys.readouterr().err
    assert not models.exists()  # nothing in place, and no empty folders made for the files


def test_a_download_that_fails_leaves_the_others_to_be_fetched(official_server, tmp_path, capsys):
    """``diffsr download sd21-base osediff osediff`` where the SD 2.1 file does not verify: it is named, osediff.pkl
    is still fetched (once, though named twice), and the command exits with status 2 listing the failure."""
    served, requests = official_server
    (served / SD21_FILE).write_bytes(b"not the official file")
    models = tmp_path / "models"
    assert main(["download", "sd21-base", "osediff", "osediff", "--models-dir", str(models)]) == 2
    printed = capsys.readouterr()
    assert printed.out.split() == [str(models / "osediff" / "osediff.pkl")]
    assert (models / "osediff" / "osediff.pkl").read_bytes() == (served / "osediff.pkl").read_bytes()
    assert "error: sd21-base: " in printed.err and "SHA-256" in printed.err
    assert printed.err.rstrip().endswith("error: 1 of 2 download(s) failed: sd21-base")
    assert os.listdir(models) == ["osediff"] and len(requests) == 2  # no empty checkpoints folder


def test_a_download_stopped_with_ctrl_c_says_how_to_resume(official_server, tmp_path, capsys, monkeypatch):
    """Ctrl-C during ``diffsr download`` printed only 'interrupted': it says that the same command resumes (the part
    fetched is kept), and the same command then finishes the file."""
    from comfyui_diffsr.cli import download as download_command

    served, _ = official_server

    class InterruptedBar:  # Ctrl-C as the first data arrives (written to the partial file first)
        n = 0

        def __init__(self, **_):
            pass

        def update(self, _):
            raise KeyboardInterrupt

        def close(self):
            pass

    monkeypatch.setattr(download_command, "tqdm", InterruptedBar)
    fetch = ["download", "osediff", "--models-dir", str(tmp_path / "models")]
    assert main(fetch) == 130
    assert capsys.readouterr().err == ("interrupted: run the same command again to resume the download (the part "
                                       "fetched is kept as <file>.partial)\n")
    weights = tmp_path / "models" / "osediff" / "osediff.pkl"
    assert not weights.exists() and os.path.getsize(f"{weights}.partial") > 0
    monkeypatch.undo()
    assert main(fetch) == 0
    assert weights.read_bytes() == (served / "osediff.pkl").read_bytes() and not os.path.exists(f"{weights}.partial")


def test_an_empty_models_dir_is_refused(official_server, tmp_path, capsys, monkeypatch):
    """``--models-dir ""`` (an unset shell variable) is refused, not taken as the current folder, where the files
    would land in ./osediff/ and ./checkpoints/."""
    _, requests = official_server
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["download", "osediff", "--models-dir", ""]) == 2
    assert capsys.readouterr().err == ("error: --models-dir is empty; give the models folder, e.g. ComfyUI/models "
                                       "(default ./models).\n")
    assert os.listdir(work) == [] and not requests


def test_the_diffsr_entry_lists_its_commands(capsys, child_env):
    """--help lists the commands on stdout; an unknown command is named on stderr with the list, exit 2."""
    assert main(["--help"]) == 0 and main([]) == 2
    assert main(["upscale"]) == 2
    printed = capsys.readouterr()
    assert printed.out.startswith("usage:") and "error: unknown command 'upscale'" in printed.err
    assert "download" in printed.err.split("error:")[0]
    shown = subprocess.run([sys.executable, "-m", "comfyui_diffsr", "--help"], capture_output=True, text=True,
                           check=True, env=child_env()).stdout
    assert all(name in shown for name in ("osediff", "dape", "dossr", "convert", "download"))


def test_face_command_fetches_the_face_weights_and_restores_at_the_input_size(tmp_path, capsys):
    """The README's face restoration: ``diffsr download osediff-face``, then ``osediff … --weights osediff_face.pkl
    --upscale 1 --color-fix none`` (the official README's ``--upscale 1 --align_method nofix``). The served file is
    the tiny OSEDiff file, so the output is the official code's at x1 with no colour fix (``i40x48_x1_nofix``)."""
    fixtures = os.path.join(DATA, "osediff")
    with open(os.path.join(fixtures, "cases.json")) as f:
        case = next(c for c in json.load(f)["cases"] if c["name"] == "i40x48_x1_nofix")
    models, output = tmp_path / "models", tmp_path / "output"
    with official_files_served({"osediff-face": os.path.join(fixtures, "osediff_tiny.pkl")}, download.OFFICIAL,
                               tmp_path / "served") as requests:
        assert main(["download", "osediff-face", "--models-dir", str(models)]) == 0
    weights = models / "osediff" / "osediff_face.pkl"
    assert capsys.readouterr().out.split() == [str(weights)] and requests == ["/osediff_face.pkl"]
    assert main(["osediff", os.path.join(fixtures, case["input"]), "-o", str(output),
                 "--base", copy_tiny_sd21(tmp_path / "tiny_sd21"), "--weights", str(weights),
                 "--upscale", "1", "--color-fix", "none", "--prompt", case["prompt"],
                 "--process-size", str(case["process_size"]), "--official-sizing"]) == 0
    out = pil_to_tensor(Image.open(output / case["input"]))
    assert tuple(out.shape[-2:]) == (48, 40)
    assert psnr(out, pil_to_tensor(Image.open(os.path.join(fixtures, case["output"])))) >= 60
