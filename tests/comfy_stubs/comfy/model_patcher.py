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
        self.model_size()

    def model_size(self):  # L272
        if self.size > 0:
            return self.size
        self.size = comfy.model_management.module_size(self.model)
        return self.size

    def is_clone(self, other):  # L342
        return hasattr(other, "model") and self.model is other.model

    def model_patches_models(self):  # L509
        return []

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        # L744 → load(full_load=True) (L636): full loads end in self.model.to(device_to)
        self.model.to(device_to)
        self.model.device = device_to
        return self.model

    def detach(self, unpatch_all=True):  # L890 → unpatch_model(offload_device) moves the weights back
        self.model.to(self.offload_device)
        self.model.device = self.offload_device
        return self.model

    def _load_list(self):  # L621: (size, name, module, its own parameter names) of every module holding weights
        loading = []
        for n, m in self.model.named_modules():
            params = [name for name, _ in m.named_parameters(recurse=False)]
            if params and all(name in params for name, _ in m.named_parameters(recurse=True)):
                loading.append((comfy.model_management.module_size(m), n, m, params))
        return loading

    def partially_unload(self, device_to, memory_to_free=0):  # L800: smallest layers first, each moved alone
        memory_freed = 0
        for module_mem, _, m, _ in sorted(self._load_list(), key=lambda entry: entry[:2]):
            if memory_to_free < memory_freed:
                break
            m.to(device_to)
            memory_freed += module_mem
        return memory_freed
