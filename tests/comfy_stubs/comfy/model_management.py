"""Stand-in for comfy/model_management.py (a125cd8): devices, interrupts, OOM."""

import weakref
from enum import Enum

import torch

OOM_EXCEPTION = torch.cuda.OutOfMemoryError  # L250 (L252: Exception where torch has no cuda.OutOfMemoryError)
interrupt_processing = False
EMPTIED = []


class VRAMState(Enum):  # L30
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


vram_state = VRAMState.NORMAL_VRAM  # L44 (--novram: NO_VRAM)


def get_torch_device():  # L169
    return torch.device("cpu")


def unet_offload_device():  # L747
    return torch.device("cpu")


def soft_empty_cache(force=False):  # L1384
    EMPTIED.append(force)


UNET_FLAG = None  # for the tests: the dtype of a --fp32-unet / --bf16-unet / --fp8_e4m3fn-unet … flag
FP16_WORKS = BF16_WORKS = False  # for the tests: what should_use_fp16 / should_use_bf16 say of the device
FP16_STORE_ONLY = False  # for the tests: a GPU that ComfyUI gives fp16 weights computed in fp32 (GTX 10xx under
# Linux; a GTX 16xx whose fp16 gives NaN, when fp32 weights do not fit): should_use_fp16(manual_cast=True) only


def should_use_fp16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):  # L1227
    return FP16_WORKS or (manual_cast and FP16_STORE_ONLY)  # (the real one: per GPU model, flags, free memory)


def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):  # L1297
    return BF16_WORKS


def unet_dtype(device=None, model_params=0, supported_dtypes=[torch.float16, torch.bfloat16, torch.float32],
               weight_dtype=None):  # L774: a precision flag first, else the first supported dtype the device runs
    if UNET_FLAG is not None:  # well (L813), else the first it can store for a manual cast (L822)
        return UNET_FLAG
    for manual_cast in (False, True):
        for dt in supported_dtypes:
            if dt == torch.float16 and should_use_fp16(device, model_params=model_params, manual_cast=manual_cast):
                return torch.float16
            if dt == torch.bfloat16 and should_use_bf16(device, model_params=model_params, manual_cast=manual_cast):
                return torch.bfloat16
    return torch.float32


def unet_manual_cast(weight_dtype, inference_device, supported_dtypes=[torch.float16, torch.bfloat16,
                                                                       torch.float32]):  # L828: None = no cast
    if weight_dtype in (torch.float32, torch.float64):
        return None
    fp16_supported = should_use_fp16(inference_device, prioritize_performance=False)
    if fp16_supported and weight_dtype == torch.float16:
        return None
    bf16_supported = should_use_bf16(inference_device)
    if bf16_supported and weight_dtype == torch.bfloat16:
        return None
    fp16_supported = should_use_fp16(inference_device, prioritize_performance=True)
    for dt in supported_dtypes:
        if dt == torch.float16 and fp16_supported:
            return torch.float16
        if dt == torch.bfloat16 and bf16_supported:
            return torch.bfloat16
    return torch.float32


class InterruptProcessingException(Exception):  # L1405
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
REQUIRED = []  # the memory_required of every load_models_gpu call, for the tests
TOTAL_MEMORY = 1e20  # bytes on the load device, for the tests (the real one asks the driver)
current_loaded_models = []  # L438: LoadedModel entries, most recent first


def module_size(module):  # L440
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


class LoadedModel:  # L448: holds its ModelPatcher by weak reference only
    def __init__(self, model):
        self._model = weakref.ref(model)
        self.device = model.load_device

    @property
    def model(self):  # L469
        return self._model()

    def model_memory(self):  # L472
        return self.model.model_size()

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):  # L487
        self.model.partially_load(self.device, lowvram_model_memory or 1e32, force_patch_weights)  # L492-495, L523
        if hasattr(self.model.model, "__weakref__"):  # L505: the entry goes when the loaded module is freed
            self.model_finalizer = weakref.finalize(self.model.model, _drop_dead)
        return self.model.model

    def model_loaded_memory(self):  # L475
        return self.model.loaded_size()

    def model_unload(self, memory_to_free=None, unpatch_weights=True):  # L511: part of it where that frees enough
        if memory_to_free is not None and memory_to_free < self.model.loaded_size():
            if self.model.partially_unload(self.model.offload_device, memory_to_free) >= memory_to_free:
                return False
        self.model.detach(unpatch_weights)
        return True

    def __eq__(self, other):  # L526
        return self.model is other.model

    def is_dead(self):  # L533 (its patcher gone)
        return self.model is None


def loaded_models(only_currently_used=False):  # L693: the loaded ModelPatchers
    return [m.model for m in current_loaded_models]


def get_free_memory(dev=None, torch_free_too=False):  # L1148: here the listed weights are all the device holds
    return TOTAL_MEMORY - sum(m.model_loaded_memory() for m in current_loaded_models if not m.is_dead())


def _drop_dead():  # what LoadedModel's finalizer (cleanup_models, L724) does when a loaded model is freed
    current_loaded_models[:] = [m for m in current_loaded_models if not m.is_dead()]


def free_memory(memory_required, device, keep_loaded=[]):
    """L569: unloads until enough is free, each model only as much as is still missing (``model_unload`` with
    ``memory_to_free``: a partial unload where that frees enough), in the order of (−offloaded memory,
    sys.getrefcount(patcher), size). Here: least recently used first."""
    _drop_dead()
    unloaded = []
    for m in [m for m in reversed(current_loaded_models) if m not in keep_loaded]:
        free = get_free_memory(device)
        if free > memory_required:
            break
        if m.model_unload(memory_required - free):
            current_loaded_models.remove(m)
            unloaded.append(m)
    return unloaded


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    """L606: the models of this call leave the loaded list (L643-652: each is a clone of itself; their weights stay
    where they are), so they are never unloaded to make room for themselves; then it frees the memory they still
    need (L654-656: what of them is not on the device) and ``memory_required`` more (the real one adds 10 % to the
    models and reserves at least 0.8 GiB + its reserve for the computation), and loads every one of them, most
    recent first: fully, but under ``--novram`` with a budget of 0.1 bytes (L683) whatever ``force_full_load``
    says (the partial loads of LOW_VRAM/NORMAL_VRAM without ``force_full_load``, L676-681, are left out)."""
    LOADED.append((list(models), force_patch_weights, force_full_load))
    REQUIRED.append(memory_required)
    _drop_dead()
    to_load = []
    for x in models:
        loaded = LoadedModel(x)
        to_load.append(current_loaded_models[current_loaded_models.index(loaded)] if loaded in current_loaded_models
                       else loaded)
    for m in to_load:
        if m in current_loaded_models:
            current_loaded_models.remove(m)
    required = sum(m.model_memory() - m.model_loaded_memory() for m in to_load)  # L488 model_memory_required
    held = sum(m.model_loaded_memory() for m in to_load)  # on the device, though no longer in the list counted here
    free_memory(required + memory_required + held, get_torch_device())
    for m in to_load:
        lowvram_model_memory = 0.1 if vram_state == VRAMState.NO_VRAM and m.device != torch.device("cpu") else 0
        m.model_load(lowvram_model_memory, force_patch_weights=force_patch_weights)
        current_loaded_models.insert(0, m)


def unload_all_models():  # L1398
    free_memory(1e30, get_torch_device())
