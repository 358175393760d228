"""Every example workflow matches the node schemas, and each UI file describes the same graph as its API twin."""

import json
import os

import pytest

from conftest import host_stand_ins
from workflow_schema import load_signatures

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
    api = load(API, f"{name}.json")
    ui = load(ROOT, "workflows", f"{name}.json")
    links = {link[0]: link for link in ui["links"]}
    rebuilt = {}
    for node in ui["nodes"]:
        sig = signatures[node["type"]]
        linked = {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]] for i in node["inputs"] if i["link"]}
        widgets = list(node["widgets_values"])
        inputs = {}
        for input_name, _ in sig["inputs"]:
            if input_name in linked:
                inputs[input_name] = linked[input_name]
            elif widgets and input_name in api[str(node["id"])]["inputs"]:
                inputs[input_name] = widgets.pop(0)
                if input_name in sig.get("seed_widgets", []):
                    widgets.pop(0)  # control_after_generate
        assert not widgets, (name, node["id"], widgets)
        rebuilt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    assert rebuilt == api
