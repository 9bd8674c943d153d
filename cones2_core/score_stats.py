"""The score statistics of the Cones 2 bias: ``std(QK^T)`` per sample, accumulated over chunks, and the bias
coefficient ``guidance_weight * log(1 + sigma^2) * std``.

Shared by cross-attention (``cones2_core.attention``) and joint attention (``cones2_core.joint_attention``): a
summary is ``(count, mean, M2)`` per sample in float64; summaries of chunks merge exactly (Chan et al.), so the
statistic of a whole sample never needs all its scores at once.
"""

from __future__ import annotations

import torch

from .errors import Cones2Error

# Upper bound on the elements of one score chunk [B, H, chunk, T] (float32: 128 MiB).
MAX_CHUNK_ELEMENTS = 1 << 25


def moments(s: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Per-sample count, mean and sum of squared deviations (float64) of s [B, ...]."""
    n = s[0].numel()
    mean = torch.sum(s, dim=tuple(range(1, s.dim())), dtype=torch.float64) / n  # [B]
    dev = s - mean.to(s.dtype).view(-1, *([1] * (s.dim() - 1)))
    m2 = torch.sum(dev * dev, dim=tuple(range(1, s.dim())), dtype=torch.float64)  # [B]
    # Correct for the rounding of the mean to float32 (exact shift formula).
    shift = torch.sum(dev, dim=tuple(range(1, s.dim())), dtype=torch.float64)
    return n, mean, m2 - shift * shift / n


def combine(a: tuple[int, torch.Tensor, torch.Tensor], b: tuple[int, torch.Tensor, torch.Tensor]):
    """Chan et al.'s pairwise merge of two (count, mean, M2) summaries."""
    na, mean_a, m2_a = a
    nb, mean_b, m2_b = b
    n = na + nb
    delta = mean_b - mean_a
    return n, mean_a + delta * (nb / n), m2_a + m2_b + delta * delta * (na * nb / n)


def unbiased_std(summary: tuple[int, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Unbiased std [B] (float64) from a (count, mean, M2) summary."""
    n, _, m2 = summary
    return torch.sqrt(m2.clamp_min(0) / max(n - 1, 1))


def bias_coefficient(std: torch.Tensor, sigma: float | torch.Tensor, guidance_weight: float) -> torch.Tensor:
    """guidance_weight * log(1 + sigma^2) * std per sample -> float32 [B]."""
    batch = std.shape[0]
    if isinstance(sigma, torch.Tensor):
        sig = sigma.detach().to(device=std.device, dtype=torch.float64).reshape(-1)
        if sig.numel() not in (1, batch):
            raise Cones2Error(
                f"sigma has {sig.numel()} values but the batch has {batch} samples; "
                "pass one noise level per sample (shape [B]) or a single float"
            )
    else:
        sig = torch.tensor([float(sigma)], dtype=torch.float64, device=std.device)
    return (float(guidance_weight) * torch.log1p(sig * sig) * std).to(torch.float32).expand(batch)


__all__ = ["MAX_CHUNK_ELEMENTS", "bias_coefficient", "combine", "moments", "unbiased_std"]
