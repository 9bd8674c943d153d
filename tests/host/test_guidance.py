"""Layout Attention Guidance through the real host (tiny SD1.5, SD2.x-v and SDXL checkpoints)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from comfyui_cones2.cones2_core.errors import Cones2Error
from comfyui_cones2.cones2_core.families import FAMILIES
from harness import tiny_checkpoints
from harness.test_helpers import logged

TWO_BOXES = ('{"version":1,"boxes":[{"subject":"dog","x":0.0,"y":0.0,"w":0.5,"h":1.0},'
             '{"subject":"cat","x":0.5,"y":0.1,"w":0.5,"h":0.9}]}')
PROMPT = "a dog and a cat on a sofa"

# The tiny checkpoints exist for the UNet families (Flux has its own bed: test_flux_*.py).
UNET_FAMILIES = sorted(k for k, f in FAMILIES.items() if f.architecture == "unet")


def encode(pack, clip, text=PROMPT):
    return pack.nodes.residual_nodes.Cones2ApplyResiduals.execute(clip, text, None).result[0]


def negative(clip):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, "")[0]


def guide(pack, model, cond, layout=TWO_BOXES, gw=0.08, start=0.0, end=1.0, recurrence=False, **kw):
    node = pack.nodes.layout_node.Cones2LayoutGuidance
    kw.setdefault("record_maps", True)  # these tests read the attention maps
    return node.execute(model, cond, layout, gw, 2.5, -1e8, start, end, recurrence, **kw).result


def sample(model, pos, neg, steps=3, cfg=5.0, seed=3, h=64, w=80, batch=1, sampler="euler"):
    import nodes

    latent = {"samples": torch.zeros(batch, 4, h // 8, w // 8)}
    return nodes.common_ksampler(model, seed, steps, cfg, sampler, "normal", pos, neg, latent)[0]["samples"]


def report(pack, model):
    return pack.nodes.maps_node.attention_report(model)


@pytest.mark.parametrize("fam", UNET_FAMILIES)
def test_outside_window_nothing_changes(pack, loaded, fam):
    model, clip = loaded(fam)
    pos, neg = encode(pack, clip), negative(clip)
    plain, plain_log = logged(model)
    gm, gpos = guide(pack, model, pos, start=0.5, end=1.0)
    guided, guided_log = logged(gm)
    sample(plain, pos, neg, steps=4)
    sample(guided, gpos, neg, steps=4)
    assert torch.equal(plain_log.calls[0][0], guided_log.calls[0][0])  # first steps: outside the window
    assert not torch.equal(plain_log.calls[-1][0], guided_log.calls[-1][0])
    # a window that excludes every step gives exactly the unguided sample
    gm2, gpos2 = guide(pack, model, pos, start=1.0, end=1.0)
    assert torch.equal(sample(model, pos, neg, steps=3), sample(gm2, gpos2, neg, steps=3))


def test_self_recurrence_takes_guided_steps_twice(pack, loaded):
    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    gm, gpos = guide(pack, model, pos, recurrence=True, recurrence_end_percent=1.0)
    m, log = logged(gm)
    a = sample(m, gpos, neg, steps=3)
    assert len(log.calls) == 6  # euler: one model call per step, every step guided and taken twice
    gm_half, gpos_half = guide(pack, model, pos, recurrence=True, start=0.0, end=0.5, recurrence_end_percent=1.0)
    m2, log2 = logged(gm_half)
    sample(m2, gpos_half, neg, steps=4)
    assert 4 < len(log2.calls) < 8
    gm_off, gpos_off = guide(pack, model, pos, recurrence=False)
    assert not torch.equal(a, sample(gm_off, gpos_off, neg, steps=3))
    assert torch.equal(a, sample(m, gpos, neg, steps=3))  # deterministic


def test_recurrence_end_percent_re_takes_only_the_early_steps(pack, loaded):
    """recurrence_end_percent 0.5 re-takes the guided steps of the first half of the schedule only (4 euler steps,
    normal scheduler: the first two), 0 none (bit for bit as self-recurrence off), 1 every one."""
    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    calls, outs = {}, {}
    for end in (0.0, 0.5, 1.0):
        m, log = logged(guide(pack, model, pos, recurrence=True, recurrence_end_percent=end)[0])
        outs[end] = sample(m, pos, neg, steps=4)
        calls[end] = len(log.calls)
    assert calls == {0.0: 4, 0.5: 6, 1.0: 8}, calls
    off, off_pos = guide(pack, model, pos, recurrence=False)
    assert torch.equal(outs[0.0], sample(off, off_pos, neg, steps=4))
    assert not torch.equal(outs[0.5], outs[0.0]) and not torch.equal(outs[0.5], outs[1.0])
    with pytest.raises(Cones2Error, match="recurrence_end_percent"):
        guide(pack, model, pos, recurrence=True, recurrence_end_percent=1.5)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_sde", "lcm"])
def test_self_recurrence_gives_every_restart_its_own_noise(pack, loaded, monkeypatch, sampler):
    """Samplers that draw noise from the seed (ancestral, SDE's Brownian tree, LCM) get a fresh, seed-determined
    seed per re-taken step; the same seed every time injected the first step's noise at every step."""
    import comfy.k_diffusion.sampling as ks

    seeds = []
    for name in ("default_noise_sampler", "BrownianTreeNoiseSampler"):
        real = getattr(ks, name)

        def spy(*args, _real=real, **kw):
            seeds.append(kw.get("seed"))
            return _real(*args, **kw)

        monkeypatch.setattr(ks, name, spy)
    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    gm, gpos = guide(pack, model, pos, recurrence=True)
    a = sample(gm, gpos, neg, steps=3, seed=2**64 - 1, sampler=sampler)
    assert len(seeds) == 6 and len(set(seeds)) == 6, seeds  # 3 steps, each taken twice
    seeds.clear()
    assert torch.equal(a, sample(gm, gpos, neg, steps=3, seed=2**64 - 1, sampler=sampler))  # seed-determined
    first = list(seeds)
    seeds.clear()
    sample(gm, gpos, neg, steps=3, seed=7, sampler=sampler)
    assert not set(first) & set(seeds)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "uni_pc", "dpmpp_2m_sde", "lms", "dpm_fast"])
