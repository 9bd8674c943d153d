"""Generation-level measures of the toy world (``harness/toy_world.py``), read off sampled latents.

Every object of the world is a flat disk whose raw latent is its signature vector, on a zero background. Per
pixel, ``z . u_k / |u_k|^2`` is 1 on object k, 0 on the background and -1/3 on any other object, so each object
is measured on its own map: present when enough pixels pass half its signature, its centroid (as fractions of
the width and height, like a layout's boxes) and its size (the radius of a disk of its soft area, in latent
pixels). Shared by the tests and the benchmarks. ``Sampler`` runs the world through the host in-process (the
rest needs torch only).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from harness.toy_world import BIG_RADIUS, LATENT_SIZE, OBJECTS, RADIUS, object_signature

# Node defaults of Cones2 Layout Guidance (nodes/layout_node.py).
GUIDANCE_DEFAULTS = {"guidance_weight": 0.08, "positive_weight": 2.5, "negative_weight": -1e8, "start_percent": 0.0,
                     "end_percent": 1.0, "self_recurrence": False}
LEFT = {"x": 0.0, "y": 0.0, "w": 0.5, "h": 1.0}
RIGHT = {"x": 0.5, "y": 0.0, "w": 0.5, "h": 1.0}

# Cases where placement is hard (bench/toy_hard.py, tests/host/test_toy_world.py), name: (prompt, {subject: box}).
# The world's captions hold at most two objects, each at a uniform position.
HARD_CASES = {
    # three subjects: the unguided model often draws only two of them
    "three": ("a photo of a dog and a cat and a car",
              {"dog": {"x": 0.0, "y": 0.0, "w": 0.5, "h": 0.5}, "cat": {"x": 0.5, "y": 0.0, "w": 0.5, "h": 0.5},
               "car": {"x": 0.0, "y": 0.5, "w": 1.0, "h": 0.5}}),
    # opposite corner quarters
    "corners": ("a photo of a dog and a cat",
                {"dog": {"x": 0.0, "y": 0.0, "w": 0.5, "h": 0.5}, "cat": {"x": 0.5, "y": 0.5, "w": 0.5, "h": 0.5}}),
    # two small boxes side by side in the middle
    "adjacent": ("a photo of a dog and a cat",
                 {"dog": {"x": 0.2, "y": 0.3, "w": 0.3, "h": 0.4}, "cat": {"x": 0.5, "y": 0.3, "w": 0.3, "h": 0.4}}),
    # top / bottom halves
    "topbottom": ("a photo of a car and a dog",
                  {"car": {"x": 0.0, "y": 0.0, "w": 1.0, "h": 0.5}, "dog": {"x": 0.0, "y": 0.5, "w": 1.0, "h": 0.5}}),
    # a big subject and a small one: big dog in the left two thirds, cat in the top-right corner
    "bigsmall": ("a photo of a big dog and a cat",
                 {"dog": {"x": 0.0, "y": 0.0, "w": 0.65, "h": 1.0}, "cat": {"x": 0.65, "y": 0.0, "w": 0.35, "h": 0.4}}),
}

MIN_AREA = 4.0  # latent pixels above half the signature (a normal object has about 20)
SIZE_THRESHOLD = 0.5 * (RADIUS + BIG_RADIUS)  # radius above which an object counts as "big"


@dataclass(frozen=True)
class Found:
    present: bool
    area: float  # pixels above half the signature
    radius: float  # sqrt(soft area / pi), latent pixels
    cx: float  # centroid, fraction of the width (0 = left)
    cy: float  # centroid, fraction of the height (0 = top)

    def inside(self, box) -> bool:
        """Centroid inside a box {"x", "y", "w", "h"} (fractions)."""
        return self.present and box["x"] <= self.cx <= box["x"] + box["w"] and box["y"] <= self.cy <= box["y"] + box["h"]


def object_map(latent: torch.Tensor, name: str) -> torch.Tensor:
    """[H, W] map of one object in one raw latent [4, H, W]: 1 on it, 0 on background."""
    u = object_signature(name).to(latent)
    return torch.einsum("chw,c->hw", latent, u) / u.dot(u)


def find(latent: torch.Tensor, name: str) -> Found:
    m = object_map(latent.detach().float(), name)
    h, w = m.shape
    on = m > 0.5
    area = float(on.sum())
    soft = m.clamp(0, 1) * on
    mass = float(soft.sum())
    if area < MIN_AREA or mass <= 0:
        return Found(False, area, math.sqrt(max(mass, 0.0) / math.pi), float("nan"), float("nan"))
    yy, xx = torch.meshgrid(torch.arange(h, dtype=m.dtype) + 0.5, torch.arange(w, dtype=m.dtype) + 0.5, indexing="ij")
    cx = float((soft * xx).sum()) / mass / w
    cy = float((soft * yy).sum()) / mass / h
    return Found(True, area, math.sqrt(mass / math.pi), cx, cy)


def find_all(latent: torch.Tensor) -> dict[str, Found]:
    return {name: find(latent, name) for name in OBJECTS}


def summarise(latents: torch.Tensor, prompted: list[str], boxes: dict[str, dict] | None = None) -> dict:
    """Rates over a batch of raw latents [B, 4, H, W] for a prompt naming ``prompted``.

    presence: share of samples in which every prompted object appears; per_object: each one's presence rate;
    unprompted: share of samples with at least one object the prompt did not ask for; radius: mean radius of
    each prompted object where present; in_boxes (when boxes are given): share of samples in which every
    boxed object is present with its centroid inside its box.
    """
    found = [find_all(z) for z in latents]
    n = len(found)
    out = {
        "n": n,
        "presence": sum(all(f[o].present for o in prompted) for f in found) / n,
        "per_object": {o: sum(f[o].present for f in found) / n for o in prompted},
        "unprompted": sum(any(f[o].present for o in OBJECTS if o not in prompted) for f in found) / n,
        "radius": {o: _mean([f[o].radius for f in found if f[o].present]) for o in prompted},
        "found": found,
    }
    if boxes:
        out["in_boxes"] = sum(all(f[o].inside(b) for o, b in boxes.items()) for f in found) / n
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def big_pictures(subject: str, seed: int, n: int = 6) -> list[torch.Tensor]:
    """``n`` pictures (IMAGE rows) of one big ``subject`` each, at places drawn from ``seed``: what the residual
    tests and benches train on."""
    from harness import toy_world

    gen = torch.Generator().manual_seed(seed)
    return [toy_world.picture(toy_world.place(gen, [(subject, True)])) for _ in range(n)]


def train_big_residual(pack, model, clip, vae, subject: str, seed: int, **settings):
    """A residual trained by Train Residual's code from ``big_pictures(subject, seed)`` with the class word
    ``subject``, at the world's own 128 px; by default fast mode at the node's defaults (``settings``: other
    TrainSettings fields)."""
    from harness.toy_world import LATENT_SIZE as size

    config = pack.cones2_core.objective.TrainSettings(**{"mode": "fast", **settings}, resolution=size * 8)
    residual, _losses, _evals = pack.nodes.train_node.train_residual(model, clip, vae, big_pictures(subject, seed),
                                                                     subject, config)
    return residual


def residual_effects(runs, prompt: str, residual, subject: str) -> dict[str, dict]:
    """``summarise`` of ``prompt`` (naming ``subject``) over the same draws of ``runs`` (a Sampler): ``plain``,
    with the residual (``trained``), with it at the wrong sign (``flipped``) and at the word "photo"
    (``elsewhere``)."""
    return {name: summarise(runs(prompt, residuals=rs), [subject]) for name, rs in (
        ("plain", None), ("trained", [residual]), ("flipped", [residual.with_strength(-1.0)]),
        ("elsewhere", [residual.with_subject("photo")]))}


def layout(boxes: dict[str, dict]) -> str:
    """The layout JSON of {subject: box}."""
    return json.dumps({"version": 1, "boxes": [{"subject": s, **b} for s, b in boxes.items()]})


def residuals_key(residuals) -> tuple:
    """What a list of residuals is (subject, strength, the bytes of its tensors), for the sample cache: not its
    id(), which Python reuses for a new list once the old one is freed (a new residual then got an old result)."""
    import hashlib

    out = []
    for r in residuals or ():
        digest = hashlib.sha256()
        for k in sorted(r.tensors):
            digest.update(k.encode() + r.tensors[k].detach().float().cpu().numpy().tobytes())
        out.append((r.subject, float(r.strength), digest.hexdigest()))
    return tuple(out)


class Sampler:
    """Samples the toy world through the host in-process: Apply Residuals, optionally Layout Guidance (node
    defaults unless overridden), then the host's KSampler on a batch of ``n`` noise draws from one seed.
    Results are cached per settings, so tests that compare guided with unguided share the unguided run."""

    def __init__(self, pack, model, clip, n: int = 16, seed: int = 5, steps: int = 20, cfg: float = 5.0,
                 size: int = LATENT_SIZE, channels: int = 4, scheduler: str = "normal"):
        """``channels``: the model's latent channels (the world is in the first 4: the toy Chroma has 16);
        ``scheduler``: the default of every call."""
        import nodes

        self.pack, self.model, self.clip = pack, model, clip
        self.n, self.seed, self.steps, self.cfg, self.size = n, seed, steps, cfg, size
        self.channels, self.scheduler = channels, scheduler
        self.negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        self._cache: dict = {}

    def forget(self) -> None:
        """Drop every cached result: the next calls sample afresh (for timing, or after changing a module switch
        such as ``joint.EXACT`` that the cache keys do not see)."""
        self._cache.clear()

    def __call__(self, prompt: str, boxes: dict | None = None, sampler: str = "euler", scheduler: str | None = None,
                 residuals=None, **guidance) -> torch.Tensor:
        """Raw world latents [n, 4, size, size]."""
        import nodes

        scheduler = scheduler or self.scheduler
        key = (prompt, json.dumps(boxes, sort_keys=True), sampler, scheduler, residuals_key(residuals),
               tuple(sorted(guidance.items())))
        if key not in self._cache:
            pos = self.pack.nodes.residual_nodes.Cones2ApplyResiduals.execute(self.clip, prompt, residuals).result[0]
            model = self.model
            if boxes is not None:
                node = self.pack.nodes.layout_node.Cones2LayoutGuidance
                model, pos = node.execute(model, pos, layout(boxes), **{**GUIDANCE_DEFAULTS, **guidance}).result
            latent = {"samples": torch.zeros(self.n, self.channels, self.size, self.size)}
            out = nodes.common_ksampler(model, self.seed, self.steps, self.cfg, sampler, scheduler, pos,
                                        self.negative, latent)
            self._cache[key] = out[0]["samples"][:, :4]
        return self._cache[key]
