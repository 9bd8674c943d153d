"""Shared machinery of the joint-attention (MMDiT) architectures: Flux, Chroma, SD3.5, Qwen-Image.

These models attend over one sequence ``[text tokens, image tokens, (reference tokens)]`` through the host's
``optimized_attention``, which passes ``transformer_options``; guidance goes in through the host's own hook for
that, a ``transformer_options["optimized_attention_override"]`` set per model call (the model's options are not
changed, and no host function is replaced):

* every attention call of the model computes the host's attention for the whole batch (so unguided rows, the
  uncond pass and other prompts are bit-identical to an unguided model), then recomputes the guided rows with the
  Cones 2 bias on image queries x the subject's text keys (``cones2_core.joint_attention``);
* another pack's override that was there first is kept inside ours (we call it where we would call the host).

The host calls attention in two layouts, both handled: ``[B, heads, L, d]`` with ``skip_reshape`` (Flux, Chroma)
and ``[B, L, heads * d]`` (SD3.5's MMDiT, Qwen-Image). Tokens after ``text + image`` (Flux Kontext's or
Qwen-Image-Edit's reference latents) are attended as the host does and never biased. An attention call whose
sequence is shorter than ``text + image`` (SD3.5-medium's image-only self-attention) is left to the host.

This is not an architecture (no ``ARCHITECTURE``): the family modules (``flux.py``, ...) use it.
"""

from __future__ import annotations

import functools

from ...cones2_core.joint_attention import flow_sigma, joint_bias, token_mass
from .base import active_groups, guided_call, record_maps

OVERRIDE_KEY = "optimized_attention_override"  # the host's key (comfy/ldm/modules/attention.py wrap_attn)
GRID_KEY = "cones2_joint_grid"  # transformer_options of one model call: (text tokens, image rows, image columns)
# Whether the subject's text queries are confined to its region too (the transposed bias block): off, as measured
# on the Flux toy world (docs/flux.md); a module switch for that measurement, not a node input.
CONFINE_TEXT_QUERIES = False


def _rows_of(mask, rows, batch):
    """The rows of an attention mask the host passed (any of its shapes), as [rows, 1 or heads, L, L]."""
    if mask is None:
        return None
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0) if m.dim() == 2 else m.unsqueeze(1)
    return m[rows] if m.shape[0] == batch and batch > 1 else m


def as_heads(x, heads: int, skip_reshape: bool):
    """q, k or v as the core takes them, [B, heads, L, d]: as given with ``skip_reshape``, else from [B, L, heads*d]
    (a view)."""
    if skip_reshape:
        return x
    b, length, c = x.shape
    return x.view(b, length, heads, c // heads).transpose(1, 2)


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
        if not groups or grid is None or len(args) < 4:
            return base(*args, **kwargs)
        q, k, v, heads = args[:4]
        skip = bool(kwargs.get("skip_reshape"))
        if q.dim() != (4 if skip else 3) or q.shape != k.shape:
            return base(*args, **kwargs)
        txt, h, w = grid
        n = h * w
        if q.shape[2 if skip else 1] < txt + n:  # not the model's joint attention (a shorter sequence): leave it
            return base(*args, **kwargs)
        # The host passes the mask by keyword (Flux) or fifth by position (Qwen-Image's optimized_attention_masked);
        # ours goes where the host's was.
        positional = len(args) > 4
        mask = args[4] if positional else kwargs.get("mask")

        def call_masked(qs, ks, vs, m):
            if positional:
                return base(qs, ks, vs, args[3], m, *args[5:], **kwargs)
            return base(qs, ks, vs, args[3], *args[4:], **{**kwargs, "mask": m})

        def attend(g):
            rows, sig = g.tensors(q.device)
            wm = g.spec.weight_map(g.subjects, g.offsets, h, w, txt, q.device, g.window)
            qs, ks, vs = q[rows], k[rows], v[rows]
            q4, k4 = as_heads(qs, int(heads), skip), as_heads(ks, int(heads), skip)
            host_mask = _rows_of(mask, rows, q.shape[0])
            full, res = host_mask, None
            if g.spec.guidance_weight != 0:
                bias = joint_bias(q4, k4, txt, n, wm, flow_sigma(sig), g.spec.guidance_weight,
                                  text_queries=CONFINE_TEXT_QUERIES)
                full = bias if host_mask is None else bias + host_mask.float()
                res = call_masked(qs, ks, vs, full.to(q.dtype))
            record_maps(g, h, w, lambda tokens: token_mass(q4, k4, full, txt, n, tokens))
            return res

        # When every row is guided (CFG 1, Flux's usual) the host's call over the whole batch is skipped.
        return guided_call(groups, q.shape[0], lambda: base(*args, **kwargs), attend)


def image_grid(x, patch_size: int) -> tuple[int, int]:
    """The image token grid (rows, columns) of a latent [B, C, (T,) H, W] patchified by ``patch_size`` (the host pads
    to a whole patch)."""
    return (x.shape[-2] + patch_size - 1) // patch_size, (x.shape[-1] + patch_size - 1) // patch_size


def per_call(specs, transformer_options, x=None, context=None, patch_size: int = 2, text_length=None):
    """APPLY_MODEL's per-call step: the grid of this call's image tokens and our override (around any other).
    ``text_length(context)``: the joint sequence's text tokens (default: the context's rows)."""
    if x is None or context is None or x.dim() not in (4, 5):
        return transformer_options
    h, w = image_grid(x, patch_size)
    txt = int(context.shape[1]) if text_length is None else int(text_length(context))
    other = transformer_options.get(OVERRIDE_KEY)
    override = other if isinstance(other, Cones2JointAttention) else Cones2JointAttention(inner=other)
    return {**transformer_options, GRID_KEY: (txt, int(h), int(w)), OVERRIDE_KEY: override}
