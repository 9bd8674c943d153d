"""Layout guidance on the host, whatever the model's architecture: what a Layout Guidance node asks for, which
rows of a model call it applies to, and the wrappers that carry it through sampling.

* An ``APPLY_MODEL`` wrapper finds, per model call, which batch rows carry the guided conditioning
  (conditional pass only, matched by the context tensor itself, so cond/uncond batching, CFG 1, batch > 1
  and several prompts all work) and their sigma, and hands them to the attention patch of the model's
  architecture (``nodes/architectures/``) via transformer_options under ``CALL_KEY``.
* A ``SAMPLER_SAMPLE`` wrapper (``nodes/recurrence.py``) starts the attention recording of a run and, when asked,
  takes each guided step twice with re-noising in between (self-recurrence).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import comfy.patcher_extension
import torch

from ..cones2_core.errors import Cones2Error
from ..cones2_core.layout import build_weight_map, rasterize_boxes, resize_mask
from ..cones2_core.schedule import in_window
from ..cones2_core.video import latent_frame_times
from .common import warn
from .recording import find_recording
from .recurrence import AREAS_KEY, Cones2Sampler

WRAPPER_KEY = "cones2_guidance"  # key of our APPLY_MODEL and SAMPLER_SAMPLE wrappers on a ModelPatcher
CALL_KEY = "cones2_rows"  # transformer_options of one model call: [GuidedRows] for the attention patches


# ---- what one Layout Guidance node asks for ----------------------------------------------------------------

@dataclass
class SubjectRegion:
    subject: str
    positions: tuple[int, ...]  # token rows of the subject in its conditioning (0..T0-1)
    boxes: tuple = ()  # cones2_core.layout.Box, normalised
    masks: tuple = ()  # float [H0, W0] masks (MASK inputs, colour maps)
    weight: float = 2.5

    def mask(self, h: int, w: int, window=None, at: float | None = None) -> torch.Tensor:
        """The subject's region on an h x w grid of the whole image, or of ``window`` (y0, x0, y1, x1 as fractions
        of the image: the area a ConditioningSetArea prompt is sampled in). ``at``: a video's clip time (0..1):
        boxes with a track are taken where the track is then (``Box.at``); masks hold still."""
        if window is not None:
            y0, x0, y1, x1 = window
            full_h, full_w = max(h, round(h / max(y1 - y0, 1e-6))), max(w, round(w / max(x1 - x0, 1e-6)))
            top, left = min(round(y0 * full_h), full_h - h), min(round(x0 * full_w), full_w - w)
            return self.mask(full_h, full_w, at=at)[top:top + h, left:left + w]
        grid = torch.zeros(h, w, dtype=torch.bool)
        if self.boxes:
            grid |= rasterize_boxes(self.boxes if at is None else [b.at(at) for b in self.boxes], h, w)
        for m in self.masks:
            grid |= resize_mask(m, h, w)
        return grid


def subject_tokens(region: SubjectRegion, offsets) -> list[int]:
    """Token rows of a subject in a model call's context, its conditioning starting at each of ``offsets``."""
    return [o + p for o in offsets for p in region.positions]


