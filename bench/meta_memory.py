"""Device memory counted without the device: tensors on the ``meta`` device have shapes and dtypes but no data, so
a run on them costs no memory and little time, and ``MetaAllocator`` counts what it would hold (bench_memory.py,
tests/test_device_memory.py)."""

import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

BLOCK = 512  # bytes: the CUDA caching allocator's rounding of every allocation


def storages_keep_their_object():
    """Whether this PyTorch keeps one Python object per storage while the storage lives (2.13 does, 2.1.2 does not:
    it makes a new one at every ``untyped_storage()``), which ``MetaAllocator``'s weak references need."""
    t = torch.empty(2, device="meta")
    return t.untyped_storage() is t[1:].untyped_storage()


class MetaAllocator(TorchDispatchMode):
    """Bytes held by meta-device storages while active: ``live`` now, ``peak`` overall and ``peaks`` per stage
    (``stage``, set by the caller). A storage counts from the op that made it until its last tensor is released.

    Data the run asks for is made up: ``.item()`` / ``bool()`` of a meta tensor is 1 / True (so the fp16
    overflow check passes), and a copy to another device is zeros."""

    def __init__(self):
        if not storages_keep_their_object():
            raise RuntimeError(f"PyTorch {torch.__version__} makes a new Python object at every access to a storage, "
                               "so storages cannot be followed to their release: count with a newer PyTorch (2.13 "
                               "does it).")
        super().__init__()
        self.live = self.peak = 0
        self.peaks = {}
        self.stage = None
        self._held = {}  # id(storage) → weakref (its callback takes the bytes off)

    def hold(self, tensor):
        """Count ``tensor``'s storage (once) until it is released."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._held and self._held[key]() is storage:
            return
        size = -(-storage.nbytes() // BLOCK) * BLOCK
        self._held[key] = weakref.ref(storage, lambda _, key=key, size=size: self._release(key, size))
        self.live += size
        self.peak = max(self.peak, self.live)
        self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), self.live)

    def hold_weights(self, *modules):
        """Count the parameters and buffers of ``modules`` (each storage once)."""
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                self.hold(tensor)

    def _release(self, key, size):
        self.live -= size
        self._held.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.is_meta:
            if func is torch.ops.aten.is_nonzero.default:
                return True
            if func is torch.ops.aten._local_scalar_dense.default:
                return True if first.dtype == torch.bool else 1
            if func.overloadpacket in (torch.ops.aten.to, torch.ops.aten._to_copy):
                given = (*args[1:], *kwargs.values())
                target = [a for a in given if isinstance(a, torch.device)]
                if target and target[0].type != "meta":
                    dtype = [a for a in given if isinstance(a, torch.dtype)] or [first.dtype]
                    return torch.zeros(first.shape, dtype=dtype[0], device=target[0])
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_meta:
                self.hold(t)
        return out


class FusedAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` on meta tensors as the fused kernels (flash, memory-efficient) compute it:
    the output, no (L × S) matrix of scores (the meta device would otherwise decompose it into the math path)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention and args[0].is_meta:
            query, value = args[0], args[2]
            return query.new_empty(query.shape[:-1] + value.shape[-1:])
        return func(*args, **(kwargs or {}))
