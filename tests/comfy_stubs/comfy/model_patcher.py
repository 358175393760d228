"""Stand-in for comfy/model_patcher.py (a125cd8): the ModelPatcher fields and methods the memory manager uses."""


import comfy.model_management


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):  # L219
        self.size = size
        self.model = model
        if getattr(self.model, "device", None) is None:  # L222-226
            self.model.device = offload_device
        self.load_device = load_device
        self.offload_device = offload_device
        self.parent = None
        if not hasattr(self.model, "model_loaded_weight_memory"):  # L260-267
            self.model.model_loaded_weight_memory = 0
        if not hasattr(self.model, "model_lowvram"):
            self.model.model_lowvram = False
        self.model_size()

    def model_size(self):  # L272
        if self.size > 0:
            return self.size
        self.size = comfy.model_management.module_size(self.model)
        return self.size

    def loaded_size(self):  # L278
        return self.model.model_loaded_weight_memory

    def is_clone(self, other):  # L342
        return hasattr(other, "model") and self.model is other.model

    def model_patches_models(self):  # L509
        return []

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        """L636 for layers without ``comfy_cast_weights`` (plain torch, which ComfyUI cannot stream): the largest
        first, each moved if it fits in ``lowvram_model_memory`` with those before it; ``full_load``: all of them."""
        mem_counter = 0
        for module_mem, _, m, _ in sorted(self._load_list(), key=lambda entry: entry[:2], reverse=True):
            if full_load or mem_counter + module_mem < lowvram_model_memory:
                mem_counter += module_mem
                m.to(device_to)
                m.comfy_patched_weights = True  # L719
        self.model.model_lowvram = False  # L729: no layer it could stream
        if full_load:
            self.model.to(device_to)
            mem_counter = self.model_size()
        self.model.device = device_to
        self.model.model_loaded_weight_memory = mem_counter

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        if load_weights:  # L744
            self.load(device_to, lowvram_model_memory, force_patch_weights, full_load=lowvram_model_memory == 0)
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):  # L761
        if unpatch_weights:
            self.model.model_lowvram = False
            for m in self.model.modules():  # L790-792 (deletes the mark)
                m.comfy_patched_weights = False
            if device_to is not None:
                self.model.to(device_to)
                self.model.device = device_to
            self.model.model_loaded_weight_memory = 0

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):  # L865 (no weight patches)
        if not self.model.model_lowvram and self.model.model_loaded_weight_memory > 0:
            return 0
        full_load = self.model.model_loaded_weight_memory + extra_memory > self.model_size()
        current_used = self.model.model_loaded_weight_memory
        self.load(device_to, current_used + extra_memory, force_patch_weights, full_load)
        return self.model.model_loaded_weight_memory - current_used

    def detach(self, unpatch_all=True):  # L890 → unpatch_model(offload_device) moves the weights back
        self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)
        return self.model

    def _load_list(self):  # L621: (size, name, module, its own parameter names) of every module holding weights
        loading = []
        for n, m in self.model.named_modules():
            params = [name for name, _ in m.named_parameters(recurse=False)]
            if params and all(name in params for name, _ in m.named_parameters(recurse=True)):
                loading.append((comfy.model_management.module_size(m), n, m, params))
        return loading

    def partially_unload(self, device_to, memory_to_free=0):  # L800: smallest layers on the device first, each alone
        memory_freed = 0
        for module_mem, _, m, _ in sorted(self._load_list(), key=lambda entry: entry[:2]):
            if memory_to_free < memory_freed:
                break
            if getattr(m, "comfy_patched_weights", False):  # L816
                m.to(device_to)
                m.comfy_patched_weights = False  # L848
                memory_freed += module_mem
        if memory_freed > 0:  # L859-862
            self.model.model_lowvram = True
            self.model.model_loaded_weight_memory -= memory_freed
        return memory_freed
