"""Layout attention guidance inside ComfyUI's UNet, through the host's patch APIs only.

* An ``attn2`` replace patch on every cross-attention block computes the host's own attention for the
  whole batch (so unguided rows are bit-identical to an unpatched model) and recomputes the rows of the
  guided conditioning with the Cones 2 bias (``cones2_core.attention.guided_attention``).
* An ``APPLY_MODEL`` wrapper finds, per model call, which batch rows carry the guided conditioning
  (conditional pass only, matched by the context tensor itself, so cond/uncond batching, CFG 1, batch > 1
  and several prompts all work) and their sigma, and hands that to the patch via transformer_options.
* A ``SAMPLER_SAMPLE`` wrapper resets the attention recording of a run and, when asked, takes each guided
  step twice with re-noising in between (self-recurrence).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import comfy.patcher_extension
import torch

from ..cones2_core.attention import guided_attention
from ..cones2_core.errors import Cones2Error
from ..cones2_core.layout import build_weight_map, rasterize_boxes, resize_mask
from ..cones2_core.schedule import in_window, recurrence_plan, renoise_scale, segment_seed
from .common import warn

log = logging.getLogger("comfyui-cones2")

WRAPPER_KEY = "cones2_layout"
CALL_KEY = "cones2_call"
AREAS_KEY = "cones2_areas"  # transformer_options: {cond uuid: (y0, x0, y1, x1)} of positives with an area


# ---- what one Layout Guidance node asks for ----------------------------------------------------------------

@dataclass
class SubjectRegion:
    subject: str
    positions: tuple[int, ...]  # token rows of the subject in its conditioning (0..T0-1)
    boxes: tuple = ()  # cones2_core.layout.Box, normalised
    masks: tuple = ()  # float [H0, W0] masks (MASK inputs, colour maps)
    weight: float = 2.5

    def region(self, h: int, w: int, window=None) -> torch.Tensor:
        """The subject's region on an h x w grid of the whole image, or of ``window`` (y0, x0, y1, x1 as fractions
        of the image: the area a ConditioningSetArea prompt is sampled in)."""
        if window is not None:
            y0, x0, y1, x1 = window
            full_h, full_w = max(h, round(h / max(y1 - y0, 1e-6))), max(w, round(w / max(x1 - x0, 1e-6)))
            top, left = min(round(y0 * full_h), full_h - h), min(round(x0 * full_w), full_w - w)
            return self.region(full_h, full_w)[top:top + h, left:left + w]
        grid = torch.zeros(h, w, dtype=torch.bool)
        if self.boxes:
            grid |= rasterize_boxes(self.boxes, h, w)
        for m in self.masks:
            grid |= resize_mask(m, h, w)
        return grid


CHUNK = 77  # tokens per CLIP chunk: a conditioning's pieces (long prompts, ConditioningConcat) align to it


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
    _maps: dict = field(default_factory=dict, repr=False)  # derived weight maps, keyed by grid and device

    def match(self, ctx: torch.Tensor):
        """``(subjects, offsets)`` when the tensor ``ctx`` [T, C] holds one of this spec's conditionings, else
        None. ``offsets``: the token rows at which it starts: every chunk when the host repeated it to the
        batch's length, or where it sits inside a longer context (ConditioningConcat, either side)."""
        for ref, subjects in self.conds:
            t0 = ref.shape[1]
            step = CHUNK if t0 % CHUNK == 0 and ctx.shape[0] % CHUNK == 0 else t0
            if ctx.shape[0] < t0 or ctx.shape[-1] != ref.shape[-1]:
                continue
            r = ref[0].to(device=ctx.device, dtype=ctx.dtype)
            offsets = tuple(i for i in range(0, ctx.shape[0] - t0 + 1, step) if torch.equal(ctx[i:i + t0], r))
            if offsets:
                return subjects, offsets
        return None

    def weight_map(self, subjects, offsets, h: int, w: int, t: int, device, window=None) -> torch.Tensor:
        key = (id(subjects), offsets, h, w, t, str(device), window)
        wm = self._maps.get(key)
        if wm is None:
            bindings = [(subject_tokens(s, offsets), s.region(h, w, window), s.weight) for s in subjects]
            wm = build_weight_map(bindings, h, w, t, self.negative_weight, allow_empty=window is not None)
            wm = wm.to(device)[None]
            self._maps[key] = wm
        return wm

    def __deepcopy__(self, memo):  # the host deep-copies model options on clone: share the immutable parts
        return GuidanceSpec(self.uid, self.conds, self.guidance_weight, self.negative_weight, self.sigma_start,
                            self.sigma_end, self.self_recurrence, self.record)


