"""The joint-attention family Flux: Layout Guidance on its joint attention, and its frozen transformer for
training.

Flux attends over one sequence ``[text tokens, image tokens]`` in its double and single blocks, through the host's
``optimized_attention`` (``comfy/ldm/flux/math.py``, ``[B, heads, L, d]`` with ``skip_reshape``). The guided
attention is the shared joint-attention override (``joint.py``): the host's attention for every row, the guided
rows recomputed with the Cones 2 bias. The formula, what replaces ``log(1 + sigma^2)`` for flow time, and what is
not biased are documented in ``cones2_core/joint_attention.py``.

The training section at the end is Train Residual's Flux part (fast mode): the frozen transformer with
checkpointed blocks. Its flow-matching prediction type and its extra inputs (the distilled guidance value and the
pooled vector) come from the shared contract (``base.Architecture``: the host's ``model_sampling`` and
``extra_conds``).
"""

from __future__ import annotations

from ...cones2_core.errors import Cones2Error
from .base import FrozenModel
from .joint import JointArchitecture

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

class FluxArchitecture(JointArchitecture):
    key = "flux"
    frozen_model = FrozenFlux

    def check_model(self, model_patcher) -> None:
        dm = model_patcher.get_model_object("diffusion_model")
        if any(getattr(b, "flipped_img_txt", False) for b in getattr(dm, "double_blocks", [])):
            raise Cones2Error("this Flux-like model puts the image before the text in its attention; Layout Guidance "
                              "supports Flux's own block layout only")


ARCHITECTURE = FluxArchitecture()
