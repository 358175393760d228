"""DiffSR: OSEDiff and DoSSR super-resolution for ComfyUI.

ComfyUI imports this folder under a module name of its own choosing, so every import in the
pack is relative. Importing it reads and loads nothing: ``comfy_entrypoint`` checks the requirements
and imports the nodes when ComfyUI calls it, and weights load only when a node runs.
"""

import os
import re

REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt")
MODULES = {"pillow": "PIL", "pyyaml": "yaml"}  # distribution → the module it installs, where the names differ


def _version(text):
    """The numbers of a version string less trailing zeros, so that 10 == 10.0: '2.13.0+cpu' → (2, 13),
    '4.40.1.dev0' → (4, 40, 1)."""
    numbers = [int(n) for n in re.findall(r"\d+", text.split("+")[0])]
    while numbers and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


def unmet_requirements(path):
    """The lines of a requirements file (``name>=low[,<high]``) that the installed packages do not meet, each with
    what is installed: a module that cannot be found, or a version (from the distribution's metadata, where it has
    any) out of range. Nothing is imported. None where the file is absent (the pack installed as a wheel)."""
    import importlib.util
    from importlib import metadata

    if not os.path.isfile(path):
        return None
    unmet = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            spec = line.split("#")[0].strip()
            if not spec:
                continue
            name = re.match(r"[A-Za-z0-9_.-]+", spec).group()
            low, high = re.search(r">=\s*([\d.]+)", spec), re.search(r"<\s*([\d.]+)", spec)
            if importlib.util.find_spec(MODULES.get(name.lower(), name)) is None:
                unmet.append(f"{spec} (not installed)")
                continue
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:  # importable, without metadata under this name: nothing to compare
                continue
            if (low and _version(installed) < _version(low.group(1))
                    or high and _version(installed) >= _version(high.group(1))):
                unmet.append(f"{spec} ({installed} installed)")
    return unmet


async def comfy_entrypoint():
    """V3 entry point (ComfyUI >= 0.3.48): the pack's ``ComfyExtension``. Where ComfyUI's Python lacks a package the
    pack needs, or has a version it cannot run with, this raises with the command that installs them (ComfyUI logs
    it and starts without the pack), rather than nodes that fail when run."""
    unmet = unmet_requirements(REQUIREMENTS)
    if unmet:
        raise ImportError(f"DiffSR needs {'; '.join(unmet)}. Install its requirements into ComfyUI's Python: "
                          f'python -m pip install -r "{REQUIREMENTS}"')
    from .nodes import DiffSRExtension

    return DiffSRExtension()
