"""Chroma's quirks, through the real host's Chroma classes (``model_base.Chroma``, ``comfy.ldm.chroma``).

A small Chroma built in-process (hidden size 128, one double and one single block, an approximator of one
128-wide layer, random weights) keeps these fast; the loader-detected bed (``harness/tiny_chroma.py``) runs the
shared contract (test_beds.py). What is Chroma's own: real CFG with an unpadded T5, so the cond and uncond passes
have different text lengths and come in separate model calls; the host's attention mask (the conditioning's
``attention_mask``) reaching every block; Chroma Radiance refused; its blocks adding in place (training).
"""

from __future__ import annotations

import copy

import pytest
import torch

from comfyui_cones2.cones2_core.errors import Cones2Error
from comfyui_cones2.cones2_core.joint_attention import flow_sigma, joint_bias
from harness.test_helpers import (
    assert_composes_with_controlnet,
    assert_share_rises_with_positive_weight,
    controlled,
    randomise,
)

TWO_BOXES = ('{"version":1,"boxes":[{"subject":"dog","x":0.0,"y":0.0,"w":0.5,"h":1.0},'
             '{"subject":"cat","x":0.5,"y":0.1,"w":0.5,"h":0.9}]}')
T, T_NEG = 12, 5  # text tokens of the hand-made prompt and of its (shorter: Chroma's T5 pads nothing) negative
WORDS = {"dog": [1], "cat": [4]}
H, W = 4, 5  # image tokens of a 64 x 80 sample (patch 2 on the 8 x 10 latent)
SMALL_CHROMA = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 4096,
                "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
                "axes_dim": [16, 24, 24], "theta": 10000, "qkv_bias": True, "patch_size": 2, "in_dim": 64,
                "out_dim": 128, "hidden_dim": 128, "n_layers": 1}


@pytest.fixture(scope="module")
def small_chroma(comfy, pack):
    """(MODEL, positive, negative): the small Chroma and a prompt whose record says where 'dog' and 'cat' are."""
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.Chroma(dict(SMALL_CHROMA))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.diffusion_model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.ndim > 1 else
                    torch.full(p.shape, 1.0 if name.endswith("scale") else 0.0))
    mp = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    record = pack.cones2_core.prompt.PromptRecord("a dog and a cat", "chroma", T,
                                                  {w: tuple(r) for w, r in WORDS.items()})
    pos = [[torch.randn(1, T, 4096, generator=g), {"pooled_output": None, "cones2": record}]]
    neg = [[torch.randn(1, T_NEG, 4096, generator=g) * 0.1, {"pooled_output": None}]]
    return mp, pos, neg


def guide(pack, model, cond, gw=0.08, pw=2.5, nw=-1e8, layout=TWO_BOXES, record=True):
    node = pack.nodes.layout_node.Cones2LayoutGuidance
    return node.execute(model, cond, layout, gw, pw, nw, 0.0, 1.0, False, record_maps=record).result


def sample(model, pos, neg, cfg=4.0, seed=1, steps=3):
    import nodes

    latent = {"samples": torch.zeros(1, 16, H * 2, W * 2)}
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]


def shares(pack, model) -> dict[str, float]:
    return {r["subject"]: r["share"] for r in pack.nodes.maps_node.attention_report(model)}


def watching(model):
    """A clone of ``model`` with another pack's optimized_attention_override set first (ours keeps it inside),
    and the list of what it is handed: (q, k, mask, transformer_options) per attention call."""
    seen = []

    def theirs(func, *args, **kwargs):
        seen.append((args[0].clone(), args[1].clone(), kwargs.get("mask"), kwargs["transformer_options"]))
        return func(*args, **kwargs)

    m = model.clone()
    m.model_options["transformer_options"]["optimized_attention_override"] = theirs
    return m, seen


