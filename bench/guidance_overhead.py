"""Sampling time with Cones 2 layout guidance (self-recurrence off) versus without, measured in one run.

    python bench/guidance_overhead.py [--families sd15 sdxl] [--size 256] [--steps 4] [--repeats 5]

Builds (or reuses) the tiny random-weight checkpoints, loads them through the real host in-process, and
alternates plain and guided sampling of the same prompt and seed; prints one table of median times and
their ratio (target: at most 1.15). The machine is noisy: compare the ratio, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import tiny_checkpoints  # noqa: E402
from harness.host import find_host, import_host, load_pack  # noqa: E402

LAYOUT = ('{"version":1,"boxes":[{"subject":"dog","x":0.05,"y":0.1,"w":0.4,"h":0.8},'
          '{"subject":"cat","x":0.55,"y":0.2,"w":0.4,"h":0.7}]}')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["sd15", "sdxl"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    host = find_host()
    out = subprocess.run([sys.executable, tiny_checkpoints.__file__, "--comfyui", host, *args.families],
                         check=True, capture_output=True, text=True).stdout
    paths = dict(line.split("\t") for line in out.strip().splitlines())
    import_host(host)
    if args.device != "cpu":
        import comfy.cli_args

        comfy.cli_args.args.cpu = False
    import comfy.sd
    import torch

    import nodes as host_nodes

    pack = load_pack()
    apply_node = pack.nodes.residual_nodes.Cones2ApplyResiduals
    guide_node = pack.nodes.guidance_nodes.Cones2LayoutGuidance
    rows = []
    for fam in args.families:
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(paths[fam], output_vae=False, output_clip=True)
        pos = apply_node.execute(clip, "a dog and a cat on a sofa").result[0]
        neg = host_nodes.CLIPTextEncode().encode(clip, "")[0]
        guided, gpos = guide_node.execute(model, pos, LAYOUT, 0.08, 2.5, -1e8, 0.0, 1.0, False).result
        latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}

        def run(m, p, latent=latent, neg=neg):
            t, c = time.perf_counter(), time.process_time()
            host_nodes.common_ksampler(m, 0, args.steps, 5.0, "euler", "normal", p, neg, latent, disable_noise=False)
            return time.perf_counter() - t, time.process_time() - c

        run(model, pos)
        run(guided, gpos)  # warm-up
        plain, guide = [], []
        for _ in range(args.repeats):
            plain.append(run(model, pos))
            guide.append(run(guided, gpos))
        pw, gw = (statistics.median(x[0] for x in v) for v in (plain, guide))
        pc, gc = (statistics.median(x[1] for x in v) for v in (plain, guide))
        rows.append((fam, args.size, args.steps, pw, gw, gw / pw, pc, gc, gc / pc))
    lines = [f"{'family':8} {'size':>5} {'steps':>5} {'plain s':>8} {'guided s':>8} {'ratio':>6} "
             f"{'plain cpu':>9} {'guided cpu':>10} {'cpu ratio':>9}"]
    for fam, size, steps, pw, gw, rw, pc, gc, rc in rows:
        lines.append(f"{fam:8} {size:5d} {steps:5d} {pw:8.3f} {gw:8.3f} {rw:6.3f} {pc:9.3f} {gc:10.3f} {rc:9.3f}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
