"""What trained residuals do to the toy world's images: composing, the preservation loss, transfer damage, and
the steps-versus-lift curve of both modes.

    python bench/toy_training_effects.py [--items compose preservation transfer curve] [--paper-lr 5e-5]
                                         [--paper-steps 150] [--curve-paper-steps 4000] [--no-cache]

Builds (or reuses) the trained toy world (harness/toy_world.py), loads it through the real host in-process and
prints one markdown table per item. Every image row is the same 16 noise draws (seed 5), 20 euler steps, cfg 5,
as tests/host/test_toy_world.py; radii are in latent pixels (plain "a photo of a dog" about 2.3, big 4).

- compose: fast-mode residuals (node defaults) for "dog" from 6 pictures of big dogs and for "cat" from 6 of big
  cats, each alone and both in one Apply Residuals chain, in "a photo of a dog and a cat", unguided and with
  Layout Guidance at node defaults (dog left half, cat right half); the oracle residuals beside them.
- preservation: paper mode with and without the preservation term (--paper-lr, --paper-steps): how far the
  tuned encoder moved the other rows of the 27 templates, and what the tuned encoder's own outputs (every row,
  not only the residual's) draw for prompts with and without the subject.
- transfer: the fast "dog" residual in the two-subject prompt, with cheap mitigations (fewer steps, a lower
  strength), against the lift it keeps on the plain prompt.
- curve: plain "a photo of a dog" with the residual after 25..400 steps of fast mode and 100..4000 steps of
  paper mode (both at the node's defaults; snapshots of one run each), and of paper mode at the paper's
  learning rate with the preservation weights scaled to the toy world's loss (x0.07, 1000 steps) and off (400).
  Paper mode at 4000 steps takes about an hour on 2 quiet cores (about 0.9 s per step).
- balance: why paper mode learns little. Paper mode with the preservation term whole, on one side only and off
  (200 steps each): on the instance prompt it trains on, how far the tuned encoder moved each part of the output
  (start row, subject row, later rows), what the paper's term charges for that, and how much each part lowers the
  diffusion loss (a fixed set of 128 draws), against the oracle residual's drop.
- weighting: the oracle residual's drop of the training loss (512 fixed draws) weighted as this eps model's and
  as a v-prediction model's (the reference's SD 2.1), by quartile of sigma. The curve's "v-weighted" run trains
  paper mode at the paper's settings with the v weighting.

Trained residuals are cached under ~/.cache/comfyui-cones2/bench-toy-training/ keyed by the toy world, the
settings and the training code, so a rerun only samples (--no-cache retrains).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from harness import toy_world  # noqa: E402
from harness.host import PACK_DIR, build, find_host, import_host, load_pack  # noqa: E402

PAIR = "a photo of a dog and a cat"
PICTURE_SEEDS = {"dog": 7, "cat": 8}  # the dog's is tests/host/test_toy_world.py's
TRAIN_CODE = ("nodes/train_loop.py", "nodes/train_encoder.py", "nodes/train_node.py", "nodes/train_images.py",
              "cones2_core/objective.py", "cones2_core/gradients.py")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "comfyui-cones2", "bench-toy-training")


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def pct(x: float) -> str:
    return f"{x:.0%}"


def _sampler_class():
    from harness import toy_measures

    class DiskCachedSampler(toy_measures.Sampler):
        """toy_measures.Sampler whose latents are also kept on disk (``folder``), keyed by every setting and the
        residuals' contents, so the tables can be printed again without sampling again."""

        folder: str | None = None

        def __call__(self, prompt, boxes=None, sampler="euler", scheduler="normal", residuals=None, **guidance):
            key = repr((self.n, self.seed, self.steps, self.cfg, self.size, prompt, boxes and sorted(boxes.items()),
                        sampler, scheduler, toy_measures.residuals_key(residuals), sorted(guidance.items())))
            if self.folder is None:
                return super().__call__(prompt, boxes, sampler, scheduler, residuals, **guidance)
            path = os.path.join(self.folder, hashlib.sha256(key.encode()).hexdigest()[:20] + ".pt")
            if os.path.exists(path):
                return torch.load(path)
            z = super().__call__(prompt, boxes, sampler, scheduler, residuals, **guidance)
            os.makedirs(self.folder, exist_ok=True)
            torch.save(z, path)
            return z

    return DiskCachedSampler


