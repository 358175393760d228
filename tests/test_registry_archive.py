"""What ships. The Comfy Registry archive: the git-tracked files that no `.comfyignore` pattern matches, matched with
pathspec's gitwildmatch as comfy-cli's `file_utils.zip_files` does (`comfy node pack` / `comfy node publish`). The wheel
that `pip install .` builds: the pack's files but the development ones, built without setuptools warnings."""
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tracked files outside the development folders that the wheel leaves out
NOT_IN_WHEEL = {"README.md", "pyproject.toml", "requirements.txt", "workflows/README.md", "sample/astronaut_128.png",
                "LICENSE"}  # the wheel's dist-info holds LICENSE (test_wheel_ships_the_pack_without_setuptools_warnings)


def tracked_files():
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("needs a git checkout: the archive is made from `git ls-files`")
    out = subprocess.run(["git", "-C", ROOT, "ls-files"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def archive_files():
    """comfy-cli: patterns are the stripped non-empty lines not starting with '#'."""
    pathspec = pytest.importorskip("pathspec")
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
    needed = installed_files() | {"README.md", "pyproject.toml", "requirements.txt", "__init__.py", "LICENSE",
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


def test_wheel_ships_the_pack_without_setuptools_warnings(tmp_path):
    """pip shows the build's warnings on `pip install .`: a data folder that is not listed in pyproject.toml's
    packages gets a 'Package would be ignored' block from setuptools, and a licence given as a TOML table a
    deprecation (such builds stop working after 2027-02-18, setuptools says)."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("pyproject.toml's build-system needs setuptools >= 77 (the test extra installs it)")
    source = tmp_path / "source"
    tracked = tracked_files()
    for rel in tracked:
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), source / rel)
    build = subprocess.run([sys.executable, "-W", "default", "-c",
                            "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))",
                            str(tmp_path)], cwd=source, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    log = build.stdout + build.stderr
    assert "would be ignored" not in log, "list the data folder in pyproject.toml's packages"
    assert "SetuptoolsDeprecationWarning" not in log, log[-3000:]
    with zipfile.ZipFile(tmp_path / build.stdout.split()[-1]) as wheel:
        shipped = {n.removeprefix("comfyui_diffsr/") for n in wheel.namelist() if n.startswith("comfyui_diffsr/")}
        licences = [n for n in wheel.namelist() if ".dist-info/licenses/" in n]
        metadata = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert [n.split("/licenses/")[1] for n in licences] == ["LICENSE"], "pyproject.toml's licence text is not shipped"
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    dev = ("tests/", "bench/", "tools/", ".")  # "." for .ci/, .comfyignore, .gitignore
    expected = {p for p in tracked if not p.startswith(dev)} - NOT_IN_WHEEL
    assert shipped == expected, "ship these (pyproject.toml's packages, package-data) or list them in NOT_IN_WHEEL"


def requirement_lines(path):
    """The requirement lines of a requirements-style file, comments and blank lines left out."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def release(text):
    """'1.24.4' → (1, 24, 4)."""
    return tuple(int(n) for n in text.split("."))


def test_requirements_and_the_oldest_versions_tested_match_pyproject():
    """requirements.txt (what ComfyUI-Manager installs, and what the pack checks at start) asks what pyproject.toml
    asks, less torch (ComfyUI's own); tools/oldest-supported.txt (CI's second run, the README's list) pins each of
    pyproject.toml's packages to a version it allows, of the release its lower bound names (torch 2.1 → 2.1.2)."""
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        block = re.search(r"^dependencies = \[(.*?)\]", f.read(), re.M | re.S).group(1)
    wanted = dict(re.fullmatch(r"([a-z]+)(>=.*)", spec).groups() for spec in re.findall(r'"([^"]+)"', block))
    assert {spec for spec in requirement_lines("requirements.txt")} == {
        name + spec for name, spec in wanted.items() if name != "torch"}
    pins = dict(line.split("==") for line in requirement_lines("tools/oldest-supported.txt"))
    assert set(pins) == set(wanted)
    for name, spec in wanted.items():
        low, high = re.fullmatch(r">=([\d.]+)(?:,<([\d.]+))?", spec).groups()
        pin = release(pins[name])
        assert pin[:len(release(low))] == release(low) and (high is None or pin < release(high)), (name, pins[name])
