"""Everything specific to the joint-attention (DiT) families (Flux) on the host side.

Flux attends over one sequence ``[text tokens, image tokens]`` in its double and single blocks, through the host's
``optimized_attention`` (``comfy/ldm/flux/math.py``). Guidance goes in through the host's own hook for that, a
``transformer_options["optimized_attention_override"]`` set per model call (the model's options are not changed,
and no host function is replaced):

* every attention call of the model computes the host's attention for the whole batch (so unguided rows, the
  uncond pass and other prompts are bit-identical to an unguided model), then recomputes the guided rows with the
  Cones 2 bias as a float mask on image queries x the subject's text keys (``cones2_core.joint_attention``);
* another pack's override that was there first is kept inside ours (we call it where we would call the host).

The formula, what replaces ``log(1 + sigma^2)`` for flow time, and what is not biased are documented in
``cones2_core/joint_attention.py``. ``nodes/unet.py`` is the UNet sibling.

The training section at the end is Train Residual's Flux part (fast mode): the flow-matching prediction type, the
guidance value and pooled vector the model is trained with, and the frozen transformer with checkpointed blocks.
"""

from __future__ import annotations

import functools

import torch

from ..cones2_core.errors import Cones2Error
from ..cones2_core.gradients import OutOfPlaceAdds
from ..cones2_core.joint_attention import flow_sigma, joint_bias, token_mass
from .guidance import CALL_KEY, GuidanceSpec, add_wrappers, check_new_prompt, specs_of, subject_tokens
from .recording import find_recording
from .unet import FrozenUNet

OVERRIDE_KEY = "optimized_attention_override"  # the host's key (comfy/ldm/modules/attention.py wrap_attn)
# Whether the subject's text queries are confined to its region too (the transposed bias block): off, as measured
# on the Flux toy world (docs/flux.md); a module switch for that measurement, not a node input.
CONFINE_TEXT_QUERIES = False
GRID_KEY = "cones2_joint_grid"  # transformer_options of one model call: (text tokens, image rows, image columns)


def handles(model_patcher) -> bool:
    """True for the host's joint-attention models this module guides (Flux and its variants)."""
    import comfy.model_base

    return isinstance(getattr(model_patcher, "model", None), comfy.model_base.Flux)


def _rows_of(mask, rows, batch):
    """The rows of an attention mask the host passed (any of its shapes), as [rows, 1 or heads, L, L]."""
    if mask is None:
        return None
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0) if m.dim() == 2 else m.unsqueeze(1)
    return m[rows] if m.shape[0] == batch and batch > 1 else m


class Cones2JointAttention:
    """``optimized_attention_override`` of one model call: the host's attention for every row, the Cones 2 bias for
    the guided rows of the joint text+image attention. ``inner``: an override another pack set first."""

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, func, *args, **kwargs):
        base = func if self.inner is None else functools.partial(self.inner, func)
        opts = kwargs.get("transformer_options") or {}
        groups = [g for g in opts.get(CALL_KEY) or () if g.spec.guidance_weight != 0 or g.spec.record]
        grid = opts.get(GRID_KEY)
        if not groups or grid is None or not kwargs.get("skip_reshape") or len(args) < 4 or args[0].dim() != 4:
            return base(*args, **kwargs)
        q, k, v, heads = args[:4]
        txt, h, w = grid
        n = h * w
        if q.shape[2] < txt + n:  # not the model's joint attention (a smaller sequence): leave it alone
            return base(*args, **kwargs)
        mask = kwargs.get("mask")
        biased = sum(len(g.rows) for g in groups if g.spec.guidance_weight != 0)
        # Unbiased rows (the uncond pass, other prompts, guidance_weight 0) take the host's call over the whole
        # batch, the very call an unguided model makes, so they stay bit-identical; when every row is guided (CFG
        # 1, Flux's usual) that call is skipped.
        out = base(*args, **kwargs) if biased < q.shape[0] else None
        written = False
        for g in groups:
            rows, sig = g.tensors(q.device)
            wm = g.spec.weight_map(g.subjects, g.offsets, h, w, txt, q.device, g.window)
            qs, ks, vs = q[rows], k[rows], v[rows]
            host_mask = _rows_of(mask, rows, q.shape[0])
            full = host_mask
            if g.spec.guidance_weight != 0:
                bias = joint_bias(qs, ks, txt, n, wm, flow_sigma(sig), g.spec.guidance_weight,
                                  text_queries=CONFINE_TEXT_QUERIES)
                full = bias if host_mask is None else bias + host_mask.float()
                res = base(qs, ks, vs, heads, *args[4:], **{**kwargs, "mask": full.to(q.dtype)})
                if out is None:
                    out = res.new_empty((q.shape[0], *res.shape[1:]))
                elif not written:
                    out = out.clone()
                written = True
                out[rows] = res.to(out.dtype)
            if g.spec.record:
                rec = find_recording(g.spec.uid)
                if rec is not None:
                    tokens = [subject_tokens(s, g.offsets) for s in g.subjects]
                    rec.add(h, w, token_mass(qs, ks, full, txt, n, tokens), g.subjects, g.window)
        return out


