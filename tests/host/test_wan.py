"""Wan's quirks on its tiny bed (harness/tiny_wan.py): the weight map per latent frame follows the boxes' tracks,
the text cross-attention's bias equals its formula re-derived in float64 frame by frame, the subjects' attention
follows their tracks (and would not with the tracks reversed), and the calls that are not the text attention
(self-attention, image-to-video's clip-vision tokens) are the host's own."""

from __future__ import annotations

import math

import pytest
import torch

from harness.beds import BEDS
from harness.host import build

SIZE = 128  # 16 x 16 latent pixels: 8 x 8 tokens per latent frame
FRAMES = 3  # latent frames (9 pixel frames); their clip times are 0, 2.5/8, 6.5/8
# The dog crosses left -> right, the cat right -> left (each half the width, full height).
CROSSING = ('{"version":1,"boxes":['
            '{"subject":"dog","x":0,"y":0,"w":0.5,"h":1,"frames":[{"t":0,"x":0,"y":0,"w":0.5,"h":1},'
            '{"t":1,"x":0.5,"y":0,"w":0.5,"h":1}]},'
            '{"subject":"cat","x":0.5,"y":0,"w":0.5,"h":1,"frames":[{"t":0,"x":0.5,"y":0,"w":0.5,"h":1},'
            '{"t":1,"x":0,"y":0,"w":0.5,"h":1}]}]}')
REVERSED = CROSSING.replace('"t":0,', '"t":"A",').replace('"t":1,', '"t":0,').replace('"t":"A",', '"t":1,')


@pytest.fixture(scope="module")
def wan(comfy, host_dir):
    spec = BEDS["wan"]
    builder = spec.builder_module()
    files = build(builder.__file__, host_dir, out=builder.default_cache_dir(), timeout=1200)
    return spec.load(files)


def encode(pack, clip, text="a photo of a dog and a cat"):
    return pack.nodes.residual_nodes.Cones2ApplyResiduals.execute(clip, text, None).result[0]


def guide(pack, model, cond, layout=CROSSING, gw=0.08, pw=2.5, nw=-1e8):
    node = pack.nodes.layout_node.Cones2LayoutGuidance
    return node.execute(model, cond, layout, gw, pw, nw, 0.0, 1.0, False, record_maps=True).result


