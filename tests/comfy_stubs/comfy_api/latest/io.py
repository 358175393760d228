"""Stand-in for comfy_api/latest/_io.py (a125cd8): the schema types the pack uses, same signatures."""


class Input:  # L157-185: id, display_name, optional, tooltip, lazy (+ widget options)
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, **options):
        self.id, self.display_name, self.optional, self.tooltip, self.lazy = id, display_name, optional, tooltip, lazy
        self.options = options
        self.default = options.get("default")


class Output:  # L209
    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list


def comfytype(io_type):
    def wrap(cls):
        cls.io_type = io_type
        if "Input" not in cls.__dict__:
            cls.Input = type("Input", (Input,), {"io_type": io_type})
        if "Output" not in cls.__dict__:
            cls.Output = type("Output", (Output,), {"io_type": io_type})
        return cls
    return wrap


@comfytype("IMAGE")
class Image: ...


@comfytype("LATENT")
class Latent: ...


@comfytype("CONDITIONING")
class Conditioning: ...


@comfytype("MODEL")
class Model: ...


@comfytype("CLIP")
class Clip: ...


@comfytype("VAE")
class Vae: ...


@comfytype("STRING")
class String: ...


@comfytype("INT")
class Int: ...


@comfytype("FLOAT")
class Float: ...


@comfytype("BOOLEAN")
class Boolean: ...


@comfytype("COMBO")
class Combo:
    class Input(Input):  # L334: options first after id
        io_type = "COMBO"

        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None, **kw):
            super().__init__(id, display_name, optional, tooltip, lazy, **kw)
            self.choices = list(options or [])


def Custom(io_type):  # L136
    return comfytype(io_type)(type(f"Custom_{io_type}", (), {}))


class Schema:  # L1008
    def __init__(self, node_id, display_name=None, category="sd", inputs=None, outputs=None, hidden=None,
                 description="", is_input_list=False, is_output_node=False, is_deprecated=False,
                 is_experimental=False, is_api_node=False, not_idempotent=False, enable_expand=False):
        self.node_id, self.display_name, self.category = node_id, display_name, category
        self.inputs, self.outputs, self.hidden = inputs or [], outputs or [], hidden or []
        self.description, self.is_experimental = description, is_experimental


class ComfyNode:  # L1495
    @classmethod
    def define_schema(cls):
        raise NotImplementedError


class NodeOutput:  # L1543
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args if len(self.args) > 0 else None
