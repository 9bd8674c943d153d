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