@dataclass
class GuidanceSpec:
    uid: str
    conds: list  # [(context tensor [1, T0, C] on CPU, tuple[SubjectRegion])] one per conditioning entry
    guidance_weight: float
    negative_weight: float
    sigma_start: float
    sigma_end: float
    self_recurrence: bool
    record: bool = True  # record the attention maps (the node's record_maps)
    chunk: int | None = 77  # tokens per encoder chunk of the family (Family.chunk; None: one chunk of any length)
    recurrence_sigma_end: float = 0.0  # self-recurrence re-takes only guided steps from sigmas >= this
    _maps: dict = field(default_factory=dict, repr=False)  # derived weight maps, keyed by grid and device

    def match(self, ctx: torch.Tensor):
        """``(subjects, offsets)`` when the tensor ``ctx`` [T, C] holds one of this spec's conditionings, else
        None. ``offsets``: the token rows at which it starts: every chunk when the host repeated it to the
        batch's length, or where it sits inside a longer context (ConditioningConcat, either side)."""
        for ref, subjects in self.conds:
            t0 = ref.shape[1]
            chunked = self.chunk and t0 % self.chunk == 0 and ctx.shape[0] % self.chunk == 0
            step = self.chunk if chunked else t0
            if ctx.shape[0] < t0 or ctx.shape[-1] != ref.shape[-1]:
                continue
            r = ref[0].to(device=ctx.device, dtype=ctx.dtype)
            offsets = tuple(i for i in range(0, ctx.shape[0] - t0 + 1, step) if torch.equal(ctx[i:i + t0], r))
            if offsets:
                return subjects, offsets
        return None

    def weight_map(self, subjects, offsets, h: int, w: int, t: int, device, window=None,
                   frames: int | None = None) -> torch.Tensor:
        """W [1, h * w, t] of an image; of a video of ``frames`` latent frames, [1, frames * h * w, t]: frame f's
        rows (f * h * w ..) hold the map of the boxes at its clip time (``cones2_core.video.latent_frame_time``)."""
        key = (id(subjects), offsets, h, w, t, str(device), window, frames)
        wm = self._maps.get(key)
        if wm is None:
            times = (None,) if frames is None else latent_frame_times(frames)
            wm = torch.cat([build_weight_map([(subject_tokens(s, offsets), s.mask(h, w, window, at), s.weight)
                                              for s in subjects], h, w, t, self.negative_weight,
                                             allow_empty=window is not None) for at in times])
            wm = wm.to(device)[None]
            self._maps[key] = wm
        return wm

    def __deepcopy__(self, memo):  # the host deep-copies model options on clone: share the immutable parts
        return GuidanceSpec(self.uid, self.conds, self.guidance_weight, self.negative_weight, self.sigma_start,
                            self.sigma_end, self.self_recurrence, self.record, self.chunk,
                            self.recurrence_sigma_end)


# ---- the rows of a model call that a spec guides -------------------------------------------------------------

@dataclass
class GuidedRows:
    """The rows of one model call's batch that carry one guided conditioning (same placement, same window)."""

    spec: GuidanceSpec
    subjects: tuple
    offsets: tuple  # token rows where the guided conditioning starts in this call's context
    window: tuple | None  # the part of the image this call sees (ConditioningSetArea), None = all of it
    rows: list
    sigmas: list
    _tensors: dict = field(default_factory=dict, repr=False)

    def tensors(self, device):
        """(row indices, sigmas) as tensors on ``device``, made once per model call."""
        key = str(device)
        if key not in self._tensors:
            self._tensors[key] = (torch.tensor(self.rows, device=device),
                                  torch.tensor(self.sigmas, device=device, dtype=torch.float32))
        return self._tensors[key]


