"""One test bed per model family (development only): what the shared tests (tests/host/test_beds.py) need to know
about a family to run the whole contract on it. Adding a family = its record in cones2_core/families.py, its
architecture module (nodes/architectures/), and a ``Bed`` here with a builder of small random-weight files the
host's own loaders detect (harness/tiny_checkpoints.py, harness/tiny_flux.py).

A bed declares how its files are loaded (``load``), the latent channels, the CFG its models sample at, and what the
pack supports on it (``supports``); the tests parametrised over ``BEDS`` skip what a bed does not support and say so.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

FEATURES = frozenset({"residuals", "guidance", "maps", "train_fast", "train_paper", "self_recurrence"})


@dataclass(frozen=True)
class Bed:
    family: str  # the key of its record in cones2_core.families.FAMILIES
    builder: str  # the harness module whose build gives its files: "tiny_checkpoints", "tiny_flux", "tiny_sd3", "tiny_chroma"
    latent_channels: int
    cfg: float  # the CFG its models sample at (Flux: 1, its guidance is distilled)
    supports: frozenset = FEATURES
    prompt: str = "a photo of a dog and a cat"
    short_text: bool = False  # its T5 pads to a long length: the shared tests shorten it (Bed.shorten)
    frames: int = 0  # a video family's latent frames in the shared tests' latents (0: an image family)

    @property
    def id(self) -> str:
        return self.family

    def empty_latent(self, size: int = 64):
        """The zero latent the shared tests sample: [1, C, size/8, size/8], a video's [1, C, frames, ...]."""
        import torch

        frames = (self.frames,) if self.frames else ()
        return torch.zeros(1, self.latent_channels, *frames, size // 8, size // 8)

    def builder_module(self):
        """The harness module that builds (``build``, ``default_cache_dir``) and, except tiny_checkpoints, loads
        (``load(files)``) the bed's files."""
        return importlib.import_module(f"harness.{self.builder}")

    def shorten(self, loaded):
        """The loaded (MODEL, CLIP, VAE) as the shared tests use them: a T5 padded to a short length keeps the
        full-width forward quick (the beds whose text encoder pads to a long length: ``short_text``)."""
        if not self.short_text:
            return loaded
        from harness.test_helpers import short_clip

        model, clip, vae = loaded
        return model, short_clip(clip), vae

    def load(self, files):
        """(MODEL, CLIP, VAE) through the host's own loaders; ``files``: the builder's {kind: path}."""
        if self.builder != "tiny_checkpoints":
            return self.shorten(self.builder_module().load(files))
        import comfy.sd
        import torch

        with torch.inference_mode():
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(files[self.family])
            for key in ("clip_l", "clip_h", "clip_g"):  # full-size encoders cut to 2 layers for speed
                sub = getattr(clip.cond_stage_model, key, None)
                if sub is not None:
                    del sub.transformer.text_model.encoder.layers[2:]
        return model, clip, vae


BEDS: dict[str, Bed] = {b.family: b for b in (
    Bed("sd1", "tiny_checkpoints", 4, 5.0),
    Bed("sd2", "tiny_checkpoints", 4, 5.0),
    Bed("sdxl", "tiny_checkpoints", 4, 5.0),
    Bed("flux", "tiny_flux", 16, 1.0, supports=FEATURES - {"train_paper", "self_recurrence"}, short_text=True),
    Bed("wan", "tiny_wan", 16, 5.0, supports=FEATURES - {"train_paper", "self_recurrence"}, short_text=True,
        frames=3),
    Bed("sd3", "tiny_sd3", 16, 4.0, supports=FEATURES - {"train_paper", "self_recurrence"}),
    Bed("qwen_image", "tiny_qwen_image", 16, 2.5, supports=FEATURES - {"train_paper", "self_recurrence"}),
    # Chroma: real CFG (no distilled guidance), its T5 pads nothing (short already)
    Bed("chroma", "tiny_chroma", 16, 4.0, supports=FEATURES - {"train_paper", "self_recurrence"}),
)}
