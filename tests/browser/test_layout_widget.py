"""The layout widget in a real browser: headless Chromium + the real ComfyUI and its frontend + this pack.

One scenario (tests/browser/layout_scenario.js) drives the editor like a user, step by step; each test
below checks one step. A failed step stops the scenario, so the tests after it fail pointing at it.

The scenario runs three times (the tests' ids say which): on the frontend the host pins (``host-frontend``),
and on the newest frontend (harness/frontend.py) in classic canvas mode (``newest-classic``) and with the Vue
node renderer, "Modern Node Design (Nodes 2.0)", on (``newest-nodes2``).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shutil
import subprocess

import pytest

from comfyui_cones2.cones2_core.layout import parse_layout
from harness.frontend import NEWEST_FRONTEND

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKFLOW = os.path.join(REPO, "workflows", "two_subjects_layout.json")
FLUX_WORKFLOW = os.path.join(REPO, "workflows", "flux_two_subjects_layout.json")
NODE = "Cones2LayoutGuidance"


def shot_paths(ui_id: str) -> tuple[str, str, str, str]:
    """(node screenshot, its /tmp copy, maps screenshot, its /tmp copy) of one run."""
    tag = "" if ui_id == "host-frontend" else f"_{ui_id.replace('-', '_')}"
    return (os.path.join(HERE, "artifacts", f"layout_widget{tag}.png"), f"/tmp/cones2_layout_widget{tag}.png",
            os.path.join(HERE, "artifacts", f"layout_widget{tag}_maps.png"), f"/tmp/cones2_layout_widget{tag}_maps.png")


@pytest.fixture(scope="module")
def scenario(browser_env, ui):
    server = ui["server"]
    shot, shot_copy, maps_shot, maps_copy = shot_paths(ui["id"])
    os.makedirs(os.path.dirname(shot), exist_ok=True)
    for path in (shot, maps_shot):
        if os.path.exists(path):
            os.remove(path)
    cmd = [browser_env, os.path.join(HERE, "layout_scenario.js")]
    if ui["vue_nodes"] is not None:
        cmd += ["--vue-nodes", "on" if ui["vue_nodes"] else "off"]
    cmd += [server.url, WORKFLOW, shot, maps_shot, FLUX_WORKFLOW]
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the browser scenario ran over 300 s:\n{(e.stdout or '')[-3000:]}")
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the scenario printed no result (rc {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert "fatal" not in out, f"the scenario could not run:\n{out['fatal']}\n{res.stderr[-2000:]}"
    for path, copy in ((shot, shot_copy), (maps_shot, maps_copy)):
        if os.path.exists(path):
            shutil.copyfile(path, copy)
    out["server_log"] = server.log_tail(40)
    out["ui"] = ui
    out["shots"] = {"node": shot, "maps": maps_shot}
    return out


def check(out: dict, name: str) -> dict:
    step = out["steps"].get(name)
    if step is None:
        failed = [k for k, v in out["steps"].items() if not v["ok"]]
        pytest.fail(f"step {name!r} did not run: step {failed} failed first:\n{out.get('failed', '')[:3000]}")
    assert step["ok"], f"{name}: {step.get('error', '')[:4000]}"
    return step


def test_example_workflow_matches_the_nodes(client):
    """The shipped UI workflow uses existing nodes and a layout the node's parser accepts."""
    with open(WORKFLOW) as f:
        wf = json.load(f)
    info = client.object_info()
    types = {n["type"] for n in wf["nodes"]}
    assert types <= set(info), f"unknown node types: {types - set(info)}"
    node = next(n for n in wf["nodes"] if n["type"] == NODE)
    layout = parse_layout(node["widgets_values"][0])
    assert layout.subjects() == ["dog", "cat"]
    ckpt = next(n for n in wf["nodes"] if n["type"] == "CheckpointLoaderSimple")
    assert ckpt["widgets_values"][0] == "cones2_tiny_sd15.safetensors"


def test_runs_on_the_frontend_and_renderer_it_names(scenario):
    """Each run is on the frontend and node renderer its id names: the host's pinned frontend, or the newest one
    with the Vue node renderer off or on (the layout node drawn as a Vue component, or on the canvas)."""
    ui = scenario["ui"]
    seen = scenario.get("frontend") or {}
    if ui["id"] == "host-frontend":
        assert seen.get("version") == importlib.metadata.version("comfyui-frontend-package"), seen
    else:
        assert seen.get("version") == NEWEST_FRONTEND, seen
        assert seen.get("vueNodes") is ui["vue_nodes"], seen
        assert seen.get("vueNodeView") is ui["vue_nodes"], seen


