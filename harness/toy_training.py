"""The toy world's UNet: its initialisation and its training through the host's model classes.

The text encoder is the tiny SD1.5 checkpoint's frozen random CLIP-L; the captions, scenes and latents come
from ``harness/toy_world.py``, which builds and caches the checkpoint (this file is part of its cache key,
``toy_world.BUILD_FILES``).
"""

from __future__ import annotations

import logging
import math
import time

from harness.toy_world import OBJECTS, P_MIX, P_UNCOND, caption_bank, place, render

log = logging.getLogger("comfyui-cones2")

UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 320, "use_temporal_resblock": False,
    "use_temporal_attention": False, "adm_in_channels": None, "use_linear_in_transformer": False,
    "context_dim": 768, "num_res_blocks": [1, 1], "channel_mult": [1, 1], "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1,
}
TRAIN = {"steps": 640, "batch": 16, "lr": 1e-3, "warmup": 30, "final_lr": 0.1, "clip": 1.0, "seed": 1234,
         "max_weight": 10.0}


def _clip(seed: int = 0):
    """The tiny SD1.5 checkpoint's CLIP-L (same construction), its weights rounded to float16 as stored."""
    import comfy.sd
    import comfy.supported_models
    import torch

    from harness.tiny_checkpoints import FAMILIES, _init_module

    config = comfy.supported_models.SD15(dict(FAMILIES["sd1"]["unet"]))
    clip = comfy.sd.CLIP(target=config.clip_target(), model_options={"dtype": torch.float32})
    _init_module(clip.cond_stage_model, seed + 2)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            p.copy_(p.half().float())
    return clip


def _subject_rows(clip, text: str) -> tuple[int, ...]:
    toks = clip.tokenize(text, return_word_ids=True)["l"][0]
    names = {clip.tokenize(o)["l"][0][1][0]: o for o in OBJECTS}
    return tuple(i for i, (t, _w, _wid) in enumerate(toks) if t in names)


def contexts(clip, bank, batch: int = 48):
    """Contexts [N, 77, 768] of the captions (the host's own encoding, 48 captions per encoder call) and the
    token rows of each caption's object words."""
    import torch

    ctx, rows = [], []
    for start in range(0, len(bank), batch):
        items = bank[start:start + batch]
        chunks = [clip.tokenize(item["text"])["l"][0] for item in items]
        out = clip.encode_from_tokens({"l": chunks}).float()[0]
        ctx += list(out.reshape(len(items), -1, out.shape[-1]))
        rows += [_subject_rows(clip, item["text"]) for item in items]
        log.info("toy world: encoded %d/%d captions", start + len(items), len(bank))
    return torch.stack(ctx), rows


def init_unet(unet, seed: int) -> None:
    """Standard initialisation (the host's ops leave weights empty): PyTorch's default for convs and linears,
    ones/zeros for norms, and zero for the last layer of every residual branch and the output."""
    import zlib

    import torch

    for name, p in sorted(unet.named_parameters(), key=lambda kv: kv[0]):
        g = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
        with torch.no_grad():
            parent = name.rsplit(".", 1)[0]
            leaf = name.rsplit(".", 1)[-1]
            zero = parent.endswith(("out_layers.3", "proj_out")) or parent == "out.2"
            if "norm" in parent or parent.endswith(("in_layers.0", "out_layers.0", "out.0")) and p.ndim == 1:
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias" or zero:
                p.zero_()
            else:
                fan_in = p[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound * math.sqrt(3))


def init_cross_attention(unet, ctx, rows, seed: int, rel_floor: float = 1e-3, prior: float = 5.0) -> None:
    """Start every cross-attention layer reading the prompt's object words.

    A random CLIP's rows share a large common component (cosine 0.93-0.98 between different words at one
    position), and a pixel's attention is spread over 77 rows of which one or two name an object; a UNet
    started from random projections then needs thousands of steps before its text matters. So, from the
    caption bank's contexts: keys and values start as a PCA whitening of the rows (each layer in its own random
    rotation), which brings the differences between words to unit scale; and the first dimension of every
    head starts as a prior towards object words: its key is the rows' whitened projection on the direction
    that separates object-word rows from the others, its query a constant (the LayerNorm's bias read by a
    constant row of to_q), so that every pixel starts with about ``prior`` more logit on object words."""
    import torch

    flat = ctx.reshape(-1, ctx.shape[-1]).double()
    mean = flat.mean(0)
    dev = flat - mean
    lam, vec = torch.linalg.eigh(dev.T @ dev / flat.shape[0])
    lam, vec = lam.flip(0), vec.flip(1)
    subject = torch.zeros(ctx.shape[:2], dtype=torch.bool)
    for i, r in enumerate(rows):
        subject[i, list(r)] = True
    subject = subject.reshape(-1)
    g = torch.Generator().manual_seed(seed + 99)
    for name, mod in sorted(unet.named_modules(), key=lambda kv: kv[0]):
        if not name.endswith("attn2"):
            continue
        block = unet.get_submodule(name.rsplit(".", 1)[0])
        inner, heads = mod.to_k.weight.shape[0], mod.heads
        dim_head = inner // heads
        k = min(inner, lam.numel())
        white = vec[:, :k].T / torch.sqrt(lam[:k] + rel_floor * lam[0])[:, None]  # [k, 768]
        proj = dev @ white.T
        gap = proj[subject].mean(0) - proj[~subject].mean(0)
        direction = gap / gap.norm()
        sep = float((proj[subject] @ direction).mean() - (proj[~subject] @ direction).mean())
        amp = math.sqrt(prior * math.sqrt(dim_head))
        key_row = (amp / sep) * (direction @ white)  # [768]
        for lin in (mod.to_k, mod.to_v):
            rot, _ = torch.linalg.qr(torch.randn(inner, inner, generator=g, dtype=torch.float64))
            full = torch.zeros(inner, flat.shape[1], dtype=torch.float64)
            full[:k] = white
            w = rot @ full
            if lin is mod.to_k:
                w[::dim_head] = key_row
            with torch.no_grad():
                lin.weight.copy_(w.float())
        with torch.no_grad():
            block.norm2.bias.fill_(1.0)
            mod.to_q.weight[::dim_head] = amp / mod.to_q.weight.shape[1]


