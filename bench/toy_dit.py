"""Layout Guidance on the trained toy joint-attention world (a small Chroma): one table of case x sampler x setting.

    python bench/toy_dit.py [--family chroma|flux] [--cases pair-left pair-right three ...]
                            [--samplers euler dpmpp_2m ...] [--n 16] [--seed 5] [--steps 20] [--cfg 4] [--dense] [--confine]

Builds (or reuses) the world (harness/toy_dit.py; the small Chroma the tests use, or the Flux one), loads it through the real host in-process and prints, per case
(the two-subject halves, both ways, and ``tm.HARD_CASES``), sampler and setting (unguided, Layout Guidance at the
node's defaults; ``--dense`` adds the dense-mask joint attention instead of the exact path, ``--confine`` the
subjects' text queries confined to their regions too, ``nodes/architectures/joint.py`` CONFINE_TEXT_QUERIES), over the same n noise
draws in every row: how often every boxed subject lands in its box, how often every prompted subject is present
(and each one), how often an unprompted object appears, and the time relative to unguided sampling of the same
case and sampler. First the world's own rates: one object word per prompt. Rates do not depend on the machine;
times do (take them from one run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import toy_dit  # noqa: E402
from harness import toy_measures as tm  # noqa: E402
from harness.host import build, find_host, import_host, load_pack  # noqa: E402

PAIR = "a photo of a dog and a cat"
CASES = {"pair-left": (PAIR, {"dog": tm.LEFT, "cat": tm.RIGHT}), "pair-right": (PAIR, {"dog": tm.RIGHT, "cat": tm.LEFT}),
         **tm.HARD_CASES}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--samplers", nargs="+", default=["euler"])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=toy_dit.CFG)
    ap.add_argument("--dense", action="store_true", help="also rows through the dense-mask joint attention")
    ap.add_argument("--confine", action="store_true", help="also rows with the subjects' text queries confined")
    ap.add_argument("--family", default="chroma", choices=["chroma", "flux"], help="which world (harness/toy_dit.py)")
    args = ap.parse_args(argv)
    host = find_host()
    paths = build(toy_dit.__file__, host, "--family", args.family, out=toy_dit.default_cache_dir(), show_log=True)
    world = paths["toydit" if args.family == "chroma" else "toyflux"]
    import_host(host)
    pack = load_pack()
    sampler = tm.Sampler(pack, toy_dit.load(world, args.family), toy_dit.clip(paths["t5"], args.family), n=args.n,
                         seed=args.seed,
                         steps=args.steps, cfg=args.cfg, channels=toy_dit.CHANNELS, scheduler="simple")
    lines = ["| prompt / case | sampler | setting | all in their boxes | all present | each present | unprompted | time |",
             "|---|---|---|---|---|---|---|---|"]

    def pct(x):
        return f"{100 * x:.0f}%"

    for prompt, objs in (("a photo of a dog", ["dog"]), ("a photo of a cat", ["cat"]), ("a photo of a car", ["car"])):
        s = tm.summarise(sampler(prompt), objs)
        lines.append(f"| {prompt} | euler | unguided | | {pct(s['presence'])} | | {pct(s['unprompted'])} | |")
    # name: (guided, exact path, text queries confined)
    settings = {"unguided": (False, True, False), "defaults": (True, True, False)}
    if args.dense:
        settings["defaults, dense mask"] = (True, False, False)
    if args.confine:
        settings["defaults + text queries confined"] = (True, True, True)
    joint = pack.nodes.architectures.joint
    for case in args.cases:
        prompt, boxes = CASES[case]
        for name in args.samplers:
            base = None
            for setting, (guided, exact, confine) in settings.items():
                joint.EXACT, joint.CONFINE_TEXT_QUERIES = exact, confine
                sampler.forget()  # every row sampled and timed afresh (the cache keys know nothing of these)
                try:
                    t0 = time.perf_counter()
                    z = sampler(prompt, boxes if guided else None, sampler=name)
                    dt = time.perf_counter() - t0
                finally:
                    joint.EXACT, joint.CONFINE_TEXT_QUERIES = True, False
                base = base or dt
                s = tm.summarise(z, list(boxes), boxes)
                each = ", ".join(f"{o} {pct(r)}" for o, r in s["per_object"].items())
                lines.append(f"| {case} | {name} | {setting} | {pct(s['in_boxes'])} | {pct(s['presence'])} | {each} | "
                             f"{pct(s['unprompted'])} | {dt / base:.2f}x |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
