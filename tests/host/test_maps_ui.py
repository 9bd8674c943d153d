"""Cones2 Attention Maps' ui payload for the layout editor's overlay (ui key ``cones2_maps``)."""

from __future__ import annotations

import json

import pytest
import torch

TWO_BOXES = ('{"version":1,"boxes":[{"subject":"dog","x":0.0,"y":0.0,"w":0.5,"h":1.0},'
             '{"subject":"cat","x":0.5,"y":0.1,"w":0.5,"h":0.9}]}')
PROMPT = "a dog and a cat on a sofa"


@pytest.fixture(scope="module")
def guided_run(pack, comfy, tiny_ckpts):
    """A guided sampling run on the tiny SD1.5 checkpoint (64x80 latent): (guided model, samples)."""
    import comfy.sd

    import nodes

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(tiny_ckpts["sd1"], output_vae=False, output_clip=True)
    pos = pack.nodes.residual_nodes.Cones2ApplyResiduals.execute(clip, PROMPT, None).result[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    gm, gpos = pack.nodes.layout_node.Cones2LayoutGuidance.execute(
        model, pos, TWO_BOXES, 0.08, 2.5, -1e8, 0.0, 1.0, False, record_maps=True).result
    latent = {"samples": torch.zeros(1, 4, 8, 10)}
    out = nodes.common_ksampler(gm, 3, 2, 5.0, "euler", "normal", gpos, neg, latent)[0]
    return gm, out


@pytest.mark.parametrize("resolution", ["largest", "smallest", "all"])
def test_maps_ui_payload(pack, guided_run, resolution):
    gn = pack.nodes.maps_node
    gm, samples = guided_run
    res = gn.Cones2AttentionMaps.execute(gm, samples, resolution, 64)
    image, report = res.result
    assert image.ndim == 4 and image.shape[-1] == 3
    assert res.ui["text"] == [report]  # unchanged
    maps = res.ui["cones2_maps"]
    rows = gn.attention_report(gm)
    largest = max({r["grid"] for r in rows}, key=lambda g: g[0] * g[1])
    assert largest == (8, 10)  # the latent's grid; the payload always carries the finest one only
    assert [m["subject"] for m in maps] == [r["subject"] for r in rows if r["grid"] == largest] == ["dog", "cat"]
    for m in maps:
        assert set(m) == {"subject", "h", "w", "share", "values"}
        assert (m["h"], m["w"]) == largest and isinstance(m["h"], int) and isinstance(m["w"], int)
        values = m["values"]
        assert len(values) == m["h"] * m["w"] and all(isinstance(v, float) for v in values)
        assert all(0.0 <= v <= 1.0 for v in values) and max(values) == 1.0
        assert all(round(v, 3) == v for v in values)
        row = next(r for r in rows if r["grid"] == largest and r["subject"] == m["subject"])
        assert m["share"] == row["share"]
        # the payload is the finest grid whatever the report shows; "smallest" reports another grid only
        assert (f"{m['subject']}\t8x10\tin-region share {m['share']:.4f}" in report) == (resolution != "smallest")
        # the values are the report's map, normalised and row-major
        expect = row["map"].float() / row["map"].float().max()
        got = torch.tensor(values).reshape(m["h"], m["w"])
        assert torch.allclose(got, expect, atol=5.1e-4)
        # guided: the subject's box holds its attention (dog: left half, cat: right half)
        left, right = got[:, :5].sum(), got[:, 5:].sum()
        assert (left > right) if m["subject"] == "dog" else (right > left)
    assert len(json.dumps(maps)) < 4000  # compact: 2 x 80 values
    grids = sorted({r["grid"] for r in rows}, key=lambda g: g[0] * g[1])
    assert len(grids) > 1  # so that "smallest" and "largest" differ
    shown = {"largest": grids[-1:], "smallest": grids[:1], "all": grids}[resolution]
    assert {tuple(map(int, line.split("\t")[1].split("x"))) for line in report.splitlines()} == set(shown)
    assert len(report.splitlines()) == sum(r["grid"] in shown for r in rows)
