"""The Cones 2 attention bias against an independent float64 implementation of the paper's formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_cones2.cones2_core.attention import guided_attention
from comfyui_cones2.cones2_core.errors import Cones2Error

T = 77


def reference(q, k, v, heads, weight_map, sigma, guidance_weight, scale=None):
    """float64, one sample at a time: S' = S + g * W * log(1 + sigma^2) * std(S); softmax(S' * scale) V."""
    b, n, c = q.shape
    d = c // heads
    scale = d**-0.5 if scale is None else scale
    outs, probs, biases = [], [], []
    for i in range(b):
        qi = q[i].double().reshape(n, heads, d).transpose(0, 1)  # [H, N, d]
        ki = k[i].double().reshape(-1, heads, d).transpose(0, 1)  # [H, T, d]
        vi = v[i].double().reshape(-1, heads, d).transpose(0, 1)
        s = qi @ ki.transpose(1, 2)  # [H, N, T]
        sig = float(sigma[i]) if isinstance(sigma, torch.Tensor) else sigma
        w = weight_map[i if weight_map.shape[0] > 1 else 0].double()
        bias = guidance_weight * w * math.log(1 + sig**2) * torch.std(s)
        logits = (s + bias) * scale
        e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
        p = e / e.sum(dim=-1, keepdim=True)
        outs.append((p @ vi).transpose(0, 1).reshape(n, c))
        probs.append(p)
        biases.append(bias.expand_as(s))
    return torch.stack(outs), torch.stack(probs), torch.stack(biases)


def make_inputs(b, heads, n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, heads * d, generator=g)
    k = torch.randn(b, T, heads * d, generator=g)
    v = torch.randn(b, T, heads * d, generator=g)
    # Moderate weights on a few tokens so the bias changes the result without saturating the softmax.
    w = torch.zeros(b, n, T)
    w[:, :, 2:5] = torch.where(torch.rand(b, n, 1, generator=g) < 0.4, 2.5, -3.0)
    return q, k, v, w


def attention_share_inside(probs, tokens, mask) -> float:
    """Share of the tokens' attention mass [B, H, N, T] on the pixels of ``mask`` (N pixels)."""
    mass = probs[..., list(tokens)].double().sum(dim=(0, 1, 3))
    return (mass[mask.reshape(-1)].sum() / mass.sum()).item()


def assert_rel(actual, expected, rtol=1e-5):
    expected = expected.to(actual.dtype)
    err = (actual - expected).abs().max().item()
    assert err <= rtol * expected.abs().max().item(), f"max error {err}"


@pytest.mark.parametrize(("b", "heads", "n"), [(1, 1, 37), (2, 5, 37), (2, 1, 61), (1, 5, 13)])
def test_guided_attention_matches_reference(b, heads, n):
    q, k, v, w = make_inputs(b, heads, n, seed=b * 10 + heads)
    sigma = torch.tensor([5.0, 0.3][:b])
    out, probs = guided_attention(q, k, v, heads, w, sigma, 1.0, return_probs=True)
    ref_out, ref_probs, _ = reference(q, k, v, heads, w, sigma, 1.0)
    plain = guided_attention(q, k, v, heads, None, sigma, 1.0)
    assert out.shape == (b, n, heads * 8) and probs.shape == (b, heads, n, T) and probs.dtype == torch.float32
    assert_rel(out, ref_out)
    assert_rel(probs, ref_probs)
    assert (out - plain).abs().max() > 1e-2  # the bias really changes the output


def test_custom_scale_and_float_sigma():
    q, k, v, w = make_inputs(1, 2, 20)
    out = guided_attention(q, k, v, 2, w, 2.0, 0.8, scale=0.2)
    assert_rel(out, reference(q, k, v, 2, w, 2.0, 0.8, scale=0.2)[0])


def test_batch_equals_separate_samples_with_per_sample_sigma():
    q, k, v, w = make_inputs(2, 5, 29)
    sigma = torch.tensor([8.0, 0.5])
    both = guided_attention(q, k, v, 5, w, sigma, 1.0)
    for i in range(2):
        one = guided_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], 5, w[i : i + 1], float(sigma[i]), 1.0)
        torch.testing.assert_close(both[i : i + 1], one, rtol=1e-6, atol=1e-6)
    # Swapping the two noise levels must change both samples (sigma is really per sample).
    swapped = guided_attention(q, k, v, 5, w, sigma.flip(0), 1.0)
    assert (swapped - both).abs().amax(dim=(1, 2)).min() > 1e-3


def test_shared_weight_map_broadcasts_over_batch():
    q, k, v, w = make_inputs(2, 2, 15)
    out = guided_attention(q, k, v, 2, w[:1], 1.5, 1.0)
    assert_rel(out, reference(q, k, v, 2, w[:1].expand(2, -1, -1), 1.5, 1.0)[0])


