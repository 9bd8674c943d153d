"""Everything specific to the UNet families (SD1.5, SD2.x, SDXL) on the host side.

* Guidance: an ``attn2`` replace patch on every cross-attention block computes the host's own attention for the
  whole batch (so unguided rows are bit-identical to an unpatched model) and recomputes the rows of the guided
  conditioning with the Cones 2 bias (``cones2_core.attention.guided_attention``); block discovery; installing it
  on a clone.
* Training: the frozen UNet the trainer runs through the host's memory management (gradient checkpointing of
  its layers), its prediction type (eps / v) and SDXL's size conditioning.

A DiT family (Flux) gets a sibling module with the same jobs; the family table (``cones2_core/families.py``)
names each family's architecture.
"""

from __future__ import annotations

import torch

from ..cones2_core.attention import guided_attention
from ..cones2_core.errors import Cones2Error
from .guidance import CALL_KEY, GuidanceSpec, add_wrappers, check_new_prompt, specs_of, subject_tokens
from .recording import find_recording

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
            out = self._base(q, k, v, extra_options)
            if biased_rows:  # rows of it are overwritten below
                out = out.clone()
                if self.inner is not None:
                    added = out - self._host(q, k, v, extra_options)  # the other pack's term, kept on guided rows
        else:
            out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
        for g in groups:
            rows, sig = g.tensors(q.device)
            wm = g.spec.weight_map(g.subjects, g.offsets, h, w, t, q.device, g.window)
            args = (q[rows], k[rows], v[rows], heads, wm, sig, g.spec.guidance_weight)
            if g.spec.record:  # the subjects' attention mass per pixel, for the maps
                res, mass = guided_attention(*args, token_mass=[subject_tokens(s, g.offsets) for s in g.subjects])
                rec = find_recording(g.spec.uid)
                if rec is not None:
                    rec.add(h, w, mass, g.subjects, g.window)
            else:
                res = guided_attention(*args)
            if g.spec.guidance_weight != 0:  # at weight 0 the rows keep the host's output; only the maps are read
                out[rows] = res.to(out.dtype) if added is None else res.to(out.dtype) + added[rows]
        return out


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


def _attn2_replacements(model_patcher) -> dict:
    return model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})


def install(model_patcher, spec: GuidanceSpec):
    """A clone of ``model_patcher`` with the guidance of ``spec`` (and of earlier Layout Guidance nodes)."""
    earlier = specs_of(model_patcher)
    check_new_prompt(earlier, spec)
    specs = earlier + [spec]
    m = model_patcher.clone()
    replaced = _attn2_replacements(m)
    for block, index, tindex in cross_attention_blocks(m):
        other = replaced.get((block, index, tindex))  # another pack's replacement here is kept inside ours
        inner = other.inner if isinstance(other, Cones2CrossAttention) else other
        m.set_model_attn2_replace(Cones2CrossAttention(specs, inner), block, index, tindex)
    add_wrappers(m, specs, per_call=wrap_later_patches)
    return m


# ---- training: the frozen UNet, its prediction type and conditioning -----------------------------------------

def prediction_type(model) -> tuple[str, float, object]:
    """(``"eps"`` or ``"v"``, sigma_data, the model_sampling object) of the host's model; an error for any other
    kind of sampling."""
    import comfy.model_sampling as ms_mod

    ms = model.get_model_object("model_sampling")
    if isinstance(ms, ms_mod.EDM) or isinstance(ms, ms_mod.X0) or not isinstance(ms, ms_mod.EPS):
        raise Cones2Error(f"this model's sampling ({type(ms).__name__}) is neither eps- nor v-prediction; Cones 2 "
                          "training supports SD1.5, SD2.x and SDXL checkpoints")
    kind = "v" if isinstance(ms, ms_mod.V_PREDICTION) else "eps"
    return kind, float(getattr(ms, "sigma_data", 1.0)), ms


