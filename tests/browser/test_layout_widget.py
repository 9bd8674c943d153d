"""The layout widget in a real browser: headless Chromium + the real ComfyUI and its frontend + this pack.

One scenario (tests/browser/layout_scenario.js) drives the editor like a user, step by step; each test
below checks one step. A failed step stops the scenario, so the tests after it fail pointing at it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import pytest

from comfyui_cones2.cones2_core.layout import parse_layout

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKFLOW = os.path.join(REPO, "workflows", "two_subjects_layout.json")
FLUX_WORKFLOW = os.path.join(REPO, "workflows", "flux_two_subjects_layout.json")
SCREENSHOT = os.path.join(HERE, "artifacts", "layout_widget.png")
SCREENSHOT_COPY = "/tmp/cones2_layout_widget.png"
MAPS_SCREENSHOT = os.path.join(HERE, "artifacts", "layout_widget_maps.png")
MAPS_SCREENSHOT_COPY = "/tmp/cones2_layout_widget_maps.png"
NODE = "Cones2LayoutGuidance"


@pytest.fixture(scope="module")
def scenario(browser_env, server):
    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    for path in (SCREENSHOT, MAPS_SCREENSHOT):
        if os.path.exists(path):
            os.remove(path)
    cmd = [browser_env, os.path.join(HERE, "layout_scenario.js"), server.url, WORKFLOW, SCREENSHOT, MAPS_SCREENSHOT,
           FLUX_WORKFLOW]
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the browser scenario ran over 300 s:\n{(e.stdout or '')[-3000:]}")
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the scenario printed no result (rc {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert "fatal" not in out, f"the scenario could not run:\n{out['fatal']}\n{res.stderr[-2000:]}"
    for path, copy in ((SCREENSHOT, SCREENSHOT_COPY), (MAPS_SCREENSHOT, MAPS_SCREENSHOT_COPY)):
        if os.path.exists(path):
            shutil.copyfile(path, copy)
    out["server_log"] = server.log_tail(40)
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


def test_queued_prompt_carries_the_layout_and_runs(scenario, server):
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
    assert os.path.getsize(MAPS_SCREENSHOT) > 10_000
    with open(MAPS_SCREENSHOT, "rb") as f:
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
    assert os.path.getsize(SCREENSHOT) > 10_000
    with open(SCREENSHOT, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_flux_prompt_words_through_flux_guidance(scenario):
    """In the Flux workflow the prompt reaches Layout Guidance through FluxGuidance; the subject field still
    offers the prompt's words (Apply Residuals' text, found past FluxGuidance)."""
    step = check(scenario, "flux_prompt_words")
    with open(FLUX_WORKFLOW) as f:
        text = next(n for n in json.load(f)["nodes"] if n["type"] == "Cones2ApplyResiduals")["widgets_values"][0]
    assert step["chain"]["text"] == text
    assert {"dog", "cat", "sitting", "red", "sofa"} <= set(step["words"]), f"prompt words offered: {step['words']}"


def test_no_errors_from_the_widget_in_the_page(scenario):
    assert not scenario.get("failed"), scenario.get("failed")
    assert scenario["errors"] == [], "\n".join(scenario["errors"])
