"""ComfyUI V3 nodes (the only package that imports ComfyUI)."""

from comfy_api.latest import ComfyExtension

from . import host


class DiffSRExtension(ComfyExtension):
    async def get_node_list(self):
        from . import dossr, osediff

        host.register_model_folders()
        return osediff.NODES + dossr.NODES