class Bench:
    def __init__(self, world_path: str, use_cache: bool):
        import comfy.sd

        import nodes
        from harness import toy_measures

        self.tm = toy_measures
        self.pack = load_pack()
        self.world_name = os.path.basename(os.path.dirname(world_path))
        self.model, self.clip, self.vae, _ = comfy.sd.load_checkpoint_guess_config(world_path, output_vae=True,
                                                                                   output_clip=True)
        self.run = _sampler_class()(self.pack, self.model, self.clip)
        self.run.folder = os.path.join(CACHE, self.world_name, "samples") if use_cache else None
        self.negative = nodes.CLIPTextEncode().encode(self.clip, "")[0]
        self.family = self.pack.nodes.encoding.clip_family(self.clip).key
        self.use_cache = use_cache
        self._oracles: dict = {}

    # ---- residuals ------------------------------------------------------------------------------------------

    def pictures(self, subject: str) -> list[torch.Tensor]:
        from harness import toy_measures

        return toy_measures.big_pictures(subject, PICTURE_SEEDS[subject])

    def _cache_path(self, subject: str, settings) -> str:
        h = hashlib.sha256(repr((subject, PICTURE_SEEDS[subject], settings)).encode())
        for rel in TRAIN_CODE:
            with open(os.path.join(PACK_DIR, rel), "rb") as f:
                h.update(f.read())
        return os.path.join(CACHE, self.world_name, h.hexdigest()[:16] + ".pt")

    def train(self, subject: str, capture: bool = False, mitigation: tuple = (), snapshots: tuple = (),
              probe: bool = False, **kw):
        """(Residual, info) of Train Residual on 6 pictures of big ``subject``s at the toy world's 128 px.
        ``capture`` (paper mode): also the private encoder's outputs of the templates and of CAPTURED prompts,
        before and after training, in ``info``. ``mitigation`` (fast mode): ("bound", k) keeps the residual's
        norm at most k times the subject row's output norm (projected after every step); ("decay", w) gives
        AdamW weight decay w (the node uses 0); ("weighting", "v") (any mode) weighs the diffusion loss as for a
        v-prediction model (the reference's SD 2.1), on this eps model's same errors. ``snapshots``: step counts after which the residual the node would
        return then is also kept, in ``info["snapshots"]`` ({steps: delta}; paper mode: the 27-template pass
        through the encoder as tuned so far). ``probe`` (paper mode, with ``snapshots``): also the private
        encoder's output of the instance prompt (the class word alone, what training sees) at each snapshot, in
        ``info["probes"]`` ({steps: (context, pooled)}; step 0: before training)."""
        objective = self.pack.cones2_core.objective
        settings = objective.TrainSettings(resolution=toy_world.LATENT_SIZE * 8, **kw)
        key = (settings, mitigation, snapshots) if snapshots else (settings, mitigation)
        if probe:
            key = (*key, "probe")
        path = self._cache_path(subject, key)
        if self.use_cache and os.path.exists(path):
            info = torch.load(path)
        else:
            t0 = time.time()
            info = self._train(subject, settings, capture, mitigation, snapshots, path + ".partial", probe)
            info["seconds"] = time.time() - t0
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(info, path)
            log(f"trained {subject} {kw} {mitigation}: {info['seconds']:.0f} s")
        residual = self.pack.cones2_core.residual.Residual(subject, self.family,
                                                           objective.split_channels(info["delta"], self.family))
        return residual, info

    def _train(self, subject: str, settings, capture: bool, mitigation: tuple, snapshots: tuple = (),
               partial: str = "", probe: bool = False) -> dict:
        """``partial``: where the snapshots taken so far are also saved as they come (a long run stopped early
        keeps them)."""
        import comfy.model_management as mm

        p = self.pack
        if not capture and not mitigation and not snapshots:
            residual, losses, _ = p.nodes.train_node.train_residual(self.model, self.clip, self.vae,
                                                                    self.pictures(subject), subject, settings)
            delta = torch.cat([residual.tensors[k] for k in sorted(residual.tensors)], -1)
            return {"delta": delta.float(), "losses": losses}
        arch = p.nodes.architectures.ARCHITECTURES["unet"]
        prediction, sigma_data, ms = p.nodes.architectures.prediction_type(self.model)
        s = settings.resolved(self.family, prediction)
        captured: list = []
        kept: dict = {}
        probes: dict = {}
        base = p.nodes.train_loop.Trainer

        class Capturing(base):
            """The node's trainer; its two template passes (frozen, then tuned) also encode CAPTURED prompts, and
            it keeps the residual of every step count in ``snapshots``."""

            steps_done = 0
            enc = None  # the private encoder (paper mode), once its frozen template pass has run

            def _encode_templates(self, enc):
                out = super()._encode_templates(enc)
                if not hasattr(self, "frozen_templates"):
                    self.enc, self.frozen_templates = enc, out
                    if probe:
                        probes[0] = self._probe()
                if capture:
                    extra = {q: tuple(t.cpu() for t in self._encode(enc, self.clip.tokenize(q)))
                             for q in CAPTURED}
                    captured.append((out, extra))
                return out

            def _probe(self):
                """The private encoder's (context, pooled) of the instance prompt, as tuned so far."""
                with torch.no_grad():
                    return tuple(t.detach().float().cpu().clone() for t in self._encode(self.enc, self.instance_tokens))

            def _clip_gradients_and_step(self, opt, params):
                if mitigation and mitigation[0] == "decay":
                    for group in opt.param_groups:
                        group["weight_decay"] = mitigation[1]
                super()._clip_gradients_and_step(opt, params)
                self.steps_done += 1
                if self.steps_done in snapshots:
                    with torch.no_grad():
                        if self.enc is None:  # fast mode: the residual is the parameter
                            kept[self.steps_done] = params[0].detach().float().cpu().clone()
                        else:
                            tuned = base._encode_templates(self, self.enc)
                            kept[self.steps_done] = p.cones2_core.objective.residual_from_templates(
                                tuned, self.frozen_templates, self.template_rows)
                            if probe:
                                probes[self.steps_done] = self._probe()
                    if partial:
                        os.makedirs(os.path.dirname(partial), exist_ok=True)
                        torch.save({"snapshots": kept, "probes": probes} if probe else kept, partial)
                    log(f"snapshot at step {self.steps_done}")
                if mitigation and mitigation[0] == "bound":
                    with torch.no_grad():
                        if not hasattr(self, "row_norm"):
                            ctx = self._encode(None, self.instance_tokens)[0][0]
                            self.row_norm = float(ctx[self.instance_rows].norm())
                        cap = mitigation[1] * self.row_norm
                        n = float(params[0].norm())
                        if n > cap:
                            params[0].mul_(cap / n)

        with torch.inference_mode(False), torch.enable_grad():
            latents = p.nodes.train_images.encode_latents(self.vae, self.model, self.pictures(subject), s.resolution)
            weighting = mitigation[1] if mitigation and mitigation[0] == "weighting" else prediction
            trainer = Capturing(self.model, self.clip, weighting, sigma_data, ms, s, subject, latents,
                                mm.get_torch_device(), arch=arch)
            delta, losses, _ = trainer.run()
        if not capture:
            return {"delta": delta.float(), "losses": losses, "row_norm": getattr(trainer, "row_norm", None),
                    "snapshots": kept, "probes": probes}
        (frozen_t, frozen_x), (tuned_t, tuned_x) = captured
        return {"delta": delta.float(), "losses": losses, "frozen_templates": frozen_t, "tuned_templates": tuned_t,
                "frozen_prompts": frozen_x, "tuned_prompts": tuned_x, "template_rows": trainer.template_rows,
                "templates": trainer.templates}

    def oracle(self, subject: str, attribute: str = "big"):
        """The encoder's own "<attribute> <subject>" minus "<subject>" at the subject's token, over the 27 templates."""
        if subject not in self._oracles:
            p = self.pack
            rows = p.nodes.train_encoder.subject_rows
            deltas = []
            for t in p.cones2_core.objective.TEMPLATES:
                plain, big = t.format(subject), t.format(f"{attribute} {subject}")
                e0 = self.clip.encode_from_tokens(self.clip.tokenize(plain)).float()[0]
                e1 = self.clip.encode_from_tokens(self.clip.tokenize(big)).float()[0]
                deltas.append(e1[rows(self.clip, subject, big)] - e0[rows(self.clip, subject, plain)])
            delta = torch.stack(deltas).mean(0)
            self._oracles[subject] = p.cones2_core.residual.Residual(
                subject, self.family, p.cones2_core.objective.split_channels(delta, self.family))
        return self._oracles[subject]

    # ---- measuring ------------------------------------------------------------------------------------------

    def measure(self, prompt: str, residuals=None, boxes=None, **guidance) -> dict:
        objects = [o for o in toy_world.OBJECTS if o in prompt.split()]
        z = self.run(prompt, boxes, residuals=residuals, **guidance)
        return self.tm.summarise(z, objects, boxes)

    def measure_context(self, context: torch.Tensor, pooled: torch.Tensor, prompted: list[str], boxes=None) -> dict:
        """The same 16 draws conditioned on an encoder output given directly (no Apply Residuals)."""
        import nodes

        pos = [[context.reshape(1, -1, context.shape[-1]).float(), {"pooled_output": pooled.float()}]]
        r = self.run
        latent = {"samples": torch.zeros(r.n, 4, r.size, r.size)}
        key = hashlib.sha256(context.float().numpy().tobytes() + pooled.float().numpy().tobytes()).hexdigest()
        path = None if r.folder is None else os.path.join(r.folder, f"context-{r.n}-{r.seed}-{r.steps}-{r.cfg}-{key[:20]}.pt")
        if path and os.path.exists(path):
            z = torch.load(path)
        else:
            z = nodes.common_ksampler(self.model, r.seed, r.steps, r.cfg, "euler", "normal", pos, self.negative,
                                      latent)[0]["samples"]
            if path:
                os.makedirs(r.folder, exist_ok=True)
                torch.save(z, path)
        return self.tm.summarise(z, prompted, boxes)


