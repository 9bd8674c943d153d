"""One joint attention call of guided Flux at full width on CPU: time and peak memory of plain attention, today's
dense-mask guidance (``joint_bias`` as the SDPA mask) and the exact mask-free path (``guided_joint_attention``),
each also with the attention maps (``token_mass`` / ``return_mass``), in one run; with ``--levels call bed`` also
one model call of the full-width Flux bed (harness/tiny_flux.py: one double and one single block of Flux's width,
through the real host and the pack's nodes: plain, Layout Guidance on the exact path, with maps, and on the dense
path), in the same run.

    python bench/joint_attention_memory.py [--sizes 512 1024] [--text 512] [--reps 3] [--dtype float32]
                                           [--levels call bed] [--bed-cases plain exact exact+maps dense]
                                           [--bed-reps N]

Flux's width: 24 heads of 128 channels; 512 px is 1024 image tokens, 1024 px 4096, after 512 T5 tokens; two
subjects (3 text columns) with the default weights. Every case runs in its own subprocess (so its peak is its
own): peak = the process's peak RSS minus its RSS before the inputs were made, so it counts q, k, v, the output and
everything the case allocates. glibc's mmap threshold is fixed at 128 KiB in the children (MALLOC_MMAP_THRESHOLD_)
so that freed chunks go back to the system and the peak counts live tensors; with its default dynamic threshold
(``--glibc-default``) chunks of a few MiB freed and reallocated in a loop stay in the heap and add to RSS. Time =
the median of ``--reps`` calls. Prints one table with ratios to plain (the
issue's targets for guided: <= 1.10x time, <= 1.05x peak memory). The machine is shared: compare the ratios.

The bed level: each case in its own subprocess loads the bed through the host's loaders (the model in the host's
CPU dtype), encodes "a dog and a cat on a sofa" with T5 padded to ``--text`` tokens (T5TokenizerOptions), applies
Layout Guidance (two boxes, the node's defaults) unless plain (the host's attention: torch's SDPA, as the host picks
on NVIDIA GPUs, unless ``--host-attention default``: on CPU the host picks sub-quadratic attention, which the
exact path's flash kernel outruns), and times one-step euler sampling at CFG 1 (one
model call) after one warm-up; the RSS high-water mark is reset after the warm-up (Linux ``/proc/self/clear_refs``),
so peak = the high-water mark of the timed calls over the RSS before them (what one model call adds to the loaded
model and conditioning), and total = that high-water mark itself (the whole process during the calls).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = ["plain", "dense", "dense+maps", "exact", "exact+maps"]
BED_CASES = ["plain", "exact", "exact+maps", "dense"]
PROMPT = "a dog and a cat on a sofa"
LAYOUT = ('{"version":1,"boxes":[{"subject":"dog","x":0.05,"y":0.1,"w":0.4,"h":0.8},'
          '{"subject":"cat","x":0.55,"y":0.2,"w":0.4,"h":0.7}]}')
HEADS, HEAD_DIM = 24, 128


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _reset_peak() -> None:
    """Linux: set this process's RSS high-water mark (VmHWM) to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def child(size: int, text: int, case: str, reps: int, dtype_name: str) -> dict:
    import torch

    from cones2_core.joint_attention import guided_joint_attention, joint_bias, subject_columns, token_mass
    from cones2_core.layout import build_weight_map

    dtype = getattr(torch, dtype_name)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.inference_mode():
        t = torch.randn(1, 2, 8, 16)
        sdpa(t, t, t)  # the kernels' lazy setup, before the baseline
        h = w = size // 16
        n, length = h * w, text + h * w
        region = torch.zeros(h, w, dtype=torch.bool)
        region[:, : w // 2] = True
        wm = build_weight_map([([5], region, 2.5), ([9, 10], ~region, 2.5)], h, w, text, negative_weight=-1e8)
        tokens = [[5], [9, 10]]
        base = _rss_kib()
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, generator=g).to(dtype) for _ in range(3))
        sigma, gw = torch.tensor([2.0]), 0.3

        def run():
            if case == "plain":
                return sdpa(q, k, v)
            if case.startswith("dense"):
                mask = joint_bias(q, k, text, n, wm, sigma, gw)
                out = sdpa(q, k, v, attn_mask=mask.to(q.dtype))
                if case.endswith("maps"):
                    token_mass(q, k, mask, text, n, tokens)
                return out
            cols = subject_columns(wm, text, n)  # kept per model call in the node; a few small ops
            if case.endswith("maps"):
                out, mass = guided_joint_attention(q, k, v, text, n, cols, sigma, gw, return_mass=True)
                return out
            return guided_joint_attention(q, k, v, text, n, cols, sigma, gw)

        times = []
        for _ in range(reps):
            start = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - start)
            del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"time": statistics.median(times), "peak_mib": (peak - base) / 1024, "threads": torch.get_num_threads()}