# ---- attention recording (read by the Attention Maps node) -------------------------------------------------

class Recording:
    """Per grid (h, w): per subject, the attention mass of its tokens per pixel, summed over heads, layers,
    guided rows and guided calls; plus the subject's region on that grid."""

    def __init__(self):
        self.maps: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.regions: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.calls = 0

    def add(self, h: int, w: int, masses: torch.Tensor, subjects, window=None) -> None:
        """``masses`` [subjects, h * w]: each subject's attention mass per pixel in one call (guided_attention's
        token_mass)."""
        grid = self.maps.setdefault((h, w), {})
        regions = self.regions.setdefault((h, w), {})
        for s, m in zip(subjects, masses, strict=True):
            # stays on the attention's device (no sync per layer); read out by attention_report
            mass = m.reshape(h, w)
            grid[s.subject] = grid[s.subject] + mass if s.subject in grid else mass
            if s.subject not in regions:
                regions[s.subject] = s.region(h, w, window)


_RECORDINGS: OrderedDict[str, Recording] = OrderedDict()
_LOCK = threading.Lock()
_MAX_RECORDINGS = 32


def recording(uid: str, reset: bool = False) -> Recording:
    with _LOCK:
        rec = _RECORDINGS.get(uid)
        if rec is None or reset:
            rec = _RECORDINGS[uid] = Recording()
        _RECORDINGS.move_to_end(uid)
        while len(_RECORDINGS) > _MAX_RECORDINGS:
            _RECORDINGS.popitem(last=False)
        return rec


def find_recording(uid: str) -> Recording | None:
    with _LOCK:
        return _RECORDINGS.get(uid)


# ---- the patches ---------------------------------------------------------------------------------------------

@dataclass
class _Group:
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


class Cones2CrossAttention:
    """attn2 replace patch: host attention for every row, the Cones 2 bias for the guided rows.

    ``inner``: another pack's cross-attention replacement at this block (IPAdapter, InstantID, PuLID), whose
    output is the host's attention on the text plus an added term (their common contract). Unguided rows get
    exactly its output; guided rows get the guided attention plus its added term (its output minus the host's
    attention of the same call)."""

    def __init__(self, specs, inner=None):
        self.specs = tuple(specs)
        self.inner = inner

    def _host(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                                   transformer_options=extra_options)

    def _base(self, q, k, v, extra_options):
        """What this block gives without guidance: the other pack's replacement, else the host's attention."""
        if self.inner is not None:
            return self.inner(q, k, v, extra_options)
        return self._host(q, k, v, extra_options)

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        groups = [g for g in extra_options.get(CALL_KEY) or () if g.spec.guidance_weight != 0 or g.spec.record]
        if not groups:  # nothing guided or recorded in this call: exactly what the block gives without us
            return self._base(q, k, v, extra_options)
        shape = extra_options.get("activations_shape")
        if shape is None or len(shape) < 2:
            raise Cones2Error("this UNet does not tell its attention layers their image size (transformer_options has "
                              "no 'activations_shape'), so boxes cannot be placed; Layout Guidance needs ComfyUI's own "
                              "SD1.5/SD2.x/SDXL UNet (update ComfyUI, or remove the node that replaced the UNet)")
        h, w = int(shape[-2]), int(shape[-1])
        if h * w != q.shape[1]:
            raise Cones2Error(f"cannot map {q.shape[1]} attention pixels to a {h}x{w} grid; this UNet layout is "
                              "not supported by Layout Guidance")
        t = k.shape[1]
        biased_rows = sum(len(g.rows) for g in groups if g.spec.guidance_weight != 0)
        added = None
        if self.inner is not None or biased_rows < q.shape[0]:
            # Unbiased rows (the uncond pass, other prompts, guidance_weight 0): the block's own output over the
            # whole batch, the very call an unpatched model makes, so they stay bit-identical. (The host's
            # attention of a sub-batch rounds differently: computing only the unbiased rows saved the guided rows'
            # second computation but changed SD2.x's uncond pass in the last bits.) Another pack's replacement
            # also expects the whole batch (it splits it by cond_or_uncond).
            out = self._base(q, k, v, extra_options).clone()
            if self.inner is not None and biased_rows:
                added = out - self._host(q, k, v, extra_options)  # the other pack's term, kept on guided rows
        else:
            out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
        for g in groups:
            rows, sig = g.tensors(q.device)
            biased = g.spec.guidance_weight != 0
            tokens = [subject_tokens(s, g.offsets) for s in g.subjects]
            res, *mass = guided_attention(q[rows], k[rows], v[rows], heads,
                                          g.spec.weight_map(g.subjects, g.offsets, h, w, t, q.device, g.window),
                                          sig, g.spec.guidance_weight, token_mass=tokens if g.spec.record else None)
            if biased:  # at weight 0 the rows keep the host's output; only the maps are read
                out[rows] = res.to(out.dtype) if added is None else res.to(out.dtype) + added[rows]
            if mass:
                recording(g.spec.uid).add(h, w, mass[0], g.subjects, g.window)
        return out


