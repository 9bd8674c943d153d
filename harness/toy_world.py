"""A small *trained* world in which prompt words decide which objects appear, never where.

The random-weight tiny checkpoints barely read their text, so they cannot show what Layout Guidance or a
trained residual does to an image. This module builds a deterministic tiny checkpoint that does:

* **UNet**: an SD1.5-detected UNet (320 channels, two levels, cross-attention at 1/16 of the image size),
  trained here, on the CPU, through the host's own model classes and noise schedule, to draw the world's
  objects. Each object word ("dog", "cat", "car") makes one flat-coloured disk (red, green, blue) on a grey
  background, at a uniformly random position; "big" makes the next object larger. Captions hold one or two
  objects, in both orders, under two templates; 15% of the training contexts are the empty prompt.
  Training: 640 AdamW steps of 16 samples (learning rate 1e-3, cosine to 1e-4), eps-MSE weighted by
  min(1 + sigma^2, 10) (its build time on the test machine: docs/toy_world.md).
* **Text encoder**: the tiny SD1.5 checkpoint's own frozen random CLIP-L (``tiny_checkpoints``), so prompts go
  through CLIPTextEncode / Apply Residuals as usual. A causal encoder carries every word into the later
  tokens, so most training contexts are mixed (``mixed_context``): identity and size are then only reliable at
  the object's own token, which is where residuals and the layout bias act.
* **VAE**: the SD VAE architecture with analytic weights: the encoder averages 8x8 pixel blocks and maps their
  colour linearly to the latent, the decoder paints each latent pixel as an 8x8 block of its colour (the
  residual branches are zero, GroupNorm is kept linear by a large constant carrier channel pair in each
  group). Pictures of the world therefore VAE-encode to its latents exactly, and decoded samples show the
  objects.

This module holds the world (objects, captions, scenes and their pictures) and the build; the UNet's
initialisation and training are in ``harness/toy_training.py``, the analytic VAE in ``harness/toy_vae.py``.
The checkpoint is cached under ``~/.cache/comfyui-cones2/`` keyed by a hash of these three files and of the
tiny checkpoints' construction; ``harness/toy_measures.py`` reads the world's latents (presence, centroid,
size).

Run as a script (inside the project's venv) to build it; prints ``toy<TAB>path``:
    python harness/toy_world.py --comfyui ~/ComfyUI [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import sys
import time

log = logging.getLogger("comfyui-cones2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_VERSION = 1
FILE = "cones2_toy_sd15.safetensors"

# ---- the world -------------------------------------------------------------------------------------------------

OBJECTS = ("dog", "cat", "car")
ATTRIBUTE = "big"  # makes the next object BIG_RADIUS instead of RADIUS
# Colours in the VAE's [-1, 1] pixel space: the corners of a regular tetrahedron around the grey background, so
# any two objects' latent signatures have cosine -1/3 (red, green and blue on grey).
SIGNS = {"dog": (1, -1, -1), "cat": (-1, 1, -1), "car": (-1, -1, 1)}
COLOUR_AMPLITUDE = 0.8
VAE_GAIN = 8.0  # raw latent = VAE_GAIN * mean block colour (channels 0..2); channel 3 is always 0
RADIUS = 2.5  # latent pixels
BIG_RADIUS = 4.0
LATENT_SIZE = 16  # training latents are 16x16 (128 px images)
PREFIXES = ("a photo of a", "a nice photo of a")  # "a nice photo of a dog" puts dog where "a photo of a big dog" does
P_UNCOND = 0.15  # share of training contexts that are the empty prompt (for classifier-free guidance)
P_MIX = 0.8  # share of the others that are mixed (mixed_context)

def object_signature(name: str):
    """The raw (VAE-space) latent vector [4] of an object's pixels."""
    import torch

    s = SIGNS[name]
    return torch.tensor([VAE_GAIN * COLOUR_AMPLITUDE * v for v in s] + [0.0])


def object_colour(name: str) -> tuple[float, float, float]:
    """The object's RGB colour in 0..1."""
    return tuple(0.5 + 0.5 * COLOUR_AMPLITUDE * v for v in SIGNS[name])


def caption(objects) -> str:
    """``objects``: [(name, big)], one or two; the prefix is chosen by the caller."""
    words = [(f"{ATTRIBUTE} " if big else "") + name for name, big in objects]
    return " and a ".join(words)


def caption_bank() -> list[dict]:
    """Every caption the world is trained on: {text, objects [(name, big)]}; the empty caption first."""
    bank = [{"text": "", "objects": ()}]
    for prefix in PREFIXES:
        for a in OBJECTS:
            for big in (False, True):
                objs = ((a, big),)
                bank.append({"text": f"{prefix} {caption(objs)}", "objects": objs})
        for a in OBJECTS:
            for b in OBJECTS:
                if a == b:
                    continue
                for big_a in (False, True):
                    for big_b in (False, True):
                        objs = ((a, big_a), (b, big_b))
                        bank.append({"text": f"{prefix} {caption(objs)}", "objects": objs})
    return bank