def mixed_context(ctx, rows, groups, bank, idx: int, gen):
    """A context for caption ``idx`` in which only its object words' rows say what it asks for.

    Every row is taken from a caption with the same object-word rows (the same token layout): each object word's
    row from one that has the same object (and size) there, every other row from any of them. A causal encoder
    carries each word into every later row (padding included, and the second object's row carries the first);
    mixed this way, identity and size are only reliable at the object's own row, which is where residuals are
    added and the layout bias acts."""
    import torch

    group = groups[rows[idx]]

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=gen))]

    c = ctx[pick(group)].clone()
    for j, r in enumerate(rows[idx]):
        same = [d for d in group if bank[d]["objects"][j] == bank[idx]["objects"][j]]
        c[r] = ctx[pick(same)][r]
    return c


def train_unet(clip, progress=True):
    """The world's UNet, trained from scratch (``TRAIN``); returns the host's (model_config, BaseModel)."""
    import comfy.supported_models
    import torch

    bank = caption_bank()
    t0 = time.time()
    ctx, rows = contexts(clip, bank)
    log.info("toy world: %d captions encoded in %.0f s", len(bank), time.time() - t0)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r, []).append(i)
    config = comfy.supported_models.SD15(dict(UNET))
    model = config.get_model({})
    unet = model.diffusion_model
    init_unet(unet, TRAIN["seed"])
    init_cross_attention(unet, ctx, rows, TRAIN["seed"])
    unet.train()
    sampling = model.model_sampling
    gen = torch.Generator().manual_seed(TRAIN["seed"])
    opt = torch.optim.AdamW(unet.parameters(), lr=TRAIN["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    steps, batch = TRAIN["steps"], TRAIN["batch"]
    scale = config.latent_format.scale_factor
    sigmas = sampling.sigmas.float()
    cond_items = [i for i, item in enumerate(bank) if item["objects"]]
    t0 = time.time()
    smooth_loss = None
    for step in range(steps):
        lr = TRAIN["lr"] * min(1.0, (step + 1) / TRAIN["warmup"])
        frac = step / max(1, steps - 1)
        lr *= TRAIN["final_lr"] + (1 - TRAIN["final_lr"]) * 0.5 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr
        x0, cs = [], []
        for _ in range(batch):
            idx = cond_items[int(torch.randint(len(cond_items), (), generator=gen))]
            objs = bank[idx]["objects"]
            if torch.rand((), generator=gen) < P_UNCOND:
                c = ctx[0]
            elif torch.rand((), generator=gen) < P_MIX:
                c = mixed_context(ctx, rows, groups, bank, idx, gen)
            else:
                c = ctx[idx]
            x0.append(render(place(gen, objs)))
            cs.append(c)
        x0 = torch.stack(x0) * scale  # model space
        c = torch.stack(cs)
        t = (torch.rand(batch, generator=gen) * len(sigmas)).long().clamp(max=len(sigmas) - 1)  # uniform timesteps
        sigma = sigmas[t]
        eps = torch.randn(x0.shape, generator=gen)
        xn = x0 + eps * sigma[:, None, None, None]
        xc = sampling.calculate_input(sigma, xn)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(xc, sampling.timestep(sigma).float(), context=c)
        # eps-MSE weighted by (1 + sigma^2), capped: the x0 error where the noise hides the image, which is
        # where the prompt decides what is drawn (plain eps-MSE scales it by 1/sigma^2 and never learns text).
        weight = (1 + sigma**2).clamp(max=TRAIN["max_weight"]) / TRAIN["max_weight"]
        loss = (weight[:, None, None, None] * (out.float() - eps) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), TRAIN["clip"])
        opt.step()
        smooth_loss = loss.item() if smooth_loss is None else 0.95 * smooth_loss + 0.05 * loss.item()
        if progress and (step + 1) % 25 == 0:
            el = time.time() - t0
            log.info("toy world: step %d/%d  loss %.4f  %.0f s (%.0f s left)", step + 1, steps, smooth_loss, el,
                     el / (step + 1) * (steps - step - 1))
    unet.eval()
    return config, model
