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


LOADED = []  # (models, force_patch_weights, force_full_load) of every load_models_gpu call, for the tests
current_loaded_models = []  # L438: the ModelPatchers ComfyUI holds on their load device (most recent first)


def module_size(module):  # L440
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):  # L606: (re)load every patcher fully, most recent first
    LOADED.append((list(models), force_patch_weights, force_full_load))
    for m in models:
        if m in current_loaded_models:
            current_loaded_models.remove(m)
        m.patch_model(m.load_device, force_patch_weights=force_patch_weights)
        current_loaded_models.insert(0, m)


def free_memory(memory_required, device, keep_loaded=[]):  # L569: unloads the least recently used models first
    unloaded = []
    for m in reversed(list(current_loaded_models)):
        if m not in keep_loaded:
            m.detach(unpatch_all=True)
            current_loaded_models.remove(m)
            unloaded.append(m)
    return unloaded


def unload_all_models():  # L1398
    free_memory(1e30, get_torch_device())
