"""What the Comfy Registry archive holds: the git-tracked files that no `.comfyignore` pattern matches, matched with
pathspec's gitwildmatch as comfy-cli's `file_utils.zip_files` does (`comfy node pack` / `comfy node publish`)."""
import os
import shutil
import subprocess
import warnings

import pytest

pathspec = pytest.importorskip("pathspec")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tracked_files():
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("needs a git checkout: the archive is made from `git ls-files`")
    out = subprocess.run(["git", "-C", ROOT, "ls-files"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def archive_files():
    """comfy-cli: patterns are the stripped non-empty lines not starting with '#'."""
    with open(os.path.join(ROOT, ".comfyignore"), encoding="utf-8") as f:
        patterns = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    with warnings.catch_warnings():  # pathspec >= 1.0 deprecates the name comfy-cli uses
        warnings.simplefilter("ignore", DeprecationWarning)
        spec = pathspec.PathSpec.from_lines("gitwildmatch", patterns)
    return [p for p in tracked_files() if not spec.match_file(p)]


def installed_files():
    """The files setuptools installed (`tools/run_tests.sh` installs the pack, not editable), relative to the checkout."""
    import comfyui_diffsr

    installed = os.path.dirname(os.path.abspath(comfyui_diffsr.__file__))
    if os.path.realpath(installed) == os.path.realpath(ROOT):
        pytest.skip("the pack is installed editable: `bash tools/run_tests.sh` installs the files setuptools ships")
    return {os.path.relpath(os.path.join(folder, n), installed).replace(os.sep, "/")
            for folder, _, names in os.walk(installed) if "__pycache__" not in folder for n in names}


def test_archive_keeps_what_comfyui_and_the_command_line_run_from():
    kept = set(archive_files())
    needed = installed_files() | {"README.md", "pyproject.toml", "requirements.txt", "__init__.py",
                                  "tools/upscale_sample.sh", "sample/astronaut_128.png"}
    assert {"nodes/__init__.py", "workflows/osediff_upscale.json",
            "workflows/api/osediff_upscale.json"} <= needed, "setuptools installed too little to compare"
    assert needed - kept == set(), "the registry archive would lack files the pack needs: fix .comfyignore"


def test_archive_leaves_out_tests_benchmarks_and_tools():
    kept = archive_files()
    dev = [p for p in kept if p.split("/")[0] in ("tests", "bench", ".ci")
           or (p.startswith("tools/") and p != "tools/upscale_sample.sh")]
    assert dev == []
    size = sum(os.path.getsize(os.path.join(ROOT, p)) for p in kept)
    assert size < 3_000_000, f"registry archive holds {size / 1e6:.1f} MB of files"
