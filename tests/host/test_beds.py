"""The contract every family keeps, run on every family's test bed (harness/beds.py): residuals at the subject's
rows, Layout Guidance on the conditional pass only, the attention maps, Train Residual's fast mode, and the
wrong-family errors both ways. A new family gets these by declaring its bed; its own quirks stay in its own file
(test_flux_*.py, test_residuals.py's long prompts and SDXL halves, ...)."""

from __future__ import annotations

import copy
import hashlib
import inspect

import pytest
import torch

from comfyui_cones2.cones2_core.errors import Cones2Error
from harness.beds import BEDS
from harness.host import build
from harness.test_helpers import (
    blob_images,
    independent_context_rows,
    independent_rows,
    logged,
    text_encode,
    word_context_rows,
)

TWO_BOXES = ('{"version":1,"boxes":[{"subject":"dog","x":0.0,"y":0.0,"w":0.5,"h":1.0},'
             '{"subject":"cat","x":0.5,"y":0.1,"w":0.5,"h":0.9}]}')


@pytest.fixture(scope="module", params=sorted(BEDS), ids=sorted(BEDS))
def bed(request, comfy, host_dir):
    """(Bed, MODEL, CLIP, VAE) of one family's bed, loaded through the host's loaders (the Flux bed is the session's
    own ``flux`` fixture, so the suite holds it once)."""
    spec = BEDS[request.param]
    if spec.builder == "tiny_flux":
        return (spec, *spec.shorten(request.getfixturevalue("flux")))
    builder = spec.builder_module()
    files = build(builder.__file__, host_dir, out=builder.default_cache_dir(), timeout=1200)
    return (spec, *spec.load(files))


def needs(bed, feature):
    if feature not in bed[0].supports:
        pytest.skip(f"{bed[0].family} does not support {feature}")


def residual(pack, family, subject="dog", seed=0, strength=1.0):
    fam = pack.cones2_core.families.FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    return pack.cones2_core.residual.Residual(subject, family, {e.key: torch.randn(1, e.width, generator=g)
                                                                for e in fam.encoders}, strength=strength)


def apply(pack, clip, text, residuals=None):
    return pack.nodes.residual_nodes.Cones2ApplyResiduals.execute(clip, text, residuals).result[0]


def guide(pack, model, cond, gw=0.08, nw=-1e8, record=True, layout=TWO_BOXES):
    node = pack.nodes.layout_node.Cones2LayoutGuidance
    return node.execute(model, cond, layout, gw, 2.5, nw, 0.0, 1.0, False, record_maps=record).result


def sample(spec, model, pos, neg, cfg=None, steps=2, seed=3, size=64):
    import nodes

    latent = {"samples": spec.empty_latent(size)}
    cfg = spec.cfg if cfg is None else cfg
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]


def same_pooled(a: dict, b: dict) -> bool:
    """Both conditionings' pooled vectors equal, or both absent (Wan's umT5 and Qwen-Image's LLM give none)."""
    pa, pb = a.get("pooled_output"), b.get("pooled_output")
    return pa is None and pb is None if pa is None or pb is None else torch.equal(pa, pb)


