"""Layout Guidance on Flux's joint attention, through the real host's Flux classes and samplers.

A small Flux (the host's own ``model_base.Flux`` and ``comfy.ldm.flux`` blocks, hidden size 128, one double and
one single block, random weights) built in-process keeps these behaviour tests fast; the loader-detected test bed
(``harness/tiny_flux.py``) is what the residual, workflow and training tests use.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from comfyui_cones2.cones2_core.errors import Cones2Error
from comfyui_cones2.cones2_core.joint_attention import flow_sigma, joint_bias
from harness.test_helpers import (
    CallLog,
    assert_composes_with_controlnet,
    assert_share_rises_with_positive_weight,
    controlled,
    randomise,
)

TWO_BOXES = ('{"version":1,"boxes":[{"subject":"dog","x":0.0,"y":0.0,"w":0.5,"h":1.0},'
             '{"subject":"cat","x":0.5,"y":0.1,"w":0.5,"h":0.9}]}')
T = 12  # text tokens of the hand-made prompt
WORDS = {"dog": [1], "cat": [4]}
SMALL_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
              "context_in_dim": 4096, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
              "depth_single_blocks": 1, "axes_dim": [16, 24, 24], "theta": 10000, "qkv_bias": True,
              "guidance_embed": True, "patch_size": 2}


@pytest.fixture(scope="module")
def small_flux(comfy, pack):
    """(MODEL, positive, negative): the small Flux and a prompt whose record says where 'dog' and 'cat' are."""
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.Flux(dict(SMALL_FLUX))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.diffusion_model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.ndim > 1 else
                    torch.full(p.shape, 1.0 if name.endswith("scale") else 0.0))
    mp = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    record = pack.cones2_core.prompt.PromptRecord("a dog and a cat", "flux", T,
                                                  {w: tuple(r) for w, r in WORDS.items()})
    pos = [[torch.randn(1, T, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                    "guidance": 3.5, "cones2": record}]]
    neg = [[torch.randn(1, T, 4096, generator=g) * 0.1, {"pooled_output": torch.zeros(1, 768), "guidance": 3.5}]]
    return mp, pos, neg


def guide(pack, model, cond, gw=0.08, pw=2.5, nw=-1e8, recurrence=False, layout=TWO_BOXES, record=True):
    node = pack.nodes.layout_node.Cones2LayoutGuidance
    return node.execute(model, cond, layout, gw, pw, nw, 0.0, 1.0, recurrence, record_maps=record).result


def sample(model, pos, neg, cfg=1.0, seed=1, steps=3, sampler="euler", h=64, w=80, batch=1):
    import nodes

    latent = {"samples": torch.zeros(batch, 16, h // 8, w // 8)}
    return nodes.common_ksampler(model, seed, steps, cfg, sampler, "simple", pos, neg, latent)[0]["samples"]


def shares(pack, model) -> dict[str, float]:
    return {r["subject"]: r["share"] for r in pack.nodes.maps_node.attention_report(model)}


def test_guidance_puts_each_subjects_attention_in_its_box(pack, small_flux):
    model, pos, neg = small_flux
    plain = {}
    for gw in (0.0, 0.08):
        gm, gpos = guide(pack, model, pos, gw=gw)
        sample(gm, gpos, neg)
        plain[gw] = shares(pack, gm)
    assert set(plain[0.08]) == {"dog", "cat"}
    for subject, guided in plain[0.08].items():
        assert guided >= 0.99, (subject, guided)
        assert guided > plain[0.0][subject] + 0.2, (subject, guided, plain[0.0][subject])


def test_soft_layout_share_rises_with_positive_weight(pack, small_flux):
    model, pos, neg = small_flux

    def run(gw, pw, nw):
        gm, gpos = guide(pack, model, pos, gw=gw, pw=pw, nw=nw)
        sample(gm, gpos, neg)
        return shares(pack, gm)

    assert_share_rises_with_positive_weight(pack, run)


def test_uncond_pass_and_other_prompts_are_bit_identical_and_the_model_unchanged(pack, small_flux):
    model, pos, neg = small_flux
    before = dict(model.model_options["transformer_options"])
    runs = {}
    for name, m in (("plain", model), ("guided", guide(pack, model, pos)[0])):
        logged = m.clone()
        log = CallLog()
        logged.set_model_unet_function_wrapper(log)
        sample(logged, pos, neg, cfg=3.0)
        runs[name] = (log, sample(m, neg, pos, cfg=3.0))
    (plain, plain_other), (guided, guided_other) = runs["plain"], runs["guided"]
    assert len(plain.calls) == len(guided.calls) == 3  # cond and uncond batched in one call per step
    # step 1 sees the same input: the uncond pass is bit-identical, the conditional one is guided
    assert torch.equal(plain.calls[0][1], guided.calls[0][1])
    assert not torch.equal(plain.calls[0][0], guided.calls[0][0])
    assert torch.equal(plain_other, guided_other)  # a prompt the node does not guide samples as without it
    assert model.model_options["transformer_options"] == before  # nothing written into the input model


def test_the_bias_the_host_attention_receives_is_the_documented_formula(pack, small_flux):
    """Another pack's optimized_attention_override, set first, is kept inside ours; in the guided calls it is
    handed the Cones 2 mask, which equals the core formula recomputed from the
    same q and k at flow_sigma(t)."""
    model, pos, neg = small_flux
    seen = []

    def theirs(func, *args, **kwargs):
        seen.append((args[0].clone(), args[1].clone(), kwargs.get("mask"), kwargs["transformer_options"]))
        return func(*args, **kwargs)

    m = model.clone()
    m.model_options["transformer_options"]["optimized_attention_override"] = theirs
    gm, gpos = guide(pack, m, pos, gw=0.08, nw=-5.0, record=False)
    sample(gm, gpos, neg, steps=2)
    plain = [s for s in seen if s[2] is None]
    masked = [s for s in seen if s[2] is not None]
    # CFG 1: every row of a call is guided, so the host's unbiased call is skipped: 2 steps x (1 double + 1 single)
    assert not plain and len(masked) == 2 * 2
    q, k, mask, opts = masked[0]
    rows = opts["cones2_rows"][0]
    txt, h, w = opts["cones2_joint_grid"]
    assert (txt, h, w) == (T, 4, 5)
    wm = rows.spec.weight_map(rows.subjects, rows.offsets, h, w, txt, q.device)
    want = joint_bias(q.double(), k.double(), txt, h * w, wm, flow_sigma(torch.tensor(rows.sigmas)), 0.08)
    torch.testing.assert_close(mask.double(), want.double(), rtol=1e-5, atol=1e-6)
    assert float(rows.sigmas[0]) == pytest.approx(1.0)  # Flux's first step is t = 1: the capped sigma


def test_the_exact_path_equals_the_dense_mask_path(pack, small_flux, monkeypatch):
    """Without another override, the guided rows take the exact mask-free path (guided_joint_attention): its samples
    and maps equal those of the dense-mask path whose mask is the documented formula (the test above), and it is the
    path taken."""
    model, pos, neg = small_flux
    joint = pack.nodes.architectures.joint
    masks = []
    runs = {}
    for exact in (True, False):
        monkeypatch.setattr(joint, "EXACT", exact)
        gm, gpos = guide(pack, model, pos, gw=0.3, nw=-3.0)
        with monkeypatch.context() as mp:
            mp.setattr(joint, "guided_joint_attention", _counting(joint.guided_joint_attention, masks))
            runs[exact] = (sample(gm, gpos, neg, steps=3), shares(pack, gm), len(masks))
        masks.clear()
    (exact_x, exact_maps, exact_calls), (dense_x, dense_maps, dense_calls) = runs[True], runs[False]
    assert exact_calls == 3 * 2 and dense_calls == 0  # 3 steps x (1 double + 1 single block), CFG 1
    torch.testing.assert_close(exact_x, dense_x, rtol=1e-4, atol=1e-4)
    assert exact_maps.keys() == dense_maps.keys() == {"dog", "cat"}
    for s in exact_maps:
        assert exact_maps[s] == pytest.approx(dense_maps[s], abs=1e-4)
    assert not torch.equal(exact_x, sample(model, pos, neg, steps=3))  # and the bias does something


def _counting(fn, log):
    def run(*args, **kwargs):
        log.append("exact")
        return fn(*args, **kwargs)
    return run


def test_composes_with_a_dit_block_replacement(pack, small_flux):
    """A PuLID-Flux style ``patches_replace['dit']`` double-block wrapper (it calls the original block and adds
    to the image stream): both act; guidance still places the subjects."""
    model, pos, neg = small_flux
    calls = []

    def block(args, extra):
        calls.append(1)
        out = extra["original_block"](args)
        return {"img": out["img"] + 0.01, "txt": out["txt"]}

    m = model.clone()
    m.set_model_patch_replace(block, "dit", "double_block", 0)
    gm, gpos = guide(pack, m, pos)
    out = sample(gm, gpos, neg)
    assert calls and min(shares(pack, gm).values()) >= 0.99
    gm_only, gpos_only = guide(pack, model, pos)
    assert not torch.equal(out, sample(gm_only, gpos_only, neg))  # the other pack's patch still acts


def test_batch_of_two_gives_what_two_single_runs_give(pack, small_flux):
    model, pos, neg = small_flux
    gm, gpos = guide(pack, model, pos, record=False)
    both = sample(gm, gpos, neg, batch=2)
    assert not torch.equal(both[0], both[1])
    one = sample(gm, gpos, neg, batch=1)
    torch.testing.assert_close(both[:1], one, rtol=1e-4, atol=1e-5)


def test_self_recurrence_on_flux_says_it_is_skipped(pack, small_flux, caplog):
    model, pos, neg = small_flux
    gm, gpos = guide(pack, model, pos, recurrence=True, record=False)
    with caplog.at_level(logging.WARNING, logger="comfyui-cones2"):
        out = sample(gm, gpos, neg)
    assert "not available on flow models" in caplog.text
    gm2, gpos2 = guide(pack, model, pos, recurrence=False, record=False)
    assert torch.equal(out, sample(gm2, gpos2, neg))


def test_sd_text_on_flux_is_a_clear_error(pack, small_flux):
    model, pos, _neg = small_flux
    sd_record = dataclasses.replace(pos[0][1]["cones2"], family="sd1")
    sd = [[torch.randn(1, 77, 768), {"cones2": sd_record}]]
    with pytest.raises(Cones2Error, match="768 wide.*4096-wide text"):
        guide(pack, model, sd)


def test_composes_with_a_flux_controlnet(pack, small_flux):
    """An XLabs-style Flux ControlNet (the host's ControlNetFlux, applied with ControlNetApplyAdvanced): guidance
    still places the subjects, the ControlNet still acts, at guidance_weight 0 the image is bit for bit what the
    ControlNet alone gives, and the ControlNet's own attention is never biased
    (harness.test_helpers.assert_composes_with_controlnet)."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.ops

    model, pos, neg = small_flux
    cfg = {k: v for k, v in SMALL_FLUX.items() if k != "image_model"}
    net = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init, **cfg)
    randomise(net, 5)
    control = comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"), manual_cast_dtype=None,
                                          extra_conds=["y", "guidance"])
    hint = torch.rand(1, 64, 80, 3, generator=torch.Generator().manual_seed(5))
    assert_composes_with_controlnet(pack, (model, pos, neg), (model, *controlled(pos, neg, control, hint)), guide,
                                    sample, shares)
