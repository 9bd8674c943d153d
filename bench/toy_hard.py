"""Layout Guidance where placement is hard, on the trained toy world: one table of case x sampler x setting.

    python bench/toy_hard.py [--cases three corners ...] [--samplers euler dpmpp_2m ...]
                             [--settings unguided defaults recurrence ...] [--n 16] [--seed 5] [--steps 20] [--cfg 5]

Builds (or reuses) the toy world (harness/toy_world.py), loads it through the real host in-process and prints,
per case (prompt and boxes, ``tm.HARD_CASES``), sampler and setting (``SETTINGS``: unguided, Layout Guidance at node
defaults, self-recurrence on, and the remedies tried), over the same n noise draws in every row: how often every
boxed subject lands in its box, how often every prompted subject is present (and each one's rate), and the
time relative to plain (unguided) sampling of the same case and sampler. Rates do not depend on the machine's
speed; times do (take them from one run on a quiet machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import toy_measures as tm  # noqa: E402
from harness import toy_world  # noqa: E402
from harness.host import build, find_host, import_host, load_pack  # noqa: E402

# name: Layout Guidance settings over the node's defaults (None: unguided)
SETTINGS = {
    "unguided": None,
    "defaults": {},
    "recurrence off": {"self_recurrence": False},
    "recurrence on": {"self_recurrence": True, "recurrence_end_percent": 1.0},
    "recurrence 25%": {"self_recurrence": True, "recurrence_end_percent": 0.25},
    "recurrence 15%": {"self_recurrence": True, "recurrence_end_percent": 0.15},
    "recurrence 50%": {"self_recurrence": True, "recurrence_end_percent": 0.5},
    # remedies that cost no extra model calls: a stronger bias inside the box, a stronger bias overall
    "pw 5": {"positive_weight": 5.0},
    "pw 10": {"positive_weight": 10.0},
    "gw 0.12": {"guidance_weight": 0.12},
    "gw 0.16": {"guidance_weight": 0.16},
    "gw 0.24": {"guidance_weight": 0.24},
    "gw 0.16 pw 5": {"guidance_weight": 0.16, "positive_weight": 5.0},
    # a soft outside (the subject's words still reachable outside its box, at a cost)
    "nw -5": {"negative_weight": -5.0},
}
SAMPLERS = ["euler", "dpmpp_2m", "uni_pc", "ddim", "euler_ancestral"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(tm.HARD_CASES), choices=list(tm.HARD_CASES))
    ap.add_argument("--samplers", nargs="+", default=SAMPLERS)
    ap.add_argument("--settings", nargs="+", default=["unguided", "defaults", "recurrence on"],
                    choices=list(SETTINGS))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--no-plain", action="store_true",
                    help="skip the unguided run of each case and sampler (no time ratio then; seconds only)")
    args = ap.parse_args(argv)
    host = find_host()
    path = build(toy_world.__file__, host, show_log=True)["toy"]
    import_host(host)
    import comfy.sd


    pack = load_pack()
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=True)
    run = tm.Sampler(pack, model, clip, n=args.n, seed=args.seed, steps=args.steps, cfg=args.cfg)
    lines = ["| case | sampler | setting | all in their boxes | each in its box | all present | each present | time | "
             "seconds |", "|---|---|---|---|---|---|---|---|---|"]
    plain: dict = {}  # seconds of the unguided run of (prompt, sampler): cached runs are not timed again
    for case in args.cases:
        prompt, boxes = tm.HARD_CASES[case]
        objects = [o for o in prompt.split() if o in toy_world.OBJECTS]
        for sampler in args.samplers:
            first = [] if args.no_plain else ["unguided"]
            for setting in (first + [s for s in args.settings if s != "unguided"]):
                guidance = SETTINGS[setting]
                t0 = time.perf_counter()
                z = run(prompt, None if guidance is None else boxes, sampler=sampler, **(guidance or {}))
                seconds = time.perf_counter() - t0
                if guidance is None:
                    plain.setdefault((prompt, sampler), seconds)
                s = tm.summarise(z, objects, boxes)
                each = ", ".join(f"{o} {r:.0%}" for o, r in s["per_object"].items())
                inside = ", ".join(f"{o} {sum(f[o].inside(b) for f in s['found']) / s['n']:.0%}"
                                   for o, b in boxes.items())
                if setting == "unguided" and "unguided" not in args.settings:
                    continue
                ratio = f"{seconds / plain[prompt, sampler]:.2f}x" if (prompt, sampler) in plain else "-"
                lines.append(f"| {case} | {sampler} | {setting} | {s['in_boxes']:.0%} | {inside} | {s['presence']:.0%} | "
                             f"{each} | {ratio} | {seconds:.0f} |")
                sys.stderr.write(lines[-1] + "\n")
    sys.stdout.write(f"toy world {os.path.basename(os.path.dirname(path))}: n={args.n} noise draws (seed {args.seed}), "
                     f"{args.steps} steps, cfg {args.cfg}, scheduler normal; time relative to the unguided row of the "
                     "same case and sampler\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