def test_the_bias_is_the_documented_formula_at_real_cfg_and_the_uncond_calls_are_untouched(pack, small_chroma):
    """Chroma samples at real CFG with an unpadded T5: the prompt (12 tokens) and its negative (5) are separate
    model calls. The guided call's mask equals the core formula re-derived in float64 from the same q and k at
    flow_sigma(t); the negative's calls get no mask and give bit for bit what they give without the node."""
    model, pos, neg = small_chroma
    m, seen = watching(model)
    sample(m, pos, neg, steps=2)
    plain_calls = [s[:2] for s in seen]
    seen.clear()
    gm, gpos = guide(pack, m, pos, gw=0.08, nw=-5.0, record=False)
    sample(gm, gpos, neg, steps=2)
    masked = [s for s in seen if s[2] is not None]
    unmasked = [s for s in seen if s[2] is None]
    assert len(masked) == len(unmasked) == 2 * 2  # 2 steps x (1 double + 1 single block), cond and uncond apart
    assert all(s[0].shape[2] == T + H * W for s in masked) and all(s[0].shape[2] == T_NEG + H * W for s in unmasked)
    assert torch.equal(unmasked[0][0], next(q for q, _k in plain_calls if q.shape[2] == T_NEG + H * W))
    q, k, mask, opts = masked[0]
    rows = opts["cones2_rows"][0]
    assert opts["cones2_joint_grid"] == (T, H, W)
    wm = rows.spec.weight_map(rows.subjects, rows.offsets, H, W, T, q.device)
    want = joint_bias(q.double(), k.double(), T, H * W, wm, flow_sigma(torch.tensor(rows.sigmas)), 0.08)
    torch.testing.assert_close(mask.double(), want.double(), rtol=1e-5, atol=1e-6)
    assert float(rows.sigmas[0]) == pytest.approx(1.0)  # the first step is t = 1: the capped sigma


def test_the_hosts_attention_mask_stays_under_the_bias(pack, small_chroma):
    """Chroma's blocks get the conditioning's attention mask (model_base.Flux.extra_conds, e.g. StyleModelApply's
    attention bias); on the guided rows the host receives that mask plus the Cones 2 bias, on the negative's
    rows the host's own call is unchanged."""
    model, pos, neg = small_chroma
    g = torch.Generator().manual_seed(7)
    host_mask = torch.randn(1, T + H * W, T + H * W, generator=g)
    mpos = [[pos[0][0], {**pos[0][1], "attention_mask": host_mask, "attention_mask_img_shape": (H, W)}]]
    m, seen = watching(model)
    gm, gpos = guide(pack, m, mpos, gw=0.08, nw=-5.0, record=False)
    sample(gm, gpos, neg, steps=1)
    guided = [s for s in seen if s[0].shape[2] == T + H * W]
    assert len(guided) == 2
    q, k, mask, opts = guided[0]
    rows = opts["cones2_rows"][0]
    wm = rows.spec.weight_map(rows.subjects, rows.offsets, H, W, T, q.device)
    bias = joint_bias(q.double(), k.double(), T, H * W, wm, flow_sigma(torch.tensor(rows.sigmas)), 0.08)
    torch.testing.assert_close(mask.double(), bias.double() + host_mask.double().unsqueeze(1), rtol=1e-5,
                               atol=1e-5)
    assert all(s[2] is None for s in seen if s[0].shape[2] == T_NEG + H * W)


def test_soft_layout_share_rises_with_positive_weight(pack, small_chroma):
    model, pos, neg = small_chroma

    def run(gw, pw, nw):
        gm, gpos = guide(pack, model, pos, gw=gw, pw=pw, nw=nw)
        sample(gm, gpos, neg)
        return shares(pack, gm)

    assert_share_rises_with_positive_weight(pack, run)


def test_chroma_radiance_is_refused_by_guidance_and_training(pack, small_chroma):
    import comfy.supported_models

    model, pos, _neg = small_chroma
    radiant = model.clone()
    radiant.model = copy.copy(model.model)  # the same weights, the host's pixel-space Chroma config
    radiant.model.model_config = comfy.supported_models.ChromaRadiance(dict(SMALL_CHROMA, image_model="chroma_radiance"))
    with pytest.raises(Cones2Error, match=r"Chroma Radiance \(pixel space\).*connect a Chroma model"):
        guide(pack, radiant, pos)
    with pytest.raises(Cones2Error, match=r"Chroma Radiance"):
        pack.nodes.architectures.prediction_type(radiant)
    assert pack.nodes.architectures.prediction_type(model)[0] == "flow"


