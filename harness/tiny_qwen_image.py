"""The tiny Qwen-Image test bed: deterministic random-weight files that the host's own loaders read as Qwen-Image.

* ``unet``: a Qwen-Image transformer for UNETLoader (``comfy.sd.load_diffusion_model``), detected as
  ``model_base.QwenImage``. The host's detection (``comfy/model_detection.py``, the ``txt_norm.weight`` branch)
  reads only ``in_channels`` (from ``img_in.weight``) and ``num_layers`` (counting ``transformer_blocks.*``); the
  rest is the class's defaults: hidden 3072 (24 heads x 128), text width 3584 (``txt_norm`` / ``txt_in``, what
  Qwen2.5-VL-7B gives), patch 2, 16 output channels, rope axes (16, 56, 56). So the bed is full width with one
  block (about 0.38 B parameters, bfloat16 like the real files: 0.76 GB).
* ``llm``: a Qwen2.5-VL-7B text model of the real width (3584, what ``txt_in`` reads), vocabulary (152064) and
  key/value width (4 heads x 128: the host's ``detect_te_model`` tells Qwen2.5-7B from -3B by the 512-wide
  ``k_proj`` bias) with one layer and a 256-wide MLP, built through the host's own class via its
  ``qwen25_7b_model_config`` override. Its embedding table (0.55 B of its 0.56 B parameters) is stored in
  float8 (e4m3, drawn with std 1 so that float8 holds it) to keep the file at 0.56 GB; the host's loader copies
  it into the model's bfloat16 table. CLIPLoader (type ``qwen_image``) would build the full 28-layer LLM for it,
  so it is read by ``harness.dev_nodes.load_tiny_qwen_clip`` (in-process) or the dev-only node that wraps it.
  No vision tower weights: the host builds Qwen2.5-VL's vision tower but only runs it for Qwen-Image-Edit's
  image tokens, which the pack refuses (docs/qwen_image.md).
* ``vae``: the host's Wan 2.1 VAE (Qwen-Image's), random (its width is hard-coded by the host's detection).

Built through the host's classes, checked against the host's detection, and cached outside the repository under
a key of this file's code and the tiny checkpoints' initialiser. Run as a script (inside the project's venv) to
build; prints ``name<TAB>path``:
    python harness/tiny_qwen_image.py --comfyui ~/ComfyUI [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__" and REPO not in sys.path:  # run as a script: make ``harness`` importable
    sys.path.insert(0, REPO)

from harness import tiny_checkpoints  # noqa: E402
from harness.dev_nodes import load_tiny_qwen_clip  # noqa: E402

log = logging.getLogger("comfyui-cones2")

BUILD_VERSION = 1
FILES = {"unet": "cones2_tiny_qwen_image.safetensors", "llm": "cones2_tiny_qwen_image_llm.safetensors",
         "vae": "cones2_tiny_qwen_image_vae.safetensors"}
FOLDERS = {"unet": "diffusion_models", "llm": "text_encoders", "vae": "vae"}

# What comfy/model_detection.py reads back from the unet file (everything else is the class's defaults there).
UNET_CONFIG = {"image_model": "qwen_image", "in_channels": 64, "num_layers": 1}
# Overrides of the host's Qwen25_7BVLI_Config (hidden 3584, vocabulary 152064 and head_dim 128 stay).
SMALL_LLM = {"num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 256}
EMBED_KEY = "model.embed_tokens.weight"


def cache_key() -> str:
    """Changes whenever this file's code or the initialiser it borrows (harness/tiny_checkpoints.py) changes."""
    return hashlib.sha256(tiny_checkpoints.code_digest(__file__) + tiny_checkpoints.cache_key().encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    return os.environ.get("CONES2_QWEN_IMAGE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "comfyui-cones2", f"qwen-image-v{BUILD_VERSION}-{cache_key()}")


def _save(sd: dict, path: str, dtype, part: str, keep: dict | None = None) -> None:
    """Save ``sd`` in ``dtype`` (the tensors named in ``keep`` in their own dtype), atomically."""
    import comfy.utils

    keep = keep or {}
    sd = {k: (v.to(keep.get(k, dtype)) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        comfy.utils.save_torch_file(sd, tmp, metadata={"cones2.tiny": f"qwen-image-{part}",
                                                       "cones2.build": str(BUILD_VERSION)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def build(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Write the three files into ``out_dir`` (each atomically); requires the host to be importable."""
    import comfy.ldm.wan.vae
    import comfy.model_detection
    import comfy.ops
    import comfy.sd
    import comfy.supported_models
    import comfy.text_encoders.llama
    import comfy.utils
    import torch

    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in FILES.items()}

    config = comfy.supported_models.QwenImage(dict(UNET_CONFIG))
    model = config.get_model({})
    tiny_checkpoints._init_module(model.diffusion_model, seed + 21)
    unet_sd = model.diffusion_model.state_dict()
    del model
    detected = comfy.model_detection.detect_unet_config(unet_sd, "")
    if detected != UNET_CONFIG:  # the host must read back exactly this model
        raise RuntimeError(f"the host detects {detected} from the tiny Qwen-Image, not {UNET_CONFIG}")
    _save(unet_sd, paths["unet"], torch.bfloat16, "unet")
    del unet_sd

    # The text model alone (the host's class, the small config), without the vision tower the bed never runs;
    # built with a stub vocabulary, its full-vocabulary table drawn apart, in slices, straight into float8 (std 1:
    # float8 e4m3 holds it), so that the build never holds it in float32.
    vocab = comfy.text_encoders.llama.Qwen25_7BVLI_Config().vocab_size
    llm = comfy.text_encoders.llama.Llama2_(comfy.text_encoders.llama.Qwen25_7BVLI_Config(**SMALL_LLM, vocab_size=8),
                                            device="cpu", dtype=torch.float32, ops=comfy.ops.manual_cast)
    tiny_checkpoints._init_module(llm, seed + 22)
    llm_sd = {f"model.{k}": v for k, v in llm.state_dict().items()}
    del llm
    g = torch.Generator().manual_seed(seed + 23)
    width = llm_sd[EMBED_KEY].shape[1]
    table = torch.empty(vocab, width, dtype=torch.float8_e4m3fn)
    for start in range(0, vocab, 8192):
        stop = min(start + 8192, vocab)
        table[start:stop] = torch.randn(stop - start, width, generator=g).to(torch.float8_e4m3fn)
    llm_sd[EMBED_KEY] = table
    if comfy.sd.detect_te_model(llm_sd) != comfy.sd.TEModel.QWEN25_7B:
        raise RuntimeError("the host does not detect the tiny LLM as Qwen2.5-7B")
    _save(llm_sd, paths["llm"], torch.bfloat16, "llm", keep={EMBED_KEY: torch.float8_e4m3fn})
    del llm_sd

    vae = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    tiny_checkpoints._init_module(vae, seed + 24)
    _save(vae.state_dict(), paths["vae"], torch.float16, "vae")
    return paths


def ensure(out_dir: str) -> dict[str, str]:
    """Build the bed into ``out_dir`` unless all its files are there; return {name: path}."""
    paths = {k: os.path.join(out_dir, f) for k, f in FILES.items()}
    if not all(os.path.exists(p) for p in paths.values()):
        log.info("building the tiny Qwen-Image bed in %s", out_dir)
        build(out_dir)
    return paths


def load(paths: dict[str, str]):
    """(MODEL, CLIP, VAE) of the bed in this process, through the host's loaders: ``load_diffusion_model``
    (UNETLoader), the host's Qwen-Image text loader with the small LLM config (``load_tiny_qwen_clip``), ``VAE``."""
    import comfy.sd
    import comfy.utils

    model = comfy.sd.load_diffusion_model(paths["unet"])
    clip = load_tiny_qwen_clip(paths["llm"])
    return model, clip, comfy.sd.VAE(sd=comfy.utils.load_torch_file(paths["vae"]))  # as VAELoader does


def install(paths: dict[str, str], server) -> dict[str, str]:
    """Link the bed's files into a ``harness.server.ComfyServer``'s model folders (diffusion_models,
    text_encoders, vae); returns {name: file name as the loaders list it}."""
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
