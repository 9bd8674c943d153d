"""SD3.5's own quirks, on its test bed (harness/tiny_sd3.py, the host's SD3 checkpoint loader): the joint bias
reaches the subject's CLIP rows and its T5 rows alike and equals the documented formula recomputed in float64;
SD3.5-medium's image-only self-attention is left to the host; a CLIP loaded without T5 gives CLIP rows only (the
record and residuals follow it, Train Residual refuses it); register tokens are refused. The shared contract runs
in test_beds.py (``-k sd3``)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from comfyui_cones2.cones2_core.errors import Cones2Error
from harness import tiny_sd3
from harness.beds import BEDS
from harness.host import build
from harness.test_helpers import (
    assert_composes_with_controlnet,
    blob_images,
    controlled,
    independent_context_rows,
    randomise,
    word_context_rows,
)

TWO_BOXES = ('{"version":1,"boxes":[{"subject":"dog","x":0.0,"y":0.0,"w":0.5,"h":1.0},'
             '{"subject":"cat","x":0.5,"y":0.1,"w":0.5,"h":0.9}]}')
PROMPT = "a photo of a dog and a cat"


@pytest.fixture(scope="module")
def sd3_files(comfy, host_dir):
    return build(tiny_sd3.__file__, host_dir, out=tiny_sd3.default_cache_dir(), timeout=1200)


@pytest.fixture(scope="module")
def sd3(sd3_files):
    return BEDS["sd3"].load(sd3_files)


def apply(pack, clip, text, residuals=None):
    return pack.nodes.residual_nodes.Cones2ApplyResiduals.execute(clip, text, residuals).result[0]


def guide(pack, model, cond, gw=0.08, pw=2.5, nw=-1e8, record=True):
    node = pack.nodes.layout_node.Cones2LayoutGuidance
    return node.execute(model, cond, TWO_BOXES, gw, pw, nw, 0.0, 1.0, False, record_maps=record).result


def sample(model, pos, neg, cfg=4.0, steps=2, seed=3, size=64):
    import nodes

    latent = {"samples": torch.zeros(1, 16, size // 8, size // 8)}
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]


def shares(pack, model) -> dict[str, float]:
    return {r["subject"]: r["share"] for r in pack.nodes.maps_node.attention_report(model)}


def with_inner_override(model, seen):
    """A clone whose transformer_options carry another pack's optimized_attention_override (set first, so ours
    wraps it): it records (q, k, mask, heads, transformer_options) of every call it is handed."""
    def theirs(func, *args, **kwargs):
        seen.append((args[0].clone(), args[1].clone(), kwargs.get("mask"), kwargs.get("heads"),
                     kwargs.get("transformer_options")))
        return func(*args, **kwargs)

    m = model.clone()
    m.model_options["transformer_options"]["optimized_attention_override"] = theirs
    return m


def test_the_bias_covers_the_clip_and_t5_rows_and_is_the_documented_formula(pack, sd3):
    """In the guided joint-attention calls the host's attention receives, as its mask, Cones 2's bias
    ``guidance_weight * W * log(1 + s^2) * std(S)`` times the softmax scale on image queries x text keys, recomputed
    here in float64 from the same q and k (the [B, L, heads*d] layout the MMDiT passes, heads as a keyword), and
    W's columns are the subjects' CLIP rows and T5 rows of the conditioning."""
    from comfyui_cones2.cones2_core.joint_attention import flow_sigma

    model, clip, _vae = sd3
    fam = pack.cones2_core.families.FAMILIES["sd3"]
    pos, neg = apply(pack, clip, PROMPT), apply(pack, clip, "")
    seen = []
    gm, gpos = guide(pack, with_inner_override(model, seen), pos, gw=0.08, nw=-5.0, record=False)
    sample(gm, gpos, neg, steps=1)
    masked = [s for s in seen if s[2] is not None]
    assert len(masked) == 2  # one step, the cond rows of the 2 joint blocks (the uncond pass is the host's call)
    for q, k, mask, heads, opts in masked:
        rows = opts["cones2_rows"][0]
        txt, h, w = opts["cones2_joint_grid"]
        n = h * w
        assert (txt, h, w) == (154, 4, 4) and q.shape == (1, txt + n, 128) and heads == 2
        wm = rows.spec.weight_map(rows.subjects, rows.offsets, h, w, txt, q.device)[0].double()  # [n, txt]
        cols = sorted(wm.abs().sum(0).nonzero().flatten().tolist())
        want_cols = word_context_rows(clip, PROMPT, "dog", fam) + word_context_rows(clip, PROMPT, "cat", fam)
        assert cols == sorted(want_cols) and max(cols) >= 77  # the T5 rows are biased too
        d = q.shape[-1] // heads
        q4 = q.double().view(1, -1, heads, d).transpose(1, 2)
        k4 = k.double().view(1, -1, heads, d).transpose(1, 2)
        scores = q4[:, :, txt:] @ k4[:, :, :txt].transpose(-1, -2)  # [1, heads, image, text]
        s = float(flow_sigma(torch.tensor(rows.sigmas, dtype=torch.float64))[0])
        coef = 0.08 * math.log(1 + s * s) * float(scores.flatten().std(unbiased=True))
        want = torch.zeros(1, 1, txt + n, txt + n, dtype=torch.float64)
        want[0, 0, txt:, :txt] = d ** -0.5 * coef * wm
        torch.testing.assert_close(mask.double(), want, rtol=1e-5, atol=1e-6)


def test_the_image_only_self_attention_of_sd35_medium_is_left_to_the_host(pack, sd3):
    """The bed has SD3.5-medium's x_block_self_attn in block 0: that call (the image tokens alone, shorter than
    text + image) reaches the host unbiased in every row, while the joint calls of the guided rows are biased."""
    model, clip, _vae = sd3
    dm = model.get_model_object("diffusion_model")
    assert dm.joint_blocks[0].x_block.x_block_self_attn and not dm.joint_blocks[1].x_block.x_block_self_attn
    pos, neg = apply(pack, clip, PROMPT), apply(pack, clip, "")
    seen = []
    gm, gpos = guide(pack, with_inner_override(model, seen), pos, record=False)
    sample(gm, gpos, neg, steps=1)
    short = [s for s in seen if s[0].shape[1] == 16]
    joint = [s for s in seen if s[0].shape[1] == 154 + 16]
    assert len(short) == 1 and short[0][0].shape[0] == 2 and short[0][2] is None  # both rows, as the host calls it
    assert len(joint) == 4 and sum(s[2] is not None for s in joint) == 2


def test_soft_layout_share_rises_with_positive_weight(pack, sd3):
    """With a soft negative weight the in-box attention share rises with positive_weight, and at guidance weight
    0 it is lower than with the bias."""
    model, clip, _vae = sd3
    pos, neg = apply(pack, clip, PROMPT), apply(pack, clip, "")
    got = {}
    for gw, pw in ((0.0, 10.0), (0.08, 0.0), (0.08, 2.5), (0.08, 10.0)):
        gm, gpos = guide(pack, model, pos, gw=gw, pw=pw, nw=-5.0)
        sample(gm, gpos, neg, steps=1)
        got[gw, pw] = shares(pack, gm)
    for subject in ("dog", "cat"):
        series = [got[0.08, pw][subject] for pw in (0.0, 2.5, 10.0)]
        assert series[0] < series[1] < series[2], (subject, series)
        assert series[2] > got[0.0, 10.0][subject] + 0.1, (subject, series, got[0.0, 10.0][subject])


def test_a_clip_without_t5_gives_clip_rows_only(pack, sd3, sd3_files, caplog, res_dir):
    """SD3's loaders allow CLIP-L + CLIP-G alone: the conditioning is then the CLIP rows only (77), and the record,
    the residuals and Layout Guidance follow it (a residual's T5 part is not applied, with a warning); Train
    Residual refuses such a CLIP, saying to load T5 too."""
    model, _clip, vae = sd3
    _m, clip, _v = tiny_sd3.load(sd3_files, without=("t5xxl",))
    fam = pack.cones2_core.families.FAMILIES["sd3"]
    assert pack.nodes.encoding.present_keys(clip, fam) == ("l", "g")
    g = torch.Generator().manual_seed(1)
    dog = pack.cones2_core.residual.Residual("dog", "sd3", {e.key: torch.randn(1, e.width, generator=g)
                                                            for e in fam.encoders})
    base = apply(pack, clip, PROMPT)[0]
    with caplog.at_level(logging.WARNING, logger="comfyui-cones2"):
        out = apply(pack, clip, PROMPT, [dog])[0]
    assert "has no T5-XXL, so the T5-XXL part of residual" in caplog.text
    assert out[0].shape == base[0].shape == (1, 77, 4096)
    record = out[1]["cones2"]
    rows = independent_context_rows(clip, PROMPT, "dog", fam, "l")
    assert record.n_tokens == 77 and list(record.words["dog"]) == rows
    expected = base[0].clone()
    expected[0, rows[0], :768] += dog.tensors["l"][0]
    expected[0, rows[0], 768:2048] += dog.tensors["g"][0]
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-5)
    gm, gpos = guide(pack, model, [out])
    sample(gm, gpos, apply(pack, clip, ""), steps=1)
    assert min(shares(pack, gm).values()) >= 0.99
    with pytest.raises(Cones2Error, match="loaded without T5-XXL.*load the CLIP with all its text encoders"), \
            torch.inference_mode():
        pack.nodes.train_node.Cones2TrainResidual.execute(model, clip, vae, "dog", steps=1, resolution=64,
                                                          save_name="never_sd3", mode="fast", images=blob_images())
    assert not (res_dir / "never_sd3.safetensors").exists()


def test_register_tokens_before_the_text_are_refused(pack, sd3, monkeypatch):
    """An MMDiT with learned register tokens (register_length > 0; the host's detection never sets it for SD3
    files) would shift the text rows in the joint sequence: refused, not guided at the wrong keys."""
    model, clip, _vae = sd3
    pos = apply(pack, clip, PROMPT)
    monkeypatch.setattr(model.get_model_object("diffusion_model"), "register_length", 4)
    with pytest.raises(Cones2Error, match="register tokens before the text"):
        guide(pack, model, pos)


def test_the_exact_path_equals_the_dense_mask_path(pack, sd3, monkeypatch):
    """The MMDiT's [B, L, heads*d] layout (v handed unflattened) through the exact mask-free path gives the samples
    and maps of the dense-mask path (whose mask is the documented formula, test above), at CFG 4 where a batch mixes
    guided and unguided rows."""
    model, clip, _vae = sd3
    joint = pack.nodes.architectures.joint
    pos, neg = apply(pack, clip, PROMPT), apply(pack, clip, "")
    runs = {}
    for exact in (True, False):
        monkeypatch.setattr(joint, "EXACT", exact)
        gm, gpos = guide(pack, model, pos, gw=0.3, nw=-3.0)
        runs[exact] = (sample(gm, gpos, neg, steps=2), shares(pack, gm))
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-4)
    for s in ("dog", "cat"):
        assert runs[True][1][s] == pytest.approx(runs[False][1][s], abs=1e-4)
    assert not torch.equal(runs[True][0], sample(model, pos, neg, steps=2))


def sd3_controlnet(kind, model):
    """The smallest ControlNet of each kind the host builds for SD3 models, random (output projections nonzero):
    ``mmdit`` is ``load_controlnet_mmdit``'s (InstantX-style SD3 ControlNets: an MMDiT with its own joint
    attention over text and image, here one joint block of the bed's width), ``sd35`` is ``load_controlnet_sd35``'s
    (Stability's SD3.5 ControlNets: image-only blocks, its patch embedder copied from the model in pre_run)."""
    import comfy.cldm.dit_embedder
    import comfy.cldm.mmdit
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ldm.modules.diffusionmodules.mmdit
    import comfy.ops

    cpu, dtype = torch.device("cpu"), model.model.get_dtype()
    ops = comfy.ops.disable_weight_init
    if kind == "mmdit":
        config = {k: v for k, v in model.model.model_config.unet_config.items() if k != "dtype"}  # as detected
        net = comfy.cldm.mmdit.ControlNet(num_blocks=1, control_latent_channels=16, operations=ops, device=cpu,
                                          dtype=dtype, **config)
        randomise(net, 5)
        with torch.no_grad():  # a checkpoint's pos_embed: the host's 2-d sin-cos table, as the bed's own
            size = net.pos_embed_max_size
            net.pos_embed.copy_(comfy.ldm.modules.diffusionmodules.mmdit.get_2d_sincos_pos_embed_torch(
                net.hidden_size, size, size)[None])
        latent_format = comfy.latent_formats.SD3()
        latent_format.shift_factor = 0  # as load_controlnet_mmdit sets it
        return comfy.controlnet.ControlNet(net, compression_ratio=1, latent_format=latent_format, load_device=cpu,
                                           manual_cast_dtype=None)
    net = comfy.cldm.dit_embedder.ControlNetEmbedder(
        img_size=None, patch_size=2, in_chans=16, num_layers=1, main_model_double=2, double_y_emb=False,
        attention_head_dim=64, num_attention_heads=2, adm_in_channels=2048, device=cpu, dtype=dtype, operations=ops)
    randomise(net, 5)
    return comfy.controlnet.ControlNetSD35(net, compression_ratio=1, latent_format=comfy.latent_formats.SD3(),
                                           load_device=cpu, manual_cast_dtype=None)


@pytest.mark.parametrize("kind", ["mmdit", "sd35"])
def test_composes_with_an_sd3_controlnet(pack, sd3, kind):
    """Both of the host's SD3 ControlNet kinds, applied with ControlNetApplyAdvanced (the hint through the bed's
    VAE, as their latent format asks): guidance still places the subjects, the ControlNet still acts, at
    guidance_weight 0 the sample is the ControlNet's alone, and the MMDiT ControlNet's own joint attention is never
    biased (harness.test_helpers.assert_composes_with_controlnet)."""
    model, clip, vae = sd3
    pos, neg = apply(pack, clip, PROMPT), apply(pack, clip, "")
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(6))
    cpos, cneg = controlled(pos, neg, sd3_controlnet(kind, model), hint, vae)
    # the ControlNet is the same every time it is built (no weight or buffer left as torch.empty found it)
    again = controlled(pos, neg, sd3_controlnet(kind, model), hint, vae)
    assert torch.equal(sample(model, cpos, cneg, steps=1), sample(model, *again, steps=1))
    assert_composes_with_controlnet(pack, (model, pos, neg), (model, cpos, cneg), guide,
                                    lambda m, p, n: sample(m, p, n, steps=1), shares)
