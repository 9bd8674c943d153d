"""Benchmark Train Residual: seconds per step and peak memory, per mode and resolution.

CPU (default): the tiny SD1.5 checkpoint (full-size CLIP-L, small UNet) at 64 and 256 px.
CUDA (``--device cuda``): full-size random-weight SD1.5 / SD2.1-v / SDXL architectures built from the host's
configs (no weights are downloaded), at each family's native resolution.

Each configuration runs in its own subprocess. Memory: CPU, the process's RSS when training starts (ComfyUI
and the loaded checkpoint) and its peak during training (VmHWM, reset at the start); CUDA, the allocated memory
at the start and ``torch.cuda.max_memory_allocated`` during training.

On CUDA, "paper@12" repeats paper mode with the process capped at 12 GiB of GPU memory (a consumer card).

"reference-like" is the reference's loop (Cones-V2 train_cones2.py: whole encoder, default AdamW, float32, VAE
encode every step) rebuilt on the same host models, so the ratios compare runs of this machine at this time.

With ``--reference-dir`` (CPU), the authors' own trainer runs too, unedited, on a random-weight diffusers
pipeline of the same shape (bench/reference_cones2.py says how to set that up), and every row is compared
with it.

    python bench/train_residual.py --comfyui ~/ComfyUI [--device cuda] [--steps 4] [--reference-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Full-size UNets in the host's detection format (what detect_unet_config reads back from real checkpoints).
_FULL = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
         "in_channels": 4, "out_channels": 4, "model_channels": 320, "use_temporal_resblock": False,
         "use_temporal_attention": False, "transformer_depth_middle": 1}
FULL_FAMILIES = {
    "sd1": {**_FULL, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1] * 9 + [0] * 3,
             "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8},
    "sd2": {**_FULL, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1] * 9 + [0] * 3,
             "use_linear_in_transformer": True, "context_dim": 1024, "num_head_channels": 64},
    "sdxl": {**_FULL, "adm_in_channels": 2816, "num_classes": "sequential", "num_res_blocks": [2, 2, 2],
             "channel_mult": [1, 2, 4],
             "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
             "num_head_channels": 64},
}
RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}


def _images(size: int):
    import torch

    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    imgs = torch.full((3, size, size, 3), 0.5)
    for i in range(3):
        m = ((yy - size // 2 - size // 16 * i) ** 2 + (xx - size // 2) ** 2) < (size * 0.28) ** 2
        imgs[i][m] = torch.tensor([0.9, 0.2, 0.1])
    return imgs


def _full_checkpoint(family: str, out_dir: str) -> str:
    """A full-size random-weight checkpoint, built once through the harness's builder with a full UNet config."""
    from harness import tiny_checkpoints

    path = os.path.join(out_dir, f"cones2_full_{family}.safetensors")
    if not os.path.isfile(path):
        spec = tiny_checkpoints.FAMILIES[family]
        old = spec["unet"]
        spec["unet"] = FULL_FAMILIES[family]
        try:
            tiny_checkpoints.build(family, path)
        finally:
            spec["unet"] = old
    return path


