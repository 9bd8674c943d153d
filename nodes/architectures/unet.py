"""The UNet families (SD1.5, SD2.x, SDXL): Layout Guidance on their cross-attention, and their frozen UNet for
training.

* Guidance: an ``attn2`` replace patch on every cross-attention block computes the host's own attention for the
  whole batch (so unguided rows are bit-identical to an unpatched model) and recomputes the rows of the guided
  conditioning with the Cones 2 bias (``cones2_core.attention.guided_attention``), following the shared skeleton
  (``base.guided_call``); block discovery.
* Training: which layers of the UNet are checkpointed (``FrozenUNet``). Its prediction type and extra inputs
  (SDXL's size conditioning) come from the shared contract (``base.Architecture``).
"""

from __future__ import annotations

from ...cones2_core.attention import guided_attention
from ...cones2_core.errors import Cones2Error
from .base import Architecture, FrozenModel, active_groups, guided_call, record_maps, subject_token_lists

# ---- the guided cross-attention ------------------------------------------------------------------------------

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
        groups = active_groups(extra_options)
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
        biased = any(g.spec.guidance_weight != 0 for g in groups)
        added = []  # another pack's term on the guided rows: its output minus the host's attention of this call

        def whole():
            # The block's own output over the whole batch. (The host's attention of a sub-batch rounds differently:
            # computing only the unbiased rows saved the guided rows' second computation but changed SD2.x's uncond
            # pass in the last bits.) Another pack's replacement also expects the whole batch (it splits it by
            # cond_or_uncond).
            out = self._base(q, k, v, extra_options)
            if self.inner is not None and biased:
                added.append(out - self._host(q, k, v, extra_options))
            return out

        def attend(g):
            rows, sig = g.tensors(q.device)
            wm = g.spec.weight_map(g.subjects, g.offsets, h, w, t, q.device, g.window)
            args = (q[rows], k[rows], v[rows], heads, wm, sig, g.spec.guidance_weight)
            if g.spec.record:  # the subjects' attention mass per pixel, for the maps, from the same pass
                res, mass = guided_attention(*args, token_mass=subject_token_lists(g))
                record_maps(g, h, w, lambda _tokens: mass)
            else:
                res = guided_attention(*args)
            if g.spec.guidance_weight == 0:  # the rows keep the block's output; only the maps are read
                return None
            return res if not added else res.to(added[0].dtype) + added[0][rows]

        return guided_call(groups, q.shape[0], whole, attend, whole_always=self.inner is not None)


def wrap_later_patches(specs, transformer_options, **_call):
    """A cross-attention replacement another node installed after Layout Guidance took our place at its block:
    for this call (a per-call override, the model is untouched) ours runs again with theirs inside. Called by the
    APPLY_MODEL wrapper on every model call."""
    replaced = transformer_options.get("patches_replace", {}).get("attn2", {})
    later = {key: patch for key, patch in replaced.items() if not isinstance(patch, Cones2CrossAttention)}
    if not later:
        return transformer_options
    attn2 = {**replaced, **{key: Cones2CrossAttention(specs, inner=patch) for key, patch in later.items()}}
    patches_replace = {**transformer_options["patches_replace"], "attn2": attn2}
    return {**transformer_options, "patches_replace": patches_replace}


# ---- the UNet's cross-attention blocks ------------------------------------------------------------------

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


def _attn2_replacements(model_patcher) -> dict:
    return model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})


# ---- training: the frozen UNet --------------------------------------------------------------------------------

class FrozenUNet(FrozenModel):
    """The frozen UNet for training (see FrozenModel), loaded whole on a GPU. Checkpointing wraps the UNet's layers
    with parameters (the ResBlocks, transformers and resamplers inside its input, middle and output blocks): the
    host runs a block by calling its layers one by one (``forward_timestep_embed``), so the layers are what gets
    wrapped."""

    def layers(self) -> list:
        dm = self.mp.model.diffusion_model
        blocks = [*getattr(dm, "input_blocks", []), *getattr(dm, "output_blocks", [])]
        if getattr(dm, "middle_block", None) is not None:
            blocks.append(dm.middle_block)
        return [layer for block in blocks for layer in block if next(layer.parameters(), None) is not None]


# ---- the registry entry -----------------------------------------------------------------------------------------

class UNetArchitecture(Architecture):
    key = "unet"
    attention = "cross-attention"
    frozen_model = FrozenUNet

    def patch(self, model_patcher, specs) -> None:
        """An attn2 replace patch on every cross-attention block; another pack's replacement there is kept inside
        ours (and one installed later is wrapped per call, ``wrap_later_patches``)."""
        replaced = _attn2_replacements(model_patcher)
        for block, index, tindex in cross_attention_blocks(model_patcher):
            other = replaced.get((block, index, tindex))
            inner = other.inner if isinstance(other, Cones2CrossAttention) else other
            model_patcher.set_model_attn2_replace(Cones2CrossAttention(specs, inner), block, index, tindex)

    def per_call(self, model_patcher):
        return wrap_later_patches


ARCHITECTURE = UNetArchitecture()
