"""The tiny SD3.5 test bed: one deterministic random-weight checkpoint that the host's own checkpoint loader reads
as SD3 (``model_base.SD3``, ``supported_models.SD3``) with its three text encoders and a 16-channel VAE.

* the MMDiT: what ``comfy/model_detection.py`` reads from the keys is all it can be: ``depth`` from the patch
  embedder's width (hidden = 64 x depth, heads = depth, joint blocks = depth: the host fixes the head width at 64
  and the block count at the depth), the patch size, ``pos_embed_max_size`` from ``pos_embed``, ``adm_in_channels``
  (the pooled 2048), the context embedder (4096 -> hidden), RMS q/k norms and SD3.5-medium's
  ``x_block_self_attn`` layers. The bed is depth 2 (hidden 128, 2 heads, 2 blocks) with the image-only
  self-attention in block 0, as SD3.5 medium has it in its first blocks. ``register_length`` and
  ``context_processor`` are never set by the host's detection from SD3 files (the first is not read at all).
* CLIP-L and CLIP-G keep their widths (768, 1280) and vocabularies with 3 layers (the host reads the penultimate) and a 256-wide MLP; the T5 keeps
  T5-XXL's width (4096) and vocabulary with one tiny layer. The host builds SD3's encoders from fixed configs
  (the full T5-XXL is 4.7 B parameters), so the checkpoint is loaded with the host's own per-encoder config
  overrides (``te_model_options``: ``clip_l_model_config``, ``clip_g_model_config``, ``t5xxl_model_config``,
  kept in the file's metadata): in-process by ``load``, on test servers by the development-only node
  ``Cones2DevTinySD3CheckpointLoader`` (``harness/dev_nodes/``).
* the VAE: the SD VAE architecture with 16 latent channels (SD3's layout, no quant convs).

Run as a script (inside the project's venv) to build; prints ``name<TAB>path``:
    python harness/tiny_sd3.py --comfyui ~/ComfyUI [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__" and REPO not in sys.path:  # run as a script: make ``harness`` importable
    sys.path.insert(0, REPO)

from harness import tiny_checkpoints  # noqa: E402
from harness.dev_nodes import SD3_TE_CONFIG_KEY, load_tiny_sd3_checkpoint  # noqa: E402

log = logging.getLogger("comfyui-cones2")

BUILD_VERSION = 1
FILES = {"ckpt": "cones2_tiny_sd3.safetensors"}
FOLDERS = {"ckpt": "checkpoints"}
TE_CONFIG_KEY = SD3_TE_CONFIG_KEY  # the file's metadata: the text encoders' config overrides

# What comfy/model_detection.py reads back from the checkpoint's MMDiT keys.
UNET_CONFIG = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
               "adm_in_channels": 2048,
               "context_embedder_config": {"target": "torch.nn.Linear",
                                           "params": {"in_features": 4096, "out_features": 128}},
               "num_patches": 32 * 32, "pos_embed_max_size": 32, "qk_norm": "rms", "pos_embed_scaling_factor": None,
               "x_block_self_attn_layers": [0]}
# The host's per-encoder config overrides (comfy/sd1_clip.py: model_options["<name>_model_config"]).
TE_MODEL_OPTIONS = {
    "clip_l_model_config": {"num_hidden_layers": 3, "intermediate_size": 256},
    "clip_g_model_config": {"num_hidden_layers": 3, "intermediate_size": 256},
    "t5xxl_model_config": {"num_layers": 1, "num_heads": 2, "d_kv": 64, "d_ff": 256},
}


def cache_key() -> str:
    """Changes whenever this file's code or the initialiser it borrows (harness/tiny_checkpoints.py) changes."""
    return hashlib.sha256(tiny_checkpoints.code_digest(__file__) + tiny_checkpoints.cache_key().encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    return os.environ.get("CONES2_SD3_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "comfyui-cones2", f"sd3-v{BUILD_VERSION}-{cache_key()}")


def build(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Write the checkpoint into ``out_dir`` (atomically); requires the host to be importable."""
    import comfy.ldm.models.autoencoder
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    import torch

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, FILES["ckpt"])
    config = comfy.supported_models.SD3(json.loads(json.dumps(UNET_CONFIG)))
    model = config.get_model({})
    tiny_checkpoints._init_module(model.diffusion_model, seed + 21)
    dm = model.diffusion_model  # pos_embed is a buffer (the initialiser sets parameters): the host's 2-d sin-cos table
    size = UNET_CONFIG["pos_embed_max_size"]
    with torch.no_grad():
        dm.pos_embed.copy_(mmdit.get_2d_sincos_pos_embed_torch(dm.hidden_size, size, size)[None])
    detected = comfy.model_detection.detect_unet_config(model.diffusion_model.state_dict(), "")
    if detected != UNET_CONFIG:  # the host must read back exactly this model
        raise RuntimeError(f"the host detects {detected} from the tiny SD3, not {UNET_CONFIG}")

    clip = comfy.sd.CLIP(target=config.clip_target({k: torch.zeros(1) for k in _ALL_ENCODERS}),
                         model_options={"dtype": torch.float32, **TE_MODEL_OPTIONS})
    tiny_checkpoints._init_module(clip.cond_stage_model, seed + 22)

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=16)
    tiny_checkpoints._init_module(vae, seed + 23)
    vae_sd = {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "decoder."))}

    sd = model.state_dict_for_saving(clip.get_sd(), vae_sd, None)
    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        comfy.utils.save_torch_file(sd, tmp, metadata={"cones2.tiny": "sd3", "cones2.build": str(BUILD_VERSION),
                                                       TE_CONFIG_KEY: json.dumps(TE_MODEL_OPTIONS)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"ckpt": path}


# The keys by which the host's SD3 config (supported_models.SD3.clip_target) tells which encoders a file has.
_ALL_ENCODERS = ("text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
                 "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight",
                 "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight")


def ensure(out_dir: str) -> dict[str, str]:
    """Build the bed into ``out_dir`` unless its file is there; return {name: path}."""
    paths = {k: os.path.join(out_dir, f) for k, f in FILES.items()}
    if not all(os.path.exists(p) for p in paths.values()):
        log.info("building the tiny SD3.5 bed in %s", out_dir)
        build(out_dir)
    return paths


def load(paths: dict[str, str], without=()):
    """(MODEL, CLIP, VAE) of the bed in this process, through the host's checkpoint loader with the bed's text
    encoder overrides (``harness.dev_nodes.load_tiny_sd3_checkpoint``; ``without``: encoders left out)."""
    return load_tiny_sd3_checkpoint(paths["ckpt"], without)


def install(paths: dict[str, str], server) -> dict[str, str]:
    """Link the bed's checkpoint into a ``harness.server.ComfyServer``'s checkpoints folder; returns {name: file
    name as the loaders list it}."""
    out = {}
    for name, src in paths.items():
        dst = os.path.join(server.models_dir(FOLDERS[name]), os.path.basename(src))
        if not os.path.lexists(dst):
            os.symlink(os.path.abspath(src), dst)
        out[name] = os.path.basename(src)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", required=True, help="the ComfyUI folder (the host)")
    ap.add_argument("--out", default=None, help="output folder (default: the versioned cache folder)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, os.path.abspath(args.comfyui))
    sys.argv = [sys.argv[0], "--cpu"]  # the host parses its own CLI arguments on import
    import comfy.options

    comfy.options.enable_args_parsing()
    for name, path in ensure(args.out or default_cache_dir()).items():
        sys.stdout.write(f"{name}\t{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
