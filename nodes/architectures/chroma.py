"""The joint-attention family Chroma: Layout Guidance on its joint attention, and its frozen transformer for
training.

Chroma is Flux-derived (``comfy/ldm/chroma/``): the same ``[text tokens, image tokens]`` joint attention in its
double and single blocks, reached through the host's ``comfy.ldm.flux.math.attention`` (``[B, heads, L, d]`` with
``skip_reshape``, ``transformer_options`` passed on), so guidance is the shared joint-attention override
(``joint.py``) with Chroma's patch size. What differs from Flux is outside the attention: T5-XXL alone (no pooled
CLIP), its modulation vectors come from an approximator network instead of per-block modulation layers, and it
has no distilled guidance input (real CFG). The host passes Chroma's attention mask (``attention_mask`` of the
conditioning, e.g. StyleModelApply's attention bias) to every block; the override adds it to the guided rows' bias
as it does on Flux. ComfyUI 0.3.64's Chroma text encoder pads nothing and returns no mask, so in the usual graph
there is none.

Chroma Radiance (pixel space: 16 x 16 pixel patches, a NeRF-style head) is a subclass of the host's Chroma config
and is refused by both nodes with a message (not measured here).

Training (fast mode) runs the frozen transformer with every block checkpointed, as on Flux. Chroma's blocks add
their residuals in place with ``addcmul_`` (``img.addcmul_(gate, ...)``, ``x.addcmul_(...)``), whose result they
drop, so Flux's out-of-place ``+=`` cannot be used; instead each checkpointed block gets private copies of its
tensor inputs and its layer norms get a copy of theirs (``InPlaceSafe``), so the in-place adds touch nothing that
autograd saved.
"""

from __future__ import annotations

import torch

from ...cones2_core.errors import Cones2Error
from .base import FrozenModel
from .joint import JointArchitecture


def radiance(model_patcher) -> bool:
    """Whether the MODEL is Chroma Radiance (the host's pixel-space Chroma)."""
    import comfy.supported_models

    cls = getattr(comfy.supported_models, "ChromaRadiance", None)
    config = getattr(getattr(model_patcher, "model", None), "model_config", None)
    return cls is not None and isinstance(config, cls)


# ---- training: the frozen Chroma -----------------------------------------------------------------------------

class InPlaceSafe(torch.overrides.TorchFunctionMode):
    """While active, ``layer_norm`` gets a copy of an input that autograd tracks. Chroma's blocks normalise a stream
    and later add into that very tensor in place (``img.addcmul_(gate, ...)``); layer norm saves its input for
    backward, so without the copy autograd refuses the in-place add (or, under checkpointing, would recompute from
    the changed tensor). The copies are one token stream each and live while one block runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.layer_norm and args and isinstance(args[0], torch.Tensor) \
                and args[0].requires_grad:
            args = (args[0].clone(), *args[1:])
        return func(*args, **kwargs)


def _private_inputs(forward):
    """``forward`` on copies of its tensor arguments: a block that adds into its input in place must not change
    the checkpoint's saved input (its recomputation starts from it), nor make an input that needed no gradient
    need one (the first block's image stream: the recomputation would then record a different graph)."""

    def run(*args, **kwargs):
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with InPlaceSafe():
            return forward(*args, **kwargs)

    return run


class FrozenChroma(FrozenModel):
    """The frozen Chroma transformer for training (see base.FrozenModel and FrozenFlux): every double and single
    block checkpointed from the start, partial loading allowed; each block's training forward (and recomputation)
    runs on private copies of its inputs with ``InPlaceSafe``, because Chroma adds into its streams in place."""

    full_load_on_gpu = False
    checkpoint_from_start = True

    def layers(self):
        dm = self.mp.model.diffusion_model
        return [*dm.double_blocks, *dm.single_blocks]

    def _checkpointed(self, bound):
        return super()._checkpointed(_private_inputs(bound))


# ---- the registry entry ------------------------------------------------------------------------------------------

class ChromaArchitecture(JointArchitecture):
    key = "chroma"
    frozen_model = FrozenChroma

    def check_model(self, model_patcher) -> None:
        if radiance(model_patcher):
            raise Cones2Error("this is Chroma Radiance (pixel space), which Cones 2 does not support yet; connect a "
                              "Chroma model (Load Diffusion Model with a Chroma file)")
        dm = model_patcher.get_model_object("diffusion_model")
        if any(getattr(b, "flipped_img_txt", False) for b in getattr(dm, "double_blocks", [])):
            raise Cones2Error("this Chroma-like model puts the image before the text in its attention; Layout "
                              "Guidance supports Chroma's own block layout only")

    def prediction_type(self, model, family):
        self.check_model(model)  # Train Residual: Chroma Radiance is refused here too
        return super().prediction_type(model, family)


ARCHITECTURE = ChromaArchitecture()
