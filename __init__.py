"""DiffSR: OSEDiff and DoSSR super-resolution for ComfyUI.

ComfyUI imports this folder under a module name of its own choosing, so every import in the
pack is relative. Nothing is loaded here: the nodes import their cores when ComfyUI asks for
the node list.
"""


async def comfy_entrypoint():
    """V3 entry point (ComfyUI >= 0.3.48): the pack's ``ComfyExtension``."""
    from .nodes import DiffSRExtension

    return DiffSRExtension()
