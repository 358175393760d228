"""What the fixture makers share: the upstream checkout they run must be importable by its own top-level names."""

import os
import sys


def require_on_pythonpath(checkout):
    """The absolute path of ``checkout``, refusing to go on unless it is on ``PYTHONPATH``: the upstream code imports
    its modules by top-level name (``ram.models``, ``my_utils``, ``model.cldm``), and our scripts do not edit
    ``sys.path``."""
    path = os.path.abspath(checkout)
    if path not in {os.path.abspath(p) for p in sys.path if p}:
        raise SystemExit(f"Put the upstream checkout on PYTHONPATH: PYTHONPATH={path} python {sys.argv[0]} ...")
    return path