class Cones2ApplyModel:
    """APPLY_MODEL wrapper: tells the patch which rows of this call are guided, and at which sigma."""

    def __init__(self, specs, per_call=None):
        self.specs = tuple(specs)
        self.per_call = per_call  # the architecture's per-call adjustment of transformer_options, if any

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        if self.per_call is not None:
            transformer_options = self.per_call(self.specs, transformer_options, x=x, context=c_crossattn)
        groups = self.groups(c_crossattn, t, transformer_options.get("cond_or_uncond") or [0],
                             transformer_options.get("uuids") or [], transformer_options.get(AREAS_KEY) or {})
        for g in groups:
            rec = find_recording(g.spec.uid)
            if rec is not None:
                rec.calls += 1
        if groups:
            transformer_options = {**transformer_options, CALL_KEY: groups}
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def groups(self, context, sigma, cond_or_uncond, uuids=(), areas=None) -> list[GuidedRows]:
        if context is None:
            return []
        batch = context.shape[0]
        per = max(1, batch // max(1, len(cond_or_uncond)))
        found: dict[tuple, GuidedRows] = {}
        for row in range(batch):
            chunk = min(row // per, len(cond_or_uncond) - 1)
            if cond_or_uncond[chunk] != 0:  # 0 = the conditional pass; never bias the negative/uncond pass
                continue
            s = float(sigma[row]) if sigma.ndim else float(sigma)
            for spec in self.specs:
                if not in_window(s, spec.sigma_start, spec.sigma_end):
                    continue
                matched = spec.match(context[row])
                if matched is not None:
                    subjects, offsets = matched
                    window = (areas or {}).get(uuids[chunk]) if chunk < len(uuids) else None
                    g = found.setdefault((id(spec), id(subjects), offsets, window),
                                         GuidedRows(spec, subjects, offsets, window, [], []))
                    g.rows.append(row)
                    g.sigmas.append(s)
                    break
        return list(found.values())


def specs_of(model_patcher) -> list[GuidanceSpec]:
    """The guidance on this model (every Layout Guidance node applied to it so far), held by our APPLY_MODEL
    wrapper, which survives another pack replacing our attention patches afterwards."""
    for wrapper in model_patcher.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        if isinstance(wrapper, Cones2ApplyModel):
            return list(wrapper.specs)
    return []


def check_one_subject_per_token(regions, earlier=frozenset()) -> None:
    """An error when two subjects bind the same prompt token; ``earlier``: subjects that an earlier Layout
    Guidance node placed (said in the message)."""
    taken: dict[int, str] = {}
    for r in regions:
        for p in r.positions:
            if taken.setdefault(p, r.subject) != r.subject:
                origin = " (an earlier Layout Guidance node)" if taken[p] in earlier else ""
                raise Cones2Error(f"the subjects '{taken[p]}'{origin} and '{r.subject}' share prompt token {p}; give "
                                  "each box its own word")


def merge_prompts(earlier: list[GuidanceSpec], spec: GuidanceSpec) -> tuple[list[GuidanceSpec], GuidanceSpec]:
    """A later Layout Guidance node on a prompt an earlier one (on the same model) already guides: its subjects are
    merged, the way adapters stack. Returns (the earlier specs left, the new spec with the merged subjects).

    For each prompt the new node guides, the earlier node's subjects come first and the new node's after, as one
    node holding all the boxes in that order would have them; a subject in both takes the later node's regions
    (said in the log and on the node). The merged prompt takes the later node's settings (weights, window,
    self-recurrence, maps); an earlier node keeps guiding the prompts the later one does not."""
    kept: list[GuidanceSpec] = []
    conds = list(spec.conds)
    for other in earlier:
        left = []
        for ref, old in other.conds:
            hit = next((i for i, (r, _new) in enumerate(conds) if r.shape == ref.shape and torch.equal(r, ref)), None)
            if hit is None:
                left.append((ref, old))
                continue
            new = conds[hit][1]
            names = {r.subject for r in new}
            replaced = [r.subject for r in old if r.subject in names]
            if replaced:
                warn("Cones2 Layout Guidance: this node and an earlier one on the same prompt both place %s; this "
                     "node's regions are used for %s", ", ".join(replaced), "it" if len(replaced) == 1 else "them")
            merged = tuple(r for r in old if r.subject not in names) + tuple(new)
            check_one_subject_per_token(merged, earlier={r.subject for r in old} - names)
            conds[hit] = (conds[hit][0], merged)
        if left:
            kept.append(other if len(left) == len(other.conds) else dataclasses.replace(other, conds=left, _maps={}))
    return kept, dataclasses.replace(spec, conds=conds, _maps={})


def add_wrappers(model_patcher, specs, per_call=None) -> None:
    """Install (or replace) our APPLY_MODEL and SAMPLER_SAMPLE wrappers on a clone for ``specs``."""
    for wtype, wrapper in ((comfy.patcher_extension.WrappersMP.APPLY_MODEL, Cones2ApplyModel(specs, per_call)),
                           (comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, Cones2Sampler(specs))):
        model_patcher.remove_wrappers_with_key(wtype, WRAPPER_KEY)
        model_patcher.add_wrapper_with_key(wtype, WRAPPER_KEY, wrapper)
