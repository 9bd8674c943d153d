"""Hostile but realistic inputs to Layout Guidance and residual loading, through the real host in-process: every
one gets a clear error at the node (never a NaN image or a crash at the sampler), or a warning where the input is
legal but does nothing."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from comfyui_cones2.cones2_core.errors import Cones2Error

TWO_BOXES = ('{"version":1,"boxes":[{"subject":"dog","x":0.0,"y":0.0,"w":0.5,"h":1.0},'
             '{"subject":"cat","x":0.5,"y":0.1,"w":0.5,"h":0.9}]}')
PROMPT = "a dog and a cat on a sofa"
SETTINGS = {"guidance_weight": 0.08, "positive_weight": 2.5, "negative_weight": -1e8, "start_percent": 0.0,
            "end_percent": 1.0, "self_recurrence": False, "record_maps": True}


def encode(pack, clip, text=PROMPT):
    return pack.nodes.residual_nodes.Cones2ApplyResiduals.execute(clip, text, None).result[0]


def guide(pack, model, cond, layout=TWO_BOXES, **kw):
    return pack.nodes.layout_node.Cones2LayoutGuidance.execute(model, cond, layout, **{**SETTINGS, **kw}).result


def sample(model, pos, neg, seed=3, steps=2):
    import nodes

    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return nodes.common_ksampler(model, seed, steps, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]


def box_layout(**extra) -> str:
    return json.dumps({"version": 1, "boxes": [{"subject": "dog", "x": 0.0, "y": 0.0, "w": 0.5, "h": 1.0, **extra}]})


@pytest.mark.parametrize("name, value", [
    ("guidance_weight", float("nan")), ("guidance_weight", float("inf")), ("guidance_weight", 3.0),
    ("positive_weight", float("nan")), ("positive_weight", 1e300), ("negative_weight", float("nan")),
    ("negative_weight", -1e300), ("negative_weight", 5.0), ("start_percent", float("nan")),
    ("end_percent", 1.5),
])
def test_bad_numbers_are_refused_by_the_node(pack, loaded, name, value):
    model, clip = loaded("sd1")
    with pytest.raises(Cones2Error, match=rf"{name} = .* is not allowed: it must be a finite number from"):
        guide(pack, model, encode(pack, clip), **{name: value})


@pytest.mark.parametrize("weight", [3e38, 1e300, -1.0, 51.0])
def test_bad_box_weights_are_refused_by_the_node(pack, loaded, weight):
    model, clip = loaded("sd1")
    with pytest.raises(Cones2Error, match=r"'weight' .*(outside 0\.\.50|finite number)"):
        guide(pack, model, encode(pack, clip), layout=box_layout(weight=weight))


def test_a_large_finite_box_weight_still_samples_finite_images(pack, loaded):
    model, clip = loaded("sd1")
    gm, gpos = guide(pack, model, encode(pack, clip), layout=box_layout(weight=50.0), guidance_weight=2.0)
    import nodes

    assert torch.isfinite(sample(gm, gpos, nodes.CLIPTextEncode().encode(clip, "")[0])).all()


def test_long_subjects_are_not_echoed_whole(pack, loaded):
    model, clip = loaded("sd1")
    subject = "x" * 6000
    layout = json.dumps({"version": 1, "boxes": [{"subject": subject, "x": 0, "y": 0, "w": 0.5, "h": 1}]})
    with pytest.raises(Cones2Error) as err:
        guide(pack, model, encode(pack, clip), layout=layout)
    assert "is not a word of the prompt" in str(err.value) and "(6000 characters)" in str(err.value)
    assert len(str(err.value)) < 600


def test_largest_sampler_seed_with_self_recurrence(pack, loaded):
    import nodes

    model, clip = loaded("sd1")
    gm, gpos = guide(pack, model, encode(pack, clip), self_recurrence=True)
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    a = sample(gm, gpos, neg, seed=2**64 - 1)
    assert torch.isfinite(a).all() and torch.equal(a, sample(gm, gpos, neg, seed=2**64 - 1))


def test_sdxl_model_with_sd15_conditioning_names_both_families(pack, loaded):
    sdxl_model, _ = loaded("sdxl")
    _, sd15_clip = loaded("sd1")
    with pytest.raises(Cones2Error, match=r"conditioning is SD1\.5 text \(768 wide\) but the model is SDXL"):
        guide(pack, sdxl_model, encode(pack, sd15_clip))


class NodeText:
    """Stands in for the server's PromptServer.instance: records the host's progress-text messages (what the
    frontend shows on a node) as (node_id, text)."""

    def __init__(self):
        self.sent = []

    def send_progress_text(self, text, node_id, sid=None):
        self.sent.append((node_id, text))


@pytest.fixture
def node_text(monkeypatch):
    """The host's ``server`` module as the pack sees it inside a running ComfyUI (importing the real one here,
    outside ``main.py``, would start its import-time set-up), with a recording ``PromptServer.instance``."""
    import sys
    import types

    recorder = NodeText()
    monkeypatch.setitem(sys.modules, "server",
                        types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=recorder)))
    return recorder


def test_empty_window_warns(pack, loaded, caplog, node_text):
    from comfy_execution.utils import CurrentNodeContext

    model, clip = loaded("sd1")
    with caplog.at_level(logging.WARNING, logger="comfyui-cones2"), CurrentNodeContext("prompt", "12"):
        guide(pack, model, encode(pack, clip), start_percent=0.4, end_percent=0.4)
    assert "start_percent = end_percent = 0.4 leaves no part of the schedule to guide" in caplog.text
    assert [(n, t[:50]) for n, t in node_text.sent] == [("12", "Cones2 Layout Guidance: start_percent = end_percen")]


def test_guided_prompt_wired_as_negative_warns(pack, loaded, caplog, node_text):
    from comfy_execution.utils import CurrentNodeContext

    import nodes

    model, clip = loaded("sd1")
    plain = nodes.CLIPTextEncode().encode(clip, "a bird on a fence")[0]  # (the same text would match the layout)
    gm, gpos = guide(pack, model, encode(pack, clip))
    with caplog.at_level(logging.WARNING, logger="comfyui-cones2"):
        sample(gm, gpos, plain)  # correct wiring: no warning
    assert "never used the guided prompt" not in caplog.text and not node_text.sent
    with caplog.at_level(logging.WARNING, logger="comfyui-cones2"), CurrentNodeContext("prompt", "3"):
        sample(gm, plain, gpos)  # the guided conditioning as the negative
    assert "never used the guided prompt as its positive conditioning, so nothing was guided" in caplog.text
    assert len(node_text.sent) == 1 and node_text.sent[0][0] == "3"  # on the sampler that ran
    assert "Connect the CONDITIONING output of Cones2 Layout Guidance" in node_text.sent[0][1]


def test_colour_map_batch_uses_the_first_and_says_so(pack, loaded, caplog):
    model, clip = loaded("sd1")
    cmap = torch.zeros(3, 64, 64, 3)
    cmap[:, :, :32, 0] = 1.0
    with caplog.at_level(logging.WARNING, logger="comfyui-cones2"):
        guide(pack, model, encode(pack, clip), layout='{"version": 1, "boxes": []}', colour_map=cmap,
              colour_subjects="#ff0000=dog")
    assert "the colour_map input holds 3 images; only the first is used" in caplog.text


def test_a_colour_given_two_subjects_or_missing_from_the_map_is_an_error(pack, loaded):
    model, clip = loaded("sd1")
    cmap = torch.zeros(1, 64, 64, 3)
    cmap[:, :, :32, 0] = 1.0
    with pytest.raises(Cones2Error, match="lists the colour #FF0000 twice"):  # before: red silently meant cat
        guide(pack, model, encode(pack, clip), layout="", colour_map=cmap, colour_subjects="#ff0000=dog, #FF0000=cat")
    with pytest.raises(Cones2Error, match="was not found in the colour map .* repaint that region"):
        guide(pack, model, encode(pack, clip), layout="", colour_map=cmap, colour_subjects="#00ff00=dog")


def test_residual_with_absurd_values_is_refused(pack, tmp_path):
    from safetensors.torch import save_file

    load_residual = pack.cones2_core.residual.load_residual

    path = tmp_path / "huge.safetensors"
    save_file({"l": torch.full((1, 768), 3e38)}, str(path), metadata={
        "cones2.format": "1", "cones2.subject": "dog", "cones2.family": "sd1", "cones2.n_tokens": "1"})
    with pytest.raises(Cones2Error, match=r"magnitude 3e\+38.*at most 10000"):
        load_residual(str(path))


def test_words_of_scripts_without_spaces_are_found_by_both_nodes(pack, loaded):
    """'犬' inside '一只犬和猫' and '🐶' inside '🐶🐱' have other tokens there than alone; Apply Residuals and Layout
    Guidance both find them by what the tokens spell, at the same rows, and bias/change exactly those rows."""
    Residual = pack.cones2_core.residual.Residual
    subject_positions = pack.nodes.layout_node.subject_positions
    model, clip = loaded("sd1")
    # CLIP's tokens: 一 = rows 1-2, 只 = 3-4, 犬 = 5-7, 和 = 8-10, 猫 = 11-13 (the word ends there)
    for text, subject, rows in [("一只犬和猫", "犬", (5, 6, 7)), ("一只犬和猫", "猫", (11, 12, 13)),
                                ("a 🐶 and a cat", "🐶", (2,)), ("🐶🐱 on a sofa", "🐶", (1,)),
                                ("🐶🐱 on a sofa", "🐱", (2,))]:
        record = encode(pack, clip, text)[0][1]["cones2"]
        assert subject_positions(record, subject) == rows, (text, subject)
        n = len(pack.nodes.encoding.word_tokens(clip, subject)["l"])
        res = Residual(subject, "sd1", {"l": torch.ones(n, 768)})
        if n != len(rows):  # the word alone has another number of tokens: a clear error, nothing applied
            with pytest.raises(Cones2Error, match="token rows but the word"):
                pack.nodes.residual_nodes.Cones2ApplyResiduals.execute(clip, text, [res])
            continue
        plain = encode(pack, clip, text)[0][0]
        applied = pack.nodes.residual_nodes.Cones2ApplyResiduals.execute(clip, text, [res]).result[0][0][0]
        changed = tuple((applied - plain).abs().sum(-1)[0].nonzero().flatten().tolist())
        assert changed == rows, (text, subject, changed)
    # guidance binds them and biases them: each subject's attention lands in its box
    import nodes

    gm, gpos = guide(pack, model, encode(pack, clip, "一只犬和猫"),
                     layout=TWO_BOXES.replace('"dog"', '"犬"').replace('"cat"', '"猫"'))
    sample(gm, gpos, nodes.CLIPTextEncode().encode(clip, "")[0])
    shares = {r["subject"]: r["share"] for r in pack.nodes.maps_node.attention_report(gm)}
    assert set(shares) == {"犬", "猫"} and min(shares.values()) >= 0.99, shares


def test_an_absent_spaceless_word_is_still_an_error(pack, loaded):
    model, clip = loaded("sd1")
    with pytest.raises(Cones2Error, match="'狗' is not a word of the prompt"):
        guide(pack, model, encode(pack, clip, "一只犬和猫"), layout=box_layout().replace('"dog"', '"狗"'))


@pytest.mark.parametrize("value, message", [(0.0, "is empty or too weak .*largest value is 0"),
                                            (0.3, "is empty or too weak .*largest value is 0.3"),
                                            (float("nan"), "holds NaN or infinite values")])
def test_bad_masks_are_refused_by_the_node(pack, loaded, value, message):
    """Not at the sampler, after the model is loaded and the first step begun: at Layout Guidance."""
    model, clip = loaded("sd1")
    masks = torch.full((1, 64, 64), value)
    with pytest.raises(Cones2Error, match=f"the mask for 'dog' {message}"):
        guide(pack, model, encode(pack, clip), layout="", masks=masks, mask_subjects="dog")
