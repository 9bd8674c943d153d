"""The pack's main job: the two-subject layout workflow (workflows/two_subjects_layout.json) through the
real ComfyUI host, on your checkpoint (--ckpt, SD1.5 / SD2.x / SDXL) or on a tiny random-weight SD1.5.

Writes into output/: the generated image(s), the attention-map figure (each subject's cross-attention with
its box outlined) and cones2_report.txt (in-region attention share per subject, time per step).
With the tiny random-weight checkpoint the images are noise, but the attention maps are real: they show
the layout guidance at work. Residuals: your own files from models/cones2_residuals/ when given with
--dog/--cat, else small random placeholder residuals made for the checkpoint's family.
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

from cones2_core.residual import load_residual, save_residual  # noqa: E402
from harness import tiny_checkpoints, tiny_extras  # noqa: E402
from harness.client import ComfyClient  # noqa: E402
from harness.host import find_host  # noqa: E402
from harness.server import ComfyServer  # noqa: E402
from harness.ui_to_api import to_api  # noqa: E402

log = logging.getLogger("comfyui-cones2")
WORKFLOW = os.path.join(ROOT, "workflows", "two_subjects_layout.json")
DEFAULT_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024}


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
    ap.add_argument("--ckpt", help="an SD1.5 / SD2.x / SDXL .safetensors checkpoint (default: tiny random SD1.5)")
    ap.add_argument("--dog", help="a residual file for the first subject ('dog')")
    ap.add_argument("--cat", help="a residual file for the second subject ('cat')")
    ap.add_argument("--size", type=int, help="image size (default: 64 on the tiny model, else the family's native)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: 4 on the tiny model, else 30)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "output"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[cones2-demo] %(message)s")
    host = find_host()
    tiny = not args.ckpt
    if tiny:
        res = subprocess.run([sys.executable, tiny_checkpoints.__file__, "--comfyui", host, "sd15"],
                             check=True, capture_output=True, text=True)
        ckpt = res.stdout.strip().split("\t")[1]
    else:
        ckpt = os.path.abspath(args.ckpt)
        if not os.path.isfile(ckpt):
            raise SystemExit(f"no checkpoint file at {ckpt}")
    family = checkpoint_family(ckpt)
    size = args.size or (64 if tiny else DEFAULT_SIZE[family])
    steps = args.steps or (4 if tiny else 30)
    os.makedirs(args.out, exist_ok=True)
    with open(WORKFLOW) as f:
        workflow = json.load(f)

    with ComfyServer(checkpoints={"main": ckpt}, host=host) as server:
        folder = server.models_dir("cones2_residuals")
        for subject, given, seed in (("dog", args.dog, 11), ("cat", args.cat, 12)):
            dst = os.path.join(folder, f"demo_{subject}.safetensors")
            if given:
                residual = load_residual(given, subject=subject)
                if residual.family != family:
                    raise SystemExit(f"{given} is a {residual.family} residual but the checkpoint is {family}")
                save_residual(residual, dst)
            else:
                tiny_extras.build_residual(dst, subject, family, seed)  # small random placeholder
        client = ComfyClient(server.url)
        prompt = to_api(workflow, client.object_info())
        for node in prompt.values():
            kind, inputs = node["class_type"], node["inputs"]
            if kind == "CheckpointLoaderSimple":
                inputs["ckpt_name"] = os.path.basename(ckpt)
            elif kind == "EmptyLatentImage":
                inputs.update(width=size, height=size, batch_size=1)
            elif kind == "KSampler":
                inputs.update(steps=steps, seed=args.seed)
            elif kind == "SaveImage":
                inputs["filename_prefix"] = "cones2_demo"
        log.info("running %s on %s (%s, %dx%d, %d steps)", os.path.basename(WORKFLOW), os.path.basename(ckpt),
                 family, size, size, steps)
        t0 = time.time()
        entry = client.run(prompt, timeout=3600)
        cold = time.time() - t0
        # Time the sampling alone: queue the same graph with another seed, so the loaders come from the cache.
        warm_prompt = json.loads(json.dumps(prompt))
        for node in warm_prompt.values():
            if node["class_type"] == "KSampler":
                node["inputs"]["seed"] = args.seed + 1
            elif node["class_type"] == "SaveImage":
                node["inputs"]["filename_prefix"] = "cones2_demo_timing"
        t0 = time.time()
        client.run(warm_prompt, timeout=3600)
        run_s = time.time() - t0
        written, reports = [], []
        for nid, out in entry["outputs"].items():
            kind = prompt[nid]["class_type"]
            for path in client.output_files(entry, server.output_dir, node_id=nid):
                name = "cones2_attention_maps.png" if _feeds_from(prompt, nid, "Cones2AttentionMaps") else \
                    os.path.basename(path)
                dst = os.path.join(args.out, name)
                shutil.copyfile(path, dst)
                written.append(dst)
            if kind == "Cones2AttentionMaps":
                reports += out.get("text", [])
    per_step = run_s / (steps * 2)  # self-recurrence: every guided step is taken twice
    lines = [f"Cones 2 demo: {os.path.basename(WORKFLOW)}",
             f"checkpoint: {ckpt} ({family}{', tiny random weights: images are noise' if tiny else ''})",
             f"size {size}x{size}, {steps} steps with self-recurrence ({steps * 2} sampler steps), seed {args.seed}",
             f"first run {cold:.1f} s (incl. loading); sampling run {run_s:.1f} s = {per_step:.3f} s per sampler step "
             "(incl. VAE decode and the maps)", "",
             "in-region attention share per subject (1.0 = all of the subject's attention inside its box):",
             *reports]
    report_path = os.path.join(args.out, "cones2_report.txt")
    with open(report_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    written.append(report_path)
    for path in written:
        log.info("wrote %s", path)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _feeds_from(prompt: dict, node_id: str, class_type: str) -> bool:
    """True when node_id's images input comes from a node of class_type."""
    src = prompt[node_id]["inputs"].get("images")
    return isinstance(src, list) and prompt.get(src[0], {}).get("class_type") == class_type


if __name__ == "__main__":
    raise SystemExit(main())
