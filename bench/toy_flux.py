"""A small *trained* Flux on the toy world's captions, and what Layout Guidance does to its images.

    python bench/toy_flux.py [--steps 600] [--n 16] [--samplers euler euler_ancestral dpmpp_2m] [--confine]

The tiny Flux bed (harness/tiny_flux.py) has random weights, so there a -1e8 bias puts every subject's attention
in its box by construction. This trains, through the host's own Flux classes, a small Flux (hidden 256, 4 heads,
2 double + 2 single blocks, Flux-schnell style without a guidance embedding) on the toy world
(harness/toy_world.py: "dog", "cat", "car" make red, green, blue disks at random places; "big" makes the next one
larger), with the bed's T5 (T5-XXL's width, one random layer) as its text: flow matching (v = eps - x0 at
logit-normal t), 600 AdamW steps of 16, contexts mixed as the SD toy world's are (identity only reliable at the
object's own T5 row); the pooled CLIP-L vector is switched off (its projection zero and frozen), so objects can
only come through the joint attention to the text rows. About 35 minutes on the shared 2-core machine; cached
under ~/.cache/comfyui-cones2/toyflux-v1-<hash of this file>/.

Then it samples "a photo of a dog and a cat" on --n noise draws of one seed, unguided and with Layout Guidance at
its node defaults (dog left, cat right, and the mirror), per sampler, and prints presence / unprompted / in-box
rates (harness/toy_measures.py on the first four latent channels). ``--confine`` adds rows with the subject's
text queries confined to its region too (``nodes/architectures/joint.py`` CONFINE_TEXT_QUERIES). Not a CI test (the build is too
slow for CI); rates, so machine noise does not matter.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from harness import tiny_flux, toy_world  # noqa: E402
from harness.host import build, find_host, import_host, load_pack  # noqa: E402

T5_LEN = 16  # T5 tokens (T5TokenizerOptions' min_length): every caption fits
CONFIG = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
          "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 2,
          "axes_dim": [8, 28, 28], "theta": 10000, "qkv_bias": True, "guidance_embed": False, "patch_size": 2}
TRAIN = {"steps": 600, "batch": 16, "lr": 1e-3, "warmup": 30, "final_lr": 0.1, "seed": 1234}


def flux_clip(paths):
    from harness.dev_nodes import load_tiny_flux_clip

    clip = load_tiny_flux_clip(paths["clip_l"], paths["t5"]).clone()
    clip.set_tokenizer_option("t5xxl_min_length", T5_LEN)
    return clip


def encode(clip, bank):
    """T5 contexts [N, T5_LEN, 4096] of the captions and the rows of their object words."""
    import torch

    names = {clip.tokenize(o, return_word_ids=True)["t5xxl"][0][0][0]: o for o in toy_world.OBJECTS}
    ctx, rows = [], []
    for item in bank:
        tokens = clip.tokenize(item["text"])
        ctx.append(clip.encode_from_tokens(tokens).float()[0])
        rows.append(tuple(i for i, (t, _w) in enumerate(tokens["t5xxl"][0]) if t in names))
    return torch.stack(ctx), rows


def to_model(raw):
    """Raw toy latents [B, 4, h, w] -> Flux model space [B, 16, h, w] (the world lives in the first 4 channels)."""
    import comfy.latent_formats
    import torch

    z = torch.zeros(raw.shape[0], 16, *raw.shape[2:])
    z[:, :4] = raw
    return comfy.latent_formats.Flux().process_in(z)


def new_model():
    import comfy.supported_models
    import torch

    config = comfy.supported_models.FluxSchnell(dict(CONFIG))
    config.set_inference_dtype(torch.float32, None)
    return config.get_model({})


def train(clip, steps: int):
    import torch

    from cones2_core.gradients import OutOfPlaceAdds
    from harness.toy_training import mixed_context

    bank = toy_world.caption_bank()
    ctx, rows = encode(clip, bank)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r, []).append(i)
    model = new_model()
    dm = model.diffusion_model
    g = torch.Generator().manual_seed(TRAIN["seed"])
    with torch.no_grad():
        for name, p in sorted(dm.named_parameters()):
            if p.ndim > 1:
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / math.sqrt(p[0].numel()) * math.sqrt(3))
            else:
                p.fill_(1.0 if name.endswith("scale") else 0.0)
        dm.vector_in.out_layer.weight.zero_()  # the pooled CLIP-L vector carries nothing in this world
        dm.final_layer.linear.weight.mul_(0.1)
    for p in dm.vector_in.parameters():
        p.requires_grad_(False)
    dm.train()
    params = [p for p in dm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=TRAIN["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    cond_items = [i for i, item in enumerate(bank) if item["objects"]]
    y0 = torch.zeros(TRAIN["batch"], 768)
    t0, smooth = time.time(), None
    for step in range(steps):
        lr = TRAIN["lr"] * min(1.0, (step + 1) / TRAIN["warmup"])
        frac = step / max(1, steps - 1)
        lr *= TRAIN["final_lr"] + (1 - TRAIN["final_lr"]) * 0.5 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr
        x0, cs = [], []
        for _ in range(TRAIN["batch"]):
            idx = cond_items[int(torch.randint(len(cond_items), (), generator=g))]
            if torch.rand((), generator=g) < toy_world.P_UNCOND:
                c = ctx[0]
            elif torch.rand((), generator=g) < toy_world.P_MIX:
                c = mixed_context(ctx, rows, groups, bank, idx, g)
            else:
                c = ctx[idx]
            x0.append(toy_world.render(toy_world.place(g, bank[idx]["objects"])))
            cs.append(c)
        x0 = to_model(torch.stack(x0))
        t = torch.sigmoid(torch.randn(TRAIN["batch"], generator=g))  # logit-normal flow time
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        with torch.autocast("cpu", dtype=torch.bfloat16), OutOfPlaceAdds():
            v = dm(xt, t, torch.stack(cs), y=y0)
        loss = ((v.float() - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if (step + 1) % 25 == 0:
            sys.stderr.write(f"toy flux: step {step + 1}/{steps} loss {smooth:.4f} {time.time() - t0:.0f} s\n")
    dm.eval()
    return model


def cache_path(steps: int) -> str:
    with open(__file__, "rb") as f:
        key = hashlib.sha256(f.read() + tiny_flux.cache_key().encode() + str(steps).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~"), ".cache", "comfyui-cones2", f"toyflux-v1-{key}", "toy_flux.safetensors")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=TRAIN["steps"])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--samplers", nargs="+", default=["euler"])
    ap.add_argument("--confine", action="store_true", help="also rows with the text queries confined")
    args = ap.parse_args(argv)
    host = find_host()
    paths = build(tiny_flux.__file__, host, out=tiny_flux.default_cache_dir())
    import_host(host)
    import comfy.model_patcher
    import comfy.utils
    import torch

    import nodes as host_nodes
    from harness import toy_measures as tm

    pack = load_pack()
    clip = flux_clip(paths)
    path = cache_path(args.steps)
    if os.path.exists(path):
        model = new_model()
        model.diffusion_model.load_state_dict(comfy.utils.load_torch_file(path))
    else:
        model = train(clip, args.steps)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        comfy.utils.save_torch_file({k: v.contiguous() for k, v in model.diffusion_model.state_dict().items()}, path)
    mp = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    apply = pack.nodes.residual_nodes.Cones2ApplyResiduals
    neg = apply.execute(clip, "", None).result[0]

    def run(prompt, boxes=None, sampler="euler"):
        pos = apply.execute(clip, prompt, None).result[0]
        m = mp
        if boxes is not None:
            m, pos = pack.nodes.layout_node.Cones2LayoutGuidance.execute(m, pos, tm.layout(boxes),
                                                                         **tm.GUIDANCE_DEFAULTS).result
        latent = {"samples": torch.zeros(args.n, 16, toy_world.LATENT_SIZE, toy_world.LATENT_SIZE)}
        samples = host_nodes.common_ksampler(m, args.seed, args.sample_steps, args.cfg, sampler, "simple", pos, neg,
                                             latent)[0]["samples"]
        return samples[:, :4]

    lines = [f"{'prompt / run':38} {'sampler':16} {'presence':>8} {'unprompted':>10} {'in boxes':>8}"]

    def row(name, sampler, s):
        inb = f"{s['in_boxes']:8.2f}" if "in_boxes" in s else f"{'':8}"
        lines.append(f"{name:38} {sampler:16} {s['presence']:8.2f} {s['unprompted']:10.2f} {inb}")

    for prompt, objs in (("a photo of a dog", ["dog"]), ("a photo of a cat", ["cat"]), ("a photo of a car", ["car"])):
        row(prompt, "euler", tm.summarise(run(prompt), objs))
    two, both = "a photo of a dog and a cat", ["dog", "cat"]
    layouts = {"dog left, cat right": {"dog": tm.LEFT, "cat": tm.RIGHT},
               "dog right, cat left": {"dog": tm.RIGHT, "cat": tm.LEFT}}
    for sampler in args.samplers:
        unguided = run(two, sampler=sampler)
        for name, boxes in layouts.items():
            row(f"unguided ({name})", sampler, tm.summarise(unguided, both, boxes))
            row(f"guided ({name})", sampler, tm.summarise(run(two, boxes, sampler), both, boxes))
            if args.confine:
                pack.nodes.architectures.joint.CONFINE_TEXT_QUERIES = True
                try:
                    row(f"+ text queries ({name})", sampler, tm.summarise(run(two, boxes, sampler), both, boxes))
                finally:
                    pack.nodes.architectures.joint.CONFINE_TEXT_QUERIES = False
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
