"""The joint-attention family SD3 / SD3.5 (MMDiT): Layout Guidance on its joint attention, and its frozen
transformer for training.

The host's MMDiT (``comfy/ldm/modules/diffusionmodules/mmdit.py``, ``_block_mixing``) attends over one sequence
``[context, image]`` in every joint block through ``optimized_attention(q, k, v, heads=..., transformer_options=...)``
in the ``[B, L, heads * d]`` layout. The context is the whole conditioning (SD3.5: the CLIP-L/CLIP-G rows, then
the T5 rows, ``cones2_core.families``), so the subject's rows of the conditioning are its text keys there. The
guided attention is the shared joint-attention override (``joint.py``); SD3.5-medium's extra image-only
self-attention (``x_block_self_attn`` layers) is a shorter sequence, which that override leaves to the host.

Training (fast mode) runs the frozen MMDiT with checkpointed joint blocks; its flow-matching prediction type and
its extra input (the pooled CLIP-L + CLIP-G vector, ``y``) come from the shared contract (``base.Architecture``:
the host's ``model_sampling`` and ``extra_conds``).
"""

from __future__ import annotations

from ...cones2_core.errors import Cones2Error
from .base import FrozenModel
from .joint import JointArchitecture


class FrozenSD3(FrozenModel):
    """The frozen MMDiT for training (see base.FrozenModel), every joint block checkpointed from the start (SD3.5
    large: 38 blocks of 2432 channels; only the blocks' inputs are kept for backward) and loaded as the host's memory
    management decides (its lowvram mode streams the weights per op; the copies live while one block recomputes).
    The joint blocks add out of place; the optional context processor (not in SD3 / SD3.5's files) adds in place,
    so the blocks run under OutOfPlaceAdds as Flux's do."""

    full_load_on_gpu = False
    checkpoint_from_start = True
    out_of_place_adds = True

    def layers(self):
        dm = self.mp.model.diffusion_model
        processor = getattr(dm, "context_processor", None)
        return [*(processor.layers if processor is not None else ()), *dm.joint_blocks]


class SD3Architecture(JointArchitecture):
    key = "sd3"
    frozen_model = FrozenSD3

    def check_model(self, model_patcher) -> None:
        dm = model_patcher.get_model_object("diffusion_model")
        if int(getattr(dm, "register_length", 0) or 0) > 0:  # learned register tokens before the context
            raise Cones2Error("this MMDiT puts learned register tokens before the text in its attention (register_length "
                              f"{int(dm.register_length)}); Layout Guidance supports SD3 / SD3.5's own layout only")


ARCHITECTURE = SD3Architecture()