def test_multistep_samplers_take_their_re_taken_steps_with_euler(pack, loaded, caplog, sampler):
    """Samplers with a history (or a schedule of their own) re-take the early guided steps as euler steps and take
    the rest as one run of their own: 6 steps with the first half re-taken are 3 x 2 euler steps (bit for bit the
    same x as euler there) and 3 steps of the sampler; every step re-taken is euler with self-recurrence."""
    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    on, on_pos = guide(pack, model, pos, recurrence=True, recurrence_end_percent=0.5)
    off, off_pos = guide(pack, model, pos, recurrence=False)
    m, log = logged(on)
    with caplog.at_level(logging.INFO, logger="comfyui-cones2"):
        a = sample(m, on_pos, neg, steps=6, sampler=sampler)
    assert f"self-recurrence with the sampler '{sampler.replace('uni_pc', 'unipc')}'" in caplog.text
    plain, plain_log = logged(model)
    sample(plain, pos, neg, steps=3, sampler=sampler)  # the sampler's own model calls for 3 steps
    own = len(log.calls) - 6  # uni_pc evaluates once more when its run starts below the top of the schedule
    assert len(plain_log.calls) <= own <= len(plain_log.calls) + (sampler == "uni_pc"), (own, len(plain_log.calls))
    assert torch.isfinite(a).all()
    assert not torch.equal(a, sample(off, off_pos, neg, steps=6, sampler=sampler))
    if sampler == "uni_pc":  # its schedule differs from euler's (the host drops the penultimate sigma)
        return
    every, every_pos = guide(pack, model, pos, recurrence=True, recurrence_end_percent=1.0)
    euler, euler_pos = guide(pack, model, pos, recurrence=True, recurrence_end_percent=1.0)
    assert torch.equal(sample(every, every_pos, neg, steps=4, sampler=sampler),
                       sample(euler, euler_pos, neg, steps=4, sampler="euler"))


def test_a_missing_activations_shape_is_a_clear_error(pack, loaded):
    g = pack.nodes.guidance
    model, clip = loaded("sd1")
    gm, _ = guide(pack, model, encode(pack, clip))
    spec = g.specs_of(gm)[0]
    group = g.GuidedRows(spec, spec.conds[0][1], (0,), None, [0], [1.0])
    q, k = torch.randn(1, 80, 64), torch.randn(1, 77, 64)
    with pytest.raises(Cones2Error, match="no 'activations_shape'"):
        pack.nodes.architectures.unet.Cones2CrossAttention([spec])(q, k, k, {"n_heads": 2, g.CALL_KEY: [group]})


