"""Every example workflow matches the node schemas, and each UI file describes the same graph as its API twin."""

import json
import os

import pytest

from conftest import host_stand_ins
from workflow_schema import WIDGET_TYPES, frontend_inputs, load_signatures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = os.path.join(ROOT, "workflows", "api")
NAMES = sorted(n[:-5] for n in os.listdir(API) if n.endswith(".json"))


@pytest.fixture(scope="module")
def signatures():
    with host_stand_ins("custom_nodes_x_diffsr_schema"):
        yield load_signatures(ROOT)


def load(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def test_at_least_four_workflows_with_thumbnails():
    assert len(NAMES) >= 4
    for name in NAMES:
        assert os.path.exists(os.path.join(ROOT, "workflows", f"{name}.json")), name
        assert os.path.exists(os.path.join(ROOT, "workflows", f"{name}.jpg")), name


def test_template_browser_serves_the_workflows_folder():
    """ComfyUI serves a pack's templates from the first of these folders that exists and lists every ``*.json`` of
    each (app/custom_node_manager.py L96-139, a125cd8): ``workflows/`` must be the first, and hold only the
    workflows."""
    folders = ["example_workflows", "example", "examples", "workflow", "workflows"]
    assert [f for f in folders if os.path.isdir(os.path.join(ROOT, f))][0] == "workflows"
    listed = sorted(n[:-5] for n in os.listdir(os.path.join(ROOT, "workflows")) if n.endswith(".json"))
    assert listed == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_matches_schemas(name, signatures):
    graph = load(API, f"{name}.json")
    for node_id, node in graph.items():
        sig = signatures[node["class_type"]]
        names = [n for n, _ in sig["inputs"]]
        assert set(node["inputs"]) <= set(names), (name, node_id, set(node["inputs"]) - set(names))
        missing = [n for n in names if n not in node["inputs"] and n not in sig.get("optional", [])]
        assert not missing, (name, node_id, missing)
        for input_name, kind in sig["inputs"]:
            if input_name not in node["inputs"]:
                continue
            value = node["inputs"][input_name]
            if isinstance(value, list):  # a link: [source node, output slot]
                source = graph[value[0]]
                outputs = signatures[source["class_type"]]["outputs"]
                assert value[1] < len(outputs) and outputs[value[1]] == kind, (name, node_id, input_name)
                continue
            widget = sig.get("widgets", {}).get(input_name)
            if kind == "INT":
                assert isinstance(value, int)
            elif kind == "FLOAT":
                assert isinstance(value, (int, float))
            elif kind in ("STRING", "COMBO"):
                assert isinstance(value, str)
            elif kind == "BOOLEAN":
                assert isinstance(value, bool)
            else:
                pytest.fail(f"{name}: {node_id}.{input_name} of type {kind} must be a link")
            if widget is None:
                continue
            lo, hi = widget.options.get("min"), widget.options.get("max")
            assert lo is None or value >= lo, (name, node_id, input_name)
            assert hi is None or value <= hi, (name, node_id, input_name)
            choices = getattr(widget, "choices", None)
            static = input_name in ("color_fix", "dtype") or (input_name == "config" and value.endswith("(built in)"))
            if choices is not None and static:
                assert value in choices, (name, node_id, input_name, value)


@pytest.mark.parametrize("name", NAMES)
def test_ui_twin_is_the_same_graph(name, signatures):
    """The UI file as frontend 1.27 reads and saves one: every input listed (sockets, then widgets), a link's
    target slot its index there, a value for every widget (a widget left out of the API file at its default), outputs
    by their display names; read back, the same graph as its API twin."""
    api = load(API, f"{name}.json")
    ui = load(ROOT, "workflows", f"{name}.json")
    links = {link[0]: link for link in ui["links"]}
    rebuilt = {}
    for node in ui["nodes"]:
        sig = signatures[node["type"]]
        sockets, widgets = frontend_inputs(sig)
        assert [i["name"] for i in node["inputs"]] == [n for n, _ in sockets + widgets], (name, node["id"])
        assert [o["name"] for o in node["outputs"]] == sig.get("output_names", sig["outputs"]), (name, node["id"])
        linked = {}
        for slot, entry in enumerate(node["inputs"]):
            assert ("widget" in entry) == (entry["type"] in WIDGET_TYPES), (name, node["id"], entry)
            if entry["link"] is not None:
                _, source, source_slot, target, target_slot, kind = links[entry["link"]]
                assert (target, target_slot) == (node["id"], slot), (name, node["id"], entry)
                source_type = next(n["type"] for n in ui["nodes"] if n["id"] == source)
                assert kind == signatures[source_type]["outputs"][source_slot], (name, entry)
                linked[entry["name"]] = [str(source), source_slot]
        values = list(node["widgets_values"])
        inputs = {n: linked[n] for n, _ in sockets if n in linked}
        for input_name, _ in widgets:
            value = values.pop(0)
            if input_name in sig.get("seed_widgets", []):
                assert values.pop(0) == "fixed"  # control_after_generate
            if input_name in linked:
                inputs[input_name] = linked[input_name]
            elif input_name in api[str(node["id"])]["inputs"]:
                inputs[input_name] = value
            else:
                assert value == sig["defaults"][input_name], (name, node["id"], input_name)
        assert not values, (name, node["id"], values)
        rebuilt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    assert rebuilt == api


@pytest.mark.parametrize("name", NAMES)
def test_ui_nodes_do_not_overlap(name):
    """No node covers another (the frontend draws a later node over an earlier one, hiding its widgets); a node's
    title bar (30 px) is drawn above its ``pos``."""
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - 30, n["size"][0], n["size"][1] + 30)
             for n in load(ROOT, "workflows", f"{name}.json")["nodes"]]
    for i, (a, ax, ay, aw, ah) in enumerate(boxes):
        for b, bx, by, bw, bh in boxes[i + 1:]:
            assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay, (name, a, b)
