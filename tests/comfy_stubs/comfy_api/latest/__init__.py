"""Stand-in for comfy_api/latest/__init__.py (a125cd8): ComfyExtension (L79) and the io module."""

from abc import ABC, abstractmethod

from . import io  # noqa: F401


class ComfyExtension(ABC):
    async def on_load(self) -> None:
        """Called when an extension is loaded."""

    @abstractmethod
    async def get_node_list(self):
        """Returns a list of nodes that this extension provides."""