def render(objects, h: int = LATENT_SIZE, w: int = LATENT_SIZE):
    """Raw latent [4, h, w] of objects [(name, big, cy, cx)] (centres in latent pixels), later ones on top."""
    import torch

    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    z = torch.zeros(4, h, w)
    for name, big, cy, cx in objects:
        r = BIG_RADIUS if big else RADIUS
        m = (r + 0.5 - torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)).clamp(0, 1)
        z = z * (1 - m) + m * object_signature(name)[:, None, None]
    return z


def place(gen, objects, h: int = LATENT_SIZE, w: int = LATENT_SIZE):
    """Uniformly random non-overlapping centres for [(name, big)] -> [(name, big, cy, cx)]."""
    import torch

    for _ in range(200):
        out = []
        for name, big in objects:
            r = BIG_RADIUS if big else RADIUS
            cy, cx = (r + torch.rand(2, generator=gen) * torch.tensor([h - 2 * r, w - 2 * r])).tolist()
            out.append((name, big, cy, cx))
        if len(out) < 2 or math.dist(out[0][2:], out[1][2:]) >= sum(BIG_RADIUS if b else RADIUS for _, b, *_ in out):
            return out
    return out


def picture(objects, h: int = LATENT_SIZE, w: int = LATENT_SIZE):
    """The world's picture [h*8, w*8, 3] (0..1, a ComfyUI IMAGE row) of objects [(name, big, cy, cx)]:
    what the VAE decodes from ``render`` of the same objects."""
    z = render(objects, h, w)
    rgb = (z[:3] / VAE_GAIN).repeat_interleave(8, 1).repeat_interleave(8, 2)
    return ((rgb + 1) / 2).clamp(0, 1).permute(1, 2, 0).contiguous()


def latent_of_picture(image):
    """What the toy VAE encodes ``image`` [H, W, 3] (0..1) to, without the host: the raw latent [4, H/8, W/8],
    VAE_GAIN times the mean colour of each 8x8 block in [-1, 1] (channel 3 zero)."""
    import torch

    rgb = image.float().permute(2, 0, 1)[None] * 2 - 1
    z = torch.nn.functional.avg_pool2d(rgb, 8)[0] * VAE_GAIN
    return torch.cat([z, torch.zeros_like(z[:1])])


# ---- building ----------------------------------------------------------------------------------------------------


# Every file whose content decides the checkpoint's tensors: a change to any of them is a new cache folder.
BUILD_FILES = ("toy_world.py", "toy_training.py", "toy_vae.py")


def cache_key() -> str:
    from harness import tiny_checkpoints

    digest = hashlib.sha256()
    for name in BUILD_FILES:
        digest.update(tiny_checkpoints.code_digest(os.path.join(os.path.dirname(os.path.abspath(__file__)), name)))
    digest.update(tiny_checkpoints.cache_key().encode())
    return digest.hexdigest()[:12]


def default_cache_dir() -> str:
    """CONES2_TOY_DIR when set, else the versioned cache folder."""
    return os.environ.get("CONES2_TOY_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "comfyui-cones2", f"toy-v{BUILD_VERSION}-{cache_key()}")


def build(path: str, unet_state: dict | None = None) -> str:
    """Train and write the toy checkpoint at ``path`` (atomically). Requires the host to be importable.
    ``unet_state`` (development only) skips the training and uses these UNet weights."""
    import comfy.supported_models
    import comfy.utils
    import torch

    from harness.toy_training import UNET, _clip, train_unet
    from harness.toy_vae import build_vae

    t0 = time.time()
    clip = _clip()
    if unet_state is None:
        _config, model = train_unet(clip)
    else:
        model = comfy.supported_models.SD15(dict(UNET)).get_model({})
        model.diffusion_model.load_state_dict(unet_state)
    vae = build_vae()
    sd = model.state_dict_for_saving(clip.get_sd(), vae.state_dict(), None)
    # The VAE stays float32 (its carrier arithmetic is exact there); the rest is stored as checkpoints are.
    sd = {k: (v.to(torch.float32 if k.startswith("first_stage_model.") else torch.float16)
              if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        comfy.utils.save_torch_file(sd, tmp, metadata={"cones2.toy": cache_key(), "cones2.build": str(BUILD_VERSION),
                                                       "cones2.build_seconds": f"{time.time() - t0:.0f}"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("toy world: built %s in %.0f s", path, time.time() - t0)
    return path


def ensure(out_dir: str | None = None) -> str:
    """The toy checkpoint's path, built first when missing (about ten minutes on two cores)."""
    path = os.path.join(out_dir or default_cache_dir(), FILE)
    if not os.path.exists(path):
        log.info("toy world: building %s (once; a progress line every 25 training steps)", path)
        build(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", required=True, help="the ComfyUI folder (the host)")
    ap.add_argument("--out", default=None, help="output folder (default: the versioned cache folder)")
    args = ap.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[cones2] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    sys.path.insert(0, os.path.abspath(args.comfyui))
    if REPO not in sys.path:
        sys.path.append(REPO)
    sys.argv = [sys.argv[0], "--cpu"]  # the host parses its own CLI arguments on import
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.stdout.write(f"toy\t{ensure(args.out)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
