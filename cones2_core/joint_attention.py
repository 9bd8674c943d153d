"""Cones 2 layout guidance on joint attention (Flux's double and single blocks).

A joint-attention model attends over one sequence ``[text tokens (T), image tokens (N), more image tokens]``:
every query sees every key. The Cones 2 bias belongs on the block where image queries meet the subject's text
keys, which is what cross-attention is in a UNet::

    S      = Q_img K_txt^T                       (per head, before the softmax scale; [N, T])
    bias   = guidance_weight * W * log(1 + s^2) * std(S)
    out    = softmax((Q K^T + B) * scale) V,     B = bias on [image rows, text columns], 0 elsewhere

* ``W [N, T]`` is :func:`cones2_core.layout.build_weight_map` for the text part (the subject's tokens get the
  positive weight inside its region and the negative weight outside; every other token 0).
* ``std(S)`` is the unbiased standard deviation of one sample's image-to-text scores over all heads, image tokens
  and text tokens: the same statistic as the UNet's ``std(QK^T)`` of a cross-attention layer, whose keys are the
  text. It is accumulated over chunks of image tokens, so no ``[N, T]`` block of every head is kept, and the
  ``[L, L]`` scores are never formed here: the bias is handed to the host's attention as a float mask broadcast
  over heads.
* ``s`` is the noise level: Flux's sigma is the flow time ``t`` in 0..1 (``x_t = (1 - t) x_0 + t eps``), which
  has the signal-to-noise ratio of the variance-exploding ``sigma = t / (1 - t)`` that the paper's
  ``log(1 + sigma^2)`` was written for (``x_t / (1 - t) = x_0 + sigma eps``). :func:`flow_sigma` maps it, capped
  at ``FLOW_SIGMA_CAP``, SD's largest sigma, because Flux starts at ``t = 1`` exactly (sigma infinite): the
  factor then runs over SD's range, 5.4 at the first step down to 0 at the last.
* Text queries, other image tokens (Kontext references) and the unconditional pass get no bias.
"""

from __future__ import annotations

import torch

from .errors import Cones2Error
from .score_stats import MAX_CHUNK_ELEMENTS, bias_coefficient, combine, moments, unbiased_std

FLOW_SIGMA_CAP = 14.6146  # SD1.x/2.x's sigma_max (scaled-linear betas, 1000 steps)


def flow_sigma(t: float | torch.Tensor) -> float | torch.Tensor:
    """The variance-exploding sigma of flow time ``t`` (same signal-to-noise ratio): t / (1 - t), capped."""
    if isinstance(t, torch.Tensor):
        t = t.double()
        return torch.where(t >= 1, torch.full_like(t, FLOW_SIGMA_CAP),
                           (t / (1 - t).clamp_min(1e-12)).clamp(0, FLOW_SIGMA_CAP))
    t = float(t)
    return FLOW_SIGMA_CAP if t >= 1 else min(max(t, 0.0) / (1 - t), FLOW_SIGMA_CAP)


def _check(q, k, txt_len: int, img_len: int, weight_map):
    if q.dim() != 4 or k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise Cones2Error(f"joint attention needs q and k as [B, heads, L, d], got {tuple(q.shape)} and "
                          f"{tuple(k.shape)}")
    b, _, length, _ = q.shape
    if txt_len < 1 or img_len < 1 or txt_len + img_len > length or k.shape[2] != length:
        raise Cones2Error(f"a joint sequence of {length} tokens cannot hold {txt_len} text and {img_len} image tokens")
    w = weight_map.unsqueeze(0) if weight_map.dim() == 2 else weight_map
    if w.dim() != 3 or w.shape[0] not in (1, b) or tuple(w.shape[1:]) != (img_len, txt_len):
        raise Cones2Error(f"the layout weight map has shape {tuple(weight_map.shape)} but this attention needs "
                          f"[{b} or 1, {img_len}, {txt_len}] (image tokens x text tokens)")
    return w.to(device=q.device, dtype=torch.float32)