class Cones2ApplyModel:
    """APPLY_MODEL wrapper: tells the patch which rows of this call are guided, and at which sigma."""

    def __init__(self, specs):
        self.specs = tuple(specs)

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        transformer_options = self._wrap_later_patches(transformer_options)
        groups = self.groups(c_crossattn, t, transformer_options.get("cond_or_uncond") or [0],
                             transformer_options.get("uuids") or [], transformer_options.get(AREAS_KEY) or {})
        for g in groups:
            recording(g.spec.uid).calls += 1
        if groups:
            transformer_options = {**transformer_options, CALL_KEY: groups}
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def groups(self, context, sigma, cond_or_uncond, uuids=(), areas=None) -> list[_Group]:
        if context is None:
            return []
        batch = context.shape[0]
        per = max(1, batch // max(1, len(cond_or_uncond)))
        found: dict[tuple, _Group] = {}
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
                                         _Group(spec, subjects, offsets, window, [], []))
                    g.rows.append(row)
                    g.sigmas.append(s)
                    break
        return list(found.values())

    def _wrap_later_patches(self, transformer_options):
        """A cross-attention replacement another node installed after Layout Guidance took our place at its block:
        for this call (a per-call override, the model is untouched) ours runs again with theirs inside."""
        replaced = transformer_options.get("patches_replace", {}).get("attn2", {})
        later = {key: patch for key, patch in replaced.items() if not isinstance(patch, Cones2CrossAttention)}
        if not later:
            return transformer_options
        attn2 = {**replaced, **{key: Cones2CrossAttention(self.specs, inner=patch) for key, patch in later.items()}}
        patches_replace = {**transformer_options["patches_replace"], "attn2": attn2}
        return {**transformer_options, "patches_replace": patches_replace}