def norm(r) -> float:
    return float(torch.cat([r.tensors[k] for k in sorted(r.tensors)], -1).float().norm())


def cos(a, b) -> float:
    x = torch.cat([a.tensors[k] for k in sorted(a.tensors)], -1).float().flatten()
    y = torch.cat([b.tensors[k] for k in sorted(b.tensors)], -1).float().flatten()
    return float(x.dot(y) / (x.norm() * y.norm()))


def radius(s: dict, o: str) -> str:
    r = s["radius"].get(o, float("nan"))
    return "-" if r != r else f"{r:.2f}"


# ---- item 1: two residuals compose --------------------------------------------------------------------------

def compose(b: Bench, full: bool) -> str:
    dog, _ = b.train("dog", mode="fast")
    cat, _ = b.train("cat", mode="fast")
    odog, ocat = b.oracle("dog"), b.oracle("cat")
    boxes = {"dog": b.tm.LEFT, "cat": b.tm.RIGHT}
    lines: list = []
    show(lines, f"residual norms: dog {norm(dog):.2f} (oracle {norm(odog):.2f}, cos {cos(dog, odog):.2f}), "
                f"cat {norm(cat):.2f} (oracle {norm(ocat):.2f}, cos {cos(cat, ocat):.2f})", "")
    show(lines, "| prompt | residual | plain radius | with residual | oracle | lift, % of the oracle's | present |",
         "|---|---|---|---|---|---|---|")
    for o, r, orc in (("dog", dog, odog), ("cat", cat, ocat)) if full else (("cat", cat, ocat),):
        prompt = f"a photo of a {o}"
        plain, trained, oracle = b.measure(prompt), b.measure(prompt, [r]), b.measure(prompt, [orc])
        lift = (trained["radius"][o] - plain["radius"][o]) / (oracle["radius"][o] - plain["radius"][o])
        show(lines, f"| {prompt} | fast {o} | {radius(plain, o)} | {radius(trained, o)} | {radius(oracle, o)} | "
                    f"{pct(lift)} | {pct(trained['presence'])} |")
    show(lines, "", f'"{PAIR}", dog box left half, cat box right half:', "",
         "| residuals | guidance | both present | dog present | cat present | unprompted | dog radius | "
         "cat radius | both in their boxes |", "|---|---|---|---|---|---|---|---|---|")
    rows = [("none", None, True, True), ("fast dog", [dog], True, True), ("fast cat", [cat], True, True),
            ("fast dog + fast cat", [dog, cat], True, True), ("oracle dog + oracle cat", [odog, ocat], full, full)]
    for guided in (False, True):
        for label, res, unguided_row, guided_row in rows:
            if not (guided_row if guided else unguided_row):
                continue
            s = b.measure(PAIR, res, boxes) if guided else b.measure(PAIR, res)
            s_in = s if guided else b.tm.summarise(b.run(PAIR, residuals=res), ["dog", "cat"], boxes)
            show(lines, f"| {label} | {'node defaults' if guided else 'none'} | {pct(s['presence'])} | "
                        f"{pct(s['per_object']['dog'])} | {pct(s['per_object']['cat'])} | {pct(s['unprompted'])} | "
                        f"{radius(s, 'dog')} | {radius(s, 'cat')} | {pct(s_in['in_boxes'])} |")
    return "\n".join(lines)


