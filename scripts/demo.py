"""The pack's main job: the two-subject layout workflow (workflows/two_subjects_layout.json) through the
real ComfyUI host, on the trained toy world (harness/toy_world.py, built on first use) or on your checkpoint
(--ckpt, SD1.5 / SD2.x / SDXL).

Writes into output/: the guided image, the unguided image of the same seed (the same graph at
guidance_weight 0), cones2_compare.png (the two side by side with the boxes drawn), the attention-map figures
of both runs (each subject's cross-attention with its box outlined) and cones2_report.txt (in-region attention
share per subject, time per step, and on the toy world where each object landed). Residuals: your own files
when given with --dog/--cat; without them the residual loaders are left out of the graph.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from safetensors import safe_open  # noqa: E402

from cones2_core.figures import draw_boxes  # noqa: E402
from cones2_core.residual import load_residual, save_residual  # noqa: E402
from harness import toy_world  # noqa: E402
from harness.client import ComfyClient  # noqa: E402
from harness.host import find_host  # noqa: E402
from harness.server import ComfyServer  # noqa: E402
from harness.ui_to_api import to_api  # noqa: E402

log = logging.getLogger("comfyui-cones2")
WORKFLOW = os.path.join(ROOT, "workflows", "two_subjects_layout.json")
DEFAULT_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024}
TOY_PROMPT = "a photo of a dog and a cat"


def checkpoint_family(path: str) -> str:
    """SD1.5 / SD2.x / SDXL from a checkpoint's tensor names (no weights are read)."""
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise SystemExit(f"{path}: not an SD1.5, SD2.x or SDXL single-file checkpoint (.safetensors)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="an SD1.5 / SD2.x / SDXL .safetensors checkpoint (default: the toy world)")
    ap.add_argument("--dog", help="a residual file for the first subject ('dog')")
    ap.add_argument("--cat", help="a residual file for the second subject ('cat')")
    ap.add_argument("--size", type=int, help="image size (default: 128 on the toy world, else the family's native)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: 20 on the toy world, else 30)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "output"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[cones2-demo] %(message)s")
    host = find_host()
    toy = not args.ckpt
    if toy:
        log.info("the toy world's checkpoint (built once, about ten minutes on two cores)")
        res = subprocess.run([sys.executable, toy_world.__file__, "--comfyui", host], check=True,
                             stdout=subprocess.PIPE, text=True)
        ckpt = res.stdout.strip().splitlines()[-1].split("\t")[1]
    else:
        ckpt = os.path.abspath(args.ckpt)
        if not os.path.isfile(ckpt):
            raise SystemExit(f"no checkpoint file at {ckpt}")
    family = checkpoint_family(ckpt)
    size = args.size or (8 * toy_world.LATENT_SIZE if toy else DEFAULT_SIZE[family])
    steps = args.steps or (20 if toy else 30)
    os.makedirs(args.out, exist_ok=True)
    with open(WORKFLOW) as f:
        workflow = json.load(f)

    with ComfyServer(checkpoints={"main": ckpt}, host=host) as server:
        folder = server.models_dir("cones2_residuals")
        given = {"dog": args.dog, "cat": args.cat}
        for subject, path in given.items():
            if path:
                residual = load_residual(path, subject=subject)
                if residual.family != family:
                    raise SystemExit(f"{path} is a {residual.family} residual but the checkpoint is {family}")
                save_residual(residual, os.path.join(folder, f"demo_{subject}.safetensors"))
        client = ComfyClient(server.url)
        prompt = to_api(workflow, client.object_info())
        _drop_unused_residuals(prompt, {s for s, p in given.items() if p})
        boxes = []
        for node in prompt.values():
            kind, inputs = node["class_type"], node["inputs"]
            if kind == "CheckpointLoaderSimple":
                inputs["ckpt_name"] = os.path.basename(ckpt)
            elif kind == "Cones2ApplyResiduals" and toy:
                inputs["text"] = TOY_PROMPT  # the world's vocabulary
            elif kind == "Cones2LayoutGuidance":
                boxes = json.loads(inputs["layout"])["boxes"]
            elif kind == "EmptyLatentImage":
                inputs.update(width=size, height=size, batch_size=1)
            elif kind == "KSampler":
                inputs.update(steps=steps, seed=args.seed)
            elif kind == "SaveImage":
                inputs["filename_prefix"] = "cones2_demo"
        recurrence = next(n["inputs"]["self_recurrence"] for n in prompt.values()
                          if n["class_type"] == "Cones2LayoutGuidance")
        log.info("running %s on %s (%s, %dx%d, %d steps)", os.path.basename(WORKFLOW), os.path.basename(ckpt),
                 family, size, size, steps)
        t0 = time.time()
        entry = client.run(prompt, timeout=3600)
        cold = time.time() - t0
        written, reports = _collect(client, server, prompt, entry, args.out, "")
        # The same graph and seed at guidance_weight 0: exactly what sampling without Layout Guidance gives.
        unguided = _variant(prompt, "cones2_demo_unguided", guidance_weight=0.0)
        entry_u = client.run(unguided, timeout=3600)
        written_u, reports_u = _collect(client, server, unguided, entry_u, args.out, "_unguided")
        # Time the sampling alone: the guided graph with another seed, so the loaders come from the cache.
        timing = _variant(prompt, "cones2_demo_timing", seed=args.seed + 1)
        t0 = time.time()
        client.run(timing, timeout=3600)
        run_s = time.time() - t0
    guided_png = next(p for p in written if os.path.basename(p).startswith("cones2_demo_"))
    unguided_png = next(p for p in written_u if os.path.basename(p).startswith("cones2_demo_unguided"))
    compare = os.path.join(args.out, "cones2_compare.png")
    landed = _compare_figure(unguided_png, guided_png, boxes, compare, toy)
    sampler_steps = steps * (2 if recurrence else 1)
    per_step = run_s / sampler_steps
    what = "trained toy world: prompt words choose the objects, the layout places them" if toy else "your checkpoint"
    lines = [f"Cones 2 demo: {os.path.basename(WORKFLOW)}",
             f"checkpoint: {ckpt} ({family}, {what})",
             f"size {size}x{size}, {steps} steps{' with self-recurrence' if recurrence else ''} "
             f"({sampler_steps} sampler steps), seed {args.seed}",
             f"first run {cold:.1f} s (incl. loading); sampling run {run_s:.1f} s = {per_step:.3f} s per sampler step "
             "(incl. VAE decode and the maps)", "",
             "in-region attention share per subject (1.0 = all of the subject's attention inside its box):",
             *reports, "", "the same seed without guidance (guidance_weight 0):", *reports_u]
    if landed:
        lines += ["", "where the toy world's objects landed (centroid as fractions of the image):", *landed]
    report_path = os.path.join(args.out, "cones2_report.txt")
    with open(report_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    for path in [*written, *written_u, compare, report_path]:
        log.info("wrote %s", path)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _drop_unused_residuals(prompt: dict, keep: set[str]) -> None:
    """Remove the Load Residual nodes whose subject has no file, and rewire what they fed."""
    for nid in [n for n, node in prompt.items() if node["class_type"] == "Cones2LoadResidual"]:
        node = prompt[nid]
        subject = os.path.splitext(node["inputs"]["residual_name"])[0].removeprefix("demo_")
        if subject in keep:
            continue
        upstream = node["inputs"].get("residuals")
        for other in prompt.values():
            for name, value in list(other["inputs"].items()):
                if isinstance(value, list) and value[:1] == [nid]:
                    if upstream is None:
                        del other["inputs"][name]
                    else:
                        other["inputs"][name] = upstream
        del prompt[nid]


def _variant(prompt: dict, prefix: str, seed: int | None = None, **guidance) -> dict:
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        if node["class_type"] == "KSampler" and seed is not None:
            node["inputs"]["seed"] = seed
        elif node["class_type"] == "Cones2LayoutGuidance":
            node["inputs"].update(guidance)
        elif node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = prefix
    return out


def _collect(client, server, prompt, entry, out_dir, suffix):
    written, reports = [], []
    for nid, out in entry["outputs"].items():
        kind = prompt[nid]["class_type"]
        for path in client.output_files(entry, server.output_dir, node_id=nid):
            name = f"cones2_attention_maps{suffix}.png" if _feeds_from(prompt, nid, "Cones2AttentionMaps") else \
                os.path.basename(path)
            dst = os.path.join(out_dir, name)
            shutil.copyfile(path, dst)
            written.append(dst)
        if kind == "Cones2AttentionMaps":
            reports += out.get("text", [])
    return written, reports


def _compare_figure(unguided_png: str, guided_png: str, boxes: list[dict], path: str, toy: bool) -> list[str]:
    """unguided | guided, each with the layout's boxes outlined; on the toy world also where each object landed."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from harness import toy_measures

    panels, landed = [], []
    for title, png in (("no guidance", unguided_png), ("Layout Guidance", guided_png)):
        with Image.open(png) as im:
            img = im.convert("RGB")
        scale = max(1, 256 // img.height)
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        draw_boxes(img, boxes)
        draw = ImageDraw.Draw(img)
        w, h = img.size
        draw.rectangle([0, h - 16, w, h], fill=(0, 0, 0))
        draw.text((4, h - 14), title, fill=(255, 255, 255))
        panels.append(img)
        if toy:
            pixels = torch.from_numpy(np.asarray(Image.open(png).convert("RGB")).astype("float32") / 255.0)
            found = toy_measures.find_all(toy_world.latent_of_picture(pixels))
            for b in boxes:
                f = found.get(b["subject"])
                if f is None:
                    continue
                where = f"({f.cx:.2f}, {f.cy:.2f}), {'inside' if f.inside(b) else 'outside'} its box" if f.present \
                    else "not drawn"
                landed.append(f"{title}: {b['subject']} {where}")
    gap = 6
    fig = Image.new("RGB", (sum(p.width for p in panels) + gap, max(p.height for p in panels)), (255, 255, 255))
    x = 0
    for p in panels:
        fig.paste(p, (x, 0))
        x += p.width + gap
    fig.save(path)
    return landed


def _feeds_from(prompt: dict, node_id: str, class_type: str) -> bool:
    """True when node_id's images input comes from a node of class_type."""
    src = prompt[node_id]["inputs"].get("images")
    return isinstance(src, list) and prompt.get(src[0], {}).get("class_type") == class_type


if __name__ == "__main__":
    raise SystemExit(main())
