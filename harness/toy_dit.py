"""A small *trained* joint-attention world: a Chroma that draws the toy world's objects, built in CI.

The random-weight DiT beds (``harness/tiny_chroma.py`` and the others) barely read their text, so there a -1e8
bias puts every subject's attention in its box by construction. This module trains, through the host's own Chroma
classes (``comfy.supported_models.Chroma`` -> ``model_base.Chroma``, the same joint attention over
``[text, image]`` as Flux), a small Chroma on the toy world of ``harness/toy_world.py``: "dog", "cat" and "car"
make red, green and blue disks at uniformly random places, "big" makes the next one larger. Its text is the tiny
world's own T5 (``T5_CONFIG``, ``CONTEXT_GAIN``: T5-XXL's width and vocabulary, one thin random layer; frozen),
read through the host's Chroma CLIP classes, so prompts go through CLIPTextEncode / Apply Residuals as on Chroma. Chroma has no pooled vector, so objects can only come through the joint attention to the
text rows, which is where residuals are added and the layout bias acts.

* **Model**: Chroma with hidden ``CONFIG["hidden_size"]``, ``depth`` double and ``depth_single_blocks`` single
  blocks and a small approximator (its modulation network); the world lives in the first 4 of the 16 latent
  channels (the rest are zero), a 16 x 16 latent is 8 x 8 image tokens.
* **Training**: flow matching as the host samples Chroma (``x_t = (1 - t) x0 + t eps``, velocity target
  ``eps - x0``, t logit-normal), AdamW, float32; contexts mixed as the SD toy world's are
  (``toy_training.mixed_context``: each object's identity only reliable at its own T5 rows); 15% empty prompts for
  CFG. A batch mixes captions of different token counts: shorter ones are padded with masked rows (Chroma gives
  its text no positions, so a masked pad is the same as no pad, which is how the host runs the prompt).
* Cached under ``~/.cache/comfyui-cones2/toydit-v1-<hash>/`` (the hash covers this file, the toy world's files
  and the tiny checkpoints' initialiser); ``CONES2_TOYDIT_DIR`` points elsewhere.

``--long`` builds the **attribute world**: the same recipe trained ``LONG_STEPS`` steps; it binds "big" to its
object, and the tests train residuals on it (``WorldVAE`` gives Train Residual the world's latents).

The same recipe also builds a **Flux** world (``--family flux``: Flux-schnell's classes at the same size, its
pooled vector switched off; a benchmark, not built by the tests).

Run as a script (inside the project's venv) to build it; prints ``toydit<TAB>path`` (``toyflux`` for Flux) and
``t5<TAB>path``.
``bench/toy_dit.py`` prints its rates, ``tests/host/test_toy_dit.py`` asserts them.
    python harness/toy_dit.py --comfyui ~/ComfyUI [--out DIR] [--family chroma|flux] [--long]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__" and REPO not in sys.path:  # run as a script: make ``harness`` importable
    sys.path.insert(0, REPO)

from harness import tiny_checkpoints, toy_world  # noqa: E402

log = logging.getLogger("comfyui-cones2")

BUILD_VERSION = 1
FILE = "cones2_toy_chroma.safetensors"
T5_FILE = "cones2_toy_chroma_t5.safetensors"
# The world's text encoder: the host's PixArt/Chroma T5 class at T5-XXL's width (what Chroma's txt_in reads) and
# vocabulary, one thin layer, random weights. Its attention output is scaled by CONTEXT_GAIN: with the full random
# attention (and its large random relative-position bias) every row is dominated by its neighbours (a word's row
# changes more between two captions than two words' rows differ), so nothing tells the transformer which row names
# which object. At 0.3 (with EMBEDDING_GAIN) a word's row keeps a cosine of 0.94 or more across the world's captions
# while two object words' rows are below 0.1: each row is its own token plus a little of its caption.
T5_CONFIG = {"num_layers": 1, "num_heads": 2, "d_kv": 64, "d_ff": 256}
CONTEXT_GAIN = 0.3
# T5's embeddings scaled up (std 0.78 instead of the beds' 0.02) so that each row's own token dominates what its
# layer adds: with the beds' small embeddings the (normalised) attention output outweighs the token itself.
EMBEDDING_GAIN = 50.0
CONFIG = {"image_model": "chroma", "in_channels": 64, "patch_size": 2, "out_channels": 64, "context_in_dim": 4096,
          "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 4, "depth": 1, "depth_single_blocks": 1,
          "axes_dim": [8, 28, 28], "theta": 10000, "qkv_bias": True,
          "in_dim": 64, "out_dim": 256, "hidden_dim": 128, "n_layers": 1}
# The Flux world (bench only, ``bench/toy_dit.py --family flux``): Flux-schnell's layout (no guidance embedding) at the
# Chroma world's size; its pooled CLIP-L input is switched off (vector_in's projection zero and frozen), so objects
# come only through the joint attention to the T5 rows, as on Chroma. Its CLIP pads T5 to FLUX_T5_LENGTH tokens
# (T5TokenizerOptions' min_length; the host's Flux default is 256), the same rows in training and sampling.
FLUX_CONFIG = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
               "context_in_dim": 4096, "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 4, "depth": 1,
               "depth_single_blocks": 1, "axes_dim": [8, 28, 28], "theta": 10000, "qkv_bias": True,
               "guidance_embed": False, "patch_size": 2}
FLUX_T5_LENGTH = 16
FILES = {"chroma": FILE, "flux": "cones2_toy_flux.safetensors"}
TRAIN = {"steps": 480, "batch": 16, "lr": 1e-3, "warmup": 30, "final_lr": 0.1, "seed": 1234}
# The attribute world (``--long``): the same recipe trained three times as long (about 7 minutes on two cores). It
# binds "big" (plain "a photo of a dog" draws radius 2.85, "a photo of a big dog" 3.79, the pictures' big disks
# 3.89), which the 480-step world does not (it draws soft, oversized disks: 4.4 and 4.95), so the residual tests use
# it; but it puts every placement case in its boxes (100% guided), so the guidance tests keep the 480-step world,
# whose hard cases leave room to fail.
LONG_STEPS = 1440
CHANNELS = 16  # Chroma's latent channels; the world is in the first 4
CFG = 4.0  # what the tests and benches sample with


def cache_key() -> str:
    """This file's code and the toy world's key (its build files and the tiny checkpoints' initialiser)."""
    digest = hashlib.sha256(tiny_checkpoints.code_digest(__file__))
    digest.update(toy_world.cache_key().encode())
    return digest.hexdigest()[:12]


def default_cache_dir() -> str:
    return os.environ.get("CONES2_TOYDIT_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "comfyui-cones2", f"toydit-v{BUILD_VERSION}-{cache_key()}")


def _text_encoder(sd: dict | None = None):
    """The host's Chroma CLIP (PixArt T5 tokenizer and encoder) with ``T5_CONFIG``; ``sd``: its T5 weights."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.pixart_t5
    import torch

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.pixart_t5.PixArtTokenizer,
                                                    comfy.text_encoders.pixart_t5.pixart_te())
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, "t5xxl_model_config": T5_CONFIG})
    if sd is not None:
        missing, unexpected = clip.cond_stage_model.load_state_dict(
            {f"t5xxl.transformer.{k}": v.float() for k, v in sd.items()}, strict=False)
        if unexpected or any(k.startswith("t5xxl.transformer.") for k in missing):
            raise RuntimeError(f"toy DiT T5: missing {missing}, unexpected {unexpected}")
    return clip


def new_text_encoder(seed: int = 31):
    """The world's T5, initialised (deterministically) as the beds' are, its attention output scaled down."""
    import torch

    clip = _text_encoder()
    tiny_checkpoints._init_module(clip.cond_stage_model, seed)
    with torch.no_grad():
        for name, p in clip.cond_stage_model.named_parameters():
            if name.endswith("SelfAttention.o.weight"):
                p.mul_(CONTEXT_GAIN)
            elif name.endswith("shared.weight"):
                p.mul_(EMBEDDING_GAIN)
    return clip


def clip(path: str | None = None, family: str = "chroma"):
    """The world's text encoder as the host's Chroma CLIP (CLIPTextEncode / Apply Residuals read it as Chroma's),
    or for ``family`` "flux" as the host's Flux CLIP (the tiny Flux bed's CLIP-L for its pooled vector, which the
    Flux world ignores, and this T5, padded to FLUX_T5_LENGTH tokens)."""
    import comfy.utils

    path = path or os.path.join(os.path.dirname(ensure()), T5_FILE)
    if family == "chroma":
        return _text_encoder(comfy.utils.load_torch_file(path))
    from harness import tiny_flux
    from harness.dev_nodes import load_tiny_flux_clip

    out = load_tiny_flux_clip(tiny_flux.ensure(tiny_flux.default_cache_dir())["clip_l"], path)
    out.set_tokenizer_option("t5xxl_min_length", FLUX_T5_LENGTH)
    return out


def to_model(raw):
    """Raw world latents [B, 4, h, w] -> Chroma's model space [B, 16, h, w]."""
    import comfy.latent_formats
    import torch

    z = torch.zeros(raw.shape[0], CHANNELS, *raw.shape[2:])
    z[:, :4] = raw
    return comfy.latent_formats.Flux().process_in(z)


def new_model(family: str = "chroma"):
    """An untrained (uninitialised) float32 Chroma of ``CONFIG`` (or Flux of ``FLUX_CONFIG``) through the host's
    classes."""
    import comfy.supported_models
    import torch

    if family == "chroma":
        config = comfy.supported_models.Chroma(dict(CONFIG))
    else:
        config = comfy.supported_models.FluxSchnell(dict(FLUX_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    return config.get_model({})


def _encode(text_encoder, bank):
    """T5 rows [L_i, 4096] of every caption, and the row indices of its object words."""
    names = {text_encoder.tokenize(o)["t5xxl"][0][0][0]: o for o in toy_world.OBJECTS}
    ctx, rows = [], []
    for item in bank:
        tokens = text_encoder.tokenize(item["text"])
        ctx.append(text_encoder.encode_from_tokens(tokens).float()[0])
        rows.append(tuple(i for i, (t, _w) in enumerate(tokens["t5xxl"][0]) if t in names))
    return ctx, rows


def _init(dm, gen) -> None:
    import torch

    with torch.no_grad():
        for name, p in sorted(dm.named_parameters()):
            if p.ndim > 1:
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) / math.sqrt(p[0].numel()) * math.sqrt(3))
            else:
                p.fill_(1.0 if name.endswith("scale") else 0.0)
        dm.final_layer.linear.weight.mul_(0.1)


def train(text_encoder, steps: int | None = None, progress: bool = True, family: str = "chroma"):
    """The world's Chroma (or Flux), trained from scratch; returns the host's BaseModel (model_base.Chroma or
    model_base.Flux)."""
    import torch

    steps = TRAIN["steps"] if steps is None else steps
    # One thread: the same weights on every machine of one CPU kind, whatever its core count (a float sum's order
    # follows the thread split), so the tests' rates are the ones measured; a quiet two-core machine loses ~1 min.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(text_encoder, steps, progress, family)
    finally:
        torch.set_num_threads(threads)


def _train(text_encoder, steps: int, progress: bool, family: str):
    import torch

    from comfyui_cones2.cones2_core.gradients import OutOfPlaceAdds
    from comfyui_cones2.nodes.architectures.chroma import InPlaceSafe
    from harness.toy_training import mixed_context

    bank = toy_world.caption_bank()
    ctx, rows = _encode(text_encoder, bank)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r, []).append(i)
    model = new_model(family)
    dm = model.diffusion_model
    gen = torch.Generator().manual_seed(TRAIN["seed"])
    _init(dm, gen)
    if family == "flux":  # the pooled CLIP-L vector carries nothing in this world
        with torch.no_grad():
            dm.vector_in.out_layer.weight.zero_()
        for p in dm.vector_in.parameters():
            p.requires_grad_(False)
    dm.train()
    params = [p for p in dm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=TRAIN["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    cond_items = [i for i, item in enumerate(bank) if item["objects"]]
    batch = TRAIN["batch"]
    t0, smooth = time.time(), None
    for step in range(steps):
        frac = step / max(1, steps - 1)
        lr = TRAIN["lr"] * min(1.0, (step + 1) / TRAIN["warmup"])
        lr *= TRAIN["final_lr"] + (1 - TRAIN["final_lr"]) * 0.5 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr
        x0, cs = [], []
        for _ in range(batch):
            idx = cond_items[int(torch.randint(len(cond_items), (), generator=gen))]
            if torch.rand((), generator=gen) < toy_world.P_UNCOND:
                c = ctx[0]
            elif torch.rand((), generator=gen) < toy_world.P_MIX:
                c = mixed_context(ctx, rows, groups, bank, idx, gen)
            else:
                c = ctx[idx]
            x0.append(toy_world.render(toy_world.place(gen, bank[idx]["objects"])))
            cs.append(c)
        length = max(c.shape[0] for c in cs)
        context = torch.zeros(batch, length, cs[0].shape[1])
        tokens = length + (toy_world.LATENT_SIZE // 2) ** 2  # text rows first, then the 8 x 8 image tokens
        mask = torch.zeros(batch, 1, tokens, tokens)  # full [L, L]: the host's CPU attention does not broadcast
        for i, c in enumerate(cs):
            context[i, :c.shape[0]] = c
            mask[i, ..., c.shape[0]:length] = -1e4  # padded text keys: attended by nothing
        x0 = to_model(torch.stack(x0))
        t = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal flow time
        eps = torch.randn(x0.shape, generator=gen)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        if family == "chroma":
            with InPlaceSafe():
                v = dm(xt, t, context, torch.zeros(batch), attention_mask=mask)
        else:  # every context has FLUX_T5_LENGTH rows: nothing to mask
            with OutOfPlaceAdds():
                v = dm(xt, t, context, y=torch.zeros(batch, FLUX_CONFIG["vec_in_dim"]))
        loss = ((v - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if progress and (step + 1) % 40 == 0:
            log.info("toy DiT: step %d/%d loss %.4f %.0f s", step + 1, steps, smooth, time.time() - t0)
    dm.eval()
    for p in dm.parameters():
        p.requires_grad_(False)
    return model


def build(path: str, steps: int | None = None, family: str = "chroma") -> str:
    """Train and write the world's Chroma (or Flux; float32, its transformer) at ``path`` and its T5 (float16)
    beside it unless there, each atomically (the transformer last: its file is what ``ensure`` looks for)."""
    import torch

    from harness import bed_files

    t0 = time.time()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    t5_path = os.path.join(folder, T5_FILE)
    text_encoder = new_text_encoder()
    if not os.path.exists(t5_path):
        prefix = "t5xxl.transformer."
        bed_files.save({k[len(prefix):]: v for k, v in text_encoder.get_sd().items() if k.startswith(prefix)},
                       t5_path, torch.float16, {"cones2.toy": "chroma-t5", "cones2.build": str(BUILD_VERSION)})
    # The Chroma world trains on the T5 as built (float32); the Flux world on its CLIP as sampling reads it.
    model = train(text_encoder if family == "chroma" else clip(t5_path, "flux"), steps, family=family)
    sd = {k: v.contiguous() for k, v in model.diffusion_model.state_dict().items()}
    bed_files.save(sd, path, torch.float32, {"cones2.toy": family, "cones2.build": str(BUILD_VERSION),
                                             "cones2.build_seconds": f"{time.time() - t0:.0f}"})
    log.info("toy DiT: built %s in %.0f s", path, time.time() - t0)
    return path


def file_name(family: str = "chroma", long: bool = False) -> str:
    """The world's file: the 480-step one, or ``long`` the attribute world (LONG_STEPS)."""
    stem, ext = os.path.splitext(FILES[family])
    return f"{stem}_{LONG_STEPS}{ext}" if long else FILES[family]


def ensure(out_dir: str | None = None, family: str = "chroma", long: bool = False) -> str:
    path = os.path.join(out_dir or default_cache_dir(), file_name(family, long))
    if not os.path.exists(path):
        log.info("toy DiT: building %s (once; a few minutes on two cores)", path)
        build(path, steps=LONG_STEPS if long else None, family=family)
    return path


class WorldVAE:
    """The Chroma world's pictures in its latents, what Train Residual's VAE must give (``encode``: IMAGE rows
    [B, H, W, 3] -> [B, 16, H/8, W/8]): the toy VAE's encoding (``toy_world.latent_of_picture``) in the first 4
    of Chroma's 16 channels, the rest zero, as the world was trained. A stand-in for the VAE only (the host has no
    VAE class with this world's latents); the model, text encoder, training and sampling are the host's."""

    def encode(self, pixels):
        import torch

        out = torch.zeros(pixels.shape[0], CHANNELS, pixels.shape[1] // 8, pixels.shape[2] // 8)
        for i, picture in enumerate(pixels):
            out[i, :4] = toy_world.latent_of_picture(picture)
        return out


def load(path: str | None = None, family: str = "chroma"):
    """The world's Chroma (or Flux) as a ModelPatcher (float32, CPU)."""
    import comfy.model_patcher
    import comfy.utils
    import torch

    model = new_model(family)
    model.diffusion_model.load_state_dict(comfy.utils.load_torch_file(path or ensure(family=family)))
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", required=True, help="the ComfyUI folder (the host)")
    ap.add_argument("--out", default=None, help="output folder (default: the versioned cache folder)")
    ap.add_argument("--family", default="chroma", choices=sorted(FILES), help="which world (the tests use chroma)")
    ap.add_argument("--long", action="store_true",
                    help=f"the attribute world: {LONG_STEPS} training steps instead of {TRAIN['steps']} (LONG_STEPS)")
    args = ap.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[cones2] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    from harness.host import import_host, load_pack

    import_host(os.path.abspath(args.comfyui))
    load_pack()  # training imports the pack's Chroma module (InPlaceSafe)
    path = ensure(args.out, args.family, args.long)
    sys.stdout.write(f"{'toydit' if args.family == 'chroma' else 'toyflux'}\t{path}\nt5\t{os.path.join(os.path.dirname(path), T5_FILE)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
