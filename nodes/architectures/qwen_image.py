"""The joint-attention family Qwen-Image: Layout Guidance on its joint attention, and its frozen transformer for
training.

Qwen-Image (``comfy/ldm/qwen_image/model.py``) is an MMDiT: each of its 60 blocks attends over one sequence
``[text tokens, image tokens, (reference latents' tokens)]`` through the host's ``optimized_attention_masked`` in
the ``[B, L, heads * d]`` layout, passing ``transformer_options``. The guided attention is the shared
joint-attention override (``joint.py``), set per model call with the image grid of this call's latent
(``[B, 16, T, H, W]``, patch 2) and the text length, which is the context's rows: the host passes no attention
mask into the blocks (``encoder_hidden_states_mask`` is not used by the attention) and pads nothing, so the joint
sequence's text part is exactly the conditioning. Qwen-Image-Edit's reference latents (ReferenceLatent) are
appended after the image tokens and never biased.

The training section is Train Residual's Qwen-Image part (fast mode): the frozen transformer with checkpointed
blocks, as for Flux; its flow-matching prediction type and extra inputs come from the shared contract
(``base.Architecture``: the host's ``model_sampling`` and ``extra_conds``).
"""

from __future__ import annotations

from .base import FrozenModel
from .joint import JointArchitecture


class FrozenQwenImage(FrozenModel):
    """The frozen Qwen-Image transformer for training (see base.FrozenModel): every block checkpointed from the
    start (a block keeps only its two streams' inputs for backward), and the weights may be loaded partly (the host
    streams them per op), as 20 B parameters rarely fit beside the activations. Its blocks add their residuals out
    of place, so they need no OutOfPlaceAdds."""

    full_load_on_gpu = False
    checkpoint_from_start = True

    def layers(self):
        return list(self.mp.model.diffusion_model.transformer_blocks)


class QwenImageArchitecture(JointArchitecture):
    key = "qwen_image"
    frozen_model = FrozenQwenImage

    def model_latent(self, x):
        """Training's still latents [B, C, h, w] as Qwen-Image takes them (its latents carry Wan's VAE's frame axis:
        [B, C, 1, h, w])."""
        return x.unsqueeze(2)

    def from_model_latent(self, x):
        return x.squeeze(2)


ARCHITECTURE = QwenImageArchitecture()
