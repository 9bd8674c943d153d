"""A small *trained* world in which prompt words decide which objects appear, never where.

The random-weight tiny checkpoints barely read their text, so they cannot show what Layout Guidance or a
trained residual does to an image. This module builds a deterministic tiny checkpoint that does:

* **UNet**: an SD1.5-detected UNet (320 channels, two levels, cross-attention at 1/16 of the image size),
  trained here, on the CPU, through the host's own model classes and noise schedule, to draw the world's
  objects. Each object word ("dog", "cat", "car") makes one flat-coloured disk (red, green, blue) on a grey
  background, at a uniformly random position; "big" makes the next object larger. Captions hold one or two
  objects, in both orders, under two templates; 15% of the training contexts are the empty prompt.
  Training: 640 AdamW steps of 16 samples (learning rate 1e-3, cosine to 1e-4), eps-MSE weighted by
  min(1 + sigma^2, 10); about 12 minutes on two cores.
* **Text encoder**: the tiny SD1.5 checkpoint's own frozen random CLIP-L (``tiny_checkpoints``), so prompts go
  through CLIPTextEncode / Apply Residuals as usual. A causal encoder carries every word into the later
  tokens, so most training contexts are mixed (``mixed_context``): identity and size are then only reliable at
  the object's own token, which is where residuals and the layout bias act.
* **VAE**: the SD VAE architecture with analytic weights: the encoder averages 8x8 pixel blocks and maps their
  colour linearly to the latent, the decoder paints each latent pixel as an 8x8 block of its colour (the
  residual branches are zero, GroupNorm is kept linear by a large constant carrier channel pair in each
  group). Pictures of the world therefore VAE-encode to its latents exactly, and decoded samples show the
  objects.

The checkpoint is cached under ``~/.cache/comfyui-cones2/`` keyed by a hash of this file and of the tiny
checkpoints' construction; ``harness/toy_measures.py`` reads the world's latents (presence, centroid, size).

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

# ---- the UNet and its training ---------------------------------------------------------------------------------

UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 320, "use_temporal_resblock": False,
    "use_temporal_attention": False, "adm_in_channels": None, "use_linear_in_transformer": False,
    "context_dim": 768, "num_res_blocks": [1, 1], "channel_mult": [1, 1], "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1,
}
TRAIN = {"steps": 640, "batch": 16, "lr": 1e-3, "warmup": 30, "final_lr": 0.1, "clip": 1.0, "seed": 1234,
         "max_weight": 10.0}


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


# ---- the VAE -------------------------------------------------------------------------------------------------------

VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
CARRIER = 1000.0  # the constant channel pair that keeps every GroupNorm linear
SILU_SHIFT = 20.0  # inputs to the last SiLUs are shifted up by this, where silu(x) = x to 1e-8


def build_vae():
    """The SD VAE (host class, SD1.5's configuration) with analytic weights: linear block-colour codec.

    Signal layout in both halves: for colour c, channel 4c carries the colour, 4c+1 its negative and 4c+2 / 4c+3
    the carriers +CARRIER / -CARRIER, so every GroupNorm group that holds signal has mean 0 and a standard
    deviation fixed by the carriers (the colour changes it by under 1e-6). Residual branches (conv2, the
    attention's proj_out) are zero, channel changes are identity shortcuts, downsampling averages 2x2, upsampling
    is nearest. The encoder maps the mean colour of each 8x8 block (in [-1, 1]) to VAE_GAIN times it in latent
    channels 0..2; the decoder inverts that."""
    import comfy.ldm.models.autoencoder
    import torch

    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)
    sd = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in vae.state_dict().items()}
    for k in sd:
        if (".norm" in k or k.endswith(("norm1.weight", "norm2.weight"))) and k.endswith(".weight"):
            sd[k].fill_(1.0)

    def eye_conv(key, n=12):
        w = sd[key]
        kh, kw = w.shape[-2:]
        for c in range(n):
            w[c, c, kh // 2, kw // 2] = 1.0

    def codec_in(prefix, weights):  # weights[c] = (input channel, gain) for colour c
        w, b = sd[prefix + ".weight"], sd[prefix + ".bias"]
        kh, kw = w.shape[-2:]
        for c, (src, gain) in enumerate(weights):
            w[4 * c, src, kh // 2, kw // 2] = gain
            w[4 * c + 1, src, kh // 2, kw // 2] = -gain
            b[4 * c + 2], b[4 * c + 3] = CARRIER, -CARRIER

    def norm_out(prefix, group_size):
        # var of a signal group = carriers' share (+ under 1e-6 from the signal): CARRIER^2 * (pairs * 2 / size)
        pairs = 3 if group_size >= 12 else 1
        std = CARRIER * math.sqrt(2 * pairs / group_size)
        for c in range(3):
            sd[prefix + ".weight"][4 * c] = std
            sd[prefix + ".bias"][4 * c] = SILU_SHIFT
        for c in range(sd[prefix + ".weight"].shape[0]):
            if c % 4 or c >= 12:
                sd[prefix + ".weight"][c] = 0.0

    def codec_out(prefix, gain, outputs):
        w, b = sd[prefix + ".weight"], sd[prefix + ".bias"]
        kh, kw = w.shape[-2:]
        for c in range(outputs):
            w[c, 4 * c, kh // 2, kw // 2] = gain
            b[c] = -gain * SILU_SHIFT

    for k in sd:
        if k.endswith(("nin_shortcut.weight", "upsample.conv.weight")):
            eye_conv(k)
        elif k.endswith("downsample.conv.weight"):
            for c in range(12):
                sd[k][c, c, 0:2, 0:2] = 0.25
    codec_in("encoder.conv_in", [(c, 1.0) for c in range(3)])
    norm_out("encoder.norm_out", sd["encoder.norm_out.weight"].shape[0] // 32)
    codec_out("encoder.conv_out", VAE_GAIN, 3)
    eye_conv("quant_conv.weight", 8)
    eye_conv("post_quant_conv.weight", 4)
    codec_in("decoder.conv_in", [(c, 1.0 / VAE_GAIN) for c in range(3)])
    norm_out("decoder.norm_out", sd["decoder.norm_out.weight"].shape[0] // 32)
    codec_out("decoder.conv_out", 1.0, 3)
    vae.load_state_dict(sd)
    return vae


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


def cache_key() -> str:
    from harness import tiny_checkpoints

    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read() + tiny_checkpoints.cache_key().encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    """CONES2_TOY_DIR when set, else the versioned cache folder."""
    return os.environ.get("CONES2_TOY_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "comfyui-cones2", f"toy-v{BUILD_VERSION}-{cache_key()}")


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


def build(path: str, unet_state: dict | None = None) -> str:
    """Train and write the toy checkpoint at ``path`` (atomically). Requires the host to be importable.
    ``unet_state`` (development only) skips the training and uses these UNet weights."""
    import comfy.supported_models
    import comfy.utils
    import torch

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