def _proc_status(key: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset VmHWM (the peak RSS) to the current RSS, so the peak covers training only (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _growth(m: dict) -> float:
    """A measurement's memory growth during training: its peak minus its memory at the start (MiB)."""
    return m["peak_mib"] - m["base_mib"]


def reference_like(pack, model, clip, vae, images, steps: int, resolution: int, device, stamp) -> None:
    """The reference's training loop (Cones-V2 train_cones2.py) rebuilt on the same host models, as a baseline
    measured in the same run: the whole text encoder trains (token table included) with torch's default AdamW,
    in float32 without autocast; the images are VAE-encoded again at every step; e* is the first step's output.
    Like our paper mode it trains a private copy, since the user's CLIP must stay unchanged."""
    import torch

    encoder, unets, ob = pack.nodes.train_encoder, pack.nodes.architectures, pack.cones2_core.objective
    enc = encoder.private_text_encoder(clip, device)  # no trainable_ids: every row of the token table trains
    tokens = clip.tokenize("dog")
    rows = encoder.subject_rows(clip, "dog", "dog")
    prediction, sigma_data, ms = unets.prediction_type(model)
    sigmas = ms.sigmas.detach().float().cpu()
    pixels = [pack.nodes.train_images._resize_for_training(img, resolution) for img in images]
    opt = torch.optim.AdamW(enc.parameters(), lr=ob.PAPER_LEARNING_RATE, weight_decay=ob.WEIGHT_DECAY)
    frozen = pack.cones2_core.gradients.GradientFreeWeights()
    gen = torch.Generator().manual_seed(0)
    target = None
    with unets.unet.FrozenUNet(model, device, frozen) as unet:
        mp = unet.mp
        for step in range(steps):
            img = pixels[step % len(pixels)]
            with torch.no_grad():  # the reference encodes its (randomly cropped) batch at every step
                x0 = mp.model.process_latent_in(vae.encode(img[:resolution, :resolution].unsqueeze(0)).float())
            noise = torch.randn(x0.shape, generator=gen).to(x0.device)
            sigma = ob.sample_sigmas(sigmas, 1, gen).to(x0.device)
            ctx = enc.encode_token_weights(tokens)[0].float()
            if target is None:
                target = ctx.detach()
            x_t = ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0)
            with frozen:
                den = mp.model.apply_model(x_t, sigma, c_crossattn=ctx, transformer_options={
                    "optimized_attention_override": unets.base.sdpa_attention})
            loss = ob.diffusion_loss(den, x0, sigma, prediction, sigma_data) + \
                ob.preservation_loss(ctx, target, rows, 1e-2, 1e-3)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(enc.parameters(), ob.MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad()
            float(loss)  # wait for the step to finish (as the node's progress bar does)
            stamp()


def run_one(cfg: dict) -> dict:
    """One configuration, in this process: returns seconds per step and memory in MiB."""
    import torch

    from harness.host import import_host, load_pack

    import_host(cfg["comfyui"])
    import comfy.cli_args

    comfy.cli_args.args.cpu = cfg["device"] == "cpu"
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import folder_paths

    pack = load_pack()
    out_dir = tempfile.mkdtemp(prefix="cones2-bench-")  # never write into the host's models folder
    folder_paths.folder_names_and_paths["cones2_residuals"] = ([out_dir], {".safetensors"})
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(cfg["ckpt"])
    stamps = []
    comfy.utils.PROGRESS_BAR_HOOK = lambda value, total, preview, node_id=None: stamps.append(time.perf_counter())
    cuda = cfg["device"] == "cuda"
    mode, _, cap = cfg["mode"].partition("@")  # "paper@12" = paper mode on a GPU capped at 12 GiB
    if cuda and cap:
        total_mem = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap) * 2**30 / total_mem))
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
        base = _proc_status("VmRSS")
    images = _images(cfg["resolution"])
    t0 = time.perf_counter()
    with torch.inference_mode():
        if mode == "reference-like":
            with torch.inference_mode(False), torch.enable_grad():
                reference_like(pack, model, clip, vae, images, cfg["steps"], cfg["resolution"],
                               mm.get_torch_device(), lambda: stamps.append(time.perf_counter()))
        else:
            node = pack.nodes.train_node.Cones2TrainResidual
            node.execute(model, clip, vae, subject="dog", steps=cfg["steps"], learning_rate=0.0,
                         resolution=cfg["resolution"], batch_size=1, seed=0, save_name=f"bench_{mode}",
                         mode=mode, images=images)
    total = time.perf_counter() - t0
    # the first step pays one-off costs (allocations, kernel selection): time the steps after it
    per_step = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1) if len(stamps) > 1 else total
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        base /= 2**20
    else:
        peak = _proc_status("VmHWM")
    return {"s_per_step": per_step, "base_mib": base, "peak_mib": peak, "total_s": total}


