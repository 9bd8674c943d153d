"""The shared layout fixtures (tests/fixtures/layouts.json) against the node's parser.

The editor's parser (web/js/layout/model.js) is checked against the same file by tests/js/; this side
is authoritative: what parse_layout accepts and refuses is what the editor must accept and refuse.
"""

import json
import os

import pytest

from comfyui_cones2.cones2_core.errors import Cones2Error
from comfyui_cones2.cones2_core.layout import Box, parse_layout

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "layouts.json")

with open(FIXTURES, encoding="utf-8") as f:
    CASES = json.load(f)


@pytest.mark.parametrize("case", CASES["valid"], ids=lambda c: c["name"])
def test_valid_layout(case):
    expected = tuple(Box(b["subject"], b["x"], b["y"], b["w"], b["h"], b["weight"]) for b in case["boxes"])
    assert parse_layout(case["text"]).boxes == expected


@pytest.mark.parametrize("case", CASES["invalid"], ids=lambda c: c["name"])
def test_invalid_layout(case):
    with pytest.raises(Cones2Error) as err:
        parse_layout(case["text"])
    assert case.get("match", "") in str(err.value)


def test_fixtures_are_many_and_named_once():
    names = [c["name"] for c in CASES["valid"] + CASES["invalid"]]
    assert len(names) == len(set(names))
    assert len(CASES["valid"]) >= 5 and len(CASES["invalid"]) >= 20
