"""Stand-in for comfy/model_management.py (a125cd8): devices, interrupts, OOM."""

import torch

OOM_EXCEPTION = torch.cuda.OutOfMemoryError  # L250 (L252: Exception where torch has no cuda.OutOfMemoryError)
interrupt_processing = False
EMPTIED = []


def get_torch_device():  # L169
    return torch.device("cpu")


def unet_offload_device():  # L747
    return torch.device("cpu")


def soft_empty_cache(force=False):  # L1384
    EMPTIED.append(force)


class InterruptProcessingException(Exception):  # L1408
    pass


def interrupt_current_processing(value=True):  # L1411
    global interrupt_processing
    interrupt_processing = value


def processing_interrupted():  # L1417
    return interrupt_processing


def throw_exception_if_processing_interrupted():  # L1423
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()


LOADED = []


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):  # L606
    LOADED.append((list(models), force_patch_weights))