def test_zero_weight_map_is_plain_attention():
    b, heads, n, d = 2, 5, 37, 8
    q, k, v, _ = make_inputs(b, heads, n, d)
    expected = F.scaled_dot_product_attention(
        *(x.reshape(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    ).transpose(1, 2).reshape(b, n, heads * d)
    for weight_map in (None, torch.zeros(b, n, T)):
        out = guided_attention(q, k, v, heads, weight_map, 10.0, 1.0)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_half_precision_inputs_keep_dtype():
    q, k, v, w = make_inputs(1, 2, 16)
    out, probs = guided_attention(q.half(), k.half(), v.half(), 2, w, 1.0, 1.0, return_probs=True)
    assert out.dtype == torch.float16 and probs.dtype == torch.float32
    ref = reference(q.half().float(), k.half().float(), v.half().float(), 2, w, 1.0, 1.0)[0]
    assert_rel(out.float(), ref, rtol=2e-3)


def test_negative_weight_confines_tokens_to_region():
    b, heads, n = 2, 5, 6 * 7
    q, k, v, _ = make_inputs(b, heads, n, seed=3)
    region = torch.zeros(6, 7, dtype=torch.bool)
    region[1:4, 2:6] = True
    inside = region.reshape(-1)
    tokens = [3, 4]
    w = torch.zeros(1, n, T)
    w[0, :, tokens] = torch.where(inside, 2.5, -1e8)[:, None]
    out, probs = guided_attention(q, k, v, heads, w, 14.6, 1.0, return_probs=True)
    assert not torch.isnan(out).any() and not torch.isnan(probs).any()
    assert probs[:, :, ~inside][..., tokens].max() < 1e-12
    assert probs[:, :, inside][..., tokens].min() > 1e-4
    torch.testing.assert_close(probs.sum(-1), torch.ones(b, heads, n))
    assert attention_share_inside(probs, tokens, inside) == pytest.approx(1.0, abs=1e-9)
    _, plain = guided_attention(q, k, v, heads, None, 14.6, 1.0, return_probs=True)
    assert attention_share_inside(plain, tokens, region) < 0.6


def test_chunked_equals_unchunked():
    q, k, v, w = make_inputs(2, 5, 53, seed=7)
    q = q + 3.0  # offset scores: the chunked std must still be exact
    sigma = torch.tensor([2.0, 6.0])
    whole, p_whole = guided_attention(q, k, v, 5, w, sigma, 1.0, return_probs=True)
    for chunk in (1, 7, 52):
        part, p_part = guided_attention(q, k, v, 5, w, sigma, 1.0, return_probs=True, chunk_size=chunk)
        assert_rel(part, whole)  # chunks differ from the whole only by matmul rounding
        assert_rel(p_part, p_whole)
    assert_rel(whole, reference(q, k, v, 5, w, sigma, 1.0)[0])


def test_token_mass_is_the_probabilities_summed_per_subject_without_keeping_them():
    q, k, v, w = make_inputs(2, 5, 53, seed=4)
    subjects = [[3, 4], [6]]
    out, probs = guided_attention(q, k, v, 5, w, 3.0, 1.0, return_probs=True)
    for chunk in (None, 7):
        res, mass = guided_attention(q, k, v, 5, w, 3.0, 1.0, token_mass=subjects, chunk_size=chunk)
        assert mass.shape == (2, 53) and mass.dtype == torch.float32
        for i, tokens in enumerate(subjects):
            assert_rel(mass[i], probs[..., tokens].sum(dim=(0, 1, 3)))
        assert_rel(res, out)
    assert guided_attention(q, k, v, 5, w, 3.0, 1.0, token_mass=[])[1].shape == (0, 53)


def test_merged_chunk_std_is_exact():
    from comfyui_cones2.cones2_core.score_stats import combine, moments, unbiased_std

    g = torch.Generator().manual_seed(1)
    scores = 1000.0 + torch.randn(2, 3, 50, T, generator=g) * torch.tensor([1.0, 4.0]).view(2, 1, 1, 1)
    expected = scores.double().reshape(2, -1).std(dim=1)
    merged = None
    for start in range(0, 50, 7):
        part = moments(scores[:, :, start : start + 7])
        merged = part if merged is None else combine(merged, part)
    assert merged[0] == 50 * 3 * T
    torch.testing.assert_close(unbiased_std(merged), expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(unbiased_std(moments(scores)), expected, rtol=1e-9, atol=0)


def test_chunking_by_element_budget(monkeypatch):
    import comfyui_cones2.cones2_core.attention as attention

    q, k, v, w = make_inputs(1, 2, 40)
    expected = guided_attention(q, k, v, 2, w, 3.0, 1.0)
    monkeypatch.setattr(attention, "MAX_CHUNK_ELEMENTS", 2 * T * 6)  # 6 pixels per chunk
    assert_rel(attention.guided_attention(q, k, v, 2, w, 3.0, 1.0), expected)


def test_bad_inputs_raise_cones2_error():
    q, k, v, w = make_inputs(2, 2, 10)
    with pytest.raises(Cones2Error, match="weight map has shape"):
        guided_attention(q, k, v, 2, w[:, :9], 1.0, 1.0)
    with pytest.raises(Cones2Error, match="divisible by heads=3"):
        guided_attention(q, k, v, 3, w, 1.0, 1.0)
    with pytest.raises(Cones2Error, match="sigma has 3 values"):
        guided_attention(q, k, v, 2, w, torch.ones(3), 1.0)
    with pytest.raises(Cones2Error, match="do not match"):
        guided_attention(q, k[:1], v[:1], 2, w, 1.0, 1.0)
    with pytest.raises(Cones2Error, match="chunk_size"):
        guided_attention(q, k, v, 2, w, 1.0, 1.0, chunk_size=-1)