def per_call(specs, transformer_options, x=None, context=None, patch_size: int = 2):
    """APPLY_MODEL's per-call step: the grid of this call's image tokens and our override (around any other)."""
    if x is None or context is None or x.dim() != 4:
        return transformer_options
    h, w = (x.shape[-2] + patch_size // 2) // patch_size, (x.shape[-1] + patch_size // 2) // patch_size
    other = transformer_options.get(OVERRIDE_KEY)
    override = other if isinstance(other, Cones2JointAttention) else Cones2JointAttention(inner=other)
    return {**transformer_options, GRID_KEY: (int(context.shape[1]), int(h), int(w)), OVERRIDE_KEY: override}


def install(model_patcher, spec: GuidanceSpec):
    """A clone of ``model_patcher`` with the guidance of ``spec`` (and of earlier Layout Guidance nodes)."""
    if not handles(model_patcher):
        raise Cones2Error("this model is not a Flux model; Layout Guidance's joint-attention path supports Flux")
    dm = model_patcher.get_model_object("diffusion_model")
    if any(getattr(b, "flipped_img_txt", False) for b in getattr(dm, "double_blocks", [])):
        raise Cones2Error("this Flux-like model puts the image before the text in its attention; Layout Guidance "
                          "supports Flux's own block layout only")
    earlier = specs_of(model_patcher)
    check_new_prompt(earlier, spec)
    m = model_patcher.clone()
    add_wrappers(m, earlier + [spec], per_call=functools.partial(per_call, patch_size=int(dm.patch_size)))
    return m


# ---- training: the frozen Flux, its flow-matching sampling and conditioning -------------------------------------
# Train Residual's fast mode on Flux (train_loop.py): the loss is Flux's own flow matching as the host's model
# sampling defines it (CONST: x_t = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0, denoised = x_t -
# sigma v; the weight that turns denoised into the velocity MSE is in cones2_core.objective.x0_loss_weight), the
# noise levels are drawn uniformly from the host's sigmas table (ModelSamplingFlux: uniform t through its shift),
# and the model gets FluxGuidance's value and CLIP-L's pooled vector as it does when sampling.

def prediction_type(model) -> tuple[str, float, object]:
    """(``"flow"``, 1.0, the model_sampling object) of a Flux model; an error for any other sampling."""
    import comfy.model_sampling as ms_mod

    ms = model.get_model_object("model_sampling")
    if not handles(model) or not isinstance(ms, ms_mod.CONST):
        raise Cones2Error(f"this model ({type(model.model).__name__}, sampling {type(ms).__name__}) is not a Flux "
                          "flow-matching model; connect the MODEL of a Flux loader (Load Diffusion Model)")
    return "flow", 1.0, ms


def training_conds(model, pooled, settings, batch: int, device):
    """Flux's extra inputs for training, ``batch`` rows each: ``y`` = CLIP-L's pooled vector (as
    ``model_base.Flux.encode_adm`` makes it) and ``guidance`` = the distilled guidance value (FluxGuidance's;
    models without a guidance embedding, Flux schnell, ignore it)."""
    out = {"guidance": torch.full((batch,), float(settings.guidance), device=device)}
    if pooled is not None:
        y = model.model.encode_adm(pooled_output=pooled.float())
        out["y"] = y.to(device).reshape(1, -1).repeat(batch, 1)
    return out


class FrozenFlux(FrozenUNet):
    """The frozen Flux transformer for training (see FrozenUNet): a clone of the user's ModelPatcher loaded through
    the host's memory management, with gradient checkpointing of every double and single block from the start.

    Checkpointed, a block keeps only its inputs for backward (the image and text streams, 2 x 3072 channels per
    token) and recomputes the rest; that is what lets 57 blocks of 12 B parameters train on one card (docs/flux.md,
    Training, has the figures). For the same reason the host may load Flux partly (its lowvram
    mode streams the weights per op): the streamed copies live only while one block is recomputed."""

    full_load_on_gpu = False
    checkpoint_from_start = True

    def layers(self):
        dm = self.mp.model.diffusion_model
        return [*dm.double_blocks, *dm.single_blocks]

    def _checkpointed(self, bound):
        """The blocks add their residuals in place (``txt += ...``, ``x += ...``) into tensors they saved for
        backward, which autograd refuses: their training forwards (and recomputations) run under OutOfPlaceAdds."""
        def out_of_place(*args, **kwargs):
            with OutOfPlaceAdds():
                return bound(*args, **kwargs)

        return super()._checkpointed(out_of_place)


FrozenModel = FrozenFlux  # the name the trainer looks up in each architecture's module
