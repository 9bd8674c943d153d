"""Train Residual on Flux, memory on paper: what fast mode's backward keeps, measured per block on the tiny bed.

The tiny Flux bed (harness/tiny_flux.py) has Flux's full width (3072 channels, 24 heads), so one double and one
single block save for backward exactly what each of a full Flux's 19 double and 38 single blocks saves. This
runs the bed's forward as the trainer does (frozen weights as gradient-free aliases, out-of-place residual adds,
SDPA attention), counts the bytes autograd saves inside each kind of block (weights excluded: they are the
model's own tensors), checks that they grow linearly with the sequence, and scales them to full-size Flux:
57 blocks, bf16 activations, the sequence of a 512 or 1024 px crop plus the 256 T5 tokens of the host's
default padding. Printed as docs/flux.md's table (Training).

    python bench/flux_train_memory.py --comfyui ~/ComfyUI
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

WIDTH = 3072
DOUBLE, SINGLE = 19, 38  # Flux dev and schnell
PARAMS = 11.9e9  # the transformer's parameters
T5_TOKENS = 256  # the host's default T5 padding for Flux


def saved_per_token(model, pack, px: int, txt: int) -> dict[str, float]:
    """Bytes autograd saves inside each kind of block (and outside them) per sequence token, float32."""
    gr = pack.cones2_core.gradients
    dm = model.model.diffusion_model
    weights = {p.untyped_storage().data_ptr() for p in dm.parameters()}
    where, seen, total = ["outside"], set(), {}

    def enter(name):
        def hook(*_):
            where[0] = name
        return hook

    def leave(*_):
        where[0] = "outside"

    handles = []
    for name, blocks in (("double", dm.double_blocks), ("single", dm.single_blocks)):
        for b in blocks:
            handles += [b.register_forward_pre_hook(enter(name)), b.register_forward_hook(leave)]

    def pack_hook(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and t.is_floating_point() and (where[0], ptr) not in seen:
            seen.add((where[0], ptr))
            total[where[0]] = total.get(where[0], 0) + t.untyped_storage().nbytes()
        return t

    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.randn(1, 16, px // 8, px // 8)
            ctx = torch.randn(1, txt, 4096, requires_grad=True)
            opts = {"optimized_attention_override": pack.nodes.architectures.base.sdpa_attention}
            with gr.GradientFreeWeights(), gr.OutOfPlaceAdds(), \
                    torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
                out = model.model.apply_model(x, torch.tensor([0.5]), c_crossattn=ctx, y=torch.randn(1, 768),
                                              guidance=torch.tensor([3.5]), transformer_options=opts)
            out.pow(2).mean().backward()
    finally:
        for h in handles:
            h.remove()
    tokens = (px // 16) ** 2 + txt
    return {k: v / tokens for k, v in total.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.path.expanduser("~/ComfyUI"))
    args = ap.parse_args()
    from harness import tiny_flux
    from harness.host import build, import_host, load_pack

    import_host(args.comfyui)
    pack = load_pack()
    model = tiny_flux.load(build(tiny_flux.__file__, args.comfyui, out=tiny_flux.default_cache_dir()))[0]
    runs = {(px, txt): saved_per_token(model, pack, px, txt) for px, txt in ((64, 16), (128, 16), (128, 64))}
    out = []
    for (px, txt), r in runs.items():
        out.append(f"{px} px, {txt} text tokens: saved per token, in channels of {WIDTH} (float32): "
                   + ", ".join(f"{k} {v / WIDTH / 4:.2f}" for k, v in sorted(r.items())))
    per = {k: max(r[k] for r in runs.values()) / 2 for k in ("double", "single")}  # bf16, the largest of the runs
    block = max(per.values())
    gb = 1e9
    out += ["", f"full-size Flux transformer weights: {PARAMS * 2 / gb:.1f} GB bf16, {PARAMS / gb:.1f} GB fp8",
            "| crop | tokens (image + T5) | activations, no checkpointing | checkpointed: block inputs + one block |",
            "|---|---|---|---|"]
    for px in (512, 1024):
        tokens = (px // 16) ** 2 + T5_TOKENS
        full = (DOUBLE * per["double"] + SINGLE * per["single"]) * tokens
        inputs = (DOUBLE + SINGLE) * WIDTH * 2 * tokens  # each block keeps its input stream(s): L x 3072 bf16
        out.append(f"| {px} px | {tokens} | {full / gb:.1f} GB | {inputs / gb:.2f} + {block * tokens / gb:.2f} GB |")
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