def show(lines: list, *new: str) -> None:
    """Append rows to a table and print them at once (a long run shows its rows as they come)."""
    lines.extend(new)
    sys.stdout.write("".join(x + "\n" for x in new))
    sys.stdout.flush()


# ---- item 2: the preservation loss --------------------------------------------------------------------------

CAPTURED = ("a photo of a dog", "a photo of a cat", PAIR)


def preservation(b: Bench, lr: float, steps: int) -> str:
    odog = b.oracle("dog")
    lines: list = []
    show(lines, f"paper mode, lr {lr:g}, {steps} steps, batch 1, seed 0 (oracle residual norm {norm(odog):.2f}, a "
                "row's output norm 27.7); rows moved: mean |tuned - original| of the private encoder's output "
                "rows over the 27 templates", "",
         "| run | CPU s | residual norm | cos to oracle | subject row moved | rows before it (BOS, 'a photo of a') "
         "| rows after it (EOS, padding) | cat row of 'a photo of a cat' |", "|---|---|---|---|---|---|---|---|")
    runs = []
    for w0, w1 in ((1e-2, 1e-3), (0.0, 0.0)):
        label = f"preservation {w0:g} / {w1:g}" if w0 else "no preservation"
        res, info = b.train("dog", capture=True, mode="paper", steps=steps, learning_rate=lr,
                            preservation_weight_start=w0, preservation_weight_rest=w1)
        runs.append((label, res, info))
        before, after, subj = [], [], []
        for t, f, rows in zip(info["tuned_templates"], info["frozen_templates"], info["template_rows"], strict=True):
            d = (t - f).reshape(-1, t.shape[-1]).norm(dim=-1)
            subj.append(float(d[rows].mean()))
            before.append(float(d[: rows[0]].mean()))
            after.append(float(d[rows[-1] + 1:].mean()))
        cat_rows = b.pack.nodes.train_encoder.subject_rows(b.clip, "cat", "a photo of a cat")
        tc, fc = info["tuned_prompts"]["a photo of a cat"][0], info["frozen_prompts"]["a photo of a cat"][0]
        cat_moved = float((tc - fc).reshape(-1, tc.shape[-1])[cat_rows].norm(dim=-1).mean())

        def m(xs):
            return sum(xs) / len(xs)
        show(lines, f"| {label} | {info['seconds']:.0f} | {norm(res):.2f} | {cos(res, odog):.2f} | {m(subj):.2f} | "
                    f"{m(before):.2f} | {m(after):.2f} | {cat_moved:.2f} |")
    host = {q: b.clip.encode_from_tokens(b.clip.tokenize(q)).float() for q in CAPTURED}
    gap = max(float((runs[0][2]["frozen_prompts"][q][0].float() - host[q]).abs().max()) for q in CAPTURED)
    show(lines, "", f"Images (16 draws; 'original' is the host's encoding, {gap:.1e} from the private copy's before "
                    "training): the residual as the pack applies it (at the dog's rows only), and the tuned "
                    "encoder's own outputs (every row: what the preservation term protects):", "",
         "| prompt | conditioning | prompted present | unprompted | radius |", "|---|---|---|---|---|")
    for prompt in CAPTURED:
        objects = [o for o in toy_world.OBJECTS if o in prompt.split()]
        rows = [("original", lambda p=prompt: b.measure(p))]
        if prompt == "a photo of a dog":
            rows.append(("oracle residual", lambda p=prompt: b.measure(p, [odog])))
            rows += [(f"{label}: residual", lambda p=prompt, r=res: b.measure(p, [r])) for label, res, _ in runs]
        else:
            rows += [(f"{label}: tuned encoder", lambda p=prompt, i=info, o=objects: b.measure_context(
                *i["tuned_prompts"][p], o)) for label, _, info in runs]
        for label, f in rows:
            s = f()
            radii = ", ".join(f"{o} {radius(s, o)}" for o in objects)
            show(lines, f"| {prompt} | {label} | {pct(s['presence'])} | {pct(s['unprompted'])} | {radii} |")
    return "\n".join(lines)


