"""The video family Wan (2.1 and 2.2): Layout Guidance on its text cross-attention, per latent frame, and its
frozen transformer for training.

Every Wan block (``comfy/ldm/wan/model.py``, ``WanAttentionBlock``) has a self-attention over the video tokens and
a plain cross-attention from the video tokens to the umT5 text (``WanT2VCrossAttention``; ``WanI2VCrossAttention``
adds a second call to the clip-vision tokens), all through the host's ``optimized_attention`` in ``[B, L,
heads * d]`` with ``transformer_options``. Guidance goes in through the host's own per-call hook,
``transformer_options["optimized_attention_override"]``, set per model call (the model's options are not
changed, nothing of the host is replaced):

* the override recognises the text cross-attention call by its shapes: q holds this call's ``F * h * w`` video
  tokens and k the text's rows (the context's length). The self-attention (k as long as q) and image-to-video's
  clip-vision call (k of ``context_img_len`` tokens) are left to the host, unbiased;
* the host's attention is computed for the whole batch (the uncond pass and other prompts stay bit-identical),
  then the guided rows are recomputed with the Cones 2 bias of a UNet's cross-attention
  (``cones2_core.attention.guided_attention``: ``S + guidance_weight * W * log(1 + sigma'^2) * std(S)``, std over
  the whole sample's scores, all frames together), with ``sigma'`` the flow time's variance-exploding sigma
  (``joint_attention.flow_sigma``), as on Flux;
* ``W`` is per latent frame: the video tokens are ordered (frame, row, column), and the tokens of latent frame
  ``f`` get the weight map of the boxes at that frame's clip time (``cones2_core.video.latent_frame_time``; the
  pixel frames each latent frame covers are documented there).

One ambiguity is refused rather than guessed: a clip whose video tokens are exactly as many as the text's rows
(then the self-attention looks like the text call), with a message saying to change the frame count or size.
Wan 2.2's two experts (high- and low-noise MODELs) are two models: each takes its own Layout Guidance node.

The training section at the end is Train Residual's Wan part (fast mode): frames are trained as still images
(one latent frame each) through the frozen transformer with checkpointed blocks, against Wan's own flow loss.
"""

from __future__ import annotations

import functools

from ...cones2_core.attention import guided_attention
from ...cones2_core.errors import Cones2Error
from ...cones2_core.joint_attention import flow_sigma
from ..common import warn
from .base import (
    Architecture,
    FrozenModel,
    active_groups,
    guided_call,
    host_attention,
    record_maps,
    subject_token_lists,
    with_override,
)

GRID_KEY = "cones2_wan_grid"  # transformer_options of one model call: (text rows, frames, token rows, columns)


class Cones2WanCrossAttention:
    """``optimized_attention_override`` of one Wan model call: the host's attention for every call and row, the
    Cones 2 bias, per latent frame, for the guided rows of the text cross-attention. ``inner``: an override
    another pack set first (called where we would call the host)."""

    def __init__(self, inner=None):
        self.inner = inner
        self.warned = False

    def __call__(self, func, *args, **kwargs):
        base, heads = host_attention(func, self.inner, args, kwargs)  # Wan passes heads by keyword
        opts = kwargs.get("transformer_options") or {}
        groups = active_groups(opts)
        grid = opts.get(GRID_KEY)
        if not groups or grid is None or len(args) < 3 or heads is None or kwargs.get("skip_reshape"):
            return base(*args, **kwargs)
        q, k, v = args[:3]
        txt, frames, h, w = grid
        n = frames * h * w
        if q.dim() != 3 or k.dim() != 3 or k.shape[1] != txt or q.shape[1] == k.shape[1]:
            return base(*args, **kwargs)  # the self-attention, the clip-vision call: not ours
        if q.shape[1] != n:
            if not self.warned:  # reference tokens or frames added by another model input: said, not guessed
                self.warned = True
                warn("Cones2 Layout Guidance: this Wan call attends from %d tokens, not the latent's %d (%d frames "
                     "of %dx%d); its text attention is left unguided (reference latents or extra frames are not "
                     "supported)", q.shape[1], n, frames, h, w)
            return base(*args, **kwargs)
        heads = int(heads)

        def attend(g):
            rows, sig = g.tensors(q.device)
            wm = g.spec.weight_map(g.subjects, g.offsets, h, w, txt, q.device, g.window, frames=frames)
            call = (q[rows], k[rows], v[rows], heads, wm, flow_sigma(sig), g.spec.guidance_weight)
            if g.spec.record:
                res, mass = guided_attention(*call, token_mass=subject_token_lists(g))
                record_maps(g, h, w, lambda _tokens: mass, frames=frames)
            else:
                res = guided_attention(*call)
            return None if g.spec.guidance_weight == 0 else res

        return guided_call(groups, q.shape[0], lambda: base(*args, **kwargs), attend)