def test_self_recurrence_only_in_runs_of_the_guided_prompt(pack, loaded):
    """Another prompt (or a hires-fix pass with another conditioning) on the guided MODEL samples exactly as the
    plain model: no step re-taken, no re-noising."""
    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    gm, _gpos = guide(pack, model, pos, recurrence=True)
    other = encode(pack, clip, "a bird on a fence")
    m, log = logged(gm)
    out = sample(m, other, neg, steps=3, sampler="euler_ancestral")
    assert len(log.calls) == 3
    assert torch.equal(out, sample(model, other, neg, steps=3, sampler="euler_ancestral"))


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_guidance_weight_zero_is_unguided_bit_for_bit_and_still_records(pack, loaded, fam):
    model, clip = loaded(fam)
    pos, neg = encode(pack, clip), negative(clip)
    plain = sample(model, pos, neg, steps=3, batch=2)
    gm, gpos = guide(pack, model, pos, gw=0.0, recurrence=True)  # self-recurrence on: still plain sampling
    m, log = logged(gm)
    assert torch.equal(sample(m, gpos, neg, steps=3, batch=2), plain)
    assert len(log.calls) == 3  # no step taken twice
    rows = report(pack, gm)  # the unguided attention is recorded for the maps
    assert {r["subject"] for r in rows} == {"dog", "cat"} and all(r["share"] < 0.99 for r in rows)


def test_cfg1_and_batch(pack, loaded):
    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    gm, gpos = guide(pack, model, pos)
    m, log = logged(gm)
    sample(m, gpos, neg, steps=2, cfg=1.0)
    assert all(set(c) == {0} for c in log.calls)  # CFG 1: only the conditional pass runs
    assert min(r["share"] for r in report(pack, gm)) >= 0.99
    out = sample(gm, gpos, neg, steps=2, batch=2)
    assert out.shape[0] == 2
    assert min(r["share"] for r in report(pack, gm)) >= 0.99


