"""CI's scripts: which Python the last runs of ``.ci/run`` (the suite on Python 3.13, then on 3.10) are given, its
runs of the loaders' tests with accelerate, and ``tools/run_tests.sh``'s DIFFSR_PYTHON and DIFFSR_WITH."""

import os
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_python(path, version):
    """An executable at ``path`` that answers any ``-c`` as a Python ``version`` ("3.13") prints its version."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\necho {version}\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


RUN_FIELDS = ("DIFFSR_VENV", "DIFFSR_PYTHON", "DIFFSR_TORCH", "DIFFSR_CONSTRAINTS", "DIFFSR_WITH")


def ci_runs(tmp_path, pyenv_versions, **env):
    """``.ci/run`` in a copy of the checkout whose ``tools/run_tests.sh`` records what each run is given, with a pyenv
    of ``pyenv_versions`` ({name: version printed}) and the venvs there already (no disk check): each run's
    ``RUN_FIELDS`` ({name: value}, DIFFSR_VENV .venv where unset) and its pytest arguments (``"args"``), in order, and
    what the script wrote to stderr."""
    root = tmp_path / "checkout"
    (root / ".ci").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, ".ci", "run"), root / ".ci" / "run")
    (root / "tools").mkdir()
    fields = "|".join("${%s:-%s}" % (name, ".venv" if name == "DIFFSR_VENV" else "") for name in RUN_FIELDS)
    (root / "tools" / "run_tests.sh").write_text(f'echo "{fields}|$*" >> runs.log\n')
    for venv in (".venv-oldest", ".venv-py313", ".venv-py310"):
        (root / venv).mkdir()
    pyenv = tmp_path / "pyenv"
    for name, version in pyenv_versions.items():
        fake_python(str(pyenv / "versions" / name / "bin" / "python3"), version)
    done = subprocess.run(["bash", str(root / ".ci" / "run")], capture_output=True, text=True,
                          env={**outside_environment(), "PYENV_ROOT": str(pyenv), **env})
    assert done.returncode == 0, done.stderr
    runs = [dict(zip((*RUN_FIELDS, "args"), line.split("|"))) for line in (root / "runs.log").read_text().splitlines()]
    return runs, done.stderr


def pythons_given_to_the_last_runs(tmp_path, pyenv_versions, **env):
    """{venv: DIFFSR_PYTHON} of ``.ci/run``'s runs on other Pythons (``ci_runs``; a run left out is absent), and what
    the script wrote to stderr."""
    runs, stderr = ci_runs(tmp_path, pyenv_versions, **env)
    pythons = {run["DIFFSR_VENV"]: run["DIFFSR_PYTHON"] for run in runs if run["DIFFSR_VENV"].startswith(".venv-py")}
    return pythons, stderr


def python_given_to_the_last_run(tmp_path, pyenv_versions, **env):
    """The DIFFSR_PYTHON of ``.ci/run``'s Python 3.13 run (``pythons_given_to_the_last_runs``), None where it was left
    out, and the script's stderr."""
    pythons, stderr = pythons_given_to_the_last_runs(tmp_path, pyenv_versions, **env)
    return pythons.get(".venv-py313"), stderr


def outside_environment():
    """This process's environment without the variables the scripts read (DIFFSR_*: CI's oldest-versions run sets
    DIFFSR_CONSTRAINTS for the whole suite)."""
    return {name: value for name, value in os.environ.items() if not name.startswith("DIFFSR_")}


pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="CI's scripts are bash scripts")


def test_ci_runs_the_suite_on_pyenvs_newest_python_3_13(tmp_path):
    python, _ = python_given_to_the_last_run(tmp_path, {"3.13.0": "3.13", "3.13.2": "3.13", "3.12.8": "3.12"})
    assert python == str(tmp_path / "pyenv" / "versions" / "3.13.2" / "bin" / "python3")


def test_ci_runs_the_suite_on_python_3_10_too(tmp_path):
    """Python 3.10, the oldest the pack allows, after 3.13: its OrderedDict.popitem of a subclass calls __getitem__,
    which made the prompt cache fail at its 33rd prompt there alone. Where pyenv has no 3.10, CI's log says so."""
    pyenv = tmp_path / "pyenv" / "versions"
    pythons, _ = pythons_given_to_the_last_runs(tmp_path, {"3.13.0": "3.13", "3.10.12": "3.10", "3.10.13": "3.10",
                                                           "3.10.13t": "3.10", "3.11.7": "3.11"})
    assert pythons == {".venv-py313": str(pyenv / "3.13.0" / "bin" / "python3"),
                       ".venv-py310": str(pyenv / "3.10.13" / "bin" / "python3")}
    pythons, stderr = pythons_given_to_the_last_runs(tmp_path / "without", {"3.13.0": "3.13"})
    assert list(pythons) == [".venv-py313"]
    assert "WARNING: no Python 3.10 (none in " in stderr and "the suite is NOT checked on Python 3.10" in stderr


def test_ci_leaves_out_pyenvs_free_threaded_python_3_13(tmp_path):
    """pyenv names a free-threaded build 3.13.Nt, which ``ls | sort -V`` put after 3.13.N: the suite ran on it,
    whose wheels the pack's dependencies may lack (pip then builds them from source, or fails)."""
    python, _ = python_given_to_the_last_run(tmp_path, {"3.13.0": "3.13", "3.13.1t": "3.13"})
    assert python == str(tmp_path / "pyenv" / "versions" / "3.13.0" / "bin" / "python3")