# ---- item 3: transfer damage --------------------------------------------------------------------------------

BOUNDS = (0.2,)
DECAYS = (1.0,)


def transfer(b: Bench) -> str:
    odog = b.oracle("dog")
    plain = b.measure("a photo of a dog")
    oracle = b.measure("a photo of a dog", [odog])
    o_lift = oracle["radius"]["dog"] - plain["radius"]["dog"]
    lines = []
    header = ["| residual | norm | cos to oracle | plain prompt: dog radius | lift, % of oracle's | "
             f"'{PAIR}': dog present | cat present | dog radius | cat radius |", "|---|---|---|---|---|---|---|---|---|"]
    default, _ = b.train("dog", mode="fast")
    row = b.pack.nodes.train_encoder.subject_rows(b.clip, "dog", "dog")
    row_norm = float(b.clip.encode_from_tokens(b.clip.tokenize("dog")).float()[0, row].norm())
    show(lines, f"the subject row's output norm ('dog' alone): {row_norm:.2f}; oracle's residual norm "
                    f"{norm(odog):.2f} ({norm(odog) / row_norm:.2f} of it)", "", *header)
    variants = [("none", None), ("oracle", odog), ("fast, 100 steps (default)", default),
                ("fast, 100 steps, strength 0.75", default.with_strength(0.75)),
                ("fast, 50 steps", b.train("dog", mode="fast", steps=50)[0])]
    for k in BOUNDS:
        variants.append((f"fast, 100 steps, norm bound {k:g} x row", b.train("dog", mode="fast",
                                                                            mitigation=("bound", k))[0]))
    for w in DECAYS:
        variants.append((f"fast, 100 steps, weight decay {w:g}", b.train("dog", mode="fast",
                                                                        mitigation=("decay", w))[0]))
    for label, r in variants:
        res = None if r is None else [r]
        one, two = b.measure("a photo of a dog", res), b.measure(PAIR, res)
        lift = (one["radius"]["dog"] - plain["radius"]["dog"]) / o_lift
        n = "-" if r is None else f"{norm(r) * r.strength:.2f}"
        c = "-" if r is None else f"{cos(r, odog):.2f}"
        show(lines, f"| {label} | {n} | {c} | {radius(one, 'dog')} | {pct(lift)} | {pct(two['per_object']['dog'])} | "
                     f"{pct(two['per_object']['cat'])} | {radius(two, 'dog')} | {radius(two, 'cat')} |")
    return "\n".join(lines)


# ---- item 4: steps versus lift, both modes at the node's defaults --------------------------------------------

PAPER_POINTS = (100, 200, 400, 1000, 2000, 4000)
FAST_POINTS = (25, 50, 100, 200, 400)
# paper mode at the paper's learning rate with the preservation weights scaled (the node's inputs), to see
# whether the term is what holds the attribute back: (label, factor on 1e-2 / 1e-3, steps)
# x0.07: the toy world's diffusion loss (about 0.0097 over uniform timesteps) is 1/14 of a real SD checkpoint's on
# real pictures (about 0.14, AUTOMATIC1111/stable-diffusion-webui#3277), and Adam does not see a loss's overall
# scale, only the ratio of its terms; so these are the paper's weights for a diffusion loss of the real size.
# the paper's settings with the diffusion loss weighted as v-prediction's, (1 + sigma^2) / sigma^2 on the x0 error
# instead of eps-prediction's 1 / sigma^2: the reference trains SD 2.1-v, whose loss weighs the noisy steps more
V_WEIGHTED_STEPS = 400
PRESERVATION_SCALES = (("preservation x0.07 (the toy's loss scale)", 0.07, 1000), ("no preservation", 0.0, 400))


