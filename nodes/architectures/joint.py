"""Shared machinery of the joint-attention (MMDiT) architectures: Flux, Chroma, SD3.5, Qwen-Image.

These models attend over one sequence ``[text tokens, image tokens, (reference tokens)]`` through the host's
``optimized_attention``, which passes ``transformer_options``; guidance goes in through the host's own hook for
that, a ``transformer_options["optimized_attention_override"]`` set per model call (the model's options are not
changed, and no host function is replaced):

* every attention call of the model computes the host's attention for the whole batch (so unguided rows, the
  uncond pass and other prompts are bit-identical to an unguided model), then recomputes the guided rows with the
  Cones 2 bias on image queries x the subject's text keys (``cones2_core.joint_attention``);
* the guided rows are computed exactly without an [L, L] mask (``guided_joint_attention``: torch's fused attention
  over the unbiased keys, merged by log-sum-exp with the subject's few biased text columns, which are found once per
  model call and kept for every block): no float mask moves the attention off its fastest kernel, and the memory
  stays near plain attention's (docs/benchmarks.md). The host's attention backend is used for every unguided row;
* another pack's override that was there first is kept inside ours (we call it where we would call the host); the
  guided rows then go through it too, with the bias as a dense float mask (``joint_bias``), because the exact path
  needs the attention's log-sum-exp, which the host's call does not return (``EXACT`` switches the exact path off).

The host calls attention in two layouts, both handled: ``[B, heads, L, d]`` with ``skip_reshape`` (Flux, Chroma)
and ``[B, L, heads * d]`` (SD3.5's MMDiT, Qwen-Image). Tokens after ``text + image`` (Flux Kontext's or
Qwen-Image-Edit's reference latents) are attended as the host does and never biased. An attention call whose
sequence is shorter than ``text + image`` (SD3.5-medium's image-only self-attention) is left to the host.

This is not an architecture (no ``ARCHITECTURE``): the family modules (``flux.py``, ...) subclass its
``JointArchitecture``.
"""

from __future__ import annotations

import functools

import torch

from ...cones2_core.joint_attention import (
    flow_sigma,
    guided_joint_attention,
    joint_bias,
    subject_columns,
    token_mass,
)
from .base import (
    Architecture,
    active_groups,
    guided_call,
    host_attention,
    record_maps,
    subject_token_lists,
    with_override,
)

