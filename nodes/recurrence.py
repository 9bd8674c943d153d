"""The SAMPLER_SAMPLE wrapper of Layout Guidance: a fresh attention recording per run, the area of each area
prompt (ConditioningSetArea) for the model calls, and self-recurrence (each guided step taken twice, re-noised in
between; samplers with a history take their re-taken steps as euler steps)."""

from __future__ import annotations

import logging

import torch

from ..cones2_core.schedule import in_window, recurrence_plan, renoise_scale, segment_seed
from .common import warn
from .recording import start_recording

log = logging.getLogger("comfyui-cones2")

AREAS_KEY = "cones2_areas"  # transformer_options: {cond uuid: (y0, x0, y1, x1)} of positives with an area


# Samplers whose update from sigma_i to sigma_i+1 depends on nothing but x, the model and fresh noise, so that
# taking a guided step as its own sampler run (self-recurrence) is exactly that step. Multistep samplers (a
# history of earlier steps: lms, dpmpp_2m(_sde), dpmpp_3m_sde, uni_pc, deis, ipndm, res_multistep, ...), those
# that plan their own schedule over the whole run (dpm_fast, dpm_adaptive, heunpp2's order by distance to the
# end) and samplers of other packs would silently lose accuracy: their re-taken steps are taken by euler.
STEPWISE_SAMPLERS = frozenset(f"sample_{name}" for name in (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "euler_ancestral_RF", "heun", "dpm_2",
    "dpm_2_ancestral", "dpm_2_ancestral_RF", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_2s_ancestral_RF", "dpmpp_sde", "dpmpp_sde_gpu", "ddpm", "lcm"))


def _euler_executor(executor):
    """The rest of the host's SAMPLER_SAMPLE wrapper chain after ours, ending in euler's sample instead of the
    sampler's own."""
    import comfy.patcher_extension
    import comfy.samplers

    euler = comfy.samplers.sampler_object("euler")
    return comfy.patcher_extension.WrapperExecutor.new_class_executor(euler.sample, euler, executor.wrappers,
                                                                      executor.idx)


def sampler_function_name(sampler) -> str:
    """The sampling function of a host sampler object (comfy.samplers.KSAMPLER): 'sample_euler', 'sample_unipc'."""
    fn = getattr(sampler, "sampler_function", None)
    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    return getattr(fn, "__name__", None) or type(sampler).__name__


def positive_conds(guider):
    """(cond dict, context [B, T, C]) of each positive the host prepared for this sampling run."""
    for cond in (getattr(guider, "conds", None) or {}).get("positive", []):
        mc = cond.get("model_conds", {}).get("c_crossattn") if isinstance(cond, dict) else None
        ctx = getattr(mc, "cond", None)
        if isinstance(ctx, torch.Tensor) and ctx.ndim == 3:
            yield cond, ctx


def _flow_model(guider) -> bool:
    import comfy.model_sampling

    patcher = getattr(guider, "model_patcher", None)
    sampling = patcher.get_model_object("model_sampling") if patcher is not None else None
    return isinstance(sampling, comfy.model_sampling.CONST)


class Cones2Sampler:
    """SAMPLER_SAMPLE wrapper: fresh attention recording per run; self-recurrence on guided steps."""

    def __init__(self, specs):
        self.specs = tuple(specs)

    def __call__(self, executor, guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                 disable_pbar):
        recordings = [start_recording(spec.uid) for spec in self.specs]
        areas = self._areas(guider, latent_image if latent_image is not None else noise)
        if areas:  # tell the model calls which part of the image each area prompt sees
            options = dict(extra_args.get("model_options") or {})
            options["transformer_options"] = {**options.get("transformer_options", {}), AREAS_KEY: areas}
            extra_args = {**extra_args, "model_options": options}
        out = self._sample(executor, guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                           disable_pbar)
        unused = [s for s, rec in zip(self.specs, recordings, strict=True) if rec.calls == 0]
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
        for cond, ctx in positive_conds(guider):
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
        contexts = [row for _cond, ctx in positive_conds(guider) for row in ctx]
        return [s for s in wanted if any(s.match(ctx) is not None for ctx in contexts)]

    def _sample(self, executor, guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                disable_pbar):
        rec_specs = self._recurrent_specs(guider)
        n = len(sigmas) - 1
        guided = [any(in_window(float(sigmas[i]), s.sigma_start, max(s.sigma_end, s.recurrence_sigma_end))
                      for s in rec_specs) for i in range(n)]
        if not any(guided):
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        if denoise_mask is not None:
            warn("Cones2 Layout Guidance: self-recurrence is skipped with an inpainting mask; sampling with guidance "
                 "but without self-recurrence")
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        if _flow_model(guider):
            warn("Cones2 Layout Guidance: self-recurrence is not available on flow models (Flux): re-noising back to "
                 "the first step's t = 1 would discard the sample; sampling with guidance but without "
                 "self-recurrence. Turn self_recurrence off to silence this")
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        name = sampler_function_name(getattr(executor, "class_obj", None))  # the executor runs sampler.sample
        retake = executor  # runs the re-taken (guided, repeated) steps
        if name not in STEPWISE_SAMPLERS:
            # A history or a schedule of its own across steps: re-taking one step of it alone would break it. The
            # re-taken steps (and any single step between them) are taken by euler instead, the first-order step
            # these samplers start a run with (dpmpp_2m's first step is euler's, bit for bit up to rounding); the
            # sampler takes every longer stretch of steps as its own run (its history starts anew there).
            retake = _euler_executor(executor)
            log.info("Cones2 Layout Guidance: self-recurrence with the sampler '%s': its re-taken steps are euler "
                     "steps, the other steps are its own", name.removeprefix("sample_").removesuffix("_function"))
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
                run = retake if reps > 1 or stop - start == 1 else executor  # one step alone: first order
                if x is None:
                    x = run(guider, seg, args, cb, noise, latent_image, None, disable_pbar)
                else:
                    x = run(guider, seg, args, cb, torch.zeros_like(x), x, None, disable_pbar)
                done += stop - start
                if r + 1 < reps:  # re-noise back to sigma_start of the step and take it again
                    eps = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x)
                    x = x + renoise_scale(float(sigmas[start]), float(sigmas[stop])) * eps
        return x
