"""The environment a test gives its Python child processes (conftest's ``child_env``): the warning filters it runs
with, so that ``pytest -W error::DeprecationWarning`` fails on a deprecated call made on the command line's path."""

import subprocess
import sys

import pytest

from conftest import warning_options

WARNS = "import warnings; warnings.warn('an old API', FutureWarning); print('went on')"


@pytest.fixture
def pytest_filters(request):
    """Skips the test where pytest applies no warning filter of its own (``-p no:warnings``: no mark, no ``-W``), in
    the test's process or, by ``child_env``, in its child."""
    if not request.config.pluginmanager.has_plugin("warnings"):
        pytest.skip("-p no:warnings: pytest applies no filterwarnings mark and no -W option")


@pytest.mark.filterwarnings("error::FutureWarning")
def test_a_child_fails_on_a_warning_its_test_makes_an_error(pytest_filters, child_env):
    done = subprocess.run([sys.executable, "-c", WARNS], capture_output=True, text=True, env=child_env())
    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    assert "FutureWarning: an old API" in done.stderr.splitlines()[-1]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_child_ignores_a_warning_its_test_ignores(pytest_filters, child_env):
    done = subprocess.run([sys.executable, "-c", WARNS], capture_output=True, text=True,
                          env=child_env(PYTHONWARNINGS="error"))  # the parent's own options replace it
    assert (done.returncode, done.stdout, done.stderr) == (0, "went on\n", "")


def test_a_command_line_filter_reaches_the_child_as_python_reads_it(pytest_filters, request, monkeypatch):
    """``pytest -W error::FutureWarning:__main__``: pytest reads a ``-W`` option's message as text and its module whole,
    as Python does, so the child gets it as given (it was refused as a regular expression: every test with
    ``child_env`` errored under ``pytest -W error::DeprecationWarning:comfyui_diffsr``)."""
    monkeypatch.setattr(request.config.known_args_namespace, "pythonwarnings", ["error::FutureWarning:__main__"])
    done = subprocess.run([sys.executable, "-c", WARNS], capture_output=True, text=True,
                          env=request.getfixturevalue("child_env")())
    assert (done.returncode, done.stdout) == (1, ""), done.stderr


def test_warning_options_in_the_order_they_are_applied():
    assert warning_options([], [], [], []) == ""
    assert warning_options(["default", "error::UserWarning"], ["error::DeprecationWarning"], ["ignore:a.b::torch"],
                           ["ignore:plain text"]) == \
        "default,error::UserWarning,error::DeprecationWarning,ignore:a.b::torch,ignore:plain text"


@pytest.mark.parametrize("option", ["ignore:.*has no CLIP vocabulary", "ignore::DeprecationWarning:torch",
                                    "ignore:one, two"])
@pytest.mark.parametrize("given_as", ["ini", "mark"])
def test_a_filter_that_would_change_meaning_in_a_child_is_refused(option, given_as):
    with pytest.raises(ValueError):
        warning_options([], ["error::FutureWarning", *([option] if given_as == "ini" else [])], [],
                        [option] if given_as == "mark" else [])


def test_a_command_line_filter_holding_a_comma_is_refused():
    with pytest.raises(ValueError):
        warning_options([], [], ["ignore:one, two"], [])
