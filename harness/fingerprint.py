"""Fingerprints of what the pack computes on every test bed, for refactorings that must change nothing.

Development only. Run it on two checkouts (before and after a change) and compare the output line by line::

    python harness/fingerprint.py --comfyui ~/ComfyUI > after.txt
    (cd ../before && python harness/fingerprint.py --comfyui ~/ComfyUI) > before.txt
    diff before.txt after.txt

Each line is ``name<TAB>sha256 of the exact bytes`` of one result: the conditioning Apply Residuals makes with two
residuals, sampled latents with Layout Guidance (with and without self-recurrence), the attention maps of the
guided run, and the residuals Train Residual learns in a few steps (fast and paper mode), on the tiny SD1.5,
SD2.x-v, SDXL, Flux and Chroma beds, and a guided sample of the trained toy world. The pack and harness are the ones of
the checkout this file is in; the beds come from the shared caches (built when missing).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import tiny_checkpoints, toy_world  # noqa: E402
from harness import tiny_chroma as chroma_bed  # noqa: E402
from harness import tiny_flux as flux_bed  # noqa: E402
from harness.host import build, import_host, load_pack  # noqa: E402

TWO_BOXES = ('{"version":1,"boxes":[{"subject":"dog","x":0.0,"y":0.0,"w":0.5,"h":1.0},'
             '{"subject":"cat","x":0.5,"y":0.1,"w":0.5,"h":0.9}]}')
PROMPT = "a photo of a dog and a cat"


def digest(value) -> str:
    import torch

    h = hashlib.sha256()

    def feed(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                h.update(str(k).encode())
                feed(v[k])
        elif isinstance(v, list | tuple):
            for x in v:
                feed(x)
        else:
            h.update(repr(v).encode())

    feed(value)
    return h.hexdigest()[:24]


def residuals(pack, family: str, widths: dict, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    res = pack.cones2_core.residual.Residual
    return [res(word, family, {k: torch.randn(1, w, generator=g) * 0.5 for k, w in widths.items()})
            for word in ("dog", "cat")]


def sample(model, pos, neg, cfg, sampler, steps=3, size=64, channels=4, seed=1):
    import torch

    import nodes

    latent = {"samples": torch.zeros(1, channels, size // 8, size // 8)}
    return nodes.common_ksampler(model, seed, steps, cfg, sampler, "simple", pos, neg, latent)[0]["samples"]


def guided_lines(pack, name, model, clip, res, cfg, channels, size=64, neg_text=""):
    out = []
    apply = pack.nodes.residual_nodes.Cones2ApplyResiduals.execute
    node = pack.nodes.layout_node.Cones2LayoutGuidance.execute
    pos = apply(clip, PROMPT, res).result[0]
    neg = apply(clip, neg_text, None).result[0]
    out.append((f"{name}.conditioning", digest([c for c, _ in pos])))
    for sampler, rec in (("euler", False), ("euler_ancestral", True), ("dpmpp_2m", False)):
        guided, cond = node(model, pos, TWO_BOXES, 0.08, 2.5, -1e8, 0.0, 1.0, rec, record_maps=True).result
        lat = sample(guided, cond, neg, cfg, sampler, channels=channels, size=size)
        out.append((f"{name}.sample.{sampler}{'.recurrence' if rec else ''}", digest(lat)))
        report = pack.nodes.maps_node.attention_report(guided)
        out.append((f"{name}.maps.{sampler}", digest([(r["grid"], r["subject"], r["map"], r["region"])
                                                       for r in report])))
    soft, cond = node(model, pos, TWO_BOXES, 0.3, 2.5, -5.0, 0.0, 1.0, False, record_maps=False).result
    out.append((f"{name}.sample.soft", digest(sample(soft, cond, neg, cfg, "euler", channels=channels, size=size))))
    return out


def train_lines(pack, name, model, clip, vae, modes, **extra):
    from harness.test_helpers import blob_images

    settings_cls = pack.cones2_core.objective.TrainSettings
    out = []
    for mode in modes:
        s = settings_cls(mode=mode, steps=2, learning_rate=1e-3 if mode == "paper" else 1e-2, resolution=64,
                         seed=3, **extra)
        res, losses, evals = pack.nodes.train_node.train_residual(model, clip, vae, blob_images(3), "dog", s)
        out.append((f"{name}.train.{mode}", digest([res.tensors, losses, evals])))
    return out


def cut_encoders(clip) -> None:
    for key in ("clip_l", "clip_h", "clip_g"):
        sub = getattr(clip.cond_stage_model, key, None)
        if sub is not None:
            del sub.transformer.text_model.encoder.layers[2:]


def run(host: str, only=None) -> list[tuple[str, str]]:
    import torch

    ckpts = build(tiny_checkpoints.__file__, host, out=tiny_checkpoints.default_cache_dir(), timeout=1200)
    flux_paths = build(flux_bed.__file__, host, out=flux_bed.default_cache_dir(), timeout=1200)
    import_host(host)
    import comfy.model_management  # noqa: F401
    import comfy.sd

    pack = load_pack()
    fams = pack.cones2_core.families.FAMILIES
    lines = []
    for fam in ("sd1", "sd2", "sdxl"):
        if only and fam not in only:
            continue
        with torch.inference_mode():
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpts[fam])
            cut_encoders(clip)
        res = residuals(pack, fam, fams[fam].widths, seed=len(lines))
        lines += guided_lines(pack, fam, model, clip, res, cfg=5.0, channels=4)
        lines += train_lines(pack, fam, model, clip, vae, ("fast", "paper") if fam == "sd1" else ("fast",))
    if not only or "flux" in only:
        from harness.test_helpers import short_clip

        model, clip, vae = flux_bed.load(flux_paths)
        clip = short_clip(clip)
        res = residuals(pack, "flux", fams["flux"].widths, seed=7)
        lines += guided_lines(pack, "flux", model, clip, res, cfg=1.0, channels=16)
        lines += train_lines(pack, "flux", model, clip, vae, ("fast",), guidance=3.5)
    if not only or "chroma" in only:  # real CFG with a negative of another length (separate calls)
        chroma_paths = build(chroma_bed.__file__, host, out=chroma_bed.default_cache_dir(), timeout=1200)
        model, clip, vae = chroma_bed.load(chroma_paths)
        res = residuals(pack, "chroma", fams["chroma"].widths, seed=8)
        lines += guided_lines(pack, "chroma", model, clip, res, cfg=4.0, channels=16, neg_text="blurry")
        lines += train_lines(pack, "chroma", model, clip, vae, ("fast",))
    if not only or "toy" in only:
        path = build(toy_world.__file__, host, out=toy_world.default_cache_dir(), timeout=2400)["toy"]
        with torch.inference_mode():
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path)
        lines += guided_lines(pack, "toy", model, clip, None, cfg=5.0, channels=4, size=toy_world.LATENT_SIZE * 8)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=None, help="the ComfyUI host (default: as the tests find it)")
    ap.add_argument("--only", nargs="*", help="beds to run: sd1 sd2 sdxl flux chroma toy")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from harness.host import find_host

    host = args.comfyui or find_host()
    for name, value in run(host, args.only):
        sys.stdout.write(f"{name}\t{value}\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