def bed_child(size: int, text: int, case: str, reps: int, host_attention: str) -> dict:
    """One model call of the Flux bed, ``case`` in BED_CASES (see the module's docstring)."""
    from harness.beds import BEDS
    from harness.host import build, find_host, import_host, load_pack

    host = find_host()
    bed = BEDS["flux"]
    module = bed.builder_module()
    files = build(module.__file__, host, out=module.default_cache_dir())
    import_host(host)
    if host_attention == "pytorch":  # the host's attention is torch's SDPA, as on NVIDIA GPUs (on CPU: sub-quad)
        import comfy.cli_args

        comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.ldm.modules.attention
    import torch
    from comfy_extras.nodes_cond import T5TokenizerOptions

    import nodes as host_nodes

    pack = load_pack()
    with torch.inference_mode():  # as the host runs a prompt
        model, clip, _vae = bed.load(files)
        clip = T5TokenizerOptions.execute(clip, 0, text).result[0]
        pos = pack.nodes.residual_nodes.Cones2ApplyResiduals.execute(clip, PROMPT).result[0]
        neg = host_nodes.CLIPTextEncode().encode(clip, "")[0]  # unused at CFG 1
        del clip, _vae
        if case != "plain":
            model, pos = pack.nodes.layout_node.Cones2LayoutGuidance.execute(
                model, pos, LAYOUT, 0.08, 2.5, -1e8, 0.0, 1.0, False, record_maps=case.endswith("maps")).result
        pack.nodes.architectures.joint.EXACT = not case.startswith("dense")
        latent = {"samples": bed.empty_latent(size)}
        tokens = pos[0][0].shape[1]

        def run():
            host_nodes.common_ksampler(model, 0, 1, 1.0, "euler", "normal", pos, neg, latent)

        run()  # warm-up (the host moves the model in on its first call)
        gc.collect()
        _reset_peak()
        base = _rss_kib()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    peak = _hwm_kib()
    return {"time": statistics.median(times), "peak_mib": (peak - base) / 1024, "total_mib": peak / 1024,
            "threads": torch.get_num_threads(), "tokens": tokens, "dtype": str(model.model.get_dtype()),
            "attention": comfy.ldm.modules.attention.optimized_attention.__name__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cases", nargs="+", default=CASES)
    ap.add_argument("--glibc-default", action="store_true",
                    help="leave glibc's dynamic mmap threshold on (the peak then counts freed heap pages too)")
    ap.add_argument("--levels", nargs="+", default=["call"], choices=["call", "bed"])
    ap.add_argument("--bed-cases", nargs="+", default=BED_CASES, choices=BED_CASES)
    ap.add_argument("--bed-reps", type=int, default=None, help="timed model calls per bed case (default: --reps)")
    ap.add_argument("--host-attention", default="pytorch", choices=["pytorch", "default"],
                    help="the host's attention on the bed: torch's SDPA (what it picks on NVIDIA GPUs; the exact path's "
                         "kernel family), or its own CPU default (sub-quadratic attention)")
    ap.add_argument("--child", nargs=2, metavar=("SIZE", "CASE"), help=argparse.SUPPRESS)
    ap.add_argument("--bed-child", nargs=2, metavar=("SIZE", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        sys.stdout.write(json.dumps(child(int(args.child[0]), args.text, args.child[1], args.reps, args.dtype)) + "\n")
        return 0
    if args.bed_child:
        out = bed_child(int(args.bed_child[0]), args.text, args.bed_child[1], args.bed_reps or args.reps,
                        args.host_attention)
        sys.stdout.write("\nBENCH " + json.dumps(out) + "\n")
        return 0
    out = []
    if "call" in args.levels:
        out.append(call_table(args))
    if "bed" in args.levels:
        out.append(bed_table(args))
    sys.stdout.write("\n\n".join(out) + "\n")
    return 0


def bed_table(args) -> str:
    rows = []
    for size in args.sizes:
        res = {}
        for case in args.bed_cases:
            cmd = [sys.executable, os.path.abspath(__file__), "--bed-child", str(size), case, "--text", str(args.text),
                   "--reps", str(args.bed_reps or args.reps), "--host-attention", args.host_attention]
            env = dict(os.environ)
            if not args.glibc_default:
                env["MALLOC_MMAP_THRESHOLD_"] = "131072"
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            res[case] = json.loads(done.stdout.rsplit("BENCH ", 1)[1])
        plain = res.get("plain")
        for case in args.bed_cases:
            r = res[case]
            rows.append((size, case, r, r["time"] / plain["time"] if plain else float("nan"),
                         r["peak_mib"] / plain["peak_mib"] if plain else float("nan")))
    first = rows[0][2]
    lines = [f"Flux bed (1 double + 1 single block, hidden 3072, 24 heads), one model call (1 euler step, CFG 1), "
             f"{first['tokens']} T5 tokens, {first['dtype']}, the host's attention {first['attention']}, CPU, median of {args.bed_reps or args.reps} after a warm-up; peak = RSS "
             f"high-water mark of the timed calls over the RSS before them; total = that high-water mark",
             f"{'px':>5} {'img tok':>7} {'case':<11} {'time s':>8} {'x plain':>8} {'peak MiB':>9} {'x plain':>8} "
             f"{'total MiB':>9} {'threads':>7}"]
    lines += [f"{size:>5} {(size // 16) ** 2:>7} {case:<11} {r['time']:>8.3f} {tr:>8.2f} {r['peak_mib']:>9.1f} "
              f"{pr:>8.2f} {r['total_mib']:>9.1f} {r['threads']:>7}" for size, case, r, tr, pr in rows]
    return "\n".join(lines)


def call_table(args) -> str:
    rows = []
    for size in args.sizes:
        res = {}
        for case in args.cases:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", str(size), case, "--text", str(args.text),
                   "--reps", str(args.reps), "--dtype", args.dtype]
            env = dict(os.environ)
            if not args.glibc_default:
                env["MALLOC_MMAP_THRESHOLD_"] = "131072"
            res[case] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
        plain = res.get("plain")
        for case in args.cases:
            r = res[case]
            rows.append((size, case, r["time"], r["time"] / plain["time"] if plain else float("nan"),
                         r["peak_mib"], r["peak_mib"] / plain["peak_mib"] if plain else float("nan"), r["threads"]))
    lines = [f"joint attention, 1 sample, {HEADS} heads x {HEAD_DIM}, {args.text} text tokens, {args.dtype}, CPU, "
             f"median of {args.reps} calls, peak = RSS high-water mark over the inputs' baseline"
             f"{', glibc default' if args.glibc_default else ', MALLOC_MMAP_THRESHOLD_=131072'}",
             f"{'px':>5} {'img tok':>7} {'case':<11} {'time s':>8} {'x plain':>8} {'peak MiB':>9} {'x plain':>8} "
             f"{'threads':>7}"]
    lines += [f"{size:>5} {(size // 16) ** 2:>7} {case:<11} {tm:>8.3f} {tr:>8.2f} {pk:>9.1f} {pr:>8.2f} {th:>7}"
              for size, case, tm, tr, pk, pr, th in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
