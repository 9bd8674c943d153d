"""The toy world's own rates and what Layout Guidance does to them, measured in one run.

    python bench/toy_world.py [--samplers euler euler_ancestral ...] [--both] [--n 16] [--seed 5] [--steps 20]
                              [--cfg 5] [--single PROMPT ...]

Builds (or reuses) the trained toy world (harness/toy_world.py), loads it through the real host in-process and
prints one table: for single-object and two-object prompts, how often the prompted objects appear, how often an
unprompted one does, their mean radius, and (for "a photo of a dog and a cat", dog box left, cat box right)
how often both land in their boxes, unguided and with Layout Guidance at node defaults (``--both``: also
with self_recurrence off), per sampler. Every row uses the same n noise draws. Rates, not times: they do not
depend on the machine's speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import toy_world  # noqa: E402
from harness.host import build, find_host, import_host, load_pack  # noqa: E402

PAIR = "a photo of a dog and a cat"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samplers", nargs="+", default=["euler"])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--both", action="store_true", help="also guided with self_recurrence off")
    ap.add_argument("--single", nargs="*", default=["a photo of a dog", "a photo of a cat", "a photo of a car",
                                                    "a photo of a big dog"])
    args = ap.parse_args(argv)
    host = find_host()
    path = build(toy_world.__file__, host, show_log=True)["toy"]
    import_host(host)
    import comfy.sd

    from harness import toy_measures as tm

    pack = load_pack()
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=True)
    run = tm.Sampler(pack, model, clip, n=args.n, seed=args.seed, steps=args.steps, cfg=args.cfg)
    boxes = {"dog": tm.LEFT, "cat": tm.RIGHT}
    header = "| prompt | sampler | guidance | prompted present | unprompted | radius | both in their boxes | s |"
    lines = [header, "|" + "---|" * 8]

    def row(prompt, sampler, recurrence=None):
        """recurrence None: unguided; True/False: Layout Guidance at node defaults with self_recurrence so."""
        objects = [o for o in toy_world.OBJECTS if o in prompt.split()]
        t0 = time.time()
        guidance = {} if recurrence is None else {"self_recurrence": recurrence}
        z = run(prompt, boxes if recurrence is not None else None, sampler=sampler, **guidance)
        s = tm.summarise(z, objects, boxes if len(objects) == 2 else None)
        radius = ", ".join(f"{o} {r:.2f}" for o, r in s["radius"].items())
        inbox = f"{s['in_boxes']:.0%}" if "in_boxes" in s else ""
        label = {None: "none", True: "self-recurrence on", False: "self-recurrence off"}[recurrence]
        lines.append(f"| {prompt} | {sampler} | {label} | {s['presence']:.0%} | "
                     f"{s['unprompted']:.0%} | {radius} | {inbox} | {time.time() - t0:.0f} |")
        sys.stderr.write(lines[-1] + "\n")

    for prompt in args.single:
        row(prompt, args.samplers[0])
    import comfy.samplers

    function_name, stepwise_samplers = pack.nodes.recurrence.sampler_function_name, pack.nodes.recurrence.STEPWISE_SAMPLERS
    for sampler in args.samplers:
        stepwise = function_name(comfy.samplers.sampler_object(sampler)) in stepwise_samplers
        row(PAIR, sampler)
        if stepwise:
            row(PAIR, sampler, True)
            if args.both:
                row(PAIR, sampler, False)
        else:  # the node samples these without self-recurrence (bit for bit as with it off), so one row
            row(PAIR, sampler, False)
            lines[-1] = lines[-1].replace("self-recurrence off", "node defaults (self-recurrence off by the node)")
    sys.stdout.write(f"toy world {os.path.basename(path)}: n={args.n} noise draws (seed {args.seed}), {args.steps} "
                     f"steps, cfg {args.cfg}; boxes: dog left half, cat right half\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