def test_batched_and_separate_calls_agree(pack, loaded):
    """The same cond row gives the same output whether uncond is batched with it or not; batch 2 == 2 x 1."""
    model, clip = loaded("sd1")
    import comfy.model_management

    pos, neg = encode(pack, clip), negative(clip)
    gm, _ = guide(pack, model, pos)
    comfy.model_management.load_models_gpu([gm])
    base = gm.model
    x = torch.randn(1, 4, 8, 10, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([5.0])
    opts = gm.model_options["transformer_options"]

    def call(rows, kinds):
        ctx = torch.cat([pos[0][0] if k == 0 else neg[0][0] for k in kinds])
        to = {**opts, "cond_or_uncond": kinds, "sigmas": sigma.repeat(len(kinds))}
        import comfy.patcher_extension

        to["wrappers"] = comfy.patcher_extension.copy_nested_dicts(gm.wrappers)
        return base.apply_model(x.repeat(rows, 1, 1, 1), sigma.repeat(rows), c_crossattn=ctx, transformer_options=to)

    with torch.no_grad():
        both = call(2, [0, 1])
        cond_only = call(1, [0])
        twice = call(2, [0, 0])
        plain = model.model.apply_model(x.repeat(2, 1, 1, 1), sigma.repeat(2),
                                        c_crossattn=torch.cat([pos[0][0], neg[0][0]]),
                                        transformer_options={"cond_or_uncond": [0, 1]})
    assert torch.allclose(both[0], cond_only[0], atol=1e-5)
    assert torch.allclose(twice[0], twice[1], atol=1e-6) and torch.allclose(twice[0], cond_only[0], atol=1e-5)
    assert torch.equal(both[1], plain[1])  # the uncond row is untouched, bit for bit
    assert not torch.allclose(both[0], plain[0], atol=1e-3)


def test_masks_and_colour_map_regions(pack, loaded):
    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    masks = torch.zeros(2, 64, 80)
    masks[0, :, :40] = 1.0
    masks[1, 32:, 40:] = 1.0
    gm, gpos = guide(pack, model, pos, layout='{"version": 1, "boxes": []}', masks=masks, mask_subjects="dog, cat")
    sample(gm, gpos, neg, steps=2)
    rows = report(pack, gm)
    assert {r["subject"] for r in rows} == {"dog", "cat"} and min(r["share"] for r in rows) >= 0.99
    cat = next(r for r in rows if r["subject"] == "cat" and r["grid"] == (8, 10))
    assert cat["region"][:4].sum() == 0 and cat["region"][4:, 5:].all()
    cmap = torch.zeros(1, 64, 80, 3)
    cmap[0, :, :40] = torch.tensor([1.0, 0.02, 0.03])  # slightly off red, as after JPEG
    cmap[0, :, 40:] = torch.tensor([0.0, 0.97, 0.0])
    gm, gpos = guide(pack, model, pos, layout="", colour_map=cmap, colour_subjects="#ff0000=dog, #00ff00=cat")
    sample(gm, gpos, neg, steps=2)
    assert min(r["share"] for r in report(pack, gm)) >= 0.99


def test_weight_patches_and_other_attn2_patches_compose(pack, loaded):
    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    key = next(k for k in model.model_state_dict() if k.endswith("attn2.to_k.weight"))
    lora = model.clone()
    lora.add_patches({key: (torch.ones_like(model.model_state_dict()[key]) * 0.01,)}, 1.0)  # a LoRA-style diff
    seen = []

    def other_attn2_patch(q, context, value, extra):
        seen.append(1)
        return q, context, value

    lora.set_model_attn2_patch(other_attn2_patch)
    gm, gpos = guide(pack, lora, pos)
    after = gm.clone()
    after.add_patches({key: (torch.ones_like(model.model_state_dict()[key]) * 0.01,)}, 1.0)  # LoRA after
    sample(after, gpos, neg, steps=2)
    assert seen, "the other pack's attn2_patch must still run"
    assert min(r["share"] for r in report(pack, after)) >= 0.99


class ImageTermPatch:
    """An attn2 replacement following IPAdapter's / InstantID's / PuLID's contract: the host's attention on the
    text plus an added term computed from the image queries, weighted on the conditional chunks only (they read
    ``cond_or_uncond`` to batch their image embeddings the same way), installed per block."""

    def __init__(self, weight=0.5):
        self.weight, self.calls = weight, 0

    def __call__(self, q, k, v, extra):
        from comfy.ldm.modules.attention import optimized_attention

        self.calls += 1
        out = optimized_attention(q, k, v, extra["n_heads"])
        chunks = extra["cond_or_uncond"]
        per = q.shape[0] // len(chunks)
        on = torch.tensor([1.0 if c == 0 else 0.0 for c in chunks]).repeat_interleave(per).view(-1, 1, 1).to(q)
        return out + torch.tanh(q[..., : out.shape[-1]]) * self.weight * on


def with_image_term(pack, model, patch):
    m = model.clone()
    for block, index, tindex in pack.nodes.architectures.unet.cross_attention_blocks(m):
        m.set_model_attn2_replace(patch, block, index, tindex)
    return m


@pytest.mark.parametrize("order", ["before", "after"])
def test_an_image_term_replacement_composes_with_guidance(pack, loaded, order):
    """Another pack's cross-attention replacement (IPAdapter-style, installed before or after Layout Guidance):
    at guidance_weight 0 the result is exactly what that pack alone gives; guided, its term is kept on the
    guided rows (the sample differs from guidance alone) and the subjects are still placed."""
    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    patch = ImageTermPatch()
    alone = sample(with_image_term(pack, model, patch), pos, neg, steps=2)
    assert patch.calls
    for gw in (0.0, 0.08):
        if order == "before":
            gm, gpos = guide(pack, with_image_term(pack, model, patch), pos, gw=gw)
        else:
            gm, gpos = guide(pack, model, pos, gw=gw)
            gm = with_image_term(pack, gm, patch)
        out = sample(gm, gpos, neg, steps=2)
        if gw == 0.0:
            assert torch.equal(out, alone)
        else:
            guided_only, gpos2 = guide(pack, model, pos, gw=gw)
            assert not torch.equal(out, sample(guided_only, gpos2, neg, steps=2))  # the image term is kept
            assert not torch.equal(out, alone)  # and guided
            assert min(r["share"] for r in report(pack, gm)) >= 0.99

def test_chained_guidance_nodes_compose(pack, loaded):
    """Two Layout Guidance nodes on one MODEL for two prompts (a batch of both): each prompt's subjects are
    biased, every one of them."""
    import node_helpers

    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    one = '{"version":1,"boxes":[{"subject":"dog","x":0,"y":0,"w":0.5,"h":1}]}'
    two = '{"version":1,"boxes":[{"subject":"bird","x":0.5,"y":0,"w":0.5,"h":1}]}'
    first, gpos1 = guide(pack, model, pos, layout=one)
    gm, gpos2 = guide(pack, first, encode(pack, clip, "a bird on a fence"), layout=two)
    assert len(pack.nodes.guidance.specs_of(gm)) == 2
    both = node_helpers.conditioning_set_values(gpos1, {}) + gpos2  # ConditioningCombine
    sample(gm, both, neg, steps=2)
    rows = report(pack, gm)
    assert {r["subject"] for r in rows} == {"dog", "bird"} and min(r["share"] for r in rows) >= 0.99, rows


def test_a_second_node_on_the_same_prompt_merges_its_subjects(pack, loaded, caplog):
    """Stacked like adapters: a second Layout Guidance node on a prompt the first one guides adds its subjects,
    and the model samples exactly as one node holding every box; a subject in both takes the later node's box, and
    the node says so."""
    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    dog = '{"subject":"dog","x":0,"y":0,"w":0.5,"h":1}'
    cat = '{"subject":"cat","x":0.5,"y":0.1,"w":0.5,"h":0.9}'
    layout = '{"version":1,"boxes":[%s]}'
    first, gpos = guide(pack, model, pos, layout=layout % dog)
    stacked, gpos = guide(pack, first, gpos, layout=layout % cat)
    single, spos = guide(pack, model, pos, layout=layout % f"{dog},{cat}")
    assert len(pack.nodes.guidance.specs_of(stacked)) == 1
    out = sample(stacked, gpos, neg, steps=2)
    assert torch.equal(out, sample(single, spos, neg, steps=2))
    assert not torch.equal(out, sample(first, gpos, neg, steps=2))  # the cat is biased too
    rows = report(pack, stacked)
    assert {r["subject"] for r in rows} == {"dog", "cat"} and min(r["share"] for r in rows) >= 0.99, rows
    # the dog again in the later node, on the right: its box wins, and it is said
    moved = dog.replace('"x":0,', '"x":0.5,')
    with caplog.at_level(logging.WARNING, logger="comfyui-cones2"):
        again, apos = guide(pack, stacked, gpos, layout=layout % moved)
    assert "both place dog; this node's regions are used for it" in caplog.text
    right, rpos = guide(pack, model, pos, layout=layout % f"{cat},{moved}")
    assert torch.equal(sample(again, apos, neg, steps=2), sample(right, rpos, neg, steps=2))
    assert len(pack.nodes.guidance.specs_of(first)) == 1  # the first node's model is unchanged
    # two subjects on one word: refused in one node, and across stacked nodes with the earlier one named
    phrase = '{"subject":"a dog","x":0.5,"y":0,"w":0.5,"h":1}'
    with pytest.raises(Cones2Error, match=r"the subjects 'dog' and 'a dog' share prompt token 2; give each box its "
                                          "own word"):
        guide(pack, model, pos, layout=layout % f"{dog},{phrase}")
    with pytest.raises(Cones2Error, match=r"the subjects 'dog' \(an earlier Layout Guidance node\) and 'a dog' "
                                          "share prompt token 2"):
        guide(pack, first, gpos, layout=layout % phrase)


@pytest.mark.parametrize("layout, message", [
    ('{"version": 1, "boxes": []}', "the layout has no boxes"),
    ('{"version":1,"boxes":[{"subject":"dog","x":0.1,"y":0.1,"w":0,"h":0.5}]}', "zero area"),
    ('{"version":1,"boxes":[{"subject":"dog","x":0.8,"y":0.1,"w":0.5,"h":0.5}]}', "past the right edge"),
    ('{"version":1,"boxes":[{"subject":"dog","x":-0.2,"y":0.1,"w":0.5,"h":0.5}]}', "outside 0..1|must be"),
    ('{"version":1,"boxes":[{"subject":"horse","x":0.1,"y":0.1,"w":0.5,"h":0.5}]}',
     "'horse' is not a word of the prompt; the prompt's words are: a, dog, and, cat, on, sofa"),
    ('{"version":1,"boxes":[{"subject":"dog" "x":0.1}]}', "not valid JSON"),
    ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    ('{"version": 1, "boxes": [' + ",".join(['{"subject": "dog", "x": 0, "y": 0, "w": 0.5, "h": 1}'] * 30_000)
     + "]}", "characters long"),
])
def test_bad_layouts(pack, loaded, layout, message):
    model, clip = loaded("sd1")
    with pytest.raises(Cones2Error, match=message):
        guide(pack, model, encode(pack, clip), layout=layout)


def test_plain_clip_text_encode_conditioning_is_an_error(pack, loaded):
    model, clip = loaded("sd1")
    with pytest.raises(Cones2Error, match="encode the prompt with 'Cones2 Apply Residuals to Conditioning'"):
        guide(pack, model, negative(clip))


def test_attention_maps_node(pack, loaded):
    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    gm, gpos = guide(pack, model, pos)
    out = sample(gm, gpos, neg, steps=2)
    node = pack.nodes.maps_node.Cones2AttentionMaps
    image, text = node.execute(gm, {"samples": out}, "all", 64).result
    assert image.shape == (1, 64, 4 * 80 + 3 * 4, 3)  # 2 subjects x 2 grids, panels at the latent's aspect
    assert text.count("in-region share") == 4 and "dog" in text and "cat" in text
    with pytest.raises(Cones2Error, match="no attention was recorded"):
        node.execute(model, {"samples": out}, "largest", 64)


def test_maps_are_recorded_only_when_asked(pack, loaded, monkeypatch):
    """record_maps off (the node's default): the guided images are exactly those with it on, no attention mass is
    taken in any attention call, and Attention Maps says which switch to turn on."""
    guidance, core = pack.nodes.guidance, pack.cones2_core.attention
    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    asked = []
    real = core.guided_attention

    def spy(*args, token_mass=None, **kw):
        asked.append(token_mass is not None)
        return real(*args, token_mass=token_mass, **kw)

    monkeypatch.setattr(pack.nodes.architectures.unet, "guided_attention", spy)
    on, on_pos = guide(pack, model, pos, record_maps=True)
    off, off_pos = guide(pack, model, pos, record_maps=False)
    with_maps = sample(on, on_pos, neg, steps=2, batch=2)  # two guided rows per call
    assert asked and all(asked)
    asked.clear()
    without = sample(off, off_pos, neg, steps=2, batch=2)
    assert asked and not any(asked)  # guided, but nothing recorded
    assert torch.equal(with_maps, without)
    assert pack.nodes.recording.find_recording(guidance.specs_of(off)[0].uid).maps == {}
    with pytest.raises(Cones2Error, match="turn record_maps on"):
        pack.nodes.maps_node.Cones2AttentionMaps.execute(off, {"samples": without}, "all", 64)
    node = pack.nodes.layout_node.Cones2LayoutGuidance
    default = node.execute(model, pos, TWO_BOXES, 0.08, 2.5, -1e8, 0.0, 1.0, False).result[0]
    assert not guidance.specs_of(default)[0].record  # off unless asked


def test_layout_guidance_through_server(server, client):
    from harness.client import PromptFailed

    ckpt = tiny_checkpoints.FAMILIES["sd1"]["file"]
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "Cones2ApplyResiduals", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "Cones2LayoutGuidance", "inputs": {
            "model": ["1", 0], "conditioning": ["2", 0], "layout": TWO_BOXES, "guidance_weight": 0.08,
            "positive_weight": 2.5, "negative_weight": -1e8, "start_percent": 0.0, "end_percent": 1.0,
            "self_recurrence": True, "record_maps": True}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 96, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["4", 1], "negative": ["3", 0],
                                                    "latent_image": ["5", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "layout"}},
        "9": {"class_type": "Cones2AttentionMaps", "inputs": {"model": ["4", 0], "samples": ["6", 0],
                                                              "resolution": "largest", "panel_size": 64}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "layout_maps"}},
    }
    entry = client.run(prompt)
    assert len(client.output_files(entry, server.output_dir, node_id="8")) == 1
    maps = client.output_files(entry, server.output_dir, node_id="10")
    from PIL import Image

    with Image.open(maps[0]) as im:
        assert im.size == (2 * 96 + 4, 64)
    bad = copy.deepcopy(prompt)
    bad["4"]["inputs"]["layout"] = TWO_BOXES.replace('"cat"', '"horse"')
    with pytest.raises(PromptFailed) as err:
        client.run(bad)
    assert "'horse' is not a word of the prompt" in err.value.exception_message


