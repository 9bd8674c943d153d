"""Benchmark Train Residual: seconds per step and peak memory, per mode and resolution.

CPU (default): the tiny SD1.5 checkpoint (full-size CLIP-L, small UNet) at 64 and 256 px.
CUDA (``--device cuda``): full-size random-weight SD1.5 / SD2.1-v / SDXL architectures built from the host's
configs (no weights are downloaded), at each family's native resolution.

Each configuration runs in its own subprocess so that peak memory (CPU: max RSS growth during training; CUDA:
``torch.cuda.max_memory_allocated``) is not polluted by the previous one.

    python bench/train_residual.py --comfyui ~/ComfyUI [--device cuda] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Full-size UNets in the host's detection format (what detect_unet_config reads back from real checkpoints).
_FULL = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
         "in_channels": 4, "out_channels": 4, "model_channels": 320, "use_temporal_resblock": False,
         "use_temporal_attention": False, "transformer_depth_middle": 1}
FULL_FAMILIES = {
    "sd15": {**_FULL, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1] * 9 + [0] * 3,
             "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8},
    "sd2v": {**_FULL, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1] * 9 + [0] * 3,
             "use_linear_in_transformer": True, "context_dim": 1024, "num_head_channels": 64},
    "sdxl": {**_FULL, "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
             "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
             "num_head_channels": 64},
}
RESOLUTION = {"sd15": 512, "sd2v": 768, "sdxl": 1024}


def _images(size: int):
    import torch

    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    imgs = torch.full((3, size, size, 3), 0.5)
    for i in range(3):
        m = ((yy - size // 2 - size // 16 * i) ** 2 + (xx - size // 2) ** 2) < (size * 0.28) ** 2
        imgs[i][m] = torch.tensor([0.9, 0.2, 0.1])
    return imgs


def _full_checkpoint(family: str, out_dir: str) -> str:
    """A full-size random-weight checkpoint, built once through the harness's builder with a full UNet config."""
    from harness import tiny_checkpoints

    path = os.path.join(out_dir, f"cones2_full_{family}.safetensors")
    if not os.path.isfile(path):
        spec = tiny_checkpoints.FAMILIES[family]
        old = spec["unet"]
        spec["unet"] = FULL_FAMILIES[family]
        try:
            tiny_checkpoints.build(family, path)
        finally:
            spec["unet"] = old
    return path


def run_one(cfg: dict) -> dict:
    """One configuration, in this process: returns seconds per step and peak memory in MiB."""
    import resource

    import torch

    from harness.host import import_host, load_pack

    import_host(cfg["comfyui"])
    import comfy.cli_args

    comfy.cli_args.args.cpu = cfg["device"] == "cpu"
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import folder_paths

    pack = load_pack()
    out_dir = tempfile.mkdtemp(prefix="cones2-bench-")  # never write into the host's models folder
    folder_paths.folder_names_and_paths["cones2_residuals"] = ([out_dir], {".safetensors"})
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(cfg["ckpt"])
    stamps = []
    comfy.utils.PROGRESS_BAR_HOOK = lambda value, total, preview, node_id=None: stamps.append(time.perf_counter())
    cuda = cfg["device"] == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    node = pack.nodes.train_nodes.Cones2TrainResidual
    t0 = time.perf_counter()
    with torch.inference_mode():
        node.execute(model, clip, vae, subject="dog", steps=cfg["steps"], learning_rate=0.0,
                     resolution=cfg["resolution"], batch_size=1, seed=0, save_name=f"bench_{cfg['mode']}",
                     mode=cfg["mode"], images=_images(cfg["resolution"]))
    total = time.perf_counter() - t0
    per_step = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1) if len(stamps) > 1 else total
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        absolute = torch.cuda.max_memory_allocated() / 2**20
    else:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        peak, absolute = (maxrss - rss0) / 1024, maxrss / 1024
    del mm
    return {"s_per_step": per_step, "peak_mib": peak, "abs_mib": absolute, "total_s": total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.path.expanduser("~/ComfyUI"))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ckpt-dir", default=os.environ.get("CONES2_CKPT_DIR"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        sys.stdout.write(json.dumps(run_one(json.loads(args.one))) + "\n")
        return 0

    from harness import tiny_checkpoints

    out = args.ckpt_dir or tiny_checkpoints.default_cache_dir()
    configs = []
    if args.device == "cpu":
        res = subprocess.run([sys.executable, tiny_checkpoints.__file__, "--comfyui", args.comfyui, "--out", out,
                              "sd15"], capture_output=True, text=True)
        if res.returncode:
            sys.stderr.write(res.stderr)
            return 1
        ckpt = dict(line.split("\t") for line in res.stdout.strip().splitlines())["sd15"]
        configs = [("tiny sd15", ckpt, mode, r) for r in (64, 256) for mode in ("paper", "fast")]
    else:
        full_dir = os.path.join(out, "full")
        os.makedirs(full_dir, exist_ok=True)
        sys.path.insert(0, args.comfyui)
        from harness.host import import_host

        import_host(args.comfyui)
        import comfy.cli_args

        comfy.cli_args.args.cpu = False
        for fam in ("sd15", "sd2v", "sdxl"):
            ckpt = _full_checkpoint(fam, full_dir)
            configs += [(f"full {fam}", ckpt, mode, RESOLUTION[fam]) for mode in ("paper", "fast")]

    rows = []
    with tempfile.TemporaryDirectory() as base:
        for name, ckpt, mode, r in configs:
            cfg = {"comfyui": args.comfyui, "device": args.device, "ckpt": ckpt, "mode": mode, "resolution": r,
                   "steps": args.steps}
            env = dict(os.environ, COMFYUI_DIR=args.comfyui)
            cmd = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(cfg)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=base)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode or not lines:
                rows.append((name, mode, r, "failed: " + (res.stderr.strip().splitlines() or ["?"])[-1][:80]))
                continue
            m = json.loads(lines[-1])
            rows.append((name, mode, r, f"{m['s_per_step']:.3f}", f"{m['peak_mib']:.0f}", f"{m['abs_mib']:.0f}",
                         f"{m['total_s']:.1f}"))
    mem = "peak CUDA MiB" if args.device == "cuda" else "peak RSS"
    header = ("model", "mode", "px", "s/step", f"{mem} growth after loading", f"{mem} of the process",
              "total s (incl. setup)")
    sys.stdout.write(" | ".join(header) + "\n")
    sys.stdout.write(" | ".join("---" for _ in header) + "\n")
    for row in rows:
        sys.stdout.write(" | ".join(str(c) for c in row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
