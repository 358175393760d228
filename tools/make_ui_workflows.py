"""Write the UI-format twin (workflows/<name>.json) of every API-format workflow in workflows/api/.

The node signatures come from ``nodes/`` (read through the host stand-ins in tests/comfy_stubs) and, for
ComfyUI core nodes, from tests/data/standard_nodes.json. Run from the repo root with PYTHONPATH=tests/comfy_stubs:

    PYTHONPATH=tests/comfy_stubs python tools/make_ui_workflows.py
"""

import json
import os

from workflow_schema import load_signatures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def to_ui(api, signatures):
    nodes, links = [], []
    order = sorted(api, key=int)
    out_links = {}
    for index, node_id in enumerate(order):
        node = api[node_id]
        sig = signatures[node["class_type"]]
        inputs, widgets = [], []
        for name, kind in sig["inputs"]:
            if name not in node["inputs"]:
                continue
            value = node["inputs"][name]
            if isinstance(value, list):
                link_id = len(links) + 1
                src, slot = value
                links.append([link_id, int(src), slot, int(node_id), len(inputs), kind])
                out_links.setdefault((src, slot), []).append(link_id)
                inputs.append({"name": name, "type": kind, "link": link_id})
            else:
                widgets.append(value)
                if name in sig.get("seed_widgets", []):
                    widgets.append("fixed")  # the frontend's control_after_generate widget
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": [40 + 340 * (index % 4), 40 + 260 * (index // 4)],
                      "size": [320, 220], "flags": {}, "order": index, "mode": 0, "inputs": inputs,
                      "outputs": [], "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    for node in nodes:
        sig = signatures[node["type"]]
        node["outputs"] = [{"name": kind, "type": kind, "links": out_links.get((str(node["id"]), slot), []),
                            "slot_index": slot} for slot, kind in enumerate(sig["outputs"])]
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main():
    signatures = load_signatures(ROOT)
    api_dir = os.path.join(ROOT, "workflows", "api")
    for name in sorted(os.listdir(api_dir)):
        with open(os.path.join(api_dir, name)) as f:
            api = json.load(f)
        with open(os.path.join(ROOT, "workflows", name), "w") as f:
            json.dump(to_ui(api, signatures), f, indent=1)
        print("wrote", name)


if __name__ == "__main__":
    main()
