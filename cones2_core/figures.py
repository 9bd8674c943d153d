"""Figures: attention-map heatmaps of each subject's cross-attention with its region outlined, layout boxes
drawn on a picture, and the training loss curve."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
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


# ---- layout boxes on a picture ---------------------------------------------------------------------------

BOX_COLOUR = (40, 220, 60)
LABEL_BACKGROUND = (0, 0, 0)


def draw_boxes(img, boxes: Sequence[dict], colour: tuple[int, int, int] = BOX_COLOUR, width: int = 2) -> list:
    """Outline each layout box (``{"subject", "x", "y", "w", "h"}``, fractions of the image) on the PIL image
    ``img`` and label every box with its subject, on a dark tag inside its top-left corner so that the label reads
    on any picture (a bare green label vanished on the toy world's green cat). All outlines are drawn before the
    labels, so no outline crosses a label. Returns each label's tag as (left, top, right, bottom) pixels."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    w, h = img.size
    corners = []
    for b in boxes:
        x0, y0 = round(b["x"] * w), round(b["y"] * h)
        x1, y1 = round((b["x"] + b["w"]) * w) - 1, round((b["y"] + b["h"]) * h) - 1
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        corners.append((x0 + width, y0 + width))
    tags = []
    for b, (x, y) in zip(boxes, corners, strict=True):
        text = str(b["subject"])
        left, top, right, bottom = draw.textbbox((0, 0), text)
        tag = (x, y, x + right - left + 3, y + bottom - top + 3)
        draw.rectangle(tag, fill=LABEL_BACKGROUND)
        draw.text((x + 2 - left, y + 2 - top), text, fill=colour)
        tags.append(tag)
    return tags


# ---- loss curve ---------------------------------------------------------------------------------------------

def smooth(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (the usual training-loss smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * float(v)
        out.append(avg / (1 - beta ** i))
    return out


def draw_loss_curve(losses: Sequence[float], eval_points: Sequence[tuple[int, float]] = (),
                    width: int = 512, height: int = 256, title: str = "") -> np.ndarray:
    """A loss-curve picture as float32 [H, W, 3] in 0..1: raw loss (grey), smoothed (blue), evaluation (red)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 48, width - 10, 22, height - 20
    d.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    finite = [float(v) for v in losses if math.isfinite(v)] + [v for _, v in eval_points if math.isfinite(v)]
    if title:
        d.text((left, 4), title, fill=(0, 0, 0))
    if finite:
        lo, hi = min(finite), max(finite)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * abs(lo or 1.0), hi + 0.5 * abs(hi or 1.0)
        n = max(len(losses), 1 + max((s for s, _ in eval_points), default=0), 2)

        def xy(i: float, v: float) -> tuple[float, float]:
            x = left + (right - left) * i / (n - 1)
            y = bottom - (bottom - top) * (v - lo) / (hi - lo)
            return x, y

        for series, colour in ((losses, (190, 190, 190)), (smooth(losses), (30, 80, 220))):
            pts = [xy(i, v) for i, v in enumerate(series) if math.isfinite(v)]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            elif pts:
                d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        for s, v in eval_points:
            if math.isfinite(v):
                x, y = xy(s, v)
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(220, 40, 40))
        d.text((2, top), f"{hi:.4g}", fill=(0, 0, 0))
        d.text((2, bottom - 10), f"{lo:.4g}", fill=(0, 0, 0))
        d.text((left, bottom + 4), f"step 1 .. {n}", fill=(0, 0, 0))
    return np.asarray(img, dtype=np.float32) / 255.0
