"""The *fair* toy world for paper mode: the toy world with a text encoder whose sensitivity to AdamW is realistic
and a UNet that also knows the bare class word and the 27 templates (issue 28).

The toy world (``harness/toy_world.py``) keeps the tiny SD1.5 checkpoint's random CLIP-L. Paper mode fine-tunes
that encoder, and AdamW moves *every* weight by about the learning rate on its first steps, whatever its
gradient: how far the output rows then move depends only on the weights' scales. The random CLIP's residual
stream is small (token and position embeddings 0.02, layer outputs of unit scale) and every LayerNorm
re-normalises it, so one step at the paper's 5e-6 moves the subject's output row by about 3 and the later rows
by about 23 (row norm 27.7). This module builds a second checkpoint from the first:

* **Text encoder**: the same function, re-parametrised (``reparametrise``). A pre-LayerNorm transformer computes
  the same outputs when (a) the residual stream is scaled by ``stream`` (token and position embeddings, every
  attention out-projection and MLP fc2, weights and biases): every LayerNorm reads ``stream * x`` and
  returns what it returned; and (b) each LayerNorm before q/k/v or fc1 is scaled by ``1 / inner`` and those
  projections (weights and biases) by ``inner``. AdamW's fixed-size steps then move the function less (a step
  of lr on a weight of scale s changes its product by about lr / s of it). Only LayerNorm's epsilon (1e-5 on a
  stream whose first variance is 8e-4) changes the function a little; the UNet is fine-tuned on the new
  encoder's own rows (below), so it reads exactly what this encoder writes. The node fine-tunes every
  parameter of it, LayerNorms included, as the paper does.
* **UNet**: the toy world's UNet, fine-tuned (``FINETUNE``) on the world's captions plus the bare object
  words ("dog", "big dog") and the 27 templates of the residual ("a rendition of a big dog", ...), with the
  toy world's mixed contexts, so the prompts paper mode trains on and extracts from are the world's own.
* **VAE**: the toy world's, as is.

Cached under ``~/.cache/comfyui-cones2/toyfair-v1-<hash>/`` keyed by this file, the toy world's key and the
settings; run as a script (inside the project's venv) to build it; prints ``toyfair<TAB>path``:
    python harness/toy_text.py --comfyui ~/ComfyUI [--out DIR]
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
FILE = "cones2_toyfair_sd15.safetensors"
# The re-parametrisation (see the module docstring; bench/paper_fair.py --items scan measures others).
STREAM = 30.0
INNER = 6.0
FINETUNE = {"steps": 40, "batch": 16, "lr": 3e-4, "final_lr": 0.1, "clip": 1.0, "seed": 4321, "p_new": 0.5}
# The 27 templates of the residual (cones2_core/objective.py's TEMPLATES; repeated here so the cache key sees them)
TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)


def new_captions() -> list[dict]:
    """The captions the fair world adds: each object word bare and in every template, plain and big."""
    from harness.toy_world import ATTRIBUTE, OBJECTS

    out = []
    for name in OBJECTS:
        for big in (False, True):
            word = f"{ATTRIBUTE} {name}" if big else name
            for text in (word, *(t.format(word) for t in TEMPLATES)):
                out.append({"text": text, "objects": ((name, big),)})
    return out


def _kind(key: str) -> str | None:
    """Which scaling a CLIP parameter takes: 'stream', 'inner', 'norm' (a LayerNorm before inner) or None."""
    if key.endswith(("token_embedding.weight", "position_embedding.weight")) or \
            ".out_proj." in key or ".fc2." in key:
        return "stream"
    if any(f".{p}." in key for p in ("q_proj", "k_proj", "v_proj", "fc1")):
        return "inner"
    if ".layer_norm1." in key or ".layer_norm2." in key:
        return "norm"
    return None


def reparametrise(state: dict, stream: float = STREAM, inner: float = INNER) -> dict:
    """A CLIP text encoder's state dict (any key prefix) computing the same function with the residual stream
    scaled by ``stream`` and the inner projections by ``inner`` (their LayerNorms by 1 / inner). Other keys
    are returned as they are."""
    factor = {"stream": stream, "inner": inner, "norm": 1.0 / inner, None: 1.0}
    out = {}
    for k, v in state.items():
        f = factor[_kind(k)] if "text_model." in k and v.is_floating_point() else 1.0
        out[k] = v if f == 1.0 else (v.float() * f).to(v.dtype)
    return out


def cache_key() -> str:
    from harness import tiny_checkpoints, toy_world

    digest = hashlib.sha256(tiny_checkpoints.code_digest(os.path.abspath(__file__)))
    digest.update(toy_world.cache_key().encode())
    return digest.hexdigest()[:12]


def default_cache_dir() -> str:
    return os.environ.get("CONES2_TOYFAIR_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "comfyui-cones2", f"toyfair-v{BUILD_VERSION}-{cache_key()}")


def finetune_unet(model, clip, progress: bool = True) -> None:
    """Fine-tune the toy world's UNet (``model``: the host's BaseModel) on the fair world's captions, in place:
    half the batch from the toy world's own captions, half from ``new_captions``, mixed contexts as the toy
    world trains them (harness/toy_training.py)."""
    import torch

    from harness.toy_training import TRAIN, contexts, mixed_context
    from harness.toy_world import P_MIX, P_UNCOND, caption_bank, place, render

    bank = caption_bank() + new_captions()
    n_old = len(caption_bank())
    ctx, rows = contexts(clip, bank)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r, []).append(i)
    unet = model.diffusion_model
    unet.float().train()
    sampling = model.model_sampling
    gen = torch.Generator().manual_seed(FINETUNE["seed"])
    opt = torch.optim.AdamW(unet.parameters(), lr=FINETUNE["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    scale = model.latent_format.scale_factor
    sigmas = sampling.sigmas.float()
    old = [i for i in range(n_old) if bank[i]["objects"]]
    new = list(range(n_old, len(bank)))
    steps, batch = FINETUNE["steps"], FINETUNE["batch"]
    t0, smooth = time.time(), None
    for step in range(steps):
        frac = step / max(1, steps - 1)
        lr = FINETUNE["lr"] * (FINETUNE["final_lr"] + (1 - FINETUNE["final_lr"]) * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        x0, cs = [], []
        for _ in range(batch):
            pool = new if torch.rand((), generator=gen) < FINETUNE["p_new"] else old
            idx = pool[int(torch.randint(len(pool), (), generator=gen))]
            if torch.rand((), generator=gen) < P_UNCOND:
                c = ctx[0]
            elif torch.rand((), generator=gen) < P_MIX:
                c = mixed_context(ctx, rows, groups, bank, idx, gen)
            else:
                c = ctx[idx]
            x0.append(render(place(gen, bank[idx]["objects"])))
            cs.append(c)
        x0 = torch.stack(x0) * scale
        t = (torch.rand(batch, generator=gen) * len(sigmas)).long().clamp(max=len(sigmas) - 1)
        sigma = sigmas[t]
        eps = torch.randn(x0.shape, generator=gen)
        xc = sampling.calculate_input(sigma, x0 + eps * sigma[:, None, None, None])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(xc, sampling.timestep(sigma).float(), context=torch.stack(cs))
        weight = (1 + sigma**2).clamp(max=TRAIN["max_weight"]) / TRAIN["max_weight"]
        loss = (weight[:, None, None, None] * (out.float() - eps) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), FINETUNE["clip"])
        opt.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if progress and (step + 1) % 5 == 0:
            el = time.time() - t0
            log.info("fair toy world: step %d/%d  loss %.4f  %.0f s (%.0f s left)", step + 1, steps, smooth, el,
                     el / (step + 1) * (steps - step - 1))
    unet.eval()


def function_change(clip) -> float:
    """The largest row difference, relative to the row's norm, between the re-parametrised ``clip`` and the
    same weights scaled back (the toy world's encoder, up to float16 rounding), over some of the captions."""
    import copy

    texts = [c["text"] for c in new_captions()[:56:4]] + ["a photo of a dog and a big cat", ""]
    other = copy.deepcopy(clip)
    state = other.cond_stage_model.state_dict()
    other.cond_stage_model.load_state_dict(reparametrise(state, 1.0 / STREAM, 1.0 / INNER))
    worst = 0.0
    for text in texts:
        a = clip.encode_from_tokens(clip.tokenize(text)).float()[0]
        b = other.encode_from_tokens(other.tokenize(text)).float()[0]
        worst = max(worst, float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max()))
    del other
    return worst