@pytest.mark.parametrize("order", ["before", "after"])
def test_controlnet_before_or_after_guidance(pack, loaded, extras_files, order):
    import comfy.controlnet

    import nodes

    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    control = comfy.controlnet.load_controlnet(extras_files["controlnet"])
    hint = torch.rand(1, 64, 80, 3, generator=torch.Generator().manual_seed(4))

    def with_control(p, n):
        return nodes.ControlNetApplyAdvanced().apply_controlnet(p, n, control, hint, 0.8, 0.0, 1.0)

    if order == "before":
        pos_c, neg_c = with_control(pos, neg)
        gm, gpos = guide(pack, model, pos_c)
    else:
        gm, gpos = guide(pack, model, pos)
        gpos, neg_c = with_control(gpos, neg)
    assert "control" in gpos[0][1]
    out = sample(gm, gpos, neg_c, steps=2)
    plain = sample(gm, guide(pack, model, pos)[1], neg, steps=2)
    assert not torch.equal(out, plain)  # the ControlNet is active
    assert min(r["share"] for r in report(pack, gm)) >= 0.99


def test_a_phrase_binds_its_contiguous_tokens_only(pack, loaded):
    """'red dog' binds the run 'red dog' (as the reference binds a phrase's token sequence), not the 'red' of
    'red cat'; a phrase whose words are in the prompt but apart is refused, saying so."""
    subject_positions = pack.nodes.layout_node.subject_positions
    model, clip = loaded("sd1")
    record = encode(pack, clip, "a red dog and a red cat")[0][1]["cones2"]
    assert record.words["red"] == (2, 6)
    assert subject_positions(record, "red dog") == (2, 3)
    assert subject_positions(record, "Red  Cat") == (6, 7)
    with pytest.raises(Cones2Error, match="not in the prompt as one run of words"):
        subject_positions(record, "dog red")
    # tokens: a 1, red 2, dog 3 + house 4 ("doghouse"), "," 5, a 6, red 7, dog 8
    assert subject_positions(encode(pack, clip, "a red doghouse, a red dog")[0][1]["cones2"], "red dog") == (7, 8)


