"""The Cones 2 bias on joint (text + image) attention, against a float64 re-derivation of the documented formula."""

import math

import pytest
import torch

from comfyui_cones2.cones2_core.errors import Cones2Error
from comfyui_cones2.cones2_core.joint_attention import (
    FLOW_SIGMA_CAP,
    flow_sigma,
    image_text_std,
    joint_bias,
    token_mass,
)
from comfyui_cones2.cones2_core.layout import build_weight_map


def _inputs(b=2, heads=3, txt=7, h=4, w=5, extra=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    length = txt + h * w + extra  # `extra`: reference-image tokens after the image (Kontext)
    q, k, v = (torch.randn(b, heads, length, d, generator=g) for _ in range(3))
    region = torch.zeros(h, w, dtype=torch.bool)
    region[1:3, 0:2] = True
    other = torch.zeros(h, w, dtype=torch.bool)
    other[:, 3:] = True
    wm = build_weight_map([([2], region, 2.5), ([4, 5], other, 1.5)], h, w, txt, negative_weight=-3.0)
    return q, k, v, wm, txt, h * w


def _reference(q, k, v, txt, n, wm, sigma, gw):
    """softmax((QK^T + B) / sqrt(d)) V in float64, B = gw * W * log(1 + sigma^2) * std(Q_img K_txt^T) on image
    rows x text columns, every score formed at once."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2)
    std = s[:, :, txt:txt + n, :txt].reshape(q.shape[0], -1).std(dim=1)  # unbiased, per sample
    bias = torch.zeros_like(s)
    bias[:, :, txt:txt + n, :txt] = (gw * math.log1p(sigma**2) * std).view(-1, 1, 1, 1) * wm.double()
    return bias, torch.softmax((s + bias) / math.sqrt(q.shape[-1]), dim=-1) @ v


@pytest.mark.parametrize("chunk", [None, 3])
def test_bias_and_output_equal_the_float64_formula(chunk):
    q, k, v, wm, txt, n = _inputs()
    sigma, gw = 2.0, 0.3
    mask = joint_bias(q, k, txt, n, wm, sigma, gw, chunk_size=chunk)
    bias, ref = _reference(q, k, v, txt, n, wm, sigma, gw)
    scale = q.shape[-1] ** -0.5
    assert mask.shape == (2, 1, q.shape[2], q.shape[2]) and mask.dtype == torch.float32
    torch.testing.assert_close(mask.double().expand_as(bias) / scale, bias, rtol=1e-6, atol=1e-9)
    out = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale + mask.double(), dim=-1) @ v.double()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # the host's own attention (torch SDPA, what ComfyUI's attention_pytorch calls) with the mask: float32 rounding
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(sdpa.double(), ref, rtol=1e-4, atol=1e-5)


def test_bias_sits_only_on_image_queries_times_subject_text_keys():
    q, k, _v, wm, txt, n = _inputs()
    mask = joint_bias(q, k, txt, n, wm, 1.0, 0.5)[:, 0]
    nonzero = mask != 0
    assert not nonzero[:, :txt].any()  # text queries
    assert not nonzero[:, txt + n:].any()  # reference-image queries
    assert not nonzero[:, :, txt:].any()  # image keys
    cols = nonzero.any(dim=(0, 1)).nonzero().flatten().tolist()
    assert cols == [2, 4, 5]  # the subjects' tokens and nothing else
    img = mask[:, txt:txt + n, :txt]
    assert (img[:, :, 2].reshape(2, 4, 5)[:, 1:3, 0:2] > 0).all() and (img[:, :, 2].reshape(2, 4, 5)[:, 0] < 0).all()


def test_std_is_per_sample_and_chunk_invariant():
    q, k, _v, _wm, txt, n = _inputs(b=3)
    full = image_text_std(q, k, txt, n)
    for chunk in (1, 4, 7, 1000):
        torch.testing.assert_close(image_text_std(q, k, txt, n, chunk_size=chunk), full, rtol=1e-6, atol=0)
    alone = torch.stack([image_text_std(q[i:i + 1], k[i:i + 1], txt, n)[0] for i in range(3)])
    torch.testing.assert_close(alone, full, rtol=1e-6, atol=0)


def test_per_sample_sigma_and_zero_weight():
    q, k, _v, wm, txt, n = _inputs()
    both = joint_bias(q, k, txt, n, wm, torch.tensor([0.5, 3.0]), 0.2)
    for i, s in enumerate((0.5, 3.0)):
        torch.testing.assert_close(both[i:i + 1], joint_bias(q[i:i + 1], k[i:i + 1], txt, n, wm, s, 0.2))
    assert not joint_bias(q, k, txt, n, wm, 1.0, 0.0).any()


def test_flow_sigma_maps_flow_time_to_the_same_signal_to_noise_sigma():
    assert flow_sigma(0.0) == 0.0
    assert flow_sigma(0.5) == pytest.approx(1.0)
    assert flow_sigma(0.8) == pytest.approx(4.0)
    assert flow_sigma(1.0) == FLOW_SIGMA_CAP  # Flux's first step: t = 1 exactly
    t = torch.tensor([0.0, 0.25, 0.5, 0.99, 1.0])
    torch.testing.assert_close(flow_sigma(t), torch.tensor([0.0, 1 / 3, 1.0, FLOW_SIGMA_CAP, FLOW_SIGMA_CAP],
                                                           dtype=torch.float64))
    # x_t / (1 - t) = x0 + sigma * eps: the same signal-to-noise ratio as a VE model at sigma
    for tv in (0.1, 0.5, 0.9):
        assert flow_sigma(tv) == pytest.approx(tv / (1 - tv))


def test_token_mass_is_the_joint_softmax_mass():
    q, k, v, wm, txt, n = _inputs()
    mask = joint_bias(q, k, txt, n, wm, 2.0, 0.3)
    mass = token_mass(q, k, mask, txt, n, [[2], [4, 5]], chunk_size=3)
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5 + mask.double()
    p = torch.softmax(s, dim=-1)[:, :, txt:txt + n]
    ref = torch.stack([p[..., [2]].sum(dim=(0, 1, 3)), p[..., [4, 5]].sum(dim=(0, 1, 3))])
    torch.testing.assert_close(mass.double(), ref, rtol=1e-5, atol=1e-6)
    assert mass.shape == (2, n)


def test_shape_errors_say_what_is_wrong():
    q, k, _v, wm, txt, n = _inputs()
    with pytest.raises(Cones2Error, match="image tokens x text tokens"):
        joint_bias(q, k, txt, n, wm[:, :-1], 1.0, 0.1)
    with pytest.raises(Cones2Error, match="cannot hold"):
        joint_bias(q, k, txt, q.shape[2], wm, 1.0, 0.1)
    with pytest.raises(Cones2Error, match=r"\[B, heads, L, d\]"):
        joint_bias(q[0], k[0], txt, n, wm, 1.0, 0.1)


def test_text_queries_option_adds_the_transposed_block_only():
    q, k, _v, wm, txt, n = _inputs()
    plain = joint_bias(q, k, txt, n, wm, 1.0, 0.5)
    both = joint_bias(q, k, txt, n, wm, 1.0, 0.5, text_queries=True)
    torch.testing.assert_close(both[:, 0, txt:txt + n, :txt], plain[:, 0, txt:txt + n, :txt])
    torch.testing.assert_close(both[:, 0, :txt, txt:txt + n], plain[:, 0, txt:txt + n, :txt].transpose(1, 2))
    rest = both.clone()
    rest[:, 0, txt:txt + n, :txt] = 0
    rest[:, 0, :txt, txt:txt + n] = 0
    assert not rest.any()


# --- guided_joint_attention: the same attention without the [L, L] mask -------------------------------------------
#
# Tolerance. Both paths sum the same exp(score) * v terms, in different groupings (one kernel over all keys, or one
# over the unbiased keys merged by log-sum-exp with the subject columns), so they differ by rounding only:
# * float32: each output is a convex combination of <= L values; the accumulated rounding is <= ~L * eps of the
#   output's magnitude, L = 30 here, so 32 ulps of max|out| (~4e-6 at |out| ~ 2; measured: ~5 ulps).
# * bfloat16: the output is rounded to bfloat16 (1/2 ulp) after the kernel rounded its probabilities to bfloat16
#   (up to ~1 ulp more); today's path also rounds its bias to bfloat16. Measured: both paths within ~1.1 ulps of the
#   float64 truth. We allow 2 ulps of max|out| against the float64 formula and 3 between the two paths.

from comfyui_cones2.cones2_core.joint_attention import (  # noqa: E402
    SubjectColumns,
    attention_lse_math,
    guided_joint_attention,
    sdpa_lse,
    subject_columns,
)

_ULPS = {torch.float32: (32, 32), torch.bfloat16: (2, 3)}  # (vs float64, vs today's path)


def _ulp(x, dtype):
    """The spacing of ``dtype`` at max|x|."""
    top = float(x.abs().max())
    return 2.0 ** (math.floor(math.log2(top)) - (23 if dtype == torch.float32 else 7))


def _guided_inputs(b=2, neg=-3.0, seed=0):
    q, k, v, _wm, txt, n = _inputs(b=b, seed=seed)
    region = torch.zeros(4, 5, dtype=torch.bool)
    region[1:3, 0:2] = True
    other = torch.zeros(4, 5, dtype=torch.bool)
    other[:, 3:] = True
    wm = build_weight_map([([2], region, 2.5), ([4, 5], other, 1.5)], 4, 5, txt, negative_weight=neg)
    return q, k, v, wm, txt, n


def _host_mask(kind, b, length, seed=1):
    if kind is None:
        return None
    if kind == "padding":  # Chroma-like: some text keys of each sample masked out (one a subject column)
        m = torch.zeros(b, 1, 1, length)
        m[0, ..., [1, 4]] = float("-inf")
        m[-1, ..., [6]] = float("-inf")
        return m
    return torch.randn(b, 1, length, length, generator=torch.Generator().manual_seed(seed))  # a soft full mask


def _today(q, k, v, txt, n, wm, sigma, gw, host_mask, chunk=None, text_queries=False):
    """nodes/architectures/flux.py's path: joint_bias (+ the host's mask) as the mask of the host's SDPA, in q's dtype."""
    bias = joint_bias(q, k, txt, n, wm, sigma, gw, chunk_size=chunk, text_queries=text_queries)
    full = bias if host_mask is None else bias + host_mask.float()
    return bias, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full.to(q.dtype))


def _truth(q, k, v, bias, host_mask):
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias.double()
    if host_mask is not None:
        s = s + host_mask.double()
    return torch.softmax(s, dim=-1) @ v.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("host", [None, "padding", "soft"])
@pytest.mark.parametrize("neg", [-3.0, -1e8])
@pytest.mark.parametrize("chunk", [None, 4])
def test_guided_joint_attention_equals_todays_dense_mask_path(dtype, host, neg, chunk):
    q, k, v, wm, txt, n = _guided_inputs(neg=neg)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    sigma = flow_sigma(torch.tensor([0.5, 0.9]))  # per sample
    hm = _host_mask(host, q.shape[0], q.shape[2])
    hm = hm if hm is None or host == "padding" else hm.to(dtype)
    bias, today = _today(q, k, v, txt, n, wm, sigma, 0.3, hm, chunk)
    k0, v0 = k.clone(), v.clone()
    new = guided_joint_attention(q, k, v, txt, n, wm, sigma, 0.3, host_mask=hm, chunk_size=chunk)
    assert torch.equal(k, k0) and torch.equal(v, v0)  # the in-place key permutation is undone
    assert new.dtype == dtype and new.shape == q.shape and torch.isfinite(new).all()
    truth = _truth(q, k, v, bias, hm)
    ulp = _ulp(truth, dtype)
    to_truth, to_today = _ULPS[dtype]
    torch.testing.assert_close(new.double(), truth, rtol=0, atol=to_truth * ulp)
    torch.testing.assert_close(new.double(), today.double(), rtol=0, atol=to_today * ulp)


def test_dropping_the_bias_fails_the_comparison():
    q, k, v, wm, txt, n = _guided_inputs()
    sigma = torch.tensor([2.0, 3.0])
    _bias, today = _today(q, k, v, txt, n, wm, sigma, 0.3, None)
    new = guided_joint_attention(q, k, v, txt, n, wm, sigma, 0.3)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    tol = _ULPS[torch.float32][1] * _ulp(today, torch.float32)
    assert (new - today).abs().max() <= tol
    assert (plain - today).abs().max() > 1000 * tol  # without the bias the output is far from today's
    # weight 0 is plain attention
    torch.testing.assert_close(guided_joint_attention(q, k, v, txt, n, wm, sigma, 0.0), plain, rtol=0, atol=tol)
    # the subject's in-box share of attention rises with the guidance
    cols = subject_columns(wm, txt, n)
    inside = torch.zeros(4, 5, dtype=torch.bool)
    inside[1:3, 0:2] = True
    share = [float(guided_joint_attention(q, k, v, txt, n, cols, sigma, g, return_mass=True)[1][0][inside.flatten()]
                   .sum()) for g in (0.0, 0.3, 1.0)]
    assert share[0] < share[1] < share[2]


def test_text_queries_option_matches_todays_path():
    q, k, v, wm, txt, n = _guided_inputs()
    hm = _host_mask("soft", 2, q.shape[2])
    bias, today = _today(q, k, v, txt, n, wm, 1.5, 0.4, hm, text_queries=True)
    new = guided_joint_attention(q, k, v, txt, n, wm, 1.5, 0.4, host_mask=hm, text_queries=True)
    ulp = _ulp(today, torch.float32)
    torch.testing.assert_close(new, today, rtol=0, atol=32 * ulp)
    torch.testing.assert_close(new.double(), _truth(q, k, v, bias, hm), rtol=0, atol=32 * ulp)


def test_subject_columns_kept_for_the_call_serve_every_block():
    q, k, v, wm, txt, n = _guided_inputs(b=3)
    cols = subject_columns(wm, txt, n)
    assert isinstance(cols, SubjectColumns) and cols.cols.tolist() == [2, 4, 5] and cols.m == 3
    # the swap puts the subject columns first: positions 0..m-1 after it are exactly C
    order = cols.key_order(q.shape[2])
    assert sorted(order[:3].tolist()) == [2, 4, 5] and sorted(order.tolist()) == list(range(q.shape[2]))
    for seed in (1, 2):  # another block: other q, k, v, the same columns
        qb, kb, vb, *_ = _inputs(b=3, seed=seed)
        sigma = torch.tensor([0.3, 1.0, 5.0])
        torch.testing.assert_close(guided_joint_attention(qb, kb, vb, txt, n, cols, sigma, 0.3),
                                   guided_joint_attention(qb, kb, vb, txt, n, wm, sigma, 0.3), rtol=0, atol=0)
    with pytest.raises(Cones2Error, match="built for"):
        guided_joint_attention(q, k, v, txt, n - 1, cols, 1.0, 0.3)


def test_copy_path_and_math_attend_give_the_same_result():
    q, k, v, wm, txt, n = _guided_inputs()
    hm = _host_mask("padding", 2, q.shape[2])
    swap = guided_joint_attention(q, k, v, txt, n, wm, 2.0, 0.3, host_mask=hm, inplace=True)
    copy = guided_joint_attention(q, k, v, txt, n, wm, 2.0, 0.3, host_mask=hm, inplace=False)
    math_ = guided_joint_attention(q, k, v, txt, n, wm, 2.0, 0.3, host_mask=hm, attend=attention_lse_math)
    tol = 32 * _ulp(swap, torch.float32)
    torch.testing.assert_close(copy, swap, rtol=0, atol=tol)
    torch.testing.assert_close(math_, swap, rtol=0, atol=tol)
    with torch.inference_mode():  # the host samples in inference mode: the swap is allowed there
        qi, ki, vi = q.clone(), k.clone(), v.clone()
        torch.testing.assert_close(guided_joint_attention(qi, ki, vi, txt, n, wm, 2.0, 0.3, host_mask=hm), swap,
                                   rtol=0, atol=tol)
        assert torch.equal(ki, k) and torch.equal(vi, v)


def test_sdpa_lse_returns_the_log_sum_exp():
    q, k, v, *_ = _inputs()
    for mask in (None, _host_mask("soft", 2, q.shape[2]), _host_mask("soft", 2, q.shape[2]) > 0):
        out, lse = sdpa_lse(q, k, v, mask)
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if mask is not None:
            s = s + (mask if mask.dtype != torch.bool else torch.zeros_like(mask, dtype=torch.float32)
                     .masked_fill(~mask, float("-inf")))
        torch.testing.assert_close(lse, torch.logsumexp(s, dim=-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, torch.softmax(s, dim=-1) @ v, rtol=1e-5, atol=1e-5)
        out2, lse2 = attention_lse_math(q, k, v, mask, chunk_size=5)
        torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse2, lse, rtol=1e-5, atol=1e-5)


def test_mass_equals_token_mass_and_extra_tokens_are_reported():
    q, k, v, wm, txt, n = _guided_inputs()
    sigma = torch.tensor([1.0, 2.0])
    mask = joint_bias(q, k, txt, n, wm, sigma, 0.3)
    cols = subject_columns(wm, txt, n, tokens=[0])  # token 0 carries no weight but is recorded
    assert cols.cols.tolist() == [0, 2, 4, 5]
    _out, mass = guided_joint_attention(q, k, v, txt, n, cols, sigma, 0.3, return_mass=True, chunk_size=3)
    ref = token_mass(q, k, mask, txt, n, [[0], [2], [4], [5]])
    torch.testing.assert_close(mass, ref, rtol=1e-5, atol=1e-6)


def test_under_autograd_the_copy_path_gives_todays_gradients():
    q, k, v, wm, txt, n = _guided_inputs()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    new = guided_joint_attention(*leaves, txt, n, wm, 2.0, 0.3)
    (new * v).sum().backward()
    grads = [t.grad for t in leaves]
    leaves2 = [t.clone().requires_grad_() for t in (q, k, v)]
    _bias, today = _today(*leaves2, txt, n, wm, 2.0, 0.3, None)
    (today * v).sum().backward()
    for a, b in zip(grads, (t.grad for t in leaves2), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gram_std_equals_the_direct_statistic():
    from comfyui_cones2.cones2_core.joint_attention import image_text_std_gram

    q, k, _v, _wm, txt, n = _inputs(b=3)
    ref = torch.stack([(q[i, :, txt:txt + n].double() @ k[i, :, :txt].double().transpose(-1, -2)).std()
                       for i in range(3)])
    for chunk in (None, 1, 7):
        torch.testing.assert_close(image_text_std_gram(q, k, txt, n, chunk), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(image_text_std(q, k, txt, n), ref, rtol=1e-6, atol=0)
    shifted = q + 3.0  # a mean far from 0 (|mean| / std ~ 3): float32 Gram matrices, the difference in float64
    ref2 = torch.stack([(shifted[i, :, txt:txt + n].double() @ k[i, :, :txt].double().transpose(-1, -2)).std()
                        for i in range(3)])
    torch.testing.assert_close(image_text_std_gram(shifted, k, txt, n), ref2, rtol=1e-6, atol=0)
    torch.testing.assert_close(image_text_std_gram(shifted.bfloat16(), k.bfloat16(), txt, n),
                               image_text_std(shifted.bfloat16(), k.bfloat16(), txt, n), rtol=1e-6, atol=0)
