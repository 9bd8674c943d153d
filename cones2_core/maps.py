"""Attention-map figures: heatmaps of each subject's cross-attention with its region outlined."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A perceptual dark-to-bright ramp (black -> purple -> orange -> yellow).
_RAMP = torch.tensor([[0.0, 0.0, 0.02], [0.33, 0.06, 0.43], [0.73, 0.21, 0.33], [0.98, 0.55, 0.04], [0.99, 0.99, 0.75]])


def colourise(values: torch.Tensor) -> torch.Tensor:
    """values [h, w] in any range -> RGB [h, w, 3] in 0..1 (normalised to the map's own max)."""
    v = values.float()
    v = v / v.max().clamp_min(1e-12)
    pos = v.clamp(0, 1) * (len(_RAMP) - 1)
    lo = pos.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (pos - lo.float()).unsqueeze(-1)
    return _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac


def outline(region: torch.Tensor) -> torch.Tensor:
    """bool [H, W] -> bool [H, W]: the region's border pixels."""
    r = region.float()[None, None]
    eroded = -F.max_pool2d(-r, 3, stride=1, padding=1)
    return (r - eroded)[0, 0] > 0


def render_panel(attn: torch.Tensor, region: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One subject's map: attn [h, w] and region bool [h, w] -> RGB [height, width, 3] with the region outlined."""
    heat = F.interpolate(attn.float()[None, None], size=(height, width), mode="nearest")[0, 0]
    img = colourise(heat)
    big = F.interpolate(region.float()[None, None], size=(height, width), mode="nearest")[0, 0] > 0.5
    edge = outline(big)
    img[edge] = torch.tensor([0.2, 1.0, 0.4])
    return img


def share_inside(attn: torch.Tensor, region: torch.Tensor) -> float:
    """Share of a map's mass inside a region (both [h, w])."""
    total = attn.double().sum().item()
    return attn.double()[region.bool()].sum().item() / total if total > 0 else 0.0