def _chunk(b: int, heads: int, width: int, chunk_size: int | None) -> int:
    if chunk_size is not None and chunk_size < 1:
        raise Cones2Error(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return chunk_size or max(1, MAX_CHUNK_ELEMENTS // max(1, b * heads * width))


def image_text_std(q, k, txt_len: int, img_len: int, chunk_size: int | None = None) -> torch.Tensor:
    """Per-sample unbiased std [B] (float64) of S = Q_img K_txt^T over heads, image and text tokens."""
    b, heads = q.shape[:2]
    kt = k[:, :, :txt_len].float().transpose(-1, -2)
    chunk = _chunk(b, heads, txt_len, chunk_size)
    stats = None
    for start in range(txt_len, txt_len + img_len, chunk):
        stop = min(start + chunk, txt_len + img_len)
        part = moments(q[:, :, start:stop].float() @ kt)
        stats = part if stats is None else combine(stats, part)
    return unbiased_std(stats)


def joint_bias(q, k, txt_len: int, img_len: int, weight_map, sigma, guidance_weight: float,
               scale: float | None = None, chunk_size: int | None = None, text_queries: bool = False) -> torch.Tensor:
    """The Cones 2 bias as an additive attention mask [B, 1, L, L] (float32), already multiplied by the softmax
    scale (the host adds masks to the scaled scores): zero but on image rows x text columns.

    q, k: [B, heads, L, d] after the positional embedding (what the host's attention receives); text tokens are
    rows ``0 .. txt_len - 1``, the image's ``txt_len .. txt_len + img_len - 1``. ``sigma``: the noise level in
    sigma units per sample (``flow_sigma`` of Flux's flow time) or one float. ``text_queries``: also bias the
    subject's text queries x image keys with the same weights (an experiment; off in the node)."""
    w = _check(q, k, txt_len, img_len, weight_map)
    b, _, length, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    coef = bias_coefficient(image_text_std(q, k, txt_len, img_len, chunk_size), sigma, guidance_weight)  # [B]
    mask = torch.zeros(b, 1, length, length, dtype=torch.float32, device=q.device)
    block = (scale * coef).view(b, 1, 1) * w
    mask[:, 0, txt_len:txt_len + img_len, :txt_len] = block
    if text_queries:  # also confine the subject's text queries to its region (the transposed block)
        mask[:, 0, :txt_len, txt_len:txt_len + img_len] = block.transpose(1, 2)
    return mask


def token_mass(q, k, mask, txt_len: int, img_len: int, tokens, scale: float | None = None,
               chunk_size: int | None = None) -> torch.Tensor:
    """Attention mass of each token list on every image token, float32 [len(tokens), img_len], summed over batch,
    heads and the list's tokens: the probabilities of the joint softmax (all L keys, ``mask`` added), taken chunk
    by chunk of image queries (what the attention maps need; never the whole [L, L])."""
    b, heads, length, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    kt = k.float().transpose(-1, -2)
    picks = [torch.as_tensor(list(t), dtype=torch.long, device=q.device) for t in tokens]
    chunk = _chunk(b, heads, length, chunk_size)
    out = []
    for start in range(txt_len, txt_len + img_len, chunk):
        stop = min(start + chunk, txt_len + img_len)
        s = (q[:, :, start:stop].float() @ kt) * scale
        if mask is not None:
            s = s + mask[:, :, start:stop].float()
        p = torch.softmax(s, dim=-1)
        out.append(torch.stack([p.index_select(-1, i).sum(dim=(0, 1, 3)) for i in picks]) if picks
                   else p.new_zeros(0, stop - start))
    return torch.cat(out, dim=1)


__all__ = ["FLOW_SIGMA_CAP", "flow_sigma", "image_text_std", "joint_bias", "token_mass"]