def video_grid(x, patch_size) -> tuple[int, int, int]:
    """(frames, token rows, token columns) of a latent [B, C, F, H, W] patchified by Wan's (t, h, w) patch (the
    host pads to a whole patch)."""
    pt, ph, pw = (int(p) for p in patch_size)
    f, hh, ww = x.shape[-3:]
    return (f + pt - 1) // pt, (hh + ph - 1) // ph, (ww + pw - 1) // pw


def per_call(specs, transformer_options, x=None, context=None, patch_size=(1, 2, 2)):
    """APPLY_MODEL's per-call step: this call's video grid and text rows, and our override (around any other)."""
    if x is None or context is None or x.dim() != 5:
        return transformer_options
    frames, h, w = video_grid(x, patch_size)
    txt = int(context.shape[1])
    if frames * h * w == txt:
        raise Cones2Error(f"this clip has {frames * h * w} video tokens ({frames} latent frames of {h}x{w}), as many "
                          f"as the prompt's {txt} text rows, so Wan's self-attention cannot be told from its text "
                          "attention; change the length by 4 frames or the size by 16 pixels")
    return with_override(transformer_options, Cones2WanCrossAttention, GRID_KEY, (txt, frames, h, w))


# ---- training: the frozen Wan -------------------------------------------------------------------------------
# Train Residual's fast mode on Wan (train_loop.py): each training image (a still, or a frame of a video given as an
# IMAGE batch) is VAE-encoded alone, one latent frame [C, 1, h, w]; the trainer keeps it as [C, h, w] and the model
# gets it back with its frame axis (``model_latent``). The loss is Wan's flow matching as the host's model sampling
# defines it (CONST, shifted), as on Flux.

class FrozenWan(FrozenModel):
    """The frozen Wan transformer for training (see base.FrozenModel), with gradient checkpointing of every block
    from the start (a 14 B model's activations would not fit otherwise); the host may load it partly."""

    full_load_on_gpu = False
    checkpoint_from_start = True

    def layers(self):
        return list(self.mp.model.diffusion_model.blocks)


# ---- the registry entry ------------------------------------------------------------------------------------------

class WanArchitecture(Architecture):
    key = "wan"
    attention = "cross-attention"
    frozen_model = FrozenWan

    def check_model(self, model_patcher) -> None:
        dm = model_patcher.get_model_object("diffusion_model")
        if not hasattr(dm, "blocks") or not all(hasattr(b, "cross_attn") for b in dm.blocks):
            raise Cones2Error("this Wan-like model has no cross-attention blocks that Layout Guidance knows; it "
                              "supports ComfyUI's own Wan 2.1 / 2.2 models")

    def per_call(self, model_patcher):
        dm = model_patcher.get_model_object("diffusion_model")
        return functools.partial(per_call, patch_size=tuple(dm.patch_size))

    def model_latent(self, x):
        """Training's still-image latents [B, C, h, w] as the video model takes them, one frame [B, C, 1, h, w]."""
        return x.unsqueeze(2)

    def from_model_latent(self, x):
        return x.squeeze(2)


ARCHITECTURE = WanArchitecture()