def _context_grad(dm, wrap):
    """d(sum of the output)/d(context) of the small Chroma with each block's forward wrapped by ``wrap``."""
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, T, 4096, generator=g).requires_grad_(True)
    blocks = [*dm.double_blocks, *dm.single_blocks]
    for b in blocks:
        b.forward = wrap(type(b).forward.__get__(b))
    try:
        dm(x, torch.tensor([0.7]), ctx, torch.tensor([0.0])).sum().backward()
    finally:
        for b in blocks:
            del b.forward
    return ctx.grad


def test_training_through_the_in_place_blocks_gives_autograds_gradient(pack, small_chroma):
    """Chroma's blocks add into their streams in place (``img.addcmul_``) after normalising them: plain autograd
    refuses that; with InPlaceSafe and private inputs it runs (autograd's own in-place checks pass), and the
    checkpointed blocks that training uses give the same gradient."""
    chroma = pack.nodes.architectures.chroma
    dm = copy.deepcopy(small_chroma[0].model.diffusion_model)
    with pytest.raises(RuntimeError, match="inplace operation|in-place operation"):
        _context_grad(dm, lambda f: f)
    plain = _context_grad(dm, chroma._private_inputs)

    def checkpointed(f):
        return lambda *a, **kw: torch.utils.checkpoint.checkpoint(chroma._private_inputs(f), *a, use_reentrant=False,
                                                                  **kw)

    assert float(plain.abs().sum()) > 0
    torch.testing.assert_close(_context_grad(dm, checkpointed), plain, rtol=1e-5, atol=1e-7)


def test_the_exact_path_equals_the_dense_mask_path_with_the_hosts_mask(pack, small_chroma, monkeypatch):
    """Without another pack's override the guided rows take the exact mask-free path (joint.EXACT): on Chroma,
    with the host's attention mask on the prompt and its shorter negative in separate calls, it gives the samples
    and maps of the dense-mask path (whose mask is the formula plus the host's mask, tests above)."""
    model, pos, neg = small_chroma
    joint = pack.nodes.architectures.joint
    g = torch.Generator().manual_seed(7)
    host_mask = torch.randn(1, T + H * W, T + H * W, generator=g)
    mpos = [[pos[0][0], {**pos[0][1], "attention_mask": host_mask, "attention_mask_img_shape": (H, W)}]]
    runs = {}
    for exact in (True, False):
        monkeypatch.setattr(joint, "EXACT", exact)
        gm, gpos = guide(pack, model, mpos, gw=0.3, nw=-3.0)
        runs[exact] = (sample(gm, gpos, neg, steps=2), shares(pack, gm))
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-4)
    for s in ("dog", "cat"):
        assert runs[True][1][s] == pytest.approx(runs[False][1][s], abs=1e-4)
    assert not torch.equal(runs[True][0], sample(model, mpos, neg, steps=2))


def test_composes_with_a_flux_controlnet(pack, small_chroma):
    """The host routes Flux ControlNets to Chroma (its blocks add the ControlNet's ``input``/``output`` as Flux's do;
    Chroma's ``guidance`` cond, 0, feeds the ControlNet's guidance embedder; no pooled vector, so its ``y`` is
    zeros): an XLabs-style ControlNetFlux of the small model's width, applied with ControlNetApplyAdvanced. Guidance
    still places the subjects, the ControlNet still acts, at guidance_weight 0 the sample is the ControlNet's
    alone, and the ControlNet's own attention is never biased (harness.test_helpers)."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.ops

    model, pos, neg = small_chroma
    flux = {"in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 128,
            "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 24, 24],
            "theta": 10000, "qkv_bias": True, "guidance_embed": True, "patch_size": 2}
    net = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init, **flux)
    randomise(net, 5)
    control = comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"), manual_cast_dtype=None,
                                          extra_conds=["y", "guidance"])  # as load_controlnet_flux_xlabs_mistoline
    hint = torch.rand(1, H * 16, W * 16, 3, generator=torch.Generator().manual_seed(6))
    assert_composes_with_controlnet(pack, (model, pos, neg), (model, *controlled(pos, neg, control, hint)), guide,
                                    sample, shares)
