"""Box tracks in the layout widget, in a real browser (headless Chromium + the real ComfyUI and its frontend).

One scenario (tests/browser/tracks_scenario.js) turns "track" on, moves a box at t = 0 and at t = 1 (two
keyframes), looks at t = 0.5, saves and loads, and deletes a keyframe; each test below checks one step, the JSON
it wrote through the node's own parser. It runs on the same three frontends and renderers as the widget's main
scenario (tests/browser/conftest.py FRONTENDS).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from comfyui_cones2.cones2_core.layout import parse_layout

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKFLOW = os.path.join(REPO, "workflows", "two_subjects_layout.json")
K0 = (0.15, 0.30, 0.25, 0.30)  # the dog's keyframes the scenario sets with the mouse (x, y, w, h)
K1 = (0.55, 0.10, 0.15, 0.30)


@pytest.fixture(scope="module")
def tracks(browser_env, ui):
    tag = ui["id"].replace("-", "_")
    shot = os.path.join(HERE, "artifacts", f"layout_tracks_{tag}.png")
    os.makedirs(os.path.dirname(shot), exist_ok=True)
    if os.path.exists(shot):
        os.remove(shot)
    cmd = [browser_env, os.path.join(HERE, "tracks_scenario.js")]
    if ui["vue_nodes"] is not None:
        cmd += ["--vue-nodes", "on" if ui["vue_nodes"] else "off"]
    cmd += [ui["server"].url, WORKFLOW, shot]
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the track scenario ran over 240 s:\n{(e.stdout or '')[-3000:]}")
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the scenario printed no result (rc {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert "fatal" not in out, f"the scenario could not run:\n{out['fatal']}\n{res.stderr[-2000:]}"
    if os.path.exists(shot):
        shutil.copyfile(shot, f"/tmp/cones2_layout_tracks_{tag}.png")
    return out


def check(out: dict, name: str) -> dict:
    step = out["steps"].get(name)
    if step is None:
        failed = [k for k, v in out["steps"].items() if not v["ok"]]
        pytest.fail(f"step {name!r} did not run: step {failed} failed first:\n{out.get('failed', '')[:3000]}")
    assert step["ok"], f"{name}: {step.get('error', '')[:4000]}"
    return step


def test_no_slider_until_a_track_is_wanted(tracks):
    """An image layout (no tracks) shows no time slider; the "track" toggle shows it, and new boxes hold still."""
    check(tracks, "track_off_for_images")
    check(tracks, "track_on_shows_the_slider")


def test_moving_a_box_at_t0_sets_a_keyframe_there(tracks):
    dog = next(b for b in check(tracks, "keyframe_at_0")["layout"]["boxes"] if b["subject"] == "dog")
    assert [f["t"] for f in dog["frames"]] == [0]


def test_keyframes_at_0_and_1_in_the_json_the_node_reads(tracks):
    """The serialised layout after moving and resizing the box at t = 1: the node's parser reads the track, and
    its interpolation at t = 0.5 is the average of the two keyframes; the box's own x, y, w, h are the track at 0
    (what image models use)."""
    step = check(tracks, "keyframe_at_1")
    layout = parse_layout(step["text"])
    assert layout.moving
    dog = next(b for b in layout.boxes if b.subject == "dog")
    cat = next(b for b in layout.boxes if b.subject == "cat")
    assert [f.t for f in dog.frames] == [0.0, 1.0] and not cat.frames
    tol = 0.01  # a canvas pixel or two of the mouse
    assert (dog.x, dog.y, dog.w, dog.h) == pytest.approx(K0, abs=tol)
    assert (dog.frames[1].x, dog.frames[1].y, dog.frames[1].w, dog.frames[1].h) == pytest.approx(K1, abs=tol)
    assert dog.at(0) == type(dog)(dog.subject, dog.x, dog.y, dog.w, dog.h, dog.weight)
    half = dog.at(0.5)
    assert (half.x, half.y, half.w, half.h) == pytest.approx([(a + b) / 2 for a, b in zip(K0, K1, strict=True)],
                                                             abs=tol)


def test_the_canvas_shows_the_boxes_at_the_sliders_time(tracks):
    """At t = 0.5 the box is drawn halfway (the editor's box equals the average of the keyframes to 1e-12, and
    the canvas pixels say the fill moved there), the still box stays, and the track's keyframe dots are drawn."""
    step = check(tracks, "interpolated_at_half")
    keys = check(tracks, "keyframe_at_1")["keyframes"]
    for k in "xywh":
        assert step["dog"][k] == pytest.approx((keys[0][k] + keys[1][k]) / 2, abs=1e-12)


def test_the_api_prompt_carries_the_track_and_a_reload_shows_the_slider(tracks):
    step = check(tracks, "api_prompt_and_reload")
    assert parse_layout(step["layout"]).moving


def test_deleting_a_keyframe(tracks):
    """Delete key at t = 1 removes that keyframe (the box left with one holds still there, written without a
    track), the track's dot goes, and the frontend's undo brings the keyframe back."""
    step = check(tracks, "delete_keyframe")
    assert "frames" not in step["dog"]
    assert (step["dog"]["x"], step["dog"]["y"]) == pytest.approx(K0[:2], abs=0.01)


def test_no_errors_from_the_widget_in_the_page(tracks):
    assert not tracks.get("failed"), tracks.get("failed")
    assert tracks["errors"] == [], "\n".join(tracks["errors"])
