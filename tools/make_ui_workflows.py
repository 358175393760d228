"""Write the UI-format twin (workflows/<name>.json) of every API-format workflow in workflows/api/.

The node signatures come from ``nodes/`` (read through the host stand-ins in tests/comfy_stubs) and, for
ComfyUI core nodes, from tests/data/standard_nodes.json. Run from the repo root:

    PYTHONPATH=tests/comfy_stubs:tests python tools/make_ui_workflows.py
"""

import json
import os

from workflow_schema import WIDGET_TYPES, frontend_inputs, load_signatures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMN, NODE_WIDTH, GAP = 380, 340, 50  # 340: room for the longest title (frontend 1.58 draws 325 px)


PREVIEW_HEIGHT = {"LoadImage": 220}  # room for the image the node shows


def node_height(class_type, sig, sockets, widgets):
    """Room for a node as the frontend draws it (it enlarges a node given less: title, slot rows, widget rows, a
    taller box for each multiline text, an image preview), rounded up so that nodes placed by it never overlap."""
    rows = len(widgets) + len(sig.get("seed_widgets", []))
    extra = 80 * len(sig.get("multiline", [])) + PREVIEW_HEIGHT.get(class_type, 0)
    return 50 + 22 * max(len(sockets), len(sig["outputs"])) + 28 * rows + extra


def columns(api):
    """Each node's column: 0 for a node with no linked input, else one right of its furthest source."""
    depth = {}

    def column(node_id):
        if node_id not in depth:
            sources = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max(map(column, sources)) if sources else 0
        return depth[node_id]

    return {node_id: column(node_id) for node_id in api}


def to_ui(api, signatures):
    """The UI-format graph of an API-format one, in the layout frontend 1.27 saves: every input listed (sockets,
    then widgets with their ``widget`` name; a link's target slot is its index there), every widget's value in
    ``widgets_values`` (a linked or left-out widget keeps its default), outputs by their display names; laid out
    left to right by data flow."""
    nodes, links, out_links = [], [], {}
    depth = columns(api)
    next_y = {}
    order = sorted(api, key=lambda n: (depth[n], int(n)))
    for index, node_id in enumerate(order):
        node, sig = api[node_id], signatures[api[node_id]["class_type"]]
        sockets, widgets = frontend_inputs(sig)
        inputs, values = [], []
        for name, kind in sockets + widgets:
            entry = {"name": name, "type": kind, "link": None}
            if kind in WIDGET_TYPES:
                entry["widget"] = {"name": name}
            value = node["inputs"].get(name)
            if isinstance(value, list):
                src, slot = value
                entry["link"] = len(links) + 1
                links.append([entry["link"], int(src), slot, int(node_id), len(inputs),
                              signatures[api[src]["class_type"]]["outputs"][slot]])
                out_links.setdefault((src, slot), []).append(entry["link"])
            inputs.append(entry)
        for name, _ in widgets:
            value = node["inputs"].get(name)
            values.append(sig["defaults"][name] if value is None or isinstance(value, list) else value)
            if name in sig.get("seed_widgets", []):
                values.append("fixed")  # the frontend's control_after_generate widget
        height = node_height(node["class_type"], sig, sockets, widgets)
        x, y = 40 + COLUMN * depth[node_id], next_y.get(depth[node_id], 40)
        next_y[depth[node_id]] = y + height + GAP
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": [x, y], "size": [NODE_WIDTH, height],
                      "flags": {}, "order": index, "mode": 0, "inputs": inputs, "outputs": [],
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": values})
    for node in nodes:
        sig = signatures[node["type"]]
        names = sig.get("output_names", sig["outputs"])
        node["outputs"] = [{"name": names[slot], "type": kind, "links": out_links.get((str(node["id"]), slot), []),
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
