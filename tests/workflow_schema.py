"""Node signatures for the workflow checks: our nodes' V3 schemas (read through tests/comfy_stubs) plus the
ComfyUI core nodes listed in tests/data/standard_nodes.json."""

import asyncio
import importlib.util
import json
import os
import sys


def import_pack(root, name="custom_nodes_x_diffsr_schema"):
    """Import the pack as ComfyUI does (from its folder, under a host-chosen module name); needs the stand-ins."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    extension = asyncio.run(module.comfy_entrypoint())
    return asyncio.run(extension.get_node_list())


def load_signatures(root):
    with open(os.path.join(root, "tests", "data", "standard_nodes.json")) as f:
        signatures = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    for node in import_pack(root):
        schema = node.define_schema()
        signatures[schema.node_id] = {
            "inputs": [[i.id, i.io_type] for i in schema.inputs],
            "outputs": [o.io_type for o in schema.outputs],
            "output_names": [o.display_name or o.io_type for o in schema.outputs],  # /object_info's output_name
            "optional": [i.id for i in schema.inputs if i.optional],
            "seed_widgets": [i.id for i in schema.inputs if i.options.get("control_after_generate")],
            "multiline": [i.id for i in schema.inputs if i.options.get("multiline")],
            "defaults": {i.id: i.default for i in schema.inputs if i.default is not None},
            "widgets": {i.id: i for i in schema.inputs},
        }
    return signatures


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def frontend_inputs(sig):
    """A node's inputs as ComfyUI's frontend lists them in a saved graph (1.27): its sockets, then its widgets, each
    in the order of /object_info's input_order (required, then optional)."""
    optional = set(sig.get("optional", []))
    ordered = [i for i in sig["inputs"] if i[0] not in optional] + [i for i in sig["inputs"] if i[0] in optional]
    return ([(n, k) for n, k in ordered if k not in WIDGET_TYPES], [(n, k) for n, k in ordered if k in WIDGET_TYPES])
