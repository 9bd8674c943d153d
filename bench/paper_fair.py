"""Paper mode on the fair toy world (harness/toy_text.py): a text encoder whose AdamW steps move its outputs
about as far as we can argue a real CLIP-L's do, and captions holding the bare class word and the 27 templates.

    python bench/paper_fair.py [--items scan world sensitivity curve train-paper] [--runs fast paper scaled]
                               [--paper-steps 4000] [--measure-partial]

(default items: sensitivity, curve). On a loaded machine: one process ``--items train-paper``, another
``--items curve --runs paper --measure-partial`` now and then (each reads the snapshots kept so far).

- scan: on the toy world, the encoder re-parametrised in memory (``--scan S:I ...``: stream and inner scales,
  see harness/toy_text.py; 1:1 is the toy world's own), paper mode at its defaults for 2 steps: how far the
  first and second steps move the instance prompt's output ("dog": start row, subject row, later rows).
- world: what the fair world draws for the bare words, a template and its two-object captions.
- sensitivity: the same on the fair world, for 5 steps, and the gradients of the two loss terms at the
  encoder's output rows (the diffusion loss's and the preservation term's, per row group), averaged over the
  steps after the first (the term's gradient is zero while nothing has moved).
- train-paper: only the curve's paper run (for a second process measuring its snapshots as they come).
- curve: plain "a photo of a dog" (the same 16 draws as bench/toy_training_effects.py) with the residual after
  each snapshot of fast mode at its defaults and of paper mode at its defaults (4000 steps, lr 5e-6,
  preservation 1e-2 / 1e-3), against the untrained and the oracle rows: lift as a share of the oracle's,
  dog presence, unprompted objects. A paper run stopped early keeps its snapshots (a .partial file);
  ``--measure-partial`` measures the snapshots kept so far without training. ``--runs scaled``: paper mode with
  the preservation weights x0.07 and off (``--scales``, ``--scaled-steps``; default 400 steps), also probing the
  instance prompt's subject row, to see what the term holds back.

Every heavy run belongs under ``nice -n 19`` on a shared machine. Residuals and samples are cached as in
bench/toy_training_effects.py (under ~/.cache/comfyui-cones2/bench-toy-training/<world>/).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import toy_training_effects as tte  # noqa: E402

from harness import toy_text, toy_world  # noqa: E402
from harness.host import build, find_host, import_host  # noqa: E402

PAPER_POINTS = (25, 50, 100, 200, 400, 700, 1000, 1500, 2000, 3000, 4000)
FAST_POINTS = (50, 100)
SCAN = ("1:1", "10:1", "30:1", "30:4", "100:4", "100:10")


class Recorder:
    """Swaps the pack's Trainer for a subclass that records, per training step, the gradient of the diffusion
    loss and of the whole loss at the encoder output the step trained on (their difference is the
    preservation term's)."""

    def __init__(self, pack):
        self.loop = pack.nodes.train_loop
        self.original = self.loop.Trainer
        self.steps: list = []

    def __enter__(self):
        rec = self

        class Recording(self.original):
            def _denoise(self, mp, x0, noise, sigma, context, conds, amp=True):
                if context.requires_grad and torch.is_grad_enabled():
                    entry = {}
                    rec.steps.append(entry)
                    context.register_hook(lambda g: entry.__setitem__("total", g.detach().float().cpu()))
                    context = context.view_as(context)
                    context.register_hook(lambda g: entry.__setitem__("diffusion", g.detach().float().cpu()))
                return super()._denoise(mp, x0, noise, sigma, context, conds, amp)

        self.loop.Trainer = Recording
        return self

    def __exit__(self, *exc):
        self.loop.Trainer = self.original


def moved(probes: dict, subj: list, k: int, j: int) -> tuple:
    """Norms of the change of the instance prompt's output between snapshots j and k: start row, subject row(s),
    later rows (Frobenius over them), and every row's mean norm."""
    objective_rows = list(range(subj[-1] + 1, probes[0][0].shape[1]))
    d = (probes[k][0] - probes[j][0])[0]
    return float(d[0].norm()), float(d[subj].norm()), float(d[objective_rows].norm())


def one_world(b: tte.Bench, label: str, steps: int, lines: list, gradients: bool = False) -> None:
    subj = b.pack.nodes.train_encoder.subject_rows(b.clip, "dog", "dog")
    points = tuple(range(1, steps + 1))
    with Recorder(b.pack) as rec:
        _, info = b.train("dog", snapshots=points, probe=True, mode="paper", steps=steps)
    probes = info["probes"]
    row = float(probes[0][0][0, subj].norm())
    firsts = [moved(probes, subj, k, k - 1) for k in points]
    total = moved(probes, subj, steps, 0)
    step_s = " / ".join(f"{s:.3f}" for _, s, _ in firsts)
    later_s = " / ".join(f"{r:.2f}" for _, _, r in firsts)
    tte.show(lines, f"| {label} | {row:.1f} | {step_s} | {later_s} | {firsts[0][0]:.4f} | {total[1]:.3f} | "
                    f"{total[2]:.2f} | {info['seconds']:.0f} |")
    if not gradients:
        return
    later = list(range(subj[-1] + 1, probes[0][0].shape[1]))
    groups = {"start row": [0], "subject row": subj, "later rows": later}
    recs = [e for e in rec.steps if "total" in e and "diffusion" in e]
    tte.show(lines, "", f"gradients at the encoder output (steps 2..{len(recs)}, mean of the norms):", "",
             "| rows | diffusion loss | preservation term | ratio preservation / diffusion |", "|---|---|---|---|")
    for name, idx in groups.items():
        d = sum(float(e["diffusion"][0, idx].norm()) for e in recs[1:]) / max(1, len(recs) - 1)
        p = sum(float((e["total"] - e["diffusion"])[0, idx].norm()) for e in recs[1:]) / max(1, len(recs) - 1)
        tte.show(lines, f"| {name} | {d:.2e} | {p:.2e} | {p / d if d else float('inf'):.1f} |")


HEADER = ("| encoder | subject row norm | subject row moved, steps 1 / 2 / ... | later rows moved, steps 1 / 2 / ... "
          "| start row moved, step 1 | subject row moved, all steps | later rows moved, all steps | CPU s |",
          "|---|---|---|---|---|---|---|---|")


def scan(b: tte.Bench, which) -> str:
    """The toy world's encoder re-parametrised in memory (its function the same up to LayerNorm's epsilon)."""
    lines: list = []
    tte.show(lines, *HEADER)
    cm = b.clip.cond_stage_model
    original = {k: v.clone() for k, v in cm.state_dict().items()}
    try:
        for item in which:
            stream, inner = (float(x) for x in item.split(":"))
            cm.load_state_dict(toy_text.reparametrise(original, stream, inner))
            b.clip.patcher.model.to(torch.device("cpu"))
            one_world(b, f"toy world, stream x{stream:g}, inner x{inner:g}", 2, lines)
    finally:
        cm.load_state_dict(original)
    return "\n".join(lines)


def sensitivity(b: tte.Bench) -> str:
    lines: list = []
    tte.show(lines, *HEADER)
    one_world(b, f"fair world (stream x{toy_text.STREAM:g}, inner x{toy_text.INNER:g})", 5, lines, gradients=True)
    return "\n".join(lines)


WORLD_PROMPTS = ("dog", "big dog", "a photo of a dog", "a photo of a big dog", "a rendition of the dog",
                 "a rendition of the big dog", "a photo of a dog and a cat")


def world(b: tte.Bench) -> str:
    """What the fair world draws for the bare words, a template it added and the toy world's own captions."""
    lines: list = []
    tte.show(lines, "| prompt | prompted present | unprompted | radius |", "|---|---|---|---|")
    for prompt in WORLD_PROMPTS:
        s = b.measure(prompt)
        objects = [o for o in toy_world.OBJECTS if o in prompt.split()]
        tte.show(lines, f"| {prompt} | {tte.pct(s['presence'])} | {tte.pct(s['unprompted'])} | "
                        + ", ".join(f"{o} {tte.radius(s, o)}" for o in objects) + " |")
    return "\n".join(lines)


# paper mode with the preservation weights scaled (the node's inputs), shorter runs: is the term what holds the
# residual back on this world? x0.07 is the paper's weights for the toy's diffusion loss (1/14 of a real one's,
# bench/toy_training_effects.py); 0 switches the term off. Their probes also keep the instance prompt's output.
SCALED_STEPS = 400
SCALED_POINTS = (100, 200, 400, 700, 1000, 1500, 2000, 3000, 4000)


def curve_runs(paper_steps: int, which=("fast", "paper"), scaled_steps: int = SCALED_STEPS,
               scales: tuple = ()) -> list:
    """(label, train kwargs, snapshot points) of each run of the curve named in ``which``; ``scales``: only the
    scaled runs of these factors (all when empty), each ``scaled_steps`` long."""
    runs = [("fast", dict(mode="fast", steps=max(FAST_POINTS)), FAST_POINTS),
            ("paper", dict(mode="paper", steps=paper_steps), tuple(k for k in PAPER_POINTS if k <= paper_steps))]
    runs = [r for r in runs if r[0] in which]
    if "scaled" in which:
        for label, scale, _steps in tte.PRESERVATION_SCALES:
            if scales and scale not in scales:
                continue
            runs.append((f"paper, {label}", dict(mode="paper", steps=scaled_steps, probe=True,
                                                 preservation_weight_start=1e-2 * scale,
                                                 preservation_weight_rest=1e-3 * scale),
                         tuple(k for k in SCALED_POINTS if k <= scaled_steps)))
    return runs


def train_paper(b: tte.Bench, paper_steps: int) -> None:
    """Only the curve's paper-mode run (no sampling), so that another process can measure its snapshots as they
    come (``--measure-partial``)."""
    (_mode, kw, points), = curve_runs(paper_steps, ("paper",))
    b.train("dog", snapshots=points, **kw)


def curve(b: tte.Bench, paper_steps: int, partial_only: bool, which=("fast", "paper"), **scaled) -> str:
    odog = b.oracle("dog")
    plain = b.measure("a photo of a dog")
    oracle = b.measure("a photo of a dog", [odog])
    o_lift = oracle["radius"]["dog"] - plain["radius"]["dog"]
    Residual, split = b.pack.cones2_core.residual.Residual, b.pack.cones2_core.objective.split_channels
    lines: list = []
    tte.show(lines, f"plain radius {tte.radius(plain, 'dog')} (dog present {tte.pct(plain['per_object']['dog'])}, "
                    f"unprompted {tte.pct(plain['unprompted'])}); oracle {tte.radius(oracle, 'dog')} "
                    f"(norm {tte.norm(odog):.2f}, present {tte.pct(oracle['per_object']['dog'])}, unprompted "
                    f"{tte.pct(oracle['unprompted'])})", "",
             "| mode | steps | CPU s | residual norm | instance prompt's subject row moved | cos to oracle | dog radius "
             "| lift, % of oracle's | dog present | unprompted |", "|---|---|---|---|---|---|---|---|---|---|")
    subj = b.pack.nodes.train_encoder.subject_rows(b.clip, "dog", "dog")
    for mode, kw, points in curve_runs(paper_steps, which, **scaled):
        if partial_only and mode == "paper":
            path = b._cache_path("dog", (b.pack.cones2_core.objective.TrainSettings(
                resolution=toy_world.LATENT_SIZE * 8, **kw), (), points)) + ".partial"
            snaps = torch.load(path) if os.path.exists(path) else {}
            per_step = float("nan")
            probes: dict = {}
            tte.show(lines, f"(paper: the {len(snaps)} snapshots kept so far of a run still going or stopped)")
        else:
            _, info = b.train("dog", snapshots=points, **kw)
            snaps, per_step, probes = info["snapshots"], info["seconds"] / kw["steps"], info.get("probes") or {}
        for k in points:
            if k not in snaps:
                continue
            r = Residual("dog", b.family, split(snaps[k], b.family))
            one = b.measure("a photo of a dog", [r])
            lift = (one["radius"]["dog"] - plain["radius"]["dog"]) / o_lift
            row = f"{moved(probes, subj, k, 0)[1]:.2f}" if k in probes else "-"
            tte.show(lines, f"| {mode} | {k} | {per_step * k:.0f} | {tte.norm(r):.2f} | {row} | {tte.cos(r, odog):.2f} | "
                            f"{tte.radius(one, 'dog')} | {tte.pct(lift)} | {tte.pct(one['per_object']['dog'])} | "
                            f"{tte.pct(one['unprompted'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", nargs="+", default=["sensitivity", "curve"], choices=["scan", "world", "sensitivity", "curve", "train-paper"])
    ap.add_argument("--runs", nargs="+", default=["fast", "paper"], choices=["fast", "paper", "scaled"],
                    help="curve: the runs to measure (scaled: paper mode with the preservation term x0.07 and off, "
                         f"{SCALED_STEPS} steps)")
    ap.add_argument("--scaled-steps", type=int, default=SCALED_STEPS, help="curve: the scaled runs' steps")
    ap.add_argument("--scales", nargs="+", type=float, default=[], help="curve: only the scaled runs of these "
                    f"factors (of {', '.join(f'{s:g}' for _, s, _ in tte.PRESERVATION_SCALES)})")
    ap.add_argument("--scan", nargs="+", default=list(SCAN), help="stream:inner scales for the scan item")
    ap.add_argument("--paper-steps", type=int, default=4000)
    ap.add_argument("--measure-partial", action="store_true", help="curve: measure the paper run's snapshots kept "
                    "so far (its .partial file) instead of training")
    ap.add_argument("--no-cache", action="store_true")
    args = ap.parse_args(argv)
    host = find_host()
    toy_path = build(toy_world.__file__, host, show_log=True)["toy"]
    fair_path = None
    if {"world", "sensitivity", "curve", "train-paper"} & set(args.items):
        fair_path = build(toy_text.__file__, host, show_log=True)["toyfair"]
    import_host(host)
    for item in args.items:
        t0 = time.time()
        sys.stdout.write(f"\n## {item}\n\n")
        b = tte.Bench(toy_path if item == "scan" else fair_path, not args.no_cache and item in ("world", "curve", "train-paper"))
        if item == "scan":
            scan(b, args.scan)
        elif item == "sensitivity":
            sensitivity(b)
        elif item == "world":
            world(b)
        elif item == "train-paper":
            train_paper(b, args.paper_steps)
        else:
            curve(b, args.paper_steps, args.measure_partial, tuple(args.runs), scaled_steps=args.scaled_steps,
                  scales=tuple(args.scales))
        b = None  # one world in memory at a time
        sys.stdout.write(f"\n({item}: {time.time() - t0:.0f} s)\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
