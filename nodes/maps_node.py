"""The Attention Maps node: where each subject's words attended during the last guided sampling run."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..cones2_core.errors import Cones2Error
from ..cones2_core.families import FAMILIES
from ..cones2_core.figures import render_panel, share_inside
from .common import CATEGORY
from .guidance import specs_of
from .recording import find_recording

# The ui entry of Cones2AttentionMaps that the layout editor reads (its copy: MAPS_UI_KEY in web/js/layout/model.js)
MAPS_UI_KEY = "cones2_maps"


def attention_report(model) -> list[dict]:
    """Per guidance and grid: each subject's averaged map, region and in-region share of the last run."""
    rows = []
    for spec in specs_of(model):
        rec = find_recording(spec.uid) if spec.record else None
        if rec is None:
            continue
        for (h, w), maps in sorted(rec.maps.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
            for subject, attn in maps.items():
                attn = attn.detach().double().cpu()
                region = rec.regions[(h, w)][subject]
                frames = rec.frames.get((h, w), 1)  # a video's strip of frames, top to bottom
                per = [share_inside(a, r) for a, r in zip(attn.chunk(frames), region.chunk(frames), strict=True)]
                rows.append({"uid": spec.uid, "grid": (h, w), "subject": subject, "map": attn, "region": region,
                             "share": share_inside(attn, region), "frames": frames, "frame_shares": per})
    return rows


class Cones2AttentionMaps(io.ComfyNode):
    # The model families (cones2_core.families keys) it works with; its help page names each (tested).
    SUPPORTED_FAMILIES = tuple(FAMILIES)  # every family of the table

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Cones2AttentionMaps",
            display_name="Cones2 Attention Maps",
            category=CATEGORY,
            description=(
                "Shows where each subject's words attended during the last guided sampling run: one heatmap "
                "per subject (averaged over heads, layers of one resolution and guided steps) with its region "
                "outlined, and the share of the attention that fell inside the region (also shown on the node). "
                "Use it to debug layouts."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The guided model from Cones2 Layout Guidance."),
                io.Latent.Input("samples", tooltip="The sampler's output, so the maps are read after sampling."),
                io.Combo.Input("resolution", options=["largest", "smallest", "all"], default="largest",
                               tooltip="Which attention resolution to show: the finest grid, the coarsest, or all."),
                io.Int.Input("panel_size", default=256, min=64, max=1024, step=32,
                             tooltip="Height of each heatmap panel in pixels."),
            ],
            outputs=[
                io.Image.Output(display_name="maps", tooltip="One panel per subject (and resolution), region in green."),
                io.String.Output(display_name="report", tooltip="In-region attention share per subject and grid."),
            ],
        )

    @classmethod
    def execute(cls, model, samples, resolution="largest", panel_size=256) -> io.NodeOutput:
        specs = specs_of(model)
        if specs and not any(s.record for s in specs):
            raise Cones2Error("Cones2 Layout Guidance did not record attention for this model: turn record_maps on in "
                              "the Cones2 Layout Guidance node (and sample again)")
        rows = attention_report(model)
        if not rows:
            raise Cones2Error("no attention was recorded for this model: connect the MODEL output of Cones2 Layout "
                              "Guidance and the LATENT output of the sampler that used it")
        overlay = maps_payload(rows)
        grids = sorted({r["grid"] for r in rows}, key=lambda g: g[0] * g[1])
        keep = grids if resolution == "all" else [grids[-1] if resolution == "largest" else grids[0]]
        rows = [r for r in rows if r["grid"] in keep]
        h, w = samples["samples"].shape[-2:]
        ph, pw = panel_size, max(1, round(panel_size * w / h))
        panels = [render_panel(r["map"], r["region"], ph * r["frames"], pw) for r in rows]  # a video: a strip
        ph = max(p.shape[0] for p in panels)
        panels = [torch.cat([p, torch.ones(ph - p.shape[0], pw, 3)]) if p.shape[0] < ph else p for p in panels]
        gap = torch.ones(ph, 4, 3)
        strip = torch.cat([t for p in panels for t in (p, gap)][:-1], dim=1)
        image = _label(strip, [f"{r['subject']} {r['share']:.0%}" for r in rows], pw + 4)
        report = "\n".join(f"{r['subject']}\t{r['grid'][0]}x{r['grid'][1]}\tin-region share {r['share']:.4f}"
                           + (f"\tper frame {' '.join(f'{x:.3f}' for x in r['frame_shares'])}"
                              if r["frames"] > 1 else "") for r in rows)
        return io.NodeOutput(image[None], report, ui={"text": [report], MAPS_UI_KEY: overlay})


def maps_payload(rows: list[dict]) -> list[dict]:
    """The compact maps for the layout editor's overlay (ui key ``cones2_maps``): one entry per subject of the
    largest grid only, whatever ``resolution`` the node shows, so the websocket message stays small. Each map is
    normalised to its own max (peak 1.0), rounded to 3 decimals, row-major ``h * w`` values; ``share`` is the
    report's in-region share. The frontend keeps it in memory only; it is never part of a workflow."""
    if not rows:
        return []
    grid = max({r["grid"] for r in rows}, key=lambda g: g[0] * g[1])
    out = []
    for r in rows:
        if r["grid"] != grid:
            continue
        m = torch.nan_to_num(r["map"].detach().float().cpu()).clamp(min=0.0)
        peak = float(m.max()) if m.numel() else 0.0
        m = m / peak if peak > 0 else torch.zeros_like(m)
        entry = {"subject": r["subject"], "h": int(grid[0]), "w": int(grid[1]), "share": float(r["share"]),
                 "values": [round(v, 3) for v in m.clamp(0.0, 1.0).flatten().tolist()]}
        if r.get("frames", 1) > 1:  # a video's map: h = frames x the frame's rows, frames stacked top to bottom
            entry["frames"] = int(r["frames"])
        out.append(entry)
    return out


def _label(strip: torch.Tensor, labels: list[str], stride: int) -> torch.Tensor:
    """Write each panel's label in its top-left corner (PIL's default font)."""
    from PIL import Image, ImageDraw

    arr = (strip.clamp(0, 1) * 255).byte().numpy()
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(labels):
        x = i * stride + 4
        draw.rectangle([x - 2, 2, x + 7 * len(text), 16], fill=(0, 0, 0))
        draw.text((x, 4), text, fill=(255, 255, 255))
    import numpy as np

    return torch.from_numpy(np.asarray(img).astype("float32") / 255.0)


NODES = [Cones2AttentionMaps]
