"""The prompt record's word rule and row lookup (cones2_core/prompt.py) on hand-made records."""

from __future__ import annotations

import json
import os

import pytest

from comfyui_cones2.cones2_core.errors import Cones2Error
from comfyui_cones2.cones2_core.prompt import PromptRecord, prompt_words

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "prompt_words.json")
CASES = json.load(open(FIXTURE, encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["text"][:30] or "empty" for c in CASES])
def test_prompt_words_follow_the_shared_fixture(case):
    assert prompt_words(case["text"]) == case["words"]


def record(**words):
    return PromptRecord("a red dog and a cat", "sd1", 77, {w: tuple(r) for w, r in words.items()})


def test_rows_of_a_word_any_case():
    r = record(a=[1, 4], red=[2], dog=[3], cat=[5])
    assert r.rows_of("dog") == (3,) and r.rows_of(" Cat ") == (5,)


def test_rows_of_words_apart_without_spelling_bind_each_word():
    r = record(red=[2], dog=[3], cat=[5])
    assert r.rows_of("red cat") == (2, 5)  # no token text to find the run by: each word is bound


def test_a_subject_not_in_the_prompt_lists_the_words():
    with pytest.raises(Cones2Error, match="'horse' is not a word of the prompt; the prompt's words are: red, dog"):
        record(red=[2], dog=[3]).rows_of("horse")


def test_a_phrase_binds_its_contiguous_run_by_the_tokens_spelling():
    text = {"l": [[None, b"a ", b"red ", b"dog", b"house ", b"a ", b"red ", b"dog ", None]]}
    r = PromptRecord("a red doghouse a red dog", "sd1", 9, {"a": (1, 5), "red": (2, 6), "dog": (7,)}, text)
    assert r.rows_of("red dog") == (6, 7)
    apart = PromptRecord("red x dog", "sd1", 5, {"red": (1,), "x": (2,), "dog": (3,)},
                         {"l": [[None, b"red ", b"x ", b"dog ", None]]})
    with pytest.raises(Cones2Error, match="not in the prompt as one run of words"):
        apart.rows_of("red dog")
