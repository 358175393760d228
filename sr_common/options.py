"""The type checks of the Python API's ``Options`` (either method's): a field of the wrong type is refused by name,
with the type given and what the field takes, before any work. A bool is no number here (``upscale=True`` is a
slip, not ×1); numpy's numbers are numbers, and its bools flags."""

import numbers
import reprlib

import numpy as np

from .errors import OptionError


def check_number(value, name, *, integer=False, takes=None):
    """Refuse the option ``name`` where ``value`` is not a real number (with ``integer``: an integer) or is a bool;
    the message says what it takes: ``takes``, else "a number" or "an integer"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        _refuse(name, takes or ("an integer" if integer else "a number"), value)


def check_flag(value, name):
    """Refuse the option ``name`` where ``value`` is not True or False (numpy's too: ``scales.max() > 1``)."""
    if not isinstance(value, (bool, np.bool_)):
        _refuse(name, "True or False", value)


def _refuse(name, takes, value):
    raise OptionError(f"{name} takes {takes}, got {type(value).__name__} {reprlib.repr(value)}")