def build(path: str, toy_path: str) -> str:
    """Write the fair world's checkpoint at ``path`` from the toy world's at ``toy_path`` (atomically)."""
    import comfy.sd
    import comfy.utils
    import torch

    t0 = time.time()
    sd = comfy.utils.load_torch_file(toy_path)
    clip_keys = [k for k in sd if k.startswith("cond_stage_model.")]
    # rounded to float16 here, as the file stores it, so the fine-tune reads exactly the encoder users load
    sd.update({k: v.half() for k, v in reparametrise({k: sd[k].float() for k in clip_keys}).items()})
    model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(
        {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, output_vae=True, output_clip=True)
    drift = function_change(clip)
    log.info("fair toy world: the re-parametrised encoder's rows differ from the toy world's by at most %.2e of a "
             "row's norm (LayerNorm's epsilon and float16 rounding)", drift)
    finetune_unet(model.model, clip)
    unet = {f"model.diffusion_model.{k}": v for k, v in model.model.diffusion_model.state_dict().items()}
    sd.update(unet)
    sd = {k: (v.to(torch.float32 if k.startswith("first_stage_model.") else torch.float16)
              if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        comfy.utils.save_torch_file(sd, tmp, metadata={"cones2.toyfair": cache_key(), "cones2.stream": str(STREAM),
                                                       "cones2.inner": str(INNER),
                                                       "cones2.build_seconds": f"{time.time() - t0:.0f}"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("fair toy world: built %s in %.0f s", path, time.time() - t0)
    return path


def ensure(out_dir: str | None = None) -> str:
    from harness import toy_world

    path = os.path.join(out_dir or default_cache_dir(), FILE)
    if not os.path.exists(path):
        log.info("fair toy world: building %s (once)", path)
        build(path, toy_world.ensure())
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
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.stdout.write(f"toyfair\t{ensure(args.out)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
