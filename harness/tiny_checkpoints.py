"""Deterministic tiny random-weight checkpoints that ComfyUI's CheckpointLoaderSimple detects as
SD1.5 (eps), SD2.x (v-prediction, OpenCLIP-H) and SDXL (CLIP-L + CLIP-G).

Built through the host's own classes (``comfy.supported_models``, ``comfy.sd.CLIP``, the SD VAE), then
written with ``model_config.state_dict_for_saving`` exactly as ComfyUI's CheckpointSave writes a file.
The UNets are small (few levels, 320 channels: the host's detection needs model_channels == 320); the
text encoders and the VAE come from fixed configs and are full size, so each file is built once and
cached outside the repository under a key that changes when anything here changes.

Run as a script (inside the project's venv, with the host importable) to build them:
    python harness/tiny_checkpoints.py --comfyui ~/ComfyUI --out DIR [sd1 sd2 sdxl]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import zlib

log = logging.getLogger("comfyui-cones2")

# Bump when the construction below changes: it keys the cache.
BUILD_VERSION = 3

_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

# One tiny checkpoint per core family, keyed as cones2_core/families.py names them (each context_dim is that
# family's conditioning width). The unet_config dicts are what the host's detect_unet_config reads back.
FAMILIES = {
    "sd1": {
        "model_class": "SD15",
        "file": "cones2_tiny_sd15.safetensors",
        "unet": {**_COMMON, "adm_in_channels": None, "num_res_blocks": [1, 1], "channel_mult": [1, 1],
                 "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
                 "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768},
        "v_prediction": False,
    },
    # SD2.x 768-v: the host tells v-prediction from the spread of one bias in output_blocks.11, so this
    # UNet keeps the real block indices (4 levels x 2 res blocks) at 320 channels throughout.
    "sd2": {
        "model_class": "SD20",
        "file": "cones2_tiny_sd2v.safetensors",
        "unet": {**_COMMON, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 1, 1, 1],
                 "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                 "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 1024},
        "v_prediction": True,
    },
    # SDXL needs the transformer depth list [0, 0, 2, 2, 10, 10]; 320 channels at every level keeps it small.
    "sdxl": {
        "model_class": "SDXL",
        "file": "cones2_tiny_sdxl.safetensors",
        "unet": {**_COMMON, "adm_in_channels": 2816, "num_classes": "sequential", "num_res_blocks": [2, 2, 2],
                 "channel_mult": [1, 1, 1], "transformer_depth": [0, 0, 2, 2, 10, 10],
                 "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
                 "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048},
        "v_prediction": False,
    },
}


def code_digest(path: str) -> bytes:
    """What a build file's code is, without its comments and docstrings (its syntax tree), so that editing a
    comment keeps the caches while any change to the code makes a new key."""
    import ast

    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


def cache_key() -> str:
    """Changes whenever this file's code changes (so a stale cache is never used); comments do not count."""
    return hashlib.sha256(code_digest(__file__)).hexdigest()[:12]


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "comfyui-cones2", f"checkpoints-v{BUILD_VERSION}-{cache_key()}")


def _init_module(module, seed: int) -> None:
    """Deterministic initialisation of every float parameter (the host's ops leave weights empty)."""
    import torch

    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        g = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
        with torch.no_grad():
            leaf = name.rsplit(".", 1)[-1]
            parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
            is_norm = any(s in parent for s in ("norm", "ln_", "layer_norm", "layernorm")) or parent.startswith("ln")
            if leaf == "bias":
                p.zero_()
            elif is_norm and p.ndim == 1:
                p.fill_(1.0)
            elif name.endswith("logit_scale"):
                p.fill_(4.6052)
            elif p.ndim >= 2 and "embedding" not in name and "text_projection" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build(family: str, path: str, seed: int = 0) -> str:
    """Build one tiny checkpoint at ``path`` (atomically). Requires the host to be importable."""
    import comfy.ldm.models.autoencoder
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    import torch

    spec = FAMILIES[family]
    model_config = getattr(comfy.supported_models, spec["model_class"])(dict(spec["unet"]))
    model = model_config.get_model({})
    _init_module(model.diffusion_model, seed + 1)
    unet_sd = model.diffusion_model.state_dict()
    if spec["v_prediction"]:
        # Real 768-v checkpoints have a wide spread in this bias; the host reads it to pick v-prediction.
        key = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
        g = torch.Generator().manual_seed(seed + 7)
        unet_sd[key] = torch.randn(unet_sd[key].shape, generator=g) * 0.2
        model.diffusion_model.load_state_dict(unet_sd)

    clip = comfy.sd.CLIP(target=model_config.clip_target(), model_options={"dtype": torch.float32})
    _init_module(clip.cond_stage_model, seed + 2)

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    _init_module(vae, seed + 3)

    sd = model.state_dict_for_saving(clip.get_sd(), vae.state_dict(), None)
    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        comfy.utils.save_torch_file(sd, tmp, metadata={"cones2.tiny": family, "cones2.build": str(BUILD_VERSION)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def ensure(out_dir: str, families=tuple(FAMILIES)) -> dict[str, str]:
    """Build the missing checkpoints in ``out_dir``; return {family: path}."""
    paths = {}
    for fam in families:
        path = os.path.join(out_dir, FAMILIES[fam]["file"])
        if not os.path.exists(path):
            log.info("building tiny %s checkpoint %s", fam, path)
            build(fam, path)
        paths[fam] = path
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", required=True, help="the ComfyUI folder (the host)")
    ap.add_argument("--out", default=None, help="output folder (default: the versioned cache folder)")
    ap.add_argument("families", nargs="*", default=list(FAMILIES))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, os.path.abspath(args.comfyui))
    sys.argv = [sys.argv[0], "--cpu"]  # the host parses its own CLI arguments on import
    import comfy.options

    comfy.options.enable_args_parsing()
    out = args.out or default_cache_dir()
    for fam, path in ensure(out, args.families).items():
        sys.stdout.write(f"{fam}\t{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