@pytest.mark.parametrize("guided_first", [True, False], ids=["guided-to", "guided-from"])
def test_binding_survives_conditioning_concat(pack, loaded, guided_first):
    """ConditioningConcat puts the guided prompt's tokens at row 0 or 77 of a longer context: its subjects are
    biased there (and only there), whichever side it is on."""
    import nodes

    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    gm, gpos = guide(pack, model, pos)
    other = nodes.CLIPTextEncode().encode(clip, "in a garden, watercolour")[0]
    pair = (gpos, other) if guided_first else (other, gpos)
    concat = nodes.ConditioningConcat().concat(*pair)[0]
    assert concat[0][0].shape[1] == 154
    sample(gm, concat, neg, steps=2)
    rows = report(pack, gm)
    assert {r["subject"] for r in rows} == {"dog", "cat"} and min(r["share"] for r in rows) >= 0.99, rows
    spec = pack.nodes.guidance.specs_of(gm)[0]
    assert {key[1] for key in spec._maps} == {(0,) if guided_first else (77,)}


def test_binding_survives_conditioning_set_area(pack, loaded):
    """A guided prompt confined by ConditioningSetArea to the right half is sampled on that half only: its boxes
    are placed in the half's own coordinates (the dog's left-half box misses it, the cat's covers it), not
    stretched over it as if it were the whole image."""
    import nodes

    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    layout = ('{"version":1,"boxes":[{"subject":"dog","x":0.0,"y":0.0,"w":0.5,"h":1.0},'
              '{"subject":"cat","x":0.5,"y":0.0,"w":0.5,"h":1.0}]}')
    gm, gpos = guide(pack, model, pos, layout=layout)
    right = nodes.ConditioningSetArea().append(gpos, 40, 64, 40, 0, 1.0)[0]  # x 40..80 of an 80x64 image
    sample(gm, right, neg, steps=2)
    rows = report(pack, gm)
    assert {r["subject"] for r in rows} == {"dog", "cat"}
    for r in rows:
        h, w = r["grid"]
        assert w <= h, r["grid"]  # the half's grids (8x5 latent pixels and below), not the image's 8x10
        assert (not r["region"].any()) if r["subject"] == "dog" else r["region"].all(), (r["subject"], r["grid"])