def weights_digest(module) -> str:
    """A hash of every parameter's and buffer's bytes (no copy of the weights is kept)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# ---- residuals ---------------------------------------------------------------------------------------------------

WEIGHTED = "a photo of a (dog:1.3) next to another dog and a cat"


def test_no_residuals_is_clip_text_encode_and_records_every_words_rows(pack, bed):
    spec, _model, clip, _vae = bed
    out = apply(pack, clip, WEIGHTED)
    ref = text_encode(clip, WEIGHTED)
    assert len(out) == len(ref) == 1
    assert torch.equal(out[0][0], ref[0][0])
    assert same_pooled(out[0][1], ref[0][1])
    record = out[0][1]["cones2"]
    assert record.family == spec.family and record.n_tokens == ref[0][0].shape[1]
    fam = pack.cones2_core.families.FAMILIES[spec.family]
    for word in ("photo", "dog", "cat", "another"):  # every encoder's rows (SD3.5: its CLIP rows and its T5 rows)
        assert list(record.words[word]) == word_context_rows(clip, WEIGHTED, word, fam), word
        for enc in fam.encoders:
            assert set(independent_context_rows(clip, WEIGHTED, word, fam, enc.key)) <= set(record.words[word])
    assert len(independent_rows(clip, WEIGHTED, "dog", fam.encoders[0].key)) == 2  # both dogs, weighted or not


def test_residual_added_exactly_at_the_subjects_rows_of_every_encoder(pack, bed):
    spec, _model, clip, _vae = bed
    needs(bed, "residuals")
    fam = pack.cones2_core.families.FAMILIES[spec.family]
    dog, cat = residual(pack, spec.family, "dog", seed=1, strength=0.7), residual(pack, spec.family, "cat", seed=2)
    base = text_encode(clip, WEIGHTED)[0]
    out = apply(pack, clip, WEIGHTED, [dog, cat])[0]
    assert same_pooled(out[1], base[1])  # pooled left as the host made it
    base, out = base[0], out[0]
    expected = base.clone()
    for res in (dog, cat):
        for enc in fam.encoders:
            for row in independent_context_rows(clip, WEIGHTED, res.subject, fam, enc.key):
                block = expected[0, row, enc.offset:enc.offset + enc.width]
                expected[0, row, enc.offset:enc.offset + enc.width] = block + res.tensors[enc.key][0] * res.strength
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    changed = (out != base).any(-1)[0].nonzero().flatten().tolist()
    assert changed == sorted(word_context_rows(clip, WEIGHTED, "dog", fam) + word_context_rows(clip, WEIGHTED, "cat", fam))


def test_a_residual_of_another_family_is_refused(pack, bed):
    spec, _model, clip, _vae = bed
    fam = pack.cones2_core.families.FAMILIES[spec.family]
    for other in sorted(set(BEDS) - {spec.family}):
        theirs = pack.cones2_core.families.FAMILIES[other]
        with pytest.raises(Cones2Error, match=rf"is for {theirs.name}.* but the connected CLIP is {fam.name}"):
            apply(pack, clip, spec.prompt, [residual(pack, other)])


# ---- layout guidance and the maps --------------------------------------------------------------------------------

def test_guidance_puts_each_subjects_attention_in_its_box_and_the_maps_show_it(pack, bed):
    spec, model, clip, _vae = bed
    needs(bed, "guidance")
    pos, neg = apply(pack, clip, spec.prompt), apply(pack, clip, "")
    plain = sample(spec, model, pos, neg)
    gm, gpos = guide(pack, model, pos)
    out = sample(spec, gm, gpos, neg)
    assert not torch.equal(out, plain)
    shares = {(r["grid"], r["subject"]): r["share"] for r in pack.nodes.maps_node.attention_report(gm)}
    assert {s for _g, s in shares} == {"dog", "cat"}
    assert min(shares.values()) >= 0.99, shares
    images, report = pack.nodes.maps_node.Cones2AttentionMaps.execute(gm, {"samples": out}).result[:2]
    assert images.ndim == 4 and images.shape[-1] == 3 and "dog" in report and "cat" in report
    # unguided, the same words spread over the whole image (the test would pass without the bias otherwise)
    gm0, gpos0 = guide(pack, model, pos, gw=0.0)
    assert torch.equal(sample(spec, gm0, gpos0, neg), plain)
    rows = pack.nodes.maps_node.attention_report(gm0)
    finest = max((r["grid"] for r in rows), key=lambda g: g[0] * g[1])
    unguided = {r["subject"]: r["share"] for r in rows if r["grid"] == finest}  # (a coarse grid's box may be all)
    assert set(unguided) == {"dog", "cat"} and max(unguided.values()) < 0.9, unguided


def test_the_uncond_pass_is_bit_identical_and_the_model_unchanged(pack, bed):
    spec, model, clip, _vae = bed
    needs(bed, "guidance")
    pos, neg = apply(pack, clip, spec.prompt), apply(pack, clip, "a photo")
    before = weights_digest(model.model.diffusion_model), copy.deepcopy(model.model_options)
    runs, outs = [], []
    for guided in (False, True):
        m, pos_used = guide(pack, model, pos) if guided else (model, pos)
        m, log = logged(m)
        outs.append(sample(spec, m, pos_used, neg, cfg=2.0, steps=1))
        # the first step's passes (in one batched call, or two where the prompts' lengths differ: an LLM's text)
        runs.append({k: v for call in reversed(log.calls[:2]) for k, v in call.items()})
        if guided:  # deterministic for a seed
            assert torch.equal(sample(spec, m, pos_used, neg, cfg=2.0, steps=1), outs[-1])
    assert torch.equal(runs[0][1], runs[1][1])  # the negative prompt's pass
    assert not torch.equal(runs[0][0], runs[1][0])  # the guided pass
    assert not torch.equal(outs[0], outs[1])
    assert (weights_digest(model.model.diffusion_model), model.model_options) == before  # cloned, not patched


def test_a_model_of_another_family_is_refused(pack, bed, loaded):
    spec, _model, clip, _vae = bed
    needs(bed, "guidance")
    pos = apply(pack, clip, spec.prompt)
    other = "sd2" if spec.family != "sd2" else "sd1"
    fam = pack.cones2_core.families.FAMILIES[spec.family]
    with pytest.raises(Cones2Error, match=rf"the conditioning is {fam.name} text .* but the model is "
                                          rf"{pack.cones2_core.families.FAMILIES[other].name}"):
        guide(pack, loaded(other)[0], pos)


# ---- training -------------------------------------------------------------------------------------------------

def test_the_default_mode_is_fast_and_no_family_refuses_it(pack):
    """Train Residual's default mode (the widget's and execute's) must train on every family: paper mode is
    refused where the text encoder is T5/LLM-sized, so a paper default would be an error there."""
    node = pack.nodes.train_node.Cones2TrainResidual
    widget = next(i for i in node.define_schema().inputs if i.id == "mode")
    default = inspect.signature(node.execute).parameters["mode"].default
    assert widget.default == default == "fast"
    refused = [f.key for f in pack.cones2_core.families.FAMILIES.values() if f.paper_refusal]
    assert refused, "no family refuses paper mode any more: revisit the default (docs/training.md)"


def test_fast_training_writes_a_residual_of_the_family_and_changes_nothing_else(pack, bed, res_dir, monkeypatch):
    """Fast mode, by the node's default mode (no ``mode`` given): on every family it trains, no error."""
    spec, model, clip, vae = bed
    needs(bed, "train_fast")
    monkeypatch.setattr(pack.nodes.train_loop, "EVAL_SAMPLES", 2)
    before = weights_digest(model.model.diffusion_model), weights_digest(clip.cond_stage_model)
    node = pack.nodes.train_node.Cones2TrainResidual
    with torch.inference_mode():
        chain, filename, curve = node.execute(model, clip, vae, "dog", steps=2, learning_rate=1e-2, resolution=64,
                                              seed=1, save_name=f"bed_{spec.family}",
                                              images=blob_images()).result
    loaded = pack.cones2_core.residual.load_residual(str(res_dir / filename))
    fam = pack.cones2_core.families.FAMILIES[spec.family]
    assert loaded.family == spec.family and loaded.subject == "dog"
    assert loaded.metadata["cones2.train.mode"] == "fast"
    for enc in fam.encoders:
        rows = independent_rows(clip, "dog", "dog", enc.key)
        assert tuple(loaded.tensors[enc.key].shape) == (len(rows), enc.width)
        assert float(loaded.tensors[enc.key].abs().sum()) > 0  # it trained
        assert torch.equal(loaded.tensors[enc.key], chain[0].tensors[enc.key])
    assert curve.ndim == 4
    assert (weights_digest(model.model.diffusion_model), weights_digest(clip.cond_stage_model)) == before


def test_paper_mode_trains_or_says_to_use_fast_mode(pack, bed, res_dir, monkeypatch):
    spec, model, clip, vae = bed
    fam = pack.cones2_core.families.FAMILIES[spec.family]
    if "train_paper" in spec.supports:
        assert not fam.paper_refusal
        pytest.skip("paper mode trains on this family: tests/host/test_train.py")
    with pytest.raises(Cones2Error, match="set mode to 'fast'"), torch.inference_mode():
        pack.nodes.train_node.Cones2TrainResidual.execute(model, clip, vae, "dog", steps=1, resolution=64,
                                                          save_name="never", mode="paper", images=blob_images())
    assert not (res_dir / "never.safetensors").exists()
