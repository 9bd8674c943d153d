"""Sampling time with Cones 2 layout guidance (self-recurrence off), without and with recording the attention maps
(record_maps), versus plain sampling, measured in one run.

    python bench/guidance_overhead.py [--families sd1 sdxl flux sd3 qwen_image chroma wan] [--size 256] [--steps 4]
                                      [--repeats 5] [--flux-size 128] [--flux-tokens 64]

Builds (or reuses) the tiny random-weight checkpoints of the UNet families (at ``--size``) and every other family's
test bed (harness/beds.py, at ``--flux-size``, with the bed's CFG and latent: Flux at CFG 1 with T5 padded to
``--flux-tokens``, Wan's latent with its frames), loads them through the real host in-process, and alternates
plain, guided and guided-and-recorded sampling of the same prompt and seed; prints one table of median times and
their ratios to plain (targets for guided: at most 1.05 on the UNets, 1.10 on the others). On joint-attention
families the last column is guided sampling through the dense-mask path (``nodes/architectures/joint.py`` EXACT
off: what the guided rows take when another pack's attention override sits inside ours). Chroma samples with a
shorter negative (separate cond and uncond calls, as Chroma is used); its bed memoises the approximator after the
warm-up, so the times are the blocks' (guidance never touches the approximator). The machine is noisy: compare the
ratio, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import tiny_checkpoints  # noqa: E402
from harness.beds import BEDS  # noqa: E402
from harness.host import build, find_host, import_host, load_pack  # noqa: E402

LAYOUT = ('{"version":1,"boxes":[{"subject":"dog","x":0.05,"y":0.1,"w":0.4,"h":0.8},'
          '{"subject":"cat","x":0.55,"y":0.2,"w":0.4,"h":0.7}]}')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["sd1", "sdxl", "flux"])
    ap.add_argument("--flux-size", type=int, default=128, help="Flux image size (the bed is full width: slow)")
    ap.add_argument("--flux-tokens", type=int, default=64, help="T5 tokens of the Flux prompt")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    host = find_host()
    unets = [f for f in args.families if f in ("sd1", "sd2", "sdxl")]
    paths = {}
    if unets:
        paths = build(tiny_checkpoints.__file__, host, *unets)
    beds = {}  # every other family: its test bed (harness/beds.py), built once
    for fam in args.families:
        if fam not in unets:
            module = BEDS[fam].builder_module()
            beds[fam] = build(module.__file__, host, out=module.default_cache_dir())
    import_host(host)
    if args.device != "cpu":
        import comfy.cli_args

        comfy.cli_args.args.cpu = False
    import comfy.sd
    import torch

    import nodes as host_nodes

    pack = load_pack()
    apply_node = pack.nodes.residual_nodes.Cones2ApplyResiduals
    guide_node = pack.nodes.layout_node.Cones2LayoutGuidance
    rows = []
    for fam in args.families:
        size, cfg = args.size, 5.0
        latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
        if fam in beds:  # at --flux-size, the bed's CFG and latent (a video bed's has its frames)
            bed = BEDS[fam]
            model, clip, _vae = bed.load(beds[fam])
            if fam == "flux":
                from comfy_extras.nodes_cond import T5TokenizerOptions

                clip = T5TokenizerOptions.execute(clip, 0, args.flux_tokens).result[0]
            size, cfg = args.flux_size, bed.cfg
            latent = {"samples": bed.empty_latent(size)}
        else:
            model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(paths[fam], output_vae=False, output_clip=True)
        pos = apply_node.execute(clip, "a dog and a cat on a sofa").result[0]
        neg = host_nodes.CLIPTextEncode().encode(clip, "blurry" if fam == "chroma" else "")[0]
        guided, gpos = guide_node.execute(model, pos, LAYOUT, 0.08, 2.5, -1e8, 0.0, 1.0, False).result
        recorded, rpos = guide_node.execute(model, pos, LAYOUT, 0.08, 2.5, -1e8, 0.0, 1.0, False,
                                            record_maps=True).result

        def run(m, p, exact=True, latent=latent, neg=neg, cfg=cfg):
            pack.nodes.architectures.joint.EXACT = exact
            t, c = time.perf_counter(), time.process_time()
            host_nodes.common_ksampler(m, 0, args.steps, cfg, "euler", "normal", p, neg, latent, disable_noise=False)
            return time.perf_counter() - t, time.process_time() - c

        runs = [(model, pos, True), (guided, gpos, True), (recorded, rpos, True)]
        joint = pack.cones2_core.families.FAMILIES[fam].architecture not in ("unet", "wan")
        if joint:  # the joint attention's dense-mask path, for comparison (the path another pack's override gets)
            runs.append((guided, gpos, False))
        for m, p, exact in runs:  # warm-up
            run(m, p, exact)
        times = [[] for _ in runs]
        for _ in range(args.repeats):
            for t, (m, p, exact) in zip(times, runs, strict=True):
                t.append(run(m, p, exact))
        wall = [statistics.median(x[0] for x in t) for t in times]
        cpu = [statistics.median(x[1] for x in t) for t in times]
        rows.append((fam, size, args.steps, wall, cpu))
    lines = [f"{'family':8} {'size':>5} {'steps':>5} {'plain s':>8} {'guided':>7} {'+maps':>7} "
             f"{'guided cpu':>10} {'+maps cpu':>9} {'dense':>7}"]
    for fam, size, steps, wall, cpu in rows:
        dense = f"{wall[3] / wall[0]:7.3f}" if len(wall) > 3 else f"{'-':>7}"
        lines.append(f"{fam:8} {size:5d} {steps:5d} {wall[0]:8.3f} {wall[1] / wall[0]:7.3f} {wall[2] / wall[0]:7.3f} "
                     f"{cpu[1] / cpu[0]:10.3f} {cpu[2] / cpu[0]:9.3f} {dense}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
