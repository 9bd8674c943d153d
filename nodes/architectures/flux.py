"""The joint-attention (DiT) family Flux: Layout Guidance on its joint attention, and its frozen transformer for
training.

Flux attends over one sequence ``[text tokens, image tokens]`` in its double and single blocks, through the host's
``optimized_attention`` (``comfy/ldm/flux/math.py``). Guidance goes in through the host's own hook for that, a
``transformer_options["optimized_attention_override"]`` set per model call (the model's options are not changed,
and no host function is replaced):

* every attention call of the model computes the host's attention for the whole batch (so unguided rows, the
  uncond pass and other prompts are bit-identical to an unguided model), then recomputes the guided rows with the
  Cones 2 bias as a float mask on image queries x the subject's text keys (``cones2_core.joint_attention``);
* another pack's override that was there first is kept inside ours (we call it where we would call the host).

The formula, what replaces ``log(1 + sigma^2)`` for flow time, and what is not biased are documented in
``cones2_core/joint_attention.py``. The guided call follows the shared skeleton (``base.guided_call``).

The training section at the end is Train Residual's Flux part (fast mode): the frozen transformer with
checkpointed blocks. Its flow-matching prediction type and its extra inputs (the distilled guidance value and the
pooled vector) come from the shared contract (``base.Architecture``: the host's ``model_sampling`` and
``extra_conds``).
"""

from __future__ import annotations

import functools

from ...cones2_core.errors import Cones2Error
from ...cones2_core.joint_attention import flow_sigma, joint_bias, token_mass
from .base import Architecture, FrozenModel, active_groups, guided_call, record_maps

OVERRIDE_KEY = "optimized_attention_override"  # the host's key (comfy/ldm/modules/attention.py wrap_attn)
# Whether the subject's text queries are confined to its region too (the transposed bias block): off, as measured
# on the Flux toy world (docs/flux.md); a module switch for that measurement, not a node input.
CONFINE_TEXT_QUERIES = False
GRID_KEY = "cones2_joint_grid"  # transformer_options of one model call: (text tokens, image rows, image columns)


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
        groups = active_groups(opts)
        grid = opts.get(GRID_KEY)
        if not groups or grid is None or not kwargs.get("skip_reshape") or len(args) < 4 or args[0].dim() != 4:
            return base(*args, **kwargs)
        q, k, v, heads = args[:4]
        txt, h, w = grid
        n = h * w
        if q.shape[2] < txt + n:  # not the model's joint attention (a smaller sequence): leave it alone
            return base(*args, **kwargs)
        mask = kwargs.get("mask")

        def attend(g):
            rows, sig = g.tensors(q.device)
            wm = g.spec.weight_map(g.subjects, g.offsets, h, w, txt, q.device, g.window)
            qs, ks, vs = q[rows], k[rows], v[rows]
            host_mask = _rows_of(mask, rows, q.shape[0])
            full, res = host_mask, None
            if g.spec.guidance_weight != 0:
                bias = joint_bias(qs, ks, txt, n, wm, flow_sigma(sig), g.spec.guidance_weight,
                                  text_queries=CONFINE_TEXT_QUERIES)
                full = bias if host_mask is None else bias + host_mask.float()
                res = base(qs, ks, vs, heads, *args[4:], **{**kwargs, "mask": full.to(q.dtype)})
            record_maps(g, h, w, lambda tokens: token_mass(qs, ks, full, txt, n, tokens))
            return res

        # When every row is guided (CFG 1, Flux's usual) the host's call over the whole batch is skipped.
        return guided_call(groups, q.shape[0], lambda: base(*args, **kwargs), attend)


def per_call(specs, transformer_options, x=None, context=None, patch_size: int = 2):
    """APPLY_MODEL's per-call step: the grid of this call's image tokens and our override (around any other)."""
    if x is None or context is None or x.dim() != 4:
        return transformer_options
    h, w = (x.shape[-2] + patch_size // 2) // patch_size, (x.shape[-1] + patch_size // 2) // patch_size
    other = transformer_options.get(OVERRIDE_KEY)
    override = other if isinstance(other, Cones2JointAttention) else Cones2JointAttention(inner=other)
    return {**transformer_options, GRID_KEY: (int(context.shape[1]), int(h), int(w)), OVERRIDE_KEY: override}


# ---- training: the frozen Flux, its flow-matching sampling and conditioning -------------------------------------
# Train Residual's fast mode on Flux (train_loop.py): the loss is Flux's own flow matching as the host's model
# sampling defines it (CONST: x_t = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0, denoised = x_t -
# sigma v; the weight that turns denoised into the velocity MSE is in cones2_core.objective.x0_loss_weight), the
# noise levels are drawn uniformly from the host's sigmas table (ModelSamplingFlux: uniform t through its shift),
# and the model gets FluxGuidance's value and CLIP-L's pooled vector as it does when sampling.

class FrozenFlux(FrozenModel):
    """The frozen Flux transformer for training (see base.FrozenModel): a clone of the user's ModelPatcher loaded through
    the host's memory management, with gradient checkpointing of every double and single block from the start. The
    blocks add their residuals in place (``txt += ...``, ``x += ...``) into tensors they saved for backward, which
    autograd refuses: their training forwards (and recomputations) run under OutOfPlaceAdds.

    Checkpointed, a block keeps only its inputs for backward (the image and text streams, 2 x 3072 channels per
    token) and recomputes the rest; that is what lets 57 blocks of 12 B parameters train on one card (docs/flux.md,
    Training, has the figures). For the same reason the host may load Flux partly (its lowvram
    mode streams the weights per op): the streamed copies live only while one block is recomputed."""

    full_load_on_gpu = False
    checkpoint_from_start = True
    out_of_place_adds = True

    def layers(self):
        dm = self.mp.model.diffusion_model
        return [*dm.double_blocks, *dm.single_blocks]


# ---- the registry entry ------------------------------------------------------------------------------------------

class FluxArchitecture(Architecture):
    key = "flux"
    attention = "joint attention"
    frozen_model = FrozenFlux

    def check_model(self, model_patcher) -> None:
        dm = model_patcher.get_model_object("diffusion_model")
        if any(getattr(b, "flipped_img_txt", False) for b in getattr(dm, "double_blocks", [])):
            raise Cones2Error("this Flux-like model puts the image before the text in its attention; Layout Guidance "
                              "supports Flux's own block layout only")

    def per_call(self, model_patcher):
        dm = model_patcher.get_model_object("diffusion_model")
        return functools.partial(per_call, patch_size=int(dm.patch_size))


ARCHITECTURE = FluxArchitecture()
