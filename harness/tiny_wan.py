"""The tiny Wan test bed: deterministic random-weight files that the host's own classes read as Wan 2.1.

* ``unet``: a Wan 2.1 text-to-video transformer for UNETLoader (``comfy.sd.load_diffusion_model``), detected as
  ``supported_models.WAN21_T2V`` / ``model_base.WAN21``. The host's detection (``comfy/model_detection.py``) reads
  the width (``head.modulation``), the output and input channels, the feed-forward width and the block count
  from the keys, and fixes the rest: heads = width / 128 (head width 128), patch (1, 2, 2), freq_dim 256, qk
  norm and cross-attention norm on, eps 1e-6; the model's text width (4096, umT5-XXL's) is the class default. So
  the bed is 256 wide (2 heads of 128), a 256-wide feed-forward, 2 blocks (3.0 M parameters, bfloat16 like real
  Wan files).
* ``umt5``: an encoder of umT5-XXL's class and width (4096, what the model's ``text_embedding`` reads) with one
  layer, two heads and a 256-wide feed-forward, through the host's own class (``comfy.text_encoders.wan``) and
  its config override ``model_options["umt5xxl_model_config"]``. Real umT5 files carry their SentencePiece model
  (256 384 pieces) as the tensor ``spiece_model``; none can be downloaded here, so the bed trains a small one
  (BPE, 1 000 pieces, byte fallback, umT5's special ids: pad 0, end 1, unk 2) on a fixed English text and stores
  it the same way. CLIPLoader (type wan) would detect a one-layer file as T5-base, so it is read by
  ``harness.dev_nodes.load_tiny_wan_clip`` (in-process) or the dev-only node that wraps it (servers).
* ``vae``: Wan 2.1's VAE for VAELoader. The host's detection fixes its whole size (``dim`` 96, 16 latent channels,
  4x time and 8x space compression, 127 M parameters), so the bed's VAE is full size with random weights
  (float16).

Built through the host's classes, checked against the host's detection, and cached outside the repository under
a key of this file and the tiny checkpoints' initialiser. Run as a script (inside the project's venv) to build;
prints ``name<TAB>path``:
    python harness/tiny_wan.py --comfyui ~/ComfyUI [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__" and REPO not in sys.path:  # run as a script: make ``harness`` importable
    sys.path.insert(0, REPO)

from harness import tiny_checkpoints  # noqa: E402
from harness.dev_nodes import load_tiny_wan_clip, tiny_wan_clip  # noqa: E402

log = logging.getLogger("comfyui-cones2")

BUILD_VERSION = 1
FILES = {"unet": "cones2_tiny_wan.safetensors", "umt5": "cones2_tiny_wan_umt5.safetensors",
         "vae": "cones2_tiny_wan_vae.safetensors"}
FOLDERS = {"unet": "diffusion_models", "umt5": "text_encoders", "vae": "vae"}

# What comfy/model_detection.py reads back from the unet file (dim, out_dim, ffn_dim, num_layers, in_dim and the
# model type from the keys; the rest is fixed there).
UNET_CONFIG = {"image_model": "wan2.1", "dim": 256, "out_dim": 16, "num_heads": 2, "ffn_dim": 256, "num_layers": 2,
               "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
               "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16, "model_type": "t2v"}
# Overrides of the host's umt5_config_xxl.json (d_model 4096 stays); the vocabulary is the bed's SentencePiece.
SMALL_UMT5 = {"num_layers": 1, "num_heads": 2, "d_kv": 64, "d_ff": 256}
VOCAB = 1000
# The text the bed's SentencePiece model is trained on: the words the tests use, in ordinary sentences.
CORPUS = (
    "a photo of a dog and a cat on a sofa. a photo of a dog next to another dog and a cat. "
    "a dog runs from the left to the right while a cat walks from the right to the left. "
    "a rendering of a dog. a cropped photo of the cat. the photo of a clean dog. a bright photo of the cat. "
    "a close-up photo of a dog on the beach. a dark photo of the cat on the grass. a good photo of a dog. "
    "a red ball, a blue box and a green tree in a small room. two subjects crossing a street in the rain. "
    "the quick brown fox jumps over the lazy dog. a person walks a horse along the river at sunset. "
    "a cinematic video of a car driving through a city at night, with lights and people."
)


def cache_key() -> str:
    """Changes whenever this file's code or the initialiser it borrows (harness/tiny_checkpoints.py) changes."""
    return hashlib.sha256(tiny_checkpoints.code_digest(__file__) + tiny_checkpoints.cache_key().encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    return os.environ.get("CONES2_WAN_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "comfyui-cones2", f"wan-v{BUILD_VERSION}-{cache_key()}")


def _save(sd: dict, path: str, dtype, part: str) -> None:
    import comfy.utils

    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        comfy.utils.save_torch_file(sd, tmp, metadata={"cones2.tiny": f"wan-{part}",
                                                       "cones2.build": str(BUILD_VERSION)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def spiece_model() -> bytes:
    """The bed's SentencePiece model (serialised), trained on ``CORPUS`` with umT5's special ids."""
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.split(". ") * 4), model_writer=out, vocab_size=VOCAB, model_type="bpe",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True, character_coverage=1.0,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return out.getvalue()


def build(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Write the three files into ``out_dir`` (each atomically); requires the host to be importable."""
    import comfy.ldm.wan.vae
    import comfy.model_detection
    import comfy.supported_models
    import torch

    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in FILES.items()}

    config = comfy.supported_models.WAN21_T2V(dict(UNET_CONFIG))
    model = config.get_model({})
    tiny_checkpoints._init_module(model.diffusion_model, seed + 21)
    unet_sd = model.diffusion_model.state_dict()
    del model
    detected = comfy.model_detection.detect_unet_config(unet_sd, "")
    if detected != UNET_CONFIG:  # the host must read back exactly this model
        raise RuntimeError(f"the host detects {detected} from the tiny Wan, not {UNET_CONFIG}")
    _save(unet_sd, paths["unet"], torch.bfloat16, "unet")
    del unet_sd

    spm = torch.ByteTensor(list(spiece_model()))
    clip = tiny_wan_clip(spm, {**SMALL_UMT5, "vocab_size": VOCAB})
    tiny_checkpoints._init_module(clip.cond_stage_model, seed + 22)
    prefix = "umt5xxl.transformer."
    sd = {k[len(prefix):]: v for k, v in clip.cond_stage_model.state_dict().items() if k.startswith(prefix)}
    _save({**sd, "spiece_model": spm}, paths["umt5"], torch.float16, "umt5")
    del clip, sd

    vae = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    tiny_checkpoints._init_module(vae, seed + 23)
    _save(vae.state_dict(), paths["vae"], torch.float16, "vae")
    return paths


def ensure(out_dir: str) -> dict[str, str]:
    """Build the bed into ``out_dir`` unless all its files are there; return {name: path}."""
    paths = {k: os.path.join(out_dir, f) for k, f in FILES.items()}
    if not all(os.path.exists(p) for p in paths.values()):
        log.info("building the tiny Wan bed in %s", out_dir)
        build(out_dir)
    return paths


def load(paths: dict[str, str]):
    """(MODEL, CLIP, VAE) of the bed in this process, through the host's loaders: ``load_diffusion_model``
    (UNETLoader), the host's Wan text encoder with the small umT5 config (``load_tiny_wan_clip``), ``VAE``."""
    import comfy.sd
    import comfy.utils

    model = comfy.sd.load_diffusion_model(paths["unet"])
    clip = load_tiny_wan_clip(paths["umt5"])
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
