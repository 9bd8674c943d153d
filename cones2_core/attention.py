"""Cones 2 layout guidance: a bias added to the cross-attention scores before the softmax.

For one cross-attention call with scores ``S = Q K^T`` (per head, before the softmax scale)::

    S' = S + guidance_weight * W * log(1 + sigma^2) * std(S)
    out = softmax(S' * scale) V

``W [pixels, tokens]`` comes from :func:`cones2_core.layout.build_weight_map`; ``std(S)`` is the unbiased
standard deviation of one sample's scores over all its heads, pixels and tokens (the reference's
``qk.std()`` with batch size 1), so a batch gives exactly what separate runs of its samples give.
Everything is computed in float32; large pixel counts are processed in chunks.
"""

import torch

from .errors import Cones2Error
from .score_stats import MAX_CHUNK_ELEMENTS, bias_coefficient, combine, moments, unbiased_std


def _check_weight_map(weight_map: torch.Tensor, batch: int, n: int, t: int, device) -> torch.Tensor:
    """Validate W ([B or 1, N, T], or [N, T]) and return it as float32 [B or 1, N, T] on device."""
    w = weight_map.unsqueeze(0) if weight_map.dim() == 2 else weight_map
    if w.dim() != 3 or w.shape[0] not in (1, batch) or tuple(w.shape[1:]) != (n, t):
        raise Cones2Error(
            f"the layout weight map has shape {tuple(weight_map.shape)} but this attention layer needs "
            f"[{batch} or 1, {n}, {t}] (pixels x tokens); build it for this layer's latent grid and token count"
        )
    return w.to(device=device, dtype=torch.float32)


def _split_heads(x: torch.Tensor, heads: int, name: str) -> torch.Tensor:
    """[B, L, heads*d] -> float32 [B, heads, L, d]."""
    if x.dim() != 3 or x.shape[-1] % heads:
        raise Cones2Error(f"{name} must have shape [B, length, heads*dim] with dim divisible by heads={heads}, "
                          f"got {tuple(x.shape)}")
    b, length, c = x.shape
    return x.float().reshape(b, length, heads, c // heads).transpose(1, 2)


def guided_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    weight_map: torch.Tensor | None,
    sigma: float | torch.Tensor,
    guidance_weight: float,
    scale: float | None = None,
    return_probs: bool = False,
    *,
    token_mass=None,
    chunk_size: int | None = None,
):
    """Cross-attention with the Cones 2 layout bias.

    q [B, N, heads*d], k and v [B, T, heads*d]; weight_map [B or 1, N, T] or None (plain attention).
    Returns the output [B, N, heads*d] in q's dtype, and with return_probs=True also the float32
    probabilities [B, heads, N, T]. ``token_mass``: a list of token-index lists (one per subject); then also
    the attention mass of each list per pixel, float32 [len(token_mass), N] summed over batch, heads and the
    list's tokens, taken chunk by chunk so the probabilities are never kept (what the attention maps need).
    chunk_size (pixels per chunk) defaults to what fits MAX_CHUNK_ELEMENTS; std(S) is always taken over the
    whole sample.
    """
    if not isinstance(heads, int) or heads < 1:
        raise Cones2Error(f"heads must be a positive integer, got {heads!r}")
    qh, kh, vh = (_split_heads(x, heads, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    b, _, n, d = qh.shape
    t = kh.shape[2]
    if kh.shape[0] != b or vh.shape[:3] != kh.shape[:3] or kh.shape[3] != d:
        raise Cones2Error(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not match: "
                          "k and v need q's batch and width and the same token count")
    scale = d**-0.5 if scale is None else float(scale)
    if chunk_size is not None and chunk_size < 1:
        raise Cones2Error(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk = chunk_size or max(1, MAX_CHUNK_ELEMENTS // max(1, b * heads * t))
    kt = kh.transpose(-1, -2)  # [B, H, d, T]

    full = None  # the whole S when it fits in one chunk
    coef = w = None
    if weight_map is not None and guidance_weight != 0:
        w = _check_weight_map(weight_map, b, n, t, qh.device)
        if n <= chunk:
            full = qh @ kt
            stats = moments(full)
        else:  # first pass: per-sample moments of S, merged over chunks
            stats = None
            for start in range(0, n, chunk):
                part = moments(qh[:, :, start : start + chunk] @ kt)
                stats = part if stats is None else combine(stats, part)
        coef = bias_coefficient(unbiased_std(stats), sigma, guidance_weight).view(b, 1, 1, 1)

    outs, probs, masses = [], [], []
    picks = None
    if token_mass is not None:
        picks = [torch.as_tensor(list(tok), dtype=torch.long, device=qh.device) for tok in token_mass]
    for start in range(0, n, chunk):
        s = full if full is not None else qh[:, :, start : start + chunk] @ kt  # [B, H, c, T]
        if coef is not None:
            s = s + coef * w[:, None, start : start + chunk]
        p = torch.softmax(s * scale, dim=-1)
        outs.append(p @ vh)
        if return_probs:
            probs.append(p)
        if picks is not None:
            masses.append(torch.stack([p.index_select(-1, i).sum(dim=(0, 1, 3)) for i in picks])
                          if picks else p.new_zeros(0, p.shape[2]))
    out = torch.cat(outs, dim=2).transpose(1, 2).reshape(b, n, heads * d).to(q.dtype)
    extra = ([torch.cat(probs, dim=2)] if return_probs else []) + ([torch.cat(masses, dim=1)] if picks is not None
                                                                   else [])
    return (out, *extra) if extra else out


__all__ = ["MAX_CHUNK_ELEMENTS", "guided_attention"]