# Samplers whose update from sigma_i to sigma_i+1 depends on nothing but x, the model and fresh noise, so that
# taking a guided step as its own sampler run (self-recurrence) is exactly that step. Multistep samplers (a
# history of earlier steps: lms, dpmpp_2m(_sde), dpmpp_3m_sde, uni_pc, deis, ipndm, res_multistep, ...), those
# that plan their own schedule over the whole run (dpm_fast, dpm_adaptive, heunpp2's order by distance to the
# end) and samplers of other packs would silently lose accuracy: they sample without self-recurrence and say so.
STEPWISE_SAMPLERS = frozenset(f"sample_{name}" for name in (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "euler_ancestral_RF", "heun", "dpm_2",
    "dpm_2_ancestral", "dpm_2_ancestral_RF", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_2s_ancestral_RF", "dpmpp_sde", "dpmpp_sde_gpu", "ddpm", "lcm"))


def sampler_function_name(sampler) -> str:
    """The sampling function of a host sampler object (comfy.samplers.KSAMPLER): 'sample_euler', 'sample_unipc'."""
    fn = getattr(sampler, "sampler_function", None)
    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    return getattr(fn, "__name__", None) or type(sampler).__name__


def _positive_conds(guider):
    """(cond dict, context [B, T, C]) of each positive the host prepared for this sampling run."""
    for cond in (getattr(guider, "conds", None) or {}).get("positive", []):
        mc = cond.get("model_conds", {}).get("c_crossattn") if isinstance(cond, dict) else None
        ctx = getattr(mc, "cond", None)
        if isinstance(ctx, torch.Tensor) and ctx.ndim == 3:
            yield cond, ctx


class Cones2Sampler:
    """SAMPLER_SAMPLE wrapper: fresh attention recording per run; self-recurrence on guided steps."""

    def __init__(self, specs):
        self.specs = tuple(specs)

    def __call__(self, executor, guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                 disable_pbar):
        for spec in self.specs:
            recording(spec.uid, reset=True)
        areas = self._areas(guider, latent_image if latent_image is not None else noise)
        if areas:  # tell the model calls which part of the image each area prompt sees
            options = dict(extra_args.get("model_options") or {})
            options["transformer_options"] = {**options.get("transformer_options", {}), AREAS_KEY: areas}
            extra_args = {**extra_args, "model_options": options}
        out = self._sample(executor, guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                           disable_pbar)
        unused = [s for s in self.specs if recording(s.uid).calls == 0]
        if unused:
            warn(
                "Cones2 Layout Guidance: this sampling run never used the guided prompt as its positive "
                "conditioning, so nothing was guided (%d of %d layouts). Connect the CONDITIONING output of "
                "Cones2 Layout Guidance to the sampler's positive input (the negative is never guided), or "
                "widen start_percent/end_percent", len(unused), len(self.specs))
        return out

    def _areas(self, guider, latent) -> dict:
        """{uuid: (y0, x0, y1, x1)} for each guided positive that ConditioningSetArea (or SetMask with 'mask
        bounds') confines to part of the image; the host has resolved its area to latent pixels (h, w, y, x)."""
        out = {}
        if latent is None or latent.ndim != 4:
            return out
        height, width = latent.shape[-2:]
        for cond, ctx in _positive_conds(guider):
            area = cond.get("area")
            if not area or len(area) != 4 or isinstance(area[0], str):
                continue
            if any(spec.match(row) is not None for spec in self.specs for row in ctx):
                h, w, y, x = (int(v) for v in area)
                out[cond.get("uuid")] = (y / height, x / width, min(y + h, height) / height,
                                         min(x + w, width) / width)
        return out

    def _recurrent_specs(self, guider):
        """Specs that ask for self-recurrence and whose prompt is a positive of this run (a hires-fix pass or
        another prompt on the same MODEL samples normally)."""
        wanted = [s for s in self.specs if s.self_recurrence and s.guidance_weight != 0]
        if not wanted:
            return []
        contexts = [row for _cond, ctx in _positive_conds(guider) for row in ctx]
        return [s for s in wanted if any(s.match(ctx) is not None for ctx in contexts)]

    def _sample(self, executor, guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                disable_pbar):
        rec_specs = self._recurrent_specs(guider)
        n = len(sigmas) - 1
        guided = [any(in_window(float(sigmas[i]), s.sigma_start, s.sigma_end) for s in rec_specs) for i in range(n)]
        if not any(guided):
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        if denoise_mask is not None:
            warn("Cones2 Layout Guidance: self-recurrence is skipped with an inpainting mask; sampling with guidance "
                 "but without self-recurrence")
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        name = sampler_function_name(getattr(executor, "class_obj", None))  # the executor runs sampler.sample
        if name not in STEPWISE_SAMPLERS:
            warn("Cones2 Layout Guidance: self-recurrence is off with the sampler '%s' (it carries a history or its "
                 "own schedule across steps, which re-taking single steps would break); sampling with guidance but "
                 "without self-recurrence. It works with euler, euler_ancestral, heun, dpm_2, dpmpp_2s_ancestral, "
                 "dpmpp_sde, ddpm, lcm and ddim; turn self_recurrence off to silence this",
                 name.removeprefix("sample_").removesuffix("_function"))
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        plan = recurrence_plan([float(s) for s in sigmas], guided)
        total = sum((stop - start) * reps for start, stop, reps in plan)
        seed = int(extra_args.get("seed", 0) or 0)
        # the re-noising generator: seeded from the sampler's seed (up to 2^64 - 1) modulo 2^64
        gen = torch.Generator(device="cpu").manual_seed((seed + 0x5EED) % 2**64)
        x, done, segment = None, 0, 0
        for start, stop, reps in plan:
            for r in range(reps):
                cb = None
                if callback is not None:
                    cb = (lambda off: (lambda i, x0, xi, _total: callback(off + i, x0, xi, total)))(done)
                seg = sigmas[start:stop + 1]
                # every restart gets its own seed: samplers that draw noise from it (ancestral, SDE, LCM) must
                # not inject the first step's noise again at every step
                args = {**extra_args, "seed": segment_seed(seed, segment)}
                segment += 1
                if x is None:
                    x = executor(guider, seg, args, cb, noise, latent_image, None, disable_pbar)
                else:
                    x = executor(guider, seg, args, cb, torch.zeros_like(x), x, None, disable_pbar)
                done += stop - start
                if r + 1 < reps:  # re-noise back to sigma_start of the step and take it again
                    eps = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x)
                    x = x + renoise_scale(float(sigmas[start]), float(sigmas[stop])) * eps
        return x


# ---- installing on a clone -----------------------------------------------------------------------------------

def cross_attention_blocks(model_patcher) -> list[tuple[str, int, int]]:
    """(block, index, transformer_index) of every cross-attention transformer block of the UNet."""
    dm = model_patcher.get_model_object("diffusion_model")
    keys = []
    for name, blocks in (("input", getattr(dm, "input_blocks", [])), ("output", getattr(dm, "output_blocks", []))):
        for i, block in enumerate(blocks):
            keys += [(name, i, j) for j in _transformer_indices(block)]
    mid = getattr(dm, "middle_block", None)
    if mid is not None:
        keys += [("middle", 0, j) for j in _transformer_indices(mid)]
    if not keys:
        raise Cones2Error("this model has no UNet cross-attention blocks; Layout Guidance supports SD1.5, SD2.x and "
                          "SDXL models")
    return keys


def _transformer_indices(block) -> list[int]:
    out, index = [], 0
    for layer in block:
        for tb in getattr(layer, "transformer_blocks", []):
            if getattr(tb, "attn2", None) is not None:
                out.append(index)
            index += 1
    return out


def existing_specs(model_patcher) -> list[GuidanceSpec]:
    """Specs of Layout Guidance nodes already applied to this model (chained nodes compose)."""
    specs: dict[str, GuidanceSpec] = {}
    for patch in _attn2_replacements(model_patcher).values():
        if isinstance(patch, Cones2CrossAttention):
            for s in patch.specs:
                specs.setdefault(s.uid, s)
    return list(specs.values())


def _attn2_replacements(model_patcher) -> dict:
    return model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})