def _run_reference(args, resolutions: list[int]) -> dict:
    """{px: {s_per_step, base_mib, peak_mib} or an error string} from the unedited reference trainer, run by
    bench/reference_cones2.py in a child process per resolution (its pipeline is built once)."""
    import statistics

    here = os.path.dirname(os.path.abspath(__file__))
    tool = os.path.join(here, "reference_cones2.py")
    work = os.path.join(tempfile.gettempdir(), "cones2-reference")  # its random-weight pipeline is reused
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, COMFYUI_DIR=args.comfyui)
    out = {}
    for px in resolutions:
        result = os.path.join(work, f"result_{px}.json")
        res = subprocess.run([sys.executable, tool, "--reference-dir", args.reference_dir, "--workdir", work,
                              "--steps", str(args.steps), "--resolutions", str(px)], capture_output=True, text=True,
                             env=env)
        if res.returncode or not os.path.isfile(result):
            out[px] = "failed: " + (res.stderr.strip().splitlines() or res.stdout.strip().splitlines() or ["?"])[-1]
            continue
        with open(result) as f:
            r = json.load(f)
        steps = r["step_s"][1:] or r["step_s"]
        out[px] = {"s_per_step": statistics.mean(steps), "base_mib": r["rss_start"], "peak_mib": r["peak"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=os.path.expanduser("~/ComfyUI"))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ckpt-dir", default=os.environ.get("CONES2_CKPT_DIR"))
    ap.add_argument("--reference-dir", help="CPU: also run the authors' train_cones2.py (unedited) from this "
                    "checkout through bench/reference_cones2.py (needs diffusers and accelerate on PYTHONPATH; "
                    "see that file) and compare with it")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        sys.stdout.write(json.dumps(run_one(json.loads(args.one))) + "\n")
        return 0

    from harness import tiny_checkpoints

    out = args.ckpt_dir or tiny_checkpoints.default_cache_dir()
    configs = []
    if args.device == "cpu":
        from harness.host import BuildFailed, build

        try:
            ckpt = build(tiny_checkpoints.__file__, args.comfyui, "sd1", out=out)["sd1"]
        except BuildFailed as e:
            sys.stderr.write(f"{e}\n")
            return 1
        configs = [("tiny sd1", ckpt, mode, r) for r in (64, 256) for mode in ("reference-like", "paper", "fast")]
    else:
        full_dir = os.path.join(out, "full")
        os.makedirs(full_dir, exist_ok=True)
        sys.path.insert(0, args.comfyui)
        from harness.host import import_host

        import_host(args.comfyui)
        import comfy.cli_args

        comfy.cli_args.args.cpu = False
        for fam in ("sd1", "sd2", "sdxl"):
            ckpt = (fam, full_dir)  # built when its first row runs, so a time-limited run measures early
            # the reference has no SDXL; "paper@12": the same run on the GPU capped at 12 GiB (a consumer card),
            # where the trainer switches on gradient checkpointing if a step runs out of memory
            modes = ("paper", "paper@12", "fast") if fam == "sdxl" else ("reference-like", "paper", "paper@12", "fast")
            configs += [(f"full {fam}", ckpt, mode, RESOLUTION[fam]) for mode in modes]

    # Rows are printed as they are measured (a time-limited run still shows what it finished); each family's
    # reference-like row (and the unedited reference's, with --reference-dir) comes first, for the ratios.
    reference = _run_reference(args, sorted({r for _, _, _, r in configs})) if args.reference_dir else {}
    mem = "CUDA MiB allocated" if args.device == "cuda" else "RSS MiB"
    header = ("model", "mode", "px", "s/step", "speed vs reference-like", f"{mem} at start", f"peak {mem}",
              "peak growth", "growth vs reference-like", "UNet checkpointing", "total s")
    if reference:
        header += ("speed vs reference", "peak vs reference", "growth vs reference")
    out = [" | ".join(header), " | ".join("---" for _ in header)]
    for r, m in reference.items():
        out.append(f"reference pipe | reference (train_cones2.py) | {r} | {m}" if isinstance(m, str) else " | ".join(
            str(c) for c in ("reference pipe", "reference (train_cones2.py, unedited)", r, f"{m['s_per_step']:.3f}",
                             "-", f"{m['base_mib']:.0f}", f"{m['peak_mib']:.0f}", f"{_growth(m):.0f}",
                             "-", "off", "-", "1.00x", "1.00", "1.00")))
    sys.stdout.write("\n".join(out) + "\n")
    sys.stdout.flush()
    results = {}
    with tempfile.TemporaryDirectory() as base:
        for name, ckpt, mode, r in configs:
            if isinstance(ckpt, tuple):
                ckpt = _full_checkpoint(*ckpt)
            cfg = {"comfyui": args.comfyui, "device": args.device, "ckpt": ckpt, "mode": mode, "resolution": r,
                   "steps": args.steps}
            env = dict(os.environ, COMFYUI_DIR=args.comfyui)
            cmd = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(cfg)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=base)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode or not lines:
                results[name, mode, r] = m = "failed: " + (res.stderr.strip().splitlines() or ["?"])[-1][:80]
                sys.stdout.write(f"{name} | {mode} | {r} | {m}\n")
                sys.stdout.flush()
                continue
            results[name, mode, r] = m = json.loads(lines[-1])
            m["ckpt"] = "switching on gradient checkpointing" in res.stderr
            ref = results.get((name, "reference-like", r))
            ref = ref if isinstance(ref, dict) else None
            growth = _growth(m)
            speed = f"{ref['s_per_step'] / m['s_per_step']:.2f}x" if ref else "-"
            rel = f"{growth / max(_growth(ref), 1e-9):.2f}" if ref else "-"
            row = (name, mode, r, f"{m['s_per_step']:.3f}", speed, f"{m['base_mib']:.0f}", f"{m['peak_mib']:.0f}",
                   f"{growth:.0f}", rel, "on (after an OOM)" if m["ckpt"] else "off", f"{m['total_s']:.1f}")
            if reference:
                real = reference.get(r)
                row += (f"{real['s_per_step'] / m['s_per_step']:.2f}x", f"{m['peak_mib'] / real['peak_mib']:.2f}",
                        f"{growth / max(_growth(real), 1e-9):.2f}") \
                    if isinstance(real, dict) else ("-", "-", "-")
            sys.stdout.write(" | ".join(str(c) for c in row) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
