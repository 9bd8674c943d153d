"""The tiny Flux test bed: deterministic random-weight files that the host's own loaders read as Flux.

* ``unet``: a Flux transformer for UNETLoader (``comfy.sd.load_diffusion_model``), detected as
  ``model_base.Flux`` (Flux-dev style, with ``guidance_in``). The host's detection hard-codes Flux's width
  (hidden 3072, 24 heads, T5 context 4096, rope axes [16, 56, 56]) and only counts the blocks, so the bed is
  full width with one double and one single block (about 0.55 B parameters, bfloat16 like real Flux files).
* ``t5``: a T5 encoder of T5-XXL's width (4096, what ``txt_in`` reads) and vocabulary with one layer, two
  heads and a 256-wide feed-forward, built through the host's own T5 class via its
  ``t5xxl_model_config`` override. DualCLIPLoader would build the full T5-XXL (4.7 B) for it, so it is read
  by ``harness.dev_nodes.load_tiny_flux_clip`` (in-process) or the dev-only node that wraps it (servers).
* ``clip_l``: a random CLIP-L (the host's Flux uses only its pooled output, ``vec_in_dim`` 768).
* ``vae``: the SD VAE architecture with 16 latent channels (Flux's ae layout: no quant convs), for VAELoader.

Built through the host's classes (``comfy.supported_models.Flux``, ``comfy.sd.CLIP``, the SD VAE), checked
against the host's detection, and cached outside the repository under a key of this file and the tiny
checkpoints' initialiser. Run as a script (inside the project's venv) to build; prints ``name<TAB>path``:
    python harness/tiny_flux.py --comfyui ~/ComfyUI [--out DIR]
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
from harness.dev_nodes import load_tiny_flux_clip  # noqa: E402

log = logging.getLogger("comfyui-cones2")

BUILD_VERSION = 1
FILES = {"unet": "cones2_tiny_flux.safetensors", "t5": "cones2_tiny_flux_t5.safetensors",
         "clip_l": "cones2_tiny_flux_clip_l.safetensors", "vae": "cones2_tiny_flux_vae.safetensors"}
FOLDERS = {"unet": "diffusion_models", "t5": "text_encoders", "clip_l": "text_encoders", "vae": "vae"}

# What comfy/model_detection.py reads back from the unet file (everything but the two depths is fixed there).
UNET_CONFIG = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
               "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
               "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
               "guidance_embed": True}
# Overrides of the host's t5_config_xxl.json (d_model 4096 and the 32128-token vocabulary stay).
SMALL_T5 = {"num_layers": 1, "num_heads": 2, "d_kv": 64, "d_ff": 256}


def cache_key() -> str:
    """Changes whenever this file's code, harness/bed_files.py or the initialiser it borrows (harness/tiny_checkpoints.py)
    changes."""
    return hashlib.sha256(tiny_checkpoints.code_digest(__file__) + tiny_checkpoints.code_digest(bed_files.__file__)
                          + tiny_checkpoints.cache_key().encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    return os.environ.get("CONES2_FLUX_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "comfyui-cones2", f"flux-v{BUILD_VERSION}-{cache_key()}")


def _save(sd: dict, path: str, dtype, part: str) -> None:
    bed_files.save(sd, path, dtype, {"cones2.tiny": f"flux-{part}", "cones2.build": str(BUILD_VERSION)})


def build(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Write the four files into ``out_dir`` (each atomically); requires the host to be importable."""
    import comfy.ldm.models.autoencoder
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import torch

    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in FILES.items()}

    config = comfy.supported_models.Flux(dict(UNET_CONFIG))
    model = config.get_model({})
    tiny_checkpoints._init_module(model.diffusion_model, seed + 11)
    unet_sd = model.diffusion_model.state_dict()
    del model
    detected = comfy.model_detection.detect_unet_config(unet_sd, "")
    if detected != UNET_CONFIG:  # the host must read back exactly this model
        raise RuntimeError(f"the host detects {detected} from the tiny Flux, not {UNET_CONFIG}")
    _save(unet_sd, paths["unet"], torch.bfloat16, "unet")
    del unet_sd

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                                                    comfy.text_encoders.flux.flux_clip())
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, "t5xxl_model_config": SMALL_T5})
    tiny_checkpoints._init_module(clip.cond_stage_model, seed + 12)
    sd = clip.get_sd()
    for part, prefix in (("clip_l", "clip_l.transformer."), ("t5", "t5xxl.transformer.")):
        _save({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, paths[part], torch.float16, part)
    del clip, sd

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=16)
    tiny_checkpoints._init_module(vae, seed + 13)
    _save({k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "decoder."))}, paths["vae"],
          torch.float16, "vae")
    return paths


def ensure(out_dir: str) -> dict[str, str]:
    """Build the bed into ``out_dir`` unless all its files are there; return {name: path}."""
    return bed_files.ensure(FILES, out_dir, build, "tiny Flux bed")


def load(paths: dict[str, str]):
    """(MODEL, CLIP, VAE) of the bed in this process, through the host's loaders: ``load_diffusion_model``
    (UNETLoader), the host's Flux text loader with the small T5 config (``load_tiny_flux_clip``), ``VAE``."""
    import comfy.sd
    import comfy.utils

    model = comfy.sd.load_diffusion_model(paths["unet"])
    clip = load_tiny_flux_clip(paths["clip_l"], paths["t5"])
    return model, clip, comfy.sd.VAE(sd=comfy.utils.load_torch_file(paths["vae"]))  # as VAELoader does


def install(paths: dict[str, str], server) -> dict[str, str]:
    """Link the bed's files into a ``harness.server.ComfyServer``'s model folders; {name: file name as listed}."""
    return bed_files.install(paths, server, FOLDERS)


def main(argv=None) -> int:
    return bed_files.main(argv, __doc__, ensure, default_cache_dir)


if __name__ == "__main__":
    raise SystemExit(main())