GRID_KEY = "cones2_joint_grid"  # transformer_options of one model call: (text tokens, image rows, image columns)
# Whether the subject's text queries are confined to its region too (the transposed bias block): off, as measured
# on the Flux toy world (docs/flux.md); a module switch for that measurement, not a node input.
CONFINE_TEXT_QUERIES = False
EXACT = True  # guided rows by the exact mask-free path when no other pack's override sits inside ours (see above)


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
    or [B, L, heads, d] (SD3.5's MMDiT hands v unflattened), as the host's attention reads them (a view)."""
    if skip_reshape:
        return x
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


class Cones2JointAttention:
    """``optimized_attention_override`` of one model call: the host's attention for every row, the Cones 2 bias for
    the guided rows of the joint text+image attention. ``inner``: an override another pack set first."""

    def __init__(self, inner=None):
        self.inner = inner
        self._columns = {}  # the subject columns of each weight map, kept for every block of this model call

    def columns(self, wm, txt: int, n: int, tokens):
        key = (id(wm), txt, n, tokens)
        cols = self._columns.get(key)
        if cols is None:
            cols = self._columns[key] = (wm, subject_columns(wm, txt, n, tokens))  # wm kept: its id stays its own
        return cols[1]

    def __call__(self, func, *args, **kwargs):
        base, heads = host_attention(func, self.inner, args, kwargs)
        opts = kwargs.get("transformer_options") or {}
        groups = active_groups(opts)
        grid = opts.get(GRID_KEY)
        if not groups or grid is None or len(args) < 3 or heads is None:
            return base(*args, **kwargs)
        q, k, v = args[:3]
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
            return base(qs, ks, vs, *args[3:], **{**kwargs, "mask": m})

        def attend(g):
            rows, sig = g.tensors(q.device)
            wm = g.spec.weight_map(g.subjects, g.offsets, h, w, txt, q.device, g.window)
            whole = list(g.rows) == list(range(q.shape[0]))  # every row guided: no copy of q, k and v
            qs, ks, vs = (q, k, v) if whole else (q[rows], k[rows], v[rows])
            q4, k4 = as_heads(qs, int(heads), skip), as_heads(ks, int(heads), skip)
            host_mask = _rows_of(mask, rows, q.shape[0])
            gw = g.spec.guidance_weight
            if gw != 0 and EXACT and self.inner is None:
                return self.exact(g, q4, k4, as_heads(vs, int(heads), skip), wm, txt, n, h, w, flow_sigma(sig),
                                  host_mask, kwargs.get("skip_output_reshape", False))
            full, res = host_mask, None
            if gw != 0:
                bias = joint_bias(q4, k4, txt, n, wm, flow_sigma(sig), gw, text_queries=CONFINE_TEXT_QUERIES)
                full = bias if host_mask is None else bias + host_mask.float()
                res = call_masked(qs, ks, vs, full.to(q.dtype))
            record_maps(g, h, w, lambda tokens: token_mass(q4, k4, full, txt, n, tokens))
            return res

        # When every row is guided (CFG 1, Flux's usual) the host's call over the whole batch is skipped.
        return guided_call(groups, q.shape[0], lambda: base(*args, **kwargs), attend)

    def exact(self, g, q4, k4, v4, wm, txt, n, h, w, sigma, host_mask, skip_output_reshape):
        """The guided rows of ``g`` by the exact mask-free path, in the host's output layout ([B, L, heads*d], or
        [B, heads, L, d] with ``skip_output_reshape``), their maps recorded from the same softmax."""
        tokens = subject_token_lists(g) if g.spec.record else []
        cols = self.columns(wm, txt, n, tuple(sorted({t for ts in tokens for t in ts})))
        res = guided_joint_attention(q4, k4, v4, txt, n, cols, sigma, g.spec.guidance_weight, host_mask=host_mask,
                                     text_queries=CONFINE_TEXT_QUERIES, return_mass=bool(tokens))
        out, mass = res if tokens else (res, None)
        if tokens:
            where = {int(c): i for i, c in enumerate(cols.cols.tolist())}
            record_maps(g, h, w, lambda lists: torch.stack([mass[[where[t] for t in ts]].sum(0) if ts
                                                            else mass.new_zeros(n) for ts in lists]))
        return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def image_grid(x, patch_size: int) -> tuple[int, int]:
    """The image token grid (rows, columns) of a latent [B, C, (T,) H, W] patchified by ``patch_size`` (the host pads
    to a whole patch)."""
    return (x.shape[-2] + patch_size - 1) // patch_size, (x.shape[-1] + patch_size - 1) // patch_size


def per_call(specs, transformer_options, x=None, context=None, patch_size: int = 2):
    """APPLY_MODEL's per-call step: the grid of this call's image tokens (the joint sequence's text part is the
    context's rows) and our override (around any other)."""
    if x is None or context is None or x.dim() not in (4, 5):
        return transformer_options
    h, w = image_grid(x, patch_size)
    return with_override(transformer_options, Cones2JointAttention, GRID_KEY, (int(context.shape[1]), int(h), int(w)))


class JointArchitecture(Architecture):
    """What the joint-attention architectures share: the per-call step with the diffusion model's patch size.
    A family module subclasses it with its key, frozen model and variant checks."""

    attention = "joint attention"

    def per_call(self, model_patcher):
        dm = model_patcher.get_model_object("diffusion_model")
        return functools.partial(per_call, patch_size=int(dm.patch_size))