@pytest.mark.parametrize("node", ["ConditioningSetMask", "ConditioningSetTimestepRange", "ControlNetApply",
                                  "batch"])
def test_binding_survives_other_conditioning_nodes(pack, loaded, extras_files, node):
    """Between Layout Guidance and the sampler: a mask (whole-image sampling), a timestep range, the plain
    ControlNet node, a batch of two latents. Every subject's tokens are biased in every such run."""
    import comfy.controlnet

    import nodes

    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    gm, gpos = guide(pack, model, pos)
    batch = 1
    if node == "ConditioningSetMask":
        mask = torch.zeros(1, 64, 80)
        mask[:, :, :60] = 1.0
        gpos = nodes.ConditioningSetMask().append(gpos, mask, "default", 1.0)[0]
    elif node == "ConditioningSetTimestepRange":
        gpos = nodes.ConditioningSetTimestepRange().set_range(gpos, 0.0, 0.6)[0]
    elif node == "ControlNetApply":
        control = comfy.controlnet.load_controlnet(extras_files["controlnet"])
        gpos = nodes.ControlNetApply().apply_controlnet(gpos, control, torch.rand(1, 64, 80, 3), 0.8)[0]
    else:
        batch = 2
    sample(gm, gpos, neg, steps=3, batch=batch)
    rows = report(pack, gm)
    assert {r["subject"] for r in rows} == {"dog", "cat"} and min(r["share"] for r in rows) >= 0.99, rows
    assert pack.nodes.recording.find_recording(pack.nodes.guidance.specs_of(gm)[0].uid).calls >= 2


