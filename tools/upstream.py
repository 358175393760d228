"""What the fixture makers share: the upstream checkout they run must be importable by its own top-level names, and
the tiny checkpoints are written as recipes the tests make them from again (tests/fixture_weights.py)."""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tests_module(name):
    """The module tests/<name>.py (fixture_weights, osediff_sizing), loaded from its file (tests/ is not a
    package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tests", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_on_pythonpath(checkout):
    """The absolute path of ``checkout``, refusing to go on unless it is on ``PYTHONPATH``: the upstream code imports
    its modules by top-level name (``ram.models``, ``my_utils``, ``model.cldm``), and our scripts do not edit
    ``sys.path``."""
    path = os.path.abspath(checkout)
    if path not in {os.path.abspath(p) for p in sys.path if p}:
        raise SystemExit(f"Put the upstream checkout on PYTHONPATH: PYTHONPATH={path} python {sys.argv[0]} ...")
    return path
