"""The tiny Chroma test bed: deterministic random-weight files that the host's own loaders read as Chroma.

* ``unet``: a Chroma transformer for UNETLoader (``comfy.sd.load_diffusion_model``), detected as
  ``model_base.Chroma``. The host's detection (``comfy/model_detection.py``, the Flux branch) tells Chroma by its
  ``distilled_guidance_layer`` keys and hard-codes everything but the two block counts: hidden 3072, 24 heads,
  T5 context 4096, rope axes [16, 56, 56], 64 input/output channels (16 latent channels x 2 x 2 patches) and the
  approximator's in 64 / hidden 5120 / out 3072 / 5 layers. So the bed is full width with one double and one single
  block (about 0.63 B parameters, 0.28 B of them the approximator; bfloat16 like real Chroma files).
* ``t5``: a T5 encoder of T5-XXL's width (4096, what ``txt_in`` reads), vocabulary and 24 layers, each thin (two
  heads, a 256-wide feed-forward), built through the host's own Chroma/PixArt T5 class via its ``t5xxl_model_config``
  override. CLIPLoader (type chroma) would build the full T5-XXL (4.7 B) for it, so it is read by
  ``harness.dev_nodes.load_tiny_chroma_clip`` (in-process) or the dev-only node that wraps it (servers).
* ``vae``: the SD VAE architecture with 16 latent channels (Flux's ae layout, which Chroma uses), for VAELoader.

Built through the host's classes (``comfy.supported_models.Chroma``, ``comfy.sd.CLIP``, the SD VAE), checked
against the host's detection, and cached outside the repository under a key of this file and the tiny
checkpoints' initialiser. Run as a script (inside the project's venv) to build; prints ``name<TAB>path``:
    python harness/tiny_chroma.py --comfyui ~/ComfyUI [--out DIR]
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__" and REPO not in sys.path:  # run as a script: make ``harness`` importable
    sys.path.insert(0, REPO)

from harness import bed_files, tiny_checkpoints  # noqa: E402
from harness.dev_nodes import load_tiny_chroma_clip  # noqa: E402

log = logging.getLogger("comfyui-cones2")

BUILD_VERSION = 1
FILES = {"unet": "cones2_tiny_chroma.safetensors", "t5": "cones2_tiny_chroma_t5.safetensors",
         "vae": "cones2_tiny_chroma_vae.safetensors"}
FOLDERS = {"unet": "diffusion_models", "t5": "text_encoders", "vae": "vae"}

# What comfy/model_detection.py reads back from the unet file (everything but the two depths is fixed there).
UNET_CONFIG = {"image_model": "chroma", "in_channels": 64, "patch_size": 2, "out_channels": 64,
               "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
               "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
               "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5}
# Overrides of the host's t5_config_xxl.json (d_model 4096 and the 32128-token vocabulary stay). 24 layers, as
# T5-XXL has: the host's one-file text loader tells T5-XXL from smaller T5s by its 24th block (comfy/sd.py
# detect_te_model), so with them the tiny T5 takes CLIPLoader's own T5-XXL/chroma branch (thin: 5 M each).
SMALL_T5 = {"num_layers": 24, "num_heads": 2, "d_kv": 64, "d_ff": 256}


def cache_key() -> str:
    """Changes whenever this file's code or the initialiser it borrows (harness/tiny_checkpoints.py) changes."""
    return hashlib.sha256(tiny_checkpoints.code_digest(__file__) + tiny_checkpoints.code_digest(bed_files.__file__)
                          + tiny_checkpoints.cache_key().encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    return os.environ.get("CONES2_CHROMA_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "comfyui-cones2", f"chroma-v{BUILD_VERSION}-{cache_key()}")


def _save(sd: dict, path: str, dtype, part: str) -> None:
    bed_files.save(sd, path, dtype, {"cones2.tiny": f"chroma-{part}",
                                                       "cones2.build": str(BUILD_VERSION)})


def build(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Write the three files into ``out_dir`` (each atomically); requires the host to be importable."""
    import comfy.ldm.models.autoencoder
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.text_encoders.pixart_t5
    import torch

    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in FILES.items()}

    config = comfy.supported_models.Chroma(dict(UNET_CONFIG))
    model = config.get_model({})
    tiny_checkpoints._init_module(model.diffusion_model, seed + 21)
    unet_sd = model.diffusion_model.state_dict()
    del model
    detected = comfy.model_detection.detect_unet_config(unet_sd, "")
    if detected != UNET_CONFIG:  # the host must read back exactly this model
        raise RuntimeError(f"the host detects {detected} from the tiny Chroma, not {UNET_CONFIG}")
    _save(unet_sd, paths["unet"], torch.bfloat16, "unet")
    del unet_sd

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.pixart_t5.PixArtTokenizer,
                                                    comfy.text_encoders.pixart_t5.pixart_te())
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, "t5xxl_model_config": SMALL_T5})
    tiny_checkpoints._init_module(clip.cond_stage_model, seed + 22)
    prefix = "t5xxl.transformer."
    _save({k[len(prefix):]: v for k, v in clip.get_sd().items() if k.startswith(prefix)}, paths["t5"],
          torch.float16, "t5")
    del clip

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=16)
    tiny_checkpoints._init_module(vae, seed + 23)
    _save({k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "decoder."))}, paths["vae"],
          torch.float16, "vae")
    return paths


def ensure(out_dir: str) -> dict[str, str]:
    """Build the bed into ``out_dir`` unless all its files are there; return {name: path}."""
    return bed_files.ensure(FILES, out_dir, build, "tiny Chroma bed")


class MemoApproximator:
    """The bed's approximator forward, memoised on its input's bytes (development only, for CPU test time).

    Chroma's approximator (``distilled_guidance_layer``, 0.28 B parameters at the width the host's detection
    hard-codes) runs on 344 modulation rows per sample whatever the image size: about 180 GFLOP, 13 s on the shared
    CPU cores, where the bed's two blocks on a 64 x 64 image take well under a second. Its input depends only on
    the timestep and guidance value, so a sampler's steps repeat it across tests (the same sigmas) and across the
    cond and uncond calls of a step. A hit returns the very tensor computed before for the same input bytes, dtype
    and grad mode (exact, not an approximation); gradients never flow through it (its inputs and weights are
    frozen)."""

    def __init__(self, forward, size: int = 32):
        self.forward, self.size, self.cache = forward, size, {}

    def __call__(self, x):
        import torch

        key = (x.dtype, tuple(x.shape), str(x.device), torch.is_inference_mode_enabled(), torch.is_grad_enabled(),
               hashlib.sha256(x.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()).digest())
        if key not in self.cache:
            if len(self.cache) >= self.size:
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = self.forward(x)
        return self.cache[key]


def load(paths: dict[str, str]):
    """(MODEL, CLIP, VAE) of the bed in this process, through the host's loaders: ``load_diffusion_model``
    (UNETLoader), the host's Chroma text loader with the small T5 config (``load_tiny_chroma_clip``), ``VAE``.
    The approximator is memoised (``MemoApproximator``) for test time."""
    import comfy.sd
    import comfy.utils

    model = comfy.sd.load_diffusion_model(paths["unet"])
    approximator = model.model.diffusion_model.distilled_guidance_layer
    approximator.forward = MemoApproximator(approximator.forward)
    clip = load_tiny_chroma_clip(paths["t5"])
    return model, clip, comfy.sd.VAE(sd=comfy.utils.load_torch_file(paths["vae"]))  # as VAELoader does


def install(paths: dict[str, str], server) -> dict[str, str]:
    """Link the bed's files into a ``harness.server.ComfyServer``'s model folders; {name: file name as listed}."""
    return bed_files.install(paths, server, FOLDERS)


def main(argv=None) -> int:
    return bed_files.main(argv, __doc__, ensure, default_cache_dir)


if __name__ == "__main__":
    raise SystemExit(main())