def sample(model, pos, neg, steps=2, cfg=5.0, seed=3):
    import nodes

    latent = {"samples": torch.zeros(1, 16, FRAMES, SIZE // 8, SIZE // 8)}
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]


def columns(x0: float, w: float, n: int) -> list[int]:
    """The grid columns whose centre lies in [x0, x0 + w) (the rasteriser's rule, written out)."""
    return [j for j in range(n) if x0 <= (j + 0.5) / n < x0 + w]


def test_the_weight_map_of_each_latent_frame_is_its_interpolated_box(pack, wan):
    model, clip, _vae = wan
    gm, pos = guide(pack, model, encode(pack, clip), nw=-7.0)
    spec = pack.nodes.guidance.specs_of(gm)[0]
    subjects = spec.conds[0][1]
    record = pos[0][1]["cones2"]
    n, t = 8, pos[0][0].shape[1]
    wm = spec.weight_map(subjects, (0,), n, n, t, "cpu", frames=FRAMES)[0]
    assert tuple(wm.shape) == (FRAMES * n * n, t)
    for f, time in enumerate((0.0, 2.5 / 8, 6.5 / 8)):
        frame = wm[f * n * n:(f + 1) * n * n].reshape(n, n, t)
        for word, x0 in (("dog", 0.5 * time), ("cat", 0.5 - 0.5 * time)):
            (row,) = record.words[word]
            inside = torch.full((n, n), -7.0)
            inside[:, columns(x0, 0.5, n)] = 2.5
            assert torch.equal(frame[:, :, row], inside), (f, word)
    others = [r for r in range(t) if r not in (record.words["dog"][0], record.words["cat"][0])]
    assert not wm[:, others].any()


def capture_text_call(pack, gm, pos, neg):
    """(q, k, v, heads, transformer_options, output) of the first guided text cross-attention call of a sampling
    step, and the output of every call kept as the host gave it."""
    wan_mod = pack.nodes.architectures.wan
    seen = {}
    orig = wan_mod.Cones2WanCrossAttention.__call__

    def spy(self, func, *args, **kwargs):
        out = orig(self, func, *args, **kwargs)
        opts = kwargs.get("transformer_options") or {}
        if "text" not in seen and args[1].shape[1] == opts.get(wan_mod.GRID_KEY, (None,))[0] and \
                pack.nodes.architectures.base.active_groups(opts):
            seen["text"] = (args[0], args[1], args[2], kwargs["heads"], opts, out)
        return out

    wan_mod.Cones2WanCrossAttention.__call__ = spy
    try:
        sample(gm, pos, neg, steps=1)
    finally:
        wan_mod.Cones2WanCrossAttention.__call__ = orig
    return seen["text"]


def test_the_bias_equals_its_float64_rederivation_per_frame(pack, wan):
    """S' = S + gw * W_f * log(1 + sigma'^2) * std(S), sigma' = t / (1 - t) (flow time), std over the whole
    sample (all heads, frames, pixels and text rows); frame f's tokens get frame f's W."""
    model, clip, _vae = wan
    pos, neg = encode(pack, clip), encode(pack, clip, "a photo")
    gm, gpos = guide(pack, model, pos, nw=-3.0, gw=0.3)
    q, k, v, heads, opts, out = capture_text_call(pack, gm, gpos, neg)
    (g,) = pack.nodes.architectures.base.active_groups(opts)
    (row,) = g.rows
    sigma = g.sigmas[0]
    spec = g.spec
    n = 8
    wm = spec.weight_map(g.subjects, g.offsets, n, n, k.shape[1], "cpu", frames=FRAMES)[0].double()
    d = q.shape[-1] // heads
    qh = q[row].double().reshape(-1, heads, d).transpose(0, 1)
    kh = k[row].double().reshape(-1, heads, d).transpose(0, 1)
    vh = v[row].double().reshape(-1, heads, d).transpose(0, 1)
    s = qh @ kh.transpose(-1, -2)
    sig = min(sigma / (1 - sigma), pack.cones2_core.joint_attention.FLOW_SIGMA_CAP) if sigma < 1 else \
        pack.cones2_core.joint_attention.FLOW_SIGMA_CAP
    biased = s + 0.3 * wm * math.log1p(sig * sig) * s.std()
    expected = (torch.softmax(biased / math.sqrt(d), -1) @ vh).transpose(0, 1).reshape(q.shape[1], -1)
    torch.testing.assert_close(out[row].double(), expected, rtol=1e-4, atol=1e-4)
    # and it is not the unbiased attention (the test would pass without the bias otherwise)
    plain = (torch.softmax(s / math.sqrt(d), -1) @ vh).transpose(0, 1).reshape(q.shape[1], -1)
    assert (out[row].double() - plain).abs().max() > 1e-2


def frame_shares(pack, gm, subject: str, track_x0) -> list[float]:
    """Per latent frame, the share of ``subject``'s recorded attention inside the columns of a box of half the
    width at x0 = track_x0(time)."""
    (rowmap,) = [r for r in pack.nodes.maps_node.attention_report(gm) if r["subject"] == subject]
    n = 8
    assert rowmap["grid"] == (FRAMES * n, n)
    strip = rowmap["map"].reshape(FRAMES, n, n)
    out = []
    for f, time in enumerate((0.0, 2.5 / 8, 6.5 / 8)):
        cols = columns(track_x0(time), 0.5, n)
        out.append(float(strip[f][:, cols].sum() / strip[f].sum()))
    return out


def test_with_a_soft_negative_weight_each_frames_in_box_share_rises_with_positive_weight_and_follows_the_track(
        pack, wan):
    model, clip, _vae = wan
    pos, neg = encode(pack, clip), encode(pack, clip, "")
    dog_track = lambda t: 0.5 * t  # noqa: E731
    shares = {}
    for pw in (0.0, 2.5, 10.0):
        gm, gpos = guide(pack, model, pos, pw=pw, nw=-2.0, gw=0.2)
        sample(gm, gpos, neg, steps=1)
        shares[pw] = frame_shares(pack, gm, "dog", dog_track)
    for f in range(FRAMES):
        assert shares[0.0][f] < shares[2.5][f] < shares[10.0][f], shares
    # the attention follows the track: in the first and last frames, the guided share is in the track's box, and
    # with the tracks reversed (the same boxes at the other end of the clip) it is in the other half
    gm, gpos = guide(pack, model, pos, layout=REVERSED, pw=10.0, nw=-2.0, gw=0.2)
    sample(gm, gpos, neg, steps=1)
    reversed_shares = frame_shares(pack, gm, "dog", dog_track)
    assert shares[10.0][0] > 0.5 > reversed_shares[0] and shares[10.0][2] > 0.5 > reversed_shares[2], \
        (shares[10.0], reversed_shares)


def test_the_maps_are_a_strip_of_frames_with_each_frames_share(pack, wan):
    model, clip, _vae = wan
    pos, neg = encode(pack, clip), encode(pack, clip, "")
    gm, gpos = guide(pack, model, pos)
    out = sample(gm, gpos, neg, steps=1)
    images, report = pack.nodes.maps_node.Cones2AttentionMaps.execute(gm, {"samples": out}, panel_size=64).result[:2]
    assert tuple(images.shape) == (1, 64 * FRAMES, 2 * 64 + 4, 3)  # two subjects, each a strip of 3 frames
    lines = report.splitlines()
    assert len(lines) == 2 and all(f"{FRAMES * 8}x8" in line and "per frame" in line for line in lines)
    shares = [float(x) for x in lines[0].split("per frame ")[1].split()]
    assert len(shares) == FRAMES and min(shares) > 0.99  # hard boxes (negative_weight -1e8): all in the box
    # What the maps keep, per latent frame (docs/wan.md): per subject one float32 mass and one bool region per
    # image token of the frame, whatever the steps, blocks and heads (summed as they come).
    uid = pack.nodes.guidance.specs_of(gm)[0].uid
    rec = pack.nodes.recording.find_recording(uid)
    (key, frames), = rec.frames.items()
    tokens = key[0] * key[1] // frames
    per_frame = sum(t.numel() * t.element_size() for d in (rec.maps, rec.regions) for t in d[key].values()) // frames
    assert frames == FRAMES and per_frame == 2 * tokens * (4 + 1), (per_frame, tokens)


def test_calls_that_are_not_the_text_attention_are_the_hosts_own(pack, wan):
    """The override leaves the self-attention (k as long as q) and image-to-video's clip-vision call (k of
    context_img_len tokens) to the host untouched, even on guided rows."""
    model, clip, _vae = wan
    pos, neg = encode(pack, clip), encode(pack, clip, "a photo")
    gm, gpos = guide(pack, model, pos)
    q, k, v, heads, opts, _out = capture_text_call(pack, gm, gpos, neg)
    override = opts[pack.nodes.architectures.base.OVERRIDE_KEY]
    from comfy.ldm.modules.attention import attention_pytorch

    g = torch.Generator().manual_seed(0)
    img = torch.randn(q.shape[0], 257, q.shape[-1], generator=g)  # clip-vision tokens
    host = {"heads": heads, "transformer_options": opts, "_inside_attn_wrapper": True}  # as the host calls it
    for kk, vv in ((img, img), (q, q)):
        got = override(attention_pytorch, q, kk, vv, **host)
        assert torch.equal(got, attention_pytorch(q, kk, vv, **host))
    # while the text call of the same rows is biased
    assert not torch.equal(override(attention_pytorch, q, k, v, **host), attention_pytorch(q, k, v, **host))


def test_as_many_video_tokens_as_text_rows_is_refused_not_guessed(pack, wan):
    model, clip, _vae = wan
    pos = encode(pack, clip)
    per_call = pack.nodes.architectures.wan.per_call
    rows = pos[0][0].shape[1]
    x = torch.zeros(1, 16, 1, 2, 2 * rows)  # 1 frame of 1 x rows tokens
    with pytest.raises(pack.cones2_core.errors.Cones2Error, match="as many as the prompt's .* text rows"):
        per_call((), {}, x=x, context=pos[0][0])