def test_loads_the_example_with_its_boxes(scenario):
    step = check(scenario, "load_workflow")
    assert [b["subject"] for b in step["boxes"]] == ["dog", "cat"]


def test_draw_label_move_and_resize_with_the_mouse(scenario):
    step = check(scenario, "draw_label_move_resize")
    layout = step["layout"]
    assert parse_layout(json.dumps(layout)).subjects() == ["dog", "cat"]
    assert {"dog", "cat", "sofa"} <= set(step["words"]), f"prompt words offered: {step['words']}"


def test_delete_key_removes_the_box_not_the_node_and_undo_redo(scenario):
    step = check(scenario, "delete_key_and_undo")
    assert step["afterUndo"] == 3 and step["afterRedo"] == 2


def test_grid_snapping_and_delete_button(scenario):
    check(scenario, "snap_and_delete_button")


def test_numeric_editing_stays_inside_the_frame(scenario):
    check(scenario, "numeric_edit")


def test_queued_prompt_carries_the_layout_and_runs(scenario):
    server = scenario["ui"]["server"]
    step = check(scenario, "queue_prompt")
    layout = parse_layout(step["layout"])
    assert layout.subjects() == ["dog", "cat"]
    image = step["images"][0]
    assert os.path.isfile(os.path.join(server.output_dir, image.get("subfolder", ""), image["filename"]))


def test_attention_maps_toggle_shows_the_last_run(scenario):
    """After the run, the maps toggle draws each subject's heatmap under its box and its share in the label;
    off restores the canvas; a new run replaces the maps; nothing of them is saved."""
    step = check(scenario, "attention_maps")
    assert [m["subject"] for m in step["payload"]] == ["dog", "cat"]
    for m in step["payload"]:
        assert any(label.startswith(m["subject"]) and label.endswith(f" {math.floor(m['share'] * 100 + 0.5)}%")
                   for label in step["labels"]), step["labels"]
    assert os.path.getsize(scenario["shots"]["maps"]) > 10_000
    with open(scenario["shots"]["maps"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_save_reload_and_load_keeps_the_boxes(scenario):
    step = check(scenario, "save_reload_load")
    assert len(step["boxes"]) == 2


def test_copy_paste_and_removal(scenario):
    check(scenario, "copy_paste_remove")


def test_editing_the_json_text_redraws_the_canvas(scenario):
    step = check(scenario, "edit_json_text")
    assert "JSON" in step["status"]["text"]


def test_frame_follows_the_latent_aspect(scenario):
    check(scenario, "aspect_from_latent")


def test_screenshot_of_the_node(scenario):
    check(scenario, "screenshot")
    assert os.path.getsize(scenario["shots"]["node"]) > 10_000
    with open(scenario["shots"]["node"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_flux_prompt_words_through_flux_guidance(scenario):
    """In the Flux workflow the prompt reaches Layout Guidance through FluxGuidance; the subject field still
    offers the prompt's words (Apply Residuals' text, found past FluxGuidance)."""
    step = check(scenario, "flux_prompt_words")
    with open(FLUX_WORKFLOW) as f:
        text = next(n for n in json.load(f)["nodes"] if n["type"] == "Cones2ApplyResiduals")["widgets_values"][0]
    assert step["chain"]["text"] == text
    assert {"dog", "cat", "sitting", "red", "sofa"} <= set(step["words"]), f"prompt words offered: {step['words']}"


def test_switching_the_node_renderer_keeps_the_editor(scenario):
    """On the newest frontend, turning Nodes 2.0 off and on again (or on and off) with the workflow open: the
    editor is on the page in each renderer, with room, and takes clicks."""
    if scenario["ui"]["vue_nodes"] is None:
        pytest.skip("the host's frontend: the scenario leaves the node renderer as it is")
    step = check(scenario, "switch_renderer")
    assert [s["vueView"] for s in step["seen"]] == [not scenario["ui"]["vue_nodes"], scenario["ui"]["vue_nodes"]]


def test_no_errors_from_the_widget_in_the_page(scenario):
    assert not scenario.get("failed"), scenario.get("failed")
    assert scenario["errors"] == [], "\n".join(scenario["errors"])
