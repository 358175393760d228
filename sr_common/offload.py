"""Networks moved off a device short of memory between the stages of a run, as ComfyUI's memory manager moves its
models: the stage loader of the commands (``NetworksOnSD21.load_stage``)."""

import torch

from .latents import device_free_bytes
from .sd21 import module_tensors, move_module, tensor_bytes, weight_bytes


MIN_FREE_BYTES = 2 ** 30  # what a stage needs at least (ComfyUI keeps 0.8 GiB + its 0.4 GiB reserve free)


class OffloadWhenShort:
    """Before a stage, its networks go to ``device``. Where the device's free memory (``free_bytes()``) is less
    than the stage needs (its networks not on the device yet + its estimated activations, at least
    ``MIN_FREE_BYTES``), the other networks on the device go to ``offload_device`` first, largest first, until it
    is not; one that shares weights with the stage's stays. The other networks are the model's and any this loader
    put on the device for a stage (the commands' DAPE tagger, which is not a network of the model). So on a device
    with room nothing moves after the first run, and where ``free_bytes()`` is None (``device_free_bytes``: any
    device but CUDA) nothing is offloaded."""

    def __init__(self, device, offload_device="cpu", free_bytes=None):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.offload_device = device, torch.device(offload_device)
        self.free_bytes = free_bytes or (lambda: device_free_bytes(self.device))
        self.placed = {}  # id → module: the networks this loader moved to the device

    def on_device(self, module):
        return all(t.device == self.device for t in module_tensors(module))

    def __call__(self, model, networks, activation_bytes):
        stage = [t for m in networks for t in module_tensors(m)]
        needed = max(activation_bytes, MIN_FREE_BYTES) + tensor_bytes(t for t in stage if t.device != self.device)
        shared = {id(t) for t in stage}
        candidates = {id(m): m for m in [*model.modules(), *self.placed.values()] if m is not None}
        others = [m for m in candidates.values() if m not in networks and self.on_device(m)
                  and shared.isdisjoint(id(t) for t in module_tensors(m))]
        for module in sorted(others, key=weight_bytes, reverse=True):
            free = self.free_bytes()
            if free is None or free >= needed:
                break
            move_module(module, self.offload_device)
        for module in networks:
            if not self.on_device(module):
                move_module(module, self.device)
            self.placed[id(module)] = module
