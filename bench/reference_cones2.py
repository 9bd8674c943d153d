"""Benchmark the authors' reference trainer (Cones-V2 ``train_cones2.py``), unedited, on CPU.

It trains on a random-weight diffusers pipeline of the same shape as the pack's tiny SD1.5 checkpoint
(2-level 320-channel UNet, full-size CLIP-L text encoder and SD VAE, SD1.5's DDPM schedule), built once under
``--workdir`` with 3 instance images. Each resolution runs in its own subprocess, which executes the script
with ``runpy`` and times it from outside: the loop starts at ``progress_bar.set_description("Steps")`` and each
step ends at ``progress_bar.update``. Memory: RSS at loop start, and VmHWM (reset at loop start) at the last step.
The script then builds a pipeline ``.to("cuda")`` after the loop, which fails on CPU; only the loop is measured.

Setup (diffusers/accelerate go in a separate folder, not in the project's venv; the reference is kept outside
the repository, e.g. ``git clone https://github.com/ali-vilab/Cones-V2 /tmp/refbench/Cones-V2``):

    python -m pip install --target /tmp/refbench/site -c constraints.txt --no-deps \
        diffusers==0.42.1 accelerate==1.15.0 importlib_metadata zipp
    PYTHONPATH=/tmp/refbench/site python bench/reference_cones2.py [--steps 8] [--resolutions 64 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from train_residual import _proc_status, _reset_peak_rss  # bench/ is sys.path[0] when run as a script

TOKENIZER_DIR = os.path.join(os.environ.get("COMFYUI_DIR") or os.path.expanduser("~/ComfyUI"), "comfy", "sd1_tokenizer")


def build_pipe(pipe_dir: str) -> dict[str, int]:
    """Save a random-weight SD1.5-layout pipeline with the tiny checkpoint's UNet shape; returns param counts."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    # LDM: channel_mult [1, 1], one res block + one transformer per level, downsample after level 0 only.
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 320),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, vocab_size=49408, projection_dim=768))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                              steps_offset=1)
    # The host's file says model_max_length 8192; SD1.5's tokenizer (which the script pads to) says 77.
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(pipe_dir)
    return {name: sum(p.numel() for p in m.parameters())
            for name, m in (("unet", unet), ("text_encoder", text_encoder), ("vae", vae))}


def build_images(img_dir: str, n: int = 3, size: int = 320) -> None:
    from PIL import Image, ImageDraw

    os.makedirs(img_dir, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), (128, 128, 128))
        r, c = size // 4, size // 2 + (i - 1) * size // 8
        ImageDraw.Draw(im).ellipse((c - r, size // 2 - r, c + r, size // 2 + r), fill=(220, 30, 30))
        im.save(os.path.join(img_dir, f"{i}.png"))


def child(script: str, workdir: str, px: int, steps: int, out_json: str) -> None:
    """Run the reference in this process, hooking its progress bar to time the loop."""
    import runpy

    import tqdm.std

    st: dict = {"bar": None, "t": []}
    set_description, update = tqdm.std.tqdm.set_description, tqdm.std.tqdm.update

    def hooked_set_description(self, desc=None, refresh=True):
        if desc == "Steps" and st["bar"] is None:  # the training bar, just before the loop
            st["bar"], st["rss_start"] = self, _proc_status("VmRSS")
            _reset_peak_rss()
            st["t"].append(time.perf_counter())
            st["cpu"] = [sum(os.times()[:2])]
        return set_description(self, desc, refresh)

    def hooked_update(self, n=1):
        if self is st["bar"]:
            st["t"].append(time.perf_counter())
            st["peak"] = _proc_status("VmHWM")
            st["cpu"].append(sum(os.times()[:2]))
        return update(self, n)

    tqdm.std.tqdm.set_description, tqdm.std.tqdm.update = hooked_set_description, hooked_update
    sys.argv = [script, "--pretrained_model_name_or_path", os.path.join(workdir, "pipe"),
                "--instance_data_dir", os.path.join(workdir, "imgs"), "--instance_prompt", "dog",
                "--resolution", str(px), "--train_batch_size", "1", "--max_train_steps", str(steps),
                "--learning_rate", "5e-6", "--loss_rate_first", "1e-2", "--loss_rate_second", "1e-3",
                "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--mixed_precision", "no",
                "--output_dir", os.path.join(workdir, "out"), "--seed", "0"]
    sys.path.insert(0, os.path.dirname(script))
    error = None
    try:
        runpy.run_path(script, run_name="__main__")
    except Exception as e:  # expected after the loop: the script moves a pipeline to CUDA
        error = f"{type(e).__name__}: {e}"
    d = [b - a for a, b in zip(st["t"], st["t"][1:], strict=False)]
    res = {"px": px, "steps_done": len(d), "step_s": d, "rss_start": st.get("rss_start"),
           "peak": st.get("peak"), "after_loop_error": error,
           "cpu_s": [b - a for a, b in zip(st.get("cpu", []), st.get("cpu", [])[1:], strict=False)]}
    with open(out_json, "w") as f:
        json.dump(res, f)
    if len(d) != steps:
        raise SystemExit(f"loop did not complete ({len(d)}/{steps} steps): {error}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference-dir", default="/tmp/refbench/Cones-V2")
    ap.add_argument("--workdir", default="/tmp/refbench")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--child", nargs=2, metavar=("PX", "OUT_JSON"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    script = os.path.join(a.reference_dir, "train_cones2.py")
    if a.child:
        child(script, a.workdir, int(a.child[0]), a.steps, a.child[1])
        return 0
    if not os.path.exists(os.path.join(a.workdir, "pipe", "model_index.json")):
        counts = build_pipe(os.path.join(a.workdir, "pipe"))
        sys.stdout.write(f"built {a.workdir}/pipe, parameters: {counts}\n")
    if not os.path.isdir(os.path.join(a.workdir, "imgs")):
        build_images(os.path.join(a.workdir, "imgs"))
    rows = ["| px | s/step | RSS MiB at loop start | peak RSS MiB | growth MiB |", "|---|---|---|---|---|"]
    notes = ["", "Steps after the first, and the CPU seconds the trainer used per wall second (2 cores: ~2 when alone):"]
    for _ in range(a.repeats):
        for px in a.resolutions:
            out = os.path.join(a.workdir, f"result_{px}.json")
            with open(os.path.join(a.workdir, f"log_{px}.txt"), "w") as log:
                rc = subprocess.call([sys.executable, os.path.abspath(__file__), "--reference-dir", a.reference_dir,
                                      "--workdir", a.workdir, "--steps", str(a.steps), "--child", str(px), out],
                                     stdout=log, stderr=subprocess.STDOUT)
            if rc:
                sys.stdout.write(f"{px} px: failed (rc {rc}), see {a.workdir}/log_{px}.txt\n")
                continue
            with open(out) as f:
                r = json.load(f)
            step_s, cpu_s = r["step_s"][1:] or r["step_s"], r["cpu_s"][1:] or r["cpu_s"]
            rows.append(f"| {px} | {statistics.median(step_s):.2f} | {r['rss_start']:.0f} | {r['peak']:.0f} | "
                        f"{r['peak'] - r['rss_start']:.0f} |")
            notes.append(f"{px} px: first {r['step_s'][0]:.2f} s, then {' '.join(f'{s:.2f}' for s in step_s)} s; "
                         f"CPU/wall {sum(cpu_s) / sum(step_s):.2f}")
    sys.stdout.write("\n".join(rows + notes) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