def curve(b: Bench, paper_steps: int, which: tuple = ("fast", "scaled", "v-weighted", "default")) -> str:
    """Plain "a photo of a dog" with the residual the node would return after each step count: fast mode at its
    defaults (lr 1e-2; 100 steps by default), paper mode at its defaults (lr 5e-6, 4000 steps), and paper mode
    with the preservation weights scaled. One run per mode; the points are snapshots of it. ``which``: the runs
    to do ("fast", "scaled", "default"), so that the long one can run in a process of its own."""
    odog = b.oracle("dog")
    plain = b.measure("a photo of a dog")
    oracle = b.measure("a photo of a dog", [odog])
    o_lift = oracle["radius"]["dog"] - plain["radius"]["dog"]
    lines: list = []
    show(lines, f"plain radius {radius(plain, 'dog')}, oracle {radius(oracle, 'dog')} (norm {norm(odog):.2f})", "",
         "| mode | settings | steps | CPU s | residual norm | cos to oracle | dog radius | lift, % of oracle's | "
         "dog present | unprompted |", "|---|---|---|---|---|---|---|---|---|---|")
    runs = [("fast", "lr 1e-2 (default)", dict(mode="fast", steps=max(FAST_POINTS)), FAST_POINTS)] \
        if "fast" in which else []
    for label, scale, steps in PRESERVATION_SCALES if "scaled" in which else ():
        runs.append(("paper", f"lr 5e-6, {label}", dict(mode="paper", steps=steps, preservation_weight_start=1e-2 * scale,
                                                        preservation_weight_rest=1e-3 * scale),
                     tuple(k for k in PAPER_POINTS if k <= steps)))
    if "v-weighted" in which:
        runs.append(("paper", "lr 5e-6, 1e-2 / 1e-3, the loss weighted as v-prediction's",
                     dict(mode="paper", steps=V_WEIGHTED_STEPS, mitigation=("weighting", "v")),
                     tuple(k for k in PAPER_POINTS if k <= V_WEIGHTED_STEPS)))
    if "default" in which:  # the long run last
        runs.append(("paper", "lr 5e-6, preservation 1e-2 / 1e-3 (defaults)", dict(mode="paper", steps=paper_steps),
                     tuple(k for k in PAPER_POINTS if k <= paper_steps)))
    Residual, split = b.pack.cones2_core.residual.Residual, b.pack.cones2_core.objective.split_channels
    for mode, settings, kw, points in runs:
        _, info = b.train("dog", snapshots=points, **kw)
        per_step = info["seconds"] / kw["steps"]
        for k in points:
            r = Residual("dog", b.family, split(info["snapshots"][k], b.family))
            one = b.measure("a photo of a dog", [r])
            lift = (one["radius"]["dog"] - plain["radius"]["dog"]) / o_lift
            show(lines, f"| {mode} | {settings} | {k} | {per_step * k:.0f} | {norm(r):.2f} | {cos(r, odog):.2f} | "
                        f"{radius(one, 'dog')} | {pct(lift)} | {pct(one['per_object']['dog'])} | "
                        f"{pct(one['unprompted'])} |")
    return "\n".join(lines)


# ---- item 5: why paper mode learns little: the objective's two terms on the training prompt ------------------

# paper mode at the paper's learning rate, with the preservation term whole, on one side only, and off
BALANCE_RUNS = (("the paper's, 1e-2 / 1e-3", 1e-2, 1e-3), ("start row only, 1e-2 / 0", 1e-2, 0.0),
                ("later rows only, 0 / 1e-3", 0.0, 1e-3), ("none, 0 / 0", 0.0, 0.0))
BALANCE_POINTS = (100, 200)
EVAL_DRAWS = 128