def install(model_patcher, spec: GuidanceSpec):
    """A clone of ``model_patcher`` with the guidance of ``spec`` (and of earlier Layout Guidance nodes)."""
    earlier = specs_of(model_patcher)
    for other in earlier:
        for ref, _subjects in spec.conds:
            if any(o.shape == ref.shape and torch.equal(o, ref) for o, _ in other.conds):
                names = ", ".join(dict.fromkeys(r.subject for _, regions in other.conds for r in regions))
                raise Cones2Error(
                    f"this prompt is already guided by an earlier Cones2 Layout Guidance node on this model (subjects "
                    f"{names}); a second node on the same prompt cannot add to it. Put all boxes in one Layout "
                    "Guidance node (boxes, masks and a colour map can be combined there), or connect this node's "
                    "model input to the unguided model")
    specs = earlier + [spec]
    m = model_patcher.clone()
    replaced = _attn2_replacements(m)
    for block, index, tindex in cross_attention_blocks(m):
        other = replaced.get((block, index, tindex))  # another pack's replacement here is kept inside ours
        inner = other.inner if isinstance(other, Cones2CrossAttention) else other
        m.set_model_attn2_replace(Cones2CrossAttention(specs, inner), block, index, tindex)
    for wtype, wrapper in ((comfy.patcher_extension.WrappersMP.APPLY_MODEL, Cones2ApplyModel(specs)),
                           (comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, Cones2Sampler(specs))):
        m.remove_wrappers_with_key(wtype, WRAPPER_KEY)
        m.add_wrapper_with_key(wtype, WRAPPER_KEY, wrapper)
    return m


def specs_of(model_patcher) -> list[GuidanceSpec]:
    """The guidance on this model: held by our APPLY_MODEL wrapper (which survives another pack replacing our
    cross-attention patches afterwards), else by our patches."""
    for wrapper in model_patcher.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        if isinstance(wrapper, Cones2ApplyModel):
            return list(wrapper.specs)
    return existing_specs(model_patcher)