def training_adm(model, pooled, resolution: int, batch: int, device: torch.device) -> torch.Tensor | None:
    """SDXL's ``y`` (pooled text + size embeddings of a ``resolution`` square crop) from the frozen pooled output,
    repeated ``batch`` times; None for SD1.5/SD2.x (the model has no ADM input)."""
    if pooled is None:
        return None
    y = model.model.encode_adm(pooled_output=pooled.float(), width=resolution, height=resolution, crop_w=0,
                               crop_h=0, target_width=resolution, target_height=resolution, device=device)
    return None if y is None else y.to(device).repeat(batch, 1)


def training_conds(model, pooled, settings, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The model's extra inputs for training, each with ``batch`` rows: SDXL's ``y``, nothing for SD1.5/SD2.x.
    (The DiT sibling is ``nodes/dit.py``'s.)"""
    y = training_adm(model, pooled, settings.resolution, batch, device)
    return {} if y is None else {"y": y}


def sdpa_attention(func, q, k, v, heads, *args, **kwargs):
    """Training uses torch's scaled_dot_product_attention (fast forward and backward) whatever attention the
    host picked for sampling (on CPU it picks sub-quadratic attention, whose backward is slow)."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(q, k, v, heads, *args, **kwargs)  # kwargs carry the wrapper's re-entry flag


class FrozenUNet:
    """A clone of the user's ModelPatcher, loaded through the host's memory management, as a context manager.

    Its forward must run under ``frozen`` (a GradientFreeWeights mode), which hands every op gradient-free
    aliases of the weights, so backward reaches the context only and nothing is copied. ``checkpoint_layers()``
    switches on gradient checkpointing of the UNet's layers (the ResBlocks, transformers and resamplers inside
    its input, middle and output blocks): their forwards are wrapped until exit, then restored. The host runs a
    block by calling its layers one by one (``forward_timestep_embed``), so the layers are what gets wrapped.

    Subclasses (``nodes/dit.py``'s FrozenFlux) name their own ``layers()`` and loading policy."""

    # On a GPU the whole UNet is loaded: partly loaded weights are streamed as per-op copies, which autograd
    # would keep for backward (all of them, without checkpointing).
    full_load_on_gpu = True
    checkpoint_from_start = False

    def __init__(self, model, device: torch.device, frozen: torch.overrides.TorchFunctionMode):
        self.model, self.device, self.frozen = model, device, frozen
        self.mp = None
        self.checkpointing = False
        self._patched: list = []

    def __enter__(self) -> FrozenUNet:
        import comfy.model_management as mm

        self.mp = self.model.clone()
        mm.load_models_gpu([self.mp], force_full_load=self.full_load_on_gpu and self.device.type != "cpu")
        if self.checkpoint_from_start:
            self.checkpoint_layers()
        return self

    def layers(self) -> list[torch.nn.Module]:
        """The UNet's layers with parameters, inside its input, middle and output blocks (what gets checkpointed)."""
        dm = self.mp.model.diffusion_model
        blocks = [*getattr(dm, "input_blocks", []), *getattr(dm, "output_blocks", [])]
        if getattr(dm, "middle_block", None) is not None:
            blocks.append(dm.middle_block)
        return [layer for block in blocks for layer in block if next(layer.parameters(), None) is not None]

    def checkpoint_layers(self) -> None:
        if self.checkpointing:
            return
        for layer in self.layers():
            self._patched.append((layer, layer.__dict__.get("forward")))
            layer.forward = self._checkpointed(layer.forward)
        self.checkpointing = True

    def _checkpointed(self, bound):
        frozen = self.frozen

        def run(*args, **kwargs):
            with frozen:  # the recomputation in backward runs outside the training forward's mode
                return bound(*args, **kwargs)

        def forward(*args, **kwargs):
            # The host updates transformer_options (block indices) as the forward goes on: the recomputation
            # must see the dict as it was at this call, not as it is at backward time.
            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

        return forward

    def __exit__(self, *exc) -> None:
        for module, original in reversed(self._patched):
            if original is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = original
        self._patched.clear()
        self.checkpointing = False


FrozenModel = FrozenUNet  # the name the trainer looks up in each architecture's module (nodes/dit.py: FrozenFlux)