def soft_guide(pack, model, cond, gw, pw, nw=-5.0):
    node = pack.nodes.layout_node.Cones2LayoutGuidance
    return node.execute(model, cond, TWO_BOXES, gw, pw, nw, 0.0, 1.0, False, record_maps=True).result


def test_patched_attention_is_the_float64_formula_at_each_step_sigma(pack, loaded, monkeypatch):
    """Every guided attention call of a real sampling run, recomputed from its q, k, v in float64 straight from
    the formula softmax((S + gw * W * log(1 + sigma^2) * std(S)) / sqrt(d)) V, at the sigma of the sampler's own
    step; at a soft negative weight, where a wrong sigma, std or weight would show."""
    import comfy.samplers

    g = pack.nodes.architectures.unet
    calls = []
    real = g.guided_attention

    def spy(q, k, v, heads, wm, sig, gw, **kw):
        out = real(q, k, v, heads, wm, sig, gw, **kw)
        calls.append((q, k, v, heads, wm, sig, gw, out[0]))
        return out

    monkeypatch.setattr(g, "guided_attention", spy)
    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)
    gm, gpos = soft_guide(pack, model, pos, 0.3, 2.5)
    sample(gm, gpos, neg, steps=3)
    assert calls
    steps = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)[:-1]
    seen = sorted({round(float(c[5][0]), 4) for c in calls}, reverse=True)
    assert seen == [round(float(s), 4) for s in steps]
    for q, k, v, heads, wm, sig, gw, out in calls:
        b, n, c = q.shape
        d = c // heads
        qh, kh, vh = (x.double().reshape(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
        s = qh @ kh.transpose(-1, -2)  # [b, heads, n, t]
        std = s.reshape(b, -1).std(dim=1)  # unbiased, per sample over heads, pixels and tokens
        bias = gw * wm.double()[:, None] * (torch.log1p(sig.double() ** 2) * std).view(b, 1, 1, 1)
        ref = torch.softmax((s + bias) * d**-0.5, dim=-1) @ vh
        ref = ref.transpose(1, 2).reshape(b, n, c)
        assert torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-4), (out.double() - ref).abs().max()


def test_in_box_share_moves_with_the_weights_at_a_soft_negative_weight(pack, loaded):
    """At negative_weight -5 (not -1e8, where the share is 1 by construction) a larger guidance_weight or
    positive_weight puts more of each subject's attention in its box."""
    model, clip = loaded("sd1")
    pos, neg = encode(pack, clip), negative(clip)

    def share(gw, pw):
        gm, gpos = soft_guide(pack, model, pos, gw, pw)
        sample(gm, gpos, neg, steps=2)
        return {r["subject"]: r["share"] for r in report(pack, gm) if r["grid"] == (8, 10)}

    base, more_gw, more_pw = share(0.08, 2.5), share(0.5, 2.5), share(0.08, 10.0)
    for subject in ("dog", "cat"):
        assert 0.0 < base[subject] < 0.99, base
        assert more_gw[subject] > base[subject] + 0.02, (base, more_gw)
        assert more_pw[subject] > base[subject] + 0.02, (base, more_pw)
