"""The toy world's own rates and what Layout Guidance does to them, measured in one run.

    python bench/toy_world.py [--samplers euler euler_ancestral ...] [--n 16] [--seed 5] [--steps 20] [--cfg 5]

Builds (or reuses) the trained toy world (harness/toy_world.py), loads it through the real host in-process and
prints one table: for single-object and two-object prompts, how often the prompted objects appear, how often an
unprompted one does, their mean radius, and (for "a photo of a dog and a cat", dog box left, cat box right)
how often both land in their boxes, unguided and with Layout Guidance at node defaults, per sampler. Every row
uses the same n noise draws. Rates, not times: they do not depend on the machine's speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import toy_world  # noqa: E402
from harness.host import find_host, import_host, load_pack  # noqa: E402

PAIR = "a photo of a dog and a cat"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samplers", nargs="+", default=["euler"])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--single", nargs="*", default=["a photo of a dog", "a photo of a cat", "a photo of a car",
                                                    "a photo of a big dog"])
    args = ap.parse_args(argv)
    host = find_host()
    out = subprocess.run([sys.executable, toy_world.__file__, "--comfyui", host], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    path = out.strip().splitlines()[-1].split("\t")[1]
    import_host(host)
    import comfy.sd

    from harness import toy_measures as tm

    pack = load_pack()
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=True)
    run = tm.Sampler(pack, model, clip, n=args.n, seed=args.seed, steps=args.steps, cfg=args.cfg)
    boxes = {"dog": tm.LEFT, "cat": tm.RIGHT}
    header = "| prompt | sampler | guidance | prompted present | unprompted | radius | both in their boxes | s |"
    lines = [header, "|" + "---|" * 8]

    def row(prompt, sampler, guided):
        objects = [o for o in toy_world.OBJECTS if o in prompt.split()]
        t0 = time.time()
        z = run(prompt, boxes if guided else None, sampler=sampler)
        s = tm.summarise(z, objects, boxes if len(objects) == 2 else None)
        radius = ", ".join(f"{o} {r:.2f}" for o, r in s["radius"].items())
        inbox = f"{s['in_boxes']:.0%}" if "in_boxes" in s else ""
        lines.append(f"| {prompt} | {sampler} | {'node defaults' if guided else 'none'} | {s['presence']:.0%} | "
                     f"{s['unprompted']:.0%} | {radius} | {inbox} | {time.time() - t0:.0f} |")
        sys.stderr.write(lines[-1] + "\n")

    for prompt in args.single:
        row(prompt, args.samplers[0], False)
    for sampler in args.samplers:
        row(PAIR, sampler, False)
        row(PAIR, sampler, True)
    sys.stdout.write(f"toy world {os.path.basename(path)}: n={args.n} noise draws (seed {args.seed}), {args.steps} "
                     f"steps, cfg {args.cfg}; boxes: dog left half, cat right half\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