def x0_errors(b: Bench, contexts: dict, draws: int = EVAL_DRAWS) -> tuple[dict, torch.Tensor]:
    """({label: [draws] mean squared error of the denoised latent}, sigmas [draws]) of each instance-prompt
    context ([1, T, C]) on one fixed set of draws: a random picture of the 6 (random flip), noise, and a sigma on
    an even grid of the schedule's quantiles (training draws it uniformly). Every context sees the same draws, so
    differences between them are paired."""
    import comfy.model_management as mm

    p = b.pack
    arch = p.nodes.architectures.ARCHITECTURES["unet"]
    objective = p.cones2_core.objective
    prediction, sigma_data, ms = p.nodes.architectures.prediction_type(b.model)
    s = objective.TrainSettings(mode="paper", resolution=toy_world.LATENT_SIZE * 8).resolved(b.family, prediction)
    device = mm.get_torch_device()
    out = {}
    with torch.inference_mode(False), torch.no_grad():
        latents = p.nodes.train_images.encode_latents(b.vae, b.model, b.pictures("dog"), s.resolution)
        trainer = p.nodes.train_loop.Trainer(b.model, b.clip, prediction, sigma_data, ms, s, "dog", latents, device,
                                             arch=arch)
        g = torch.Generator().manual_seed(11)
        x0 = objective.latent_batch(trainer.latents, trainer.size, draws, g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        q = (torch.arange(draws) + 0.5) / draws
        sigma = trainer.sigmas[(q * (len(trainer.sigmas) - 1)).round().long()].to(device)
        with arch.frozen_model(b.model, device, trainer.frozen) as fm:
            for label, ctx in contexts.items():
                errors = []
                for i in range(0, draws, 16):
                    part = slice(i, min(i + 16, draws))
                    den = trainer._denoise(fm.mp, x0[part], noise[part], sigma[part], ctx.float().to(device), {},
                                           amp=False)
                    errors.append((den.float() - x0[part].float()).pow(2).flatten(1).mean(1).cpu())
                out[label] = torch.cat(errors)
    return out, sigma.float().cpu()


def diffusion_losses(b: Bench, contexts: dict) -> dict:
    """The diffusion loss (the objective's first term, as training computes it for this eps model) of each
    context, averaged over x0_errors' draws."""
    errors, sigma = x0_errors(b, contexts)
    weight = b.pack.cones2_core.objective.x0_loss_weight("eps", sigma)
    return {label: float((e * weight).mean()) for label, e in errors.items()}


WEIGHTING_DRAWS = 512


def weighting(b: Bench) -> str:
    """What the attribute is worth to the training loss under eps-prediction's weighting (the toy world's, and
    the node's for this model) and under v-prediction's (the reference's SD 2.1) of the same errors: the oracle
    residual's drop at the instance prompt, with its standard error and by quartile of sigma."""
    objective = b.pack.cones2_core.objective
    odog = b.oracle("dog")
    subj = b.pack.nodes.train_encoder.subject_rows(b.clip, "dog", "dog")
    frozen = b.clip.encode_from_tokens(b.clip.tokenize("dog")).float()
    o_delta = torch.cat([odog.tensors[k] for k in sorted(odog.tensors)], -1).float()
    errors, sigma = x0_errors(b, {"frozen": frozen, "oracle": objective.add_at_rows(frozen, subj, o_delta)},
                              WEIGHTING_DRAWS)
    n = WEIGHTING_DRAWS
    edges = ", ".join(f"{float(sigma[j * n // 4]):.2f}" for j in range(4))
    lines: list = []
    show(lines, f"{n} fixed draws from the six pictures, the instance prompt 'dog'; sigma quartiles start at "
                f"{edges}", "", "| weighting | loss (frozen) | oracle's drop | standard error | drop by sigma "
                "quartile, low to high | top quartile's share of the loss |", "|---|---|---|---|---|---|")
    for name in ("eps", "v"):
        w = objective.x0_loss_weight(name, sigma)
        loss = errors["frozen"] * w
        drop = (errors["frozen"] - errors["oracle"]) * w
        quartiles = ", ".join(f"{float(drop[j * n // 4:(j + 1) * n // 4].mean()):+.5f}" for j in range(4))
        show(lines, f"| {name} | {float(loss.mean()):.5f} | {float(drop.mean()):+.6f} | {float(drop.std() / n ** 0.5):.6f} "
                    f"| {quartiles} | {float(loss[3 * n // 4:].sum() / loss.sum()):.2f} |")
    return "\n".join(lines)


def balance(b: Bench) -> str:
    """Paper mode trains on the class word alone ("dog": start row, subject row, 75 later rows). Each run's tuned
    encoder output of that prompt, split by rows: how far each part moved, what the paper's term charges for it,
    and how much each part lowers the diffusion loss (the other rows kept frozen), against the node's residual
    (the template mean, added at the subject row) and the oracle's."""
    objective = b.pack.cones2_core.objective
    odog = b.oracle("dog")
    plain = b.measure("a photo of a dog")
    oracle = b.measure("a photo of a dog", [odog])
    o_lift = oracle["radius"]["dog"] - plain["radius"]["dog"]
    subj = b.pack.nodes.train_encoder.subject_rows(b.clip, "dog", "dog")
    o_delta = torch.cat([odog.tensors[k] for k in sorted(odog.tensors)], -1).float()
    runs = []
    for label, w0, w1 in BALANCE_RUNS:
        _, info = b.train("dog", snapshots=BALANCE_POINTS, probe=True, mode="paper", steps=max(BALANCE_POINTS),
                          preservation_weight_start=w0, preservation_weight_rest=w1)
        runs.append((label, info))
    frozen = runs[0][1]["probes"][0][0]
    host = b.clip.encode_from_tokens(b.clip.tokenize("dog")).float()
    start, rest = objective.preservation_rows(subj, frozen.shape[1])
    keep_subj = torch.zeros(frozen.shape[1], 1)
    keep_subj[subj] = 1.0
    contexts = {"frozen": frozen, "oracle": objective.add_at_rows(frozen, subj, o_delta)}
    for label, info in runs:
        for k in BALANCE_POINTS:
            tuned = info["probes"][k][0]
            contexts[label, k, "tuned"] = tuned
            contexts[label, k, "subject"] = frozen + (tuned - frozen) * keep_subj
            contexts[label, k, "others"] = tuned - (tuned - frozen) * keep_subj
            contexts[label, k, "residual"] = objective.add_at_rows(frozen, subj, info["snapshots"][k])
    loss = diffusion_losses(b, contexts)
    base = loss["frozen"]
    rows = frozen[0]
    later = rows[rest]
    common = later.mean(0)
    lines: list = []
    show(lines, f"instance prompt 'dog' (the private copy's output is {float((frozen - host).abs().max()):.1e} from "
                f"the host's): rows {start} (start), {subj} (subject), {rest[0]}..{rest[-1]} (later); every row's "
                f"norm {float(rows.norm(dim=-1).mean()):.1f}. The later rows' mean is {float(common.norm()):.1f} "
                f"long (their spread about it {float((later - common).norm(dim=-1).mean()):.1f}); cosine of the "
                f"subject row to it {float(torch.nn.functional.cosine_similarity(rows[subj[0]], common, 0)):.2f}.",
         "", f"diffusion loss (mean of {EVAL_DRAWS} fixed draws) with the frozen output {base:.5f}; the oracle "
             f"residual at the subject row lowers it by {base - loss['oracle']:.5f} (norm {float(o_delta.norm()):.2f}; "
             f"plain radius {radius(plain, 'dog')}, oracle {radius(oracle, 'dog')})", "",
         "| term (start / later weights) | steps | residual lift, % of oracle's | moved: subject row | start row | "
         "later rows | the paper's term on it | loss drop: tuned output | subject row alone | other rows alone | "
         "the residual at the subject row | objective at the paper's weights, change |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|")
    paper = objective.TrainSettings()  # the paper's preservation weights, the node's defaults
    for label, info in runs:
        for k in BALANCE_POINTS:
            d = (info["probes"][k][0] - frozen)[0]
            moved_s, moved_0, moved_r = float(d[subj].norm()), float(d[start].norm()), float(d[rest].norm())
            term = float(objective.preservation_loss(info["probes"][k][0], frozen, subj, paper.preservation_weight_start,
                                                     paper.preservation_weight_rest))  # what training adds
            r = b.pack.cones2_core.residual.Residual("dog", b.family, objective.split_channels(info["snapshots"][k],
                                                                                             b.family))
            one = b.measure("a photo of a dog", [r])
            lift = (one["radius"]["dog"] - plain["radius"]["dog"]) / o_lift
            drop = {part: base - loss[label, k, part] for part in ("tuned", "subject", "others", "residual")}
            show(lines, f"| {label} | {k} | {pct(lift)} | {moved_s:.2f} | {moved_0:.2f} | {moved_r:.2f} | "
                        f"{term:.5f} | {drop['tuned']:.5f} | {drop['subject']:.5f} | {drop['others']:.5f} | "
                        f"{drop['residual']:.5f} | {term - drop['tuned']:+.5f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", nargs="+",
                    default=["compose", "preservation", "transfer", "curve", "balance", "weighting"],
                    choices=["compose", "preservation", "transfer", "curve", "balance", "weighting"])
    ap.add_argument("--curve-paper-steps", type=int, default=4000, help="the curve's paper-mode run (the node's "
                    "default 4000; its snapshots up to this count)")
    ap.add_argument("--curve-runs", nargs="+", default=["fast", "scaled", "v-weighted", "default"],
                    choices=["fast", "scaled", "v-weighted", "default"], help="the curve's runs to do")
    ap.add_argument("--paper-lr", type=float, default=5e-5)
    ap.add_argument("--paper-steps", type=int, default=100)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--full", action="store_true", help="also the rows already in docs/training.md's composition table "
                    "(the dog alone, the oracle pair)")
    args = ap.parse_args(argv)
    host = find_host()
    path = build(toy_world.__file__, host, show_log=True)["toy"]
    import_host(host)
    b = Bench(path, not args.no_cache)
    for item in args.items:
        t0 = time.time()
        sys.stdout.write(f"\n## {item}\n\n")
        table = {"compose": lambda: compose(b, args.full), "transfer": lambda: transfer(b),
                 "preservation": lambda: preservation(b, args.paper_lr, args.paper_steps),
                 "curve": lambda: curve(b, args.curve_paper_steps, tuple(args.curve_runs)),
                 "balance": lambda: balance(b), "weighting": lambda: weighting(b)}[item]()
        del table
        sys.stdout.write(f"\n({item}: {time.time() - t0:.0f} s)\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