def test_ci_takes_a_python_3_13_named_by_command(tmp_path):
    """DIFFSR_CI_PYTHON313=python3.13 (a command on PATH, as tools/run_tests.sh's DIFFSR_PYTHON takes it) was called
    'not executable' (``[ -x python3.13 ]`` looks in the current folder) and the Python 3.13 run left out."""
    bin_folder = tmp_path / "bin"
    fake_python(str(bin_folder / "python3.13"), "3.13")
    python, stderr = python_given_to_the_last_run(tmp_path, {}, DIFFSR_CI_PYTHON313="python3.13",
                                                  PATH=f"{bin_folder}{os.pathsep}{os.environ['PATH']}")
    assert python == "python3.13", stderr


def test_ci_says_so_where_the_python_given_is_no_python_3_13(tmp_path):
    """DIFFSR_CI_PYTHON313 of another version ran 'the suite on Python 3.13' on it."""
    other = fake_python(str(tmp_path / "bin" / "python3.12"), "3.12")
    python, stderr = python_given_to_the_last_run(tmp_path, {"3.13.0": "3.13"}, DIFFSR_CI_PYTHON313=other)
    assert python is None
    assert f"WARNING: DIFFSR_CI_PYTHON313={other} is Python 3.12, not Python 3.13: the suite is NOT checked" in stderr


def test_ci_runs_the_loaders_tests_with_accelerate_beside_the_oldest_and_the_newest_versions(tmp_path):
    """diffusers 0.30-0.32 load a UNet or VAE through accelerate's loaders where accelerate is installed (many ComfyUI
    installs have it), which no venv of the suite had: CI runs the loaders' tests once more in a venv of the oldest
    versions with accelerate 0.33.0, after the oldest versions' suite, which runs without it; then with the newest
    accelerate beside the newest versions (as the first run installs them), with the broken files' tests too."""
    runs, _ = ci_runs(tmp_path, {"3.13.0": "3.13"})
    assert [run["DIFFSR_VENV"] for run in runs][:4] == [".venv", ".venv-oldest", ".venv-oldest-accelerate",
                                                        ".venv-accelerate"]
    assert runs[3] == {"DIFFSR_VENV": ".venv-accelerate", "DIFFSR_PYTHON": "", "DIFFSR_TORCH": "",
                       "DIFFSR_CONSTRAINTS": "", "DIFFSR_WITH": "accelerate",
                       "args": "tests/test_sd21_variants.py tests/test_osediff_cli.py tests/test_broken_files.py"}
    assert all(os.path.isfile(os.path.join(ROOT, path)) for path in runs[3]["args"].split())
    assert runs[1]["DIFFSR_WITH"] == ""
    with_accelerate = runs[2]
    assert with_accelerate == {"DIFFSR_VENV": ".venv-oldest-accelerate", "DIFFSR_PYTHON": "",
                               "DIFFSR_TORCH": "torch==2.13.0", "DIFFSR_CONSTRAINTS": "tools/oldest-supported.txt",
                               "DIFFSR_WITH": "accelerate==0.33.0",
                               "args": "tests/test_sd21_variants.py tests/test_osediff_cli.py"}
    assert all(os.path.isfile(os.path.join(ROOT, path)) for path in with_accelerate["args"].split())


@pytest.mark.parametrize("with_package", ["", "accelerate==0.33.0"])
def test_run_tests_installs_the_package_given_beside_the_packs(tmp_path, with_package):
    """DIFFSR_WITH: a package installed with the pack's, under the venv's constraints; none (no empty argument)
    where it is unset."""
    root = tmp_path / "checkout"
    (root / "tools").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "tools", "run_tests.sh"), root / "tools" / "run_tests.sh")
    python = root / ".venv-x" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "$*|$#" >> "$(dirname "$0")/calls.log"\necho 3.11\n')
    os.chmod(python, os.stat(python).st_mode | stat.S_IXUSR)
    env = {**outside_environment(), "DIFFSR_VENV": ".venv-x", **({"DIFFSR_WITH": with_package} if with_package else {})}
    done = subprocess.run(["bash", str(root / "tools" / "run_tests.sh"), "tests/x.py"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    calls = (python.parent / "calls.log").read_text().splitlines()
    packages = [".[test]", *([with_package] if with_package else [])]
    assert f"-m pip install -q {' '.join(packages)} -c .venv-x/constraints.txt|{6 + len(packages)}" in calls
    assert calls[-1] == "-m pytest -q tests/x.py|4"


def test_run_tests_says_where_the_python_given_does_not_run(tmp_path):
    """tools/run_tests.sh takes relative paths from the checkout (DIFFSR_VENV=.venv-py313): a DIFFSR_PYTHON relative to
    the folder it was run from, not found there, ended in "ERROR: .venv-py313 has Python 3.13, DIFFSR_PYTHON
    (py/bin/python3) is : give it a DIFFSR_VENV of its own", for the venv of that very Python."""
    root = tmp_path / "checkout"
    (root / "tools").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "tools", "run_tests.sh"), root / "tools" / "run_tests.sh")
    fake_python(str(root / ".venv-py313" / "bin" / "python"), "3.13")  # pip and pytest through it do nothing
    fake_python(str(tmp_path / "py" / "bin" / "python3"), "3.13")
    env = {**outside_environment(), "DIFFSR_VENV": ".venv-py313"}
    run = ["bash", os.path.join("checkout", "tools", "run_tests.sh")]
    done = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "DIFFSR_PYTHON": os.path.join("py", "bin", "python3")})
    assert done.returncode == 1
    assert done.stderr == (f"ERROR: DIFFSR_PYTHON (py/bin/python3) does not run (a relative path is taken from the "
                           f"checkout, {root}).\n")
    done = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "DIFFSR_PYTHON": str(tmp_path / "py" / "bin" / "python3")})
    assert done.returncode == 0, done.stderr
