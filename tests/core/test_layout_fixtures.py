"""The shared layout fixtures (tests/fixtures/layouts.json) against the node's parser.

The editor's parser (web/js/layout/model.js) is checked against the same file by tests/js/; this side
is authoritative: what parse_layout accepts and refuses is what the editor must accept and refuse.
"""

import json
import os

import pytest

from comfyui_cones2.cones2_core.errors import Cones2Error
from comfyui_cones2.cones2_core.layout import Box, Keyframe, parse_layout

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "layouts.json")

with open(FIXTURES, encoding="utf-8") as f:
    CASES = json.load(f)


@pytest.mark.parametrize("case", CASES["valid"], ids=lambda c: c["name"])
def test_valid_layout(case):
    expected = tuple(Box(b["subject"], b["x"], b["y"], b["w"], b["h"], b["weight"],
                         tuple(Keyframe(**f) for f in b.get("frames", ()))) for b in case["boxes"])
    assert parse_layout(case["text"]).boxes == expected


@pytest.mark.parametrize("case", CASES["invalid"], ids=lambda c: c["name"])
def test_invalid_layout(case):
    with pytest.raises(Cones2Error) as err:
        parse_layout(case["text"])
    assert case.get("match", "") in str(err.value)


@pytest.mark.parametrize("case", CASES["tracks"], ids=lambda c: c["name"])
def test_track_interpolation(case):
    """Box.at on the fixture's tracks: the numbers the editor's boxAt is checked against (tests/js/)."""
    layout = parse_layout(case["text"])
    for want in case["at"]:
        got = layout.boxes[want["box"]].at(want["t"])
        assert [got.x, got.y, got.w, got.h] == pytest.approx([want[k] for k in "xywh"], abs=1e-12, rel=0), want


def test_fixtures_are_many_and_named_once():
    names = [c["name"] for c in CASES["valid"] + CASES["invalid"] + CASES["tracks"]]
    assert len(names) == len(set(names))
    assert len(CASES["valid"]) >= 5 and len(CASES["invalid"]) >= 20
    assert sum(1 for c in CASES["valid"] if any("frames" in b for b in c["boxes"])) >= 3
    assert sum(1 for c in CASES["invalid"] if "keyframe" in c["match"]) >= 10
    assert sum(len(c["at"]) for c in CASES["tracks"]) >= 10
