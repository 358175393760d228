"""What a compute device offers that the pack's arithmetic depends on."""

import torch

# the device types that compute in float64: Apple's MPS has none (every float64 tensor there raises "Cannot convert
# a MPS Tensor to float64 dtype"), nor have DirectML and Intel XPUs without FP64; the meta device stands in for CUDA
# in the memory counts
FLOAT64_DEVICE_TYPES = ("cpu", "cuda", "meta")


def widest_float(device):
    """The widest float ``device`` computes in: float64 on the CPU and CUDA (``FLOAT64_DEVICE_TYPES``), float32
    elsewhere. The sums the pack forms in float64 on the device are formed in it."""
    return torch.float64 if torch.device(device).type in FLOAT64_DEVICE_TYPES else torch.float32
