"""Checks of the source itself: every Python file of the checkout (the pack, bench/, tools/, tests/) is free of what
pyflakes finds (a name used but never defined, as in an error message's f-string that only a rare input reaches, where
it would raise a NameError instead of the message; an import or a variable left unused)."""
import os
import shutil
import subprocess

import pytest
from pyflakes.api import check
from pyflakes.messages import RedefinedWhileUnused
from pyflakes.reporter import Reporter

from conftest import PACKAGED, ROOT, python_sources

CHECKED = (*PACKAGED, "bench", "tools", "tests")  # the pack's own files and folders, and the others with Python


class Findings(Reporter):
    """pyflakes' findings in one file, as a list: a syntax error as well."""

    def __init__(self):
        super().__init__(None, None)
        self.found = []

    def flake(self, message):
        self.found.append(message)

    def syntaxError(self, filename, msg, lineno, offset, text):
        self.found.append(f"{filename}:{lineno}: syntax error: {msg}")

    def unexpectedError(self, filename, msg):
        self.found.append(f"{filename}: {msg}")


def pyflakes_findings(path):
    """pyflakes' findings in ``path`` but those of a line marked ``# noqa`` (a fixture imported for pytest, an import
    made for its side effect) and the redefinitions of what such a line imported (a test's argument naming the
    fixture)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()

    def exempt(lineno):
        return 0 < lineno <= len(lines) and "# noqa" in lines[lineno - 1]

    findings = Findings()
    check(source, path, findings)
    return [str(m) for m in findings.found if isinstance(m, str)
            or not (exempt(m.lineno) or isinstance(m, RedefinedWhileUnused) and exempt(m.message_args[1]))]


def test_the_checked_files_are_the_checkouts_python_files():
    """No Python file that git tracks is left out of the check below (a new folder, a file beside __init__.py)."""
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("needs a git checkout: the files are those `git ls-files` lists")
    out = subprocess.run(["git", "-C", ROOT, "ls-files", "*.py"], capture_output=True, text=True, check=True).stdout
    tracked = {os.path.normpath(line) for line in out.splitlines() if line.strip()}
    assert len(tracked) > 100
    assert tracked <= set(python_sources(CHECKED))


@pytest.mark.parametrize("path", sorted(python_sources(CHECKED)))
def test_pyflakes_finds_nothing(path):
    assert pyflakes_findings(path) == []
