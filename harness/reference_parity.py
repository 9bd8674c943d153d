"""Parity with the authors' trainer: the UNEDITED Cones-V2 ``train_cones2.py`` on the pack's tiny checkpoints.

Three pieces, used by ``tests/host/test_reference_parity.py``:

* ``ensure_side_folder`` installs the reference's own dependencies (diffusers, accelerate, pinned below) with
  ``pip install --target`` into ``~/.cache/comfyui-cones2/reference-site-<key>/`` (keyed on the pins and
  constraints.txt), never into the project's venv; ``ensure_reference`` finds ``train_cones2.py`` at the pinned
  commit (checked by its git blob hash, so an edited copy is refused).
* ``export`` (a child process with the host and the side folder importable): one of the pack's tiny
  checkpoints, loaded by the host's own loader (``load_checkpoint_guess_config``), written as a diffusers
  pipeline folder with diffusers' own single-file converters (UNet, VAE) and the host's HF-format CLIP weights.
  The text encoder is cut to the layers the host's CLIP keeps (the tests cut it to 2 for speed). It then checks
  that the two loaders compute the same UNet output, VAE mean and text embedding (the numbers go into
  ``export.json``), so a conversion mistake shows there and not as a training mismatch.
* ``reference`` (a child process with only the side folder): runs ``train_cones2.py`` with ``runpy`` after
  monkeypatching, from outside the script, what it draws: its dataloader's sampler yields the given image
  order, ``torch.randn_like`` the given noise, ``torch.randint(0, 1000, (1,))`` the given timesteps, and the
  VAE's ``latent_dist.sample()`` returns the distribution's mean (its sampling noise injected as zero; the pack
  encodes the mean). After the loop the script moves a pipeline to CUDA to read off the residual; ``"cuda"`` is
  redirected to the CPU so that it runs to its end and saves ``residual.pt``. Per-step losses come from its
  progress bar's ``set_postfix(loss=...)``; each encoded image is recorded to check the image path too.

Why the pack's checkpoints are exported to diffusers and not the other way: the host detects a checkpoint from
its UNet's shape and reads v-prediction from one bias's spread; the pack's tiny checkpoints already pass that
detection (SD1.5 eps, SD2.x v), while the host's diffusers loader only recognises the real models' UNet sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

# The reference's dependencies, installed beside (never into) the project's venv, under constraints.txt.
PINS = ("diffusers==0.42.1", "accelerate==1.15.0", "importlib_metadata==10.2.0", "zipp==4.1.2")
REFERENCE_REPO = "https://github.com/ali-vilab/Cones-V2"
REFERENCE_COMMIT = "447c194e0ac99a2871efb15f378c96cf12238ac2"
SCRIPT_BLOB = "97131b47cd81e748488683732cf957438ae09855"  # git blob hash of train_cones2.py at that commit
HERE = os.path.dirname(os.path.abspath(__file__))
PACK_DIR = os.path.dirname(HERE)
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "comfyui-cones2")

# The diffusers UNet of each tiny checkpoint (harness/tiny_checkpoints.py FAMILIES): same levels, blocks, heads.
UNETS = {
    "sd1": dict(block_out_channels=(320, 320), layers_per_block=1, cross_attention_dim=768, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                use_linear_projection=False),
    "sd2": dict(block_out_channels=(320,) * 4, layers_per_block=2, cross_attention_dim=1024, attention_head_dim=5,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, use_linear_projection=True),
}
# The host's text encoder of each family: its key in the host's CLIP, width, whether it reads the penultimate
# layer (SD2's OpenCLIP-H), and the pad token of its tokenizer (SD2 pads with "!", id 0; SD1.5 with the end token)
ENCODERS = {"sd1": ("clip_l", 768, False, None), "sd2": ("clip_h", 1024, True, "!")}
PREDICTIONS = {"sd1": "epsilon", "sd2": "v_prediction"}


class ReferenceUnavailable(RuntimeError):
    """The reference or its dependencies could not be set up (the message says why)."""


def side_folder_key() -> str:
    with open(os.path.join(PACK_DIR, "constraints.txt"), "rb") as f:
        constraints = f.read()
    return hashlib.sha256("\n".join(PINS).encode() + b"\0" + constraints).hexdigest()[:12]


def ensure_side_folder(python: str = sys.executable) -> str:
    """The folder holding the reference's dependencies, installed once with pip (--no-deps, constraints.txt)."""
    folder = os.path.join(CACHE, f"reference-site-{side_folder_key()}")
    if os.path.isfile(os.path.join(folder, ".complete")):
        return folder
    tmp = f"{folder}.tmp{os.getpid()}"
    cmd = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", tmp, "-c",
           os.path.join(PACK_DIR, "constraints.txt"), "--no-deps", *PINS]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ReferenceUnavailable(f"pip install of {' '.join(PINS)} failed: {e}") from e
    if r.returncode:
        raise ReferenceUnavailable(f"pip install of {' '.join(PINS)} failed (rc {r.returncode}): "
                                   f"{(r.stderr or r.stdout)[-1500:]}")
    open(os.path.join(tmp, ".complete"), "w").close()
    if os.path.isdir(folder):  # a half-built folder of an earlier run
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def _blob_hash(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def ensure_reference() -> str:
    """Path of the unedited ``train_cones2.py`` at REFERENCE_COMMIT: CONES2_REFERENCE_DIR (a checkout), else the
    cache, else read from a git repository (CONES2_REFERENCE_GIT, a local clone or mirror, or a fresh
    ``git clone`` of REFERENCE_REPO) into the cache. Any copy whose blob hash differs is refused."""
    env = os.environ.get("CONES2_REFERENCE_DIR")
    cached = os.path.join(CACHE, f"Cones-V2-{REFERENCE_COMMIT[:12]}", "train_cones2.py")
    for path in ([os.path.join(env, "train_cones2.py")] if env else []) + [cached]:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                if _blob_hash(f.read()) != SCRIPT_BLOB:
                    raise ReferenceUnavailable(f"{path} is not train_cones2.py of Cones-V2 {REFERENCE_COMMIT[:12]} "
                                               "(its content differs: edited, or another commit)")
            return path
    git_dir = os.environ.get("CONES2_REFERENCE_GIT")
    clone = None
    try:
        if not git_dir:
            clone = f"{os.path.dirname(cached)}.clone{os.getpid()}"
            subprocess.run(["git", "clone", "--quiet", "--bare", "--filter=blob:none", REFERENCE_REPO, clone],
                           check=True, capture_output=True, timeout=300)
            git_dir = clone
        data = subprocess.run(["git", "--git-dir", git_dir, "show", f"{REFERENCE_COMMIT}:train_cones2.py"],
                              check=True, capture_output=True, timeout=300).stdout
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        raise ReferenceUnavailable(f"cannot get train_cones2.py at {REFERENCE_COMMIT[:12]} from "
                                   f"{git_dir or REFERENCE_REPO}: {e} {detail.decode(errors='replace')[-500:]}") from e
    finally:
        if clone and os.path.isdir(clone):
            import shutil

            shutil.rmtree(clone, ignore_errors=True)
    if _blob_hash(data) != SCRIPT_BLOB:
        raise ReferenceUnavailable(f"train_cones2.py from {git_dir} does not have the pinned content")
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    with open(f"{cached}.tmp", "wb") as f:
        f.write(data)
    os.replace(f"{cached}.tmp", cached)
    return cached


def child_env(side: str, host: str | None = None) -> dict[str, str]:
    """The environment of a child: the side folder (and the host, for ``export``) importable, offline."""
    env = dict(os.environ)
    paths = [side] + ([host, PACK_DIR] if host else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DIFFUSERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="0")
    return env


# ---- export (child: host + side folder) -------------------------------------------------------------------

def truncate_clip(clip, layers: int) -> None:
    """Keep the first ``layers`` transformer layers of the host CLIP's text encoders (in place, as the tests do)."""
    for key in ("clip_l", "clip_h", "clip_g"):
        sub = getattr(clip.cond_stage_model, key, None)
        if sub is not None:
            del sub.transformer.text_model.encoder.layers[layers:]


def export(ckpt: str, family: str, out: str, layers: int, host: str) -> dict:
    """Write the diffusers pipeline of a tiny checkpoint into ``out`` and check both loaders agree."""
    sys.path.insert(0, host)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.sd
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    key, width, penultimate, pad = ENCODERS[family]
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt)
        truncate_clip(clip, layers)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, **UNETS[family])
    ldm = {f"model.diffusion_model.{k}": v.float() for k, v in model.model.diffusion_model.state_dict().items()}
    unet.load_state_dict(convert_ldm_unet_checkpoint(ldm, dict(unet.config)), strict=True)
    dvae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
    ldm = {f"first_stage_model.{k}": v.float() for k, v in vae.first_stage_model.state_dict().items()}
    dvae.load_state_dict(convert_ldm_vae_checkpoint(ldm, dict(dvae.config)), strict=True)
    # the host's CLIP holds HF-format weights already (it converted OpenCLIP's); a penultimate-layer encoder
    # (SD2) is the diffusers text encoder with its last layer dropped, as diffusers' SD2 pipelines ship it
    src = getattr(clip.cond_stage_model, key).transformer
    n = len(src.text_model.encoder.layers) - (1 if penultimate else 0)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=n,
                                      num_attention_heads=width // 64, max_position_embeddings=77, vocab_size=49408,
                                      hidden_act="gelu" if penultimate else "quick_gelu", projection_dim=width))
    sd = {k: v.float() for k, v in src.state_dict().items() if k.startswith("text_model.")}
    if not any(k.startswith("text_model.") for k in te.state_dict()):  # transformers 5 names them without it
        sd = {k[len("text_model."):]: v for k, v in sd.items()}
    missing, unexpected = te.load_state_dict(sd, strict=False)
    assert not [m for m in missing if "position_ids" not in m], missing
    assert all(f".layers.{n}." in u or "position_ids" in u for u in unexpected), unexpected
    extra = {"pad_token": pad} if pad else {}
    tok = CLIPTokenizer.from_pretrained(os.path.join(host, "comfy", "sd1_tokenizer"), model_max_length=77, **extra)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type=PREDICTIONS[family], clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=dvae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)

    # the two loaders on the same inputs (float32 on both sides)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([417])
    ctx = torch.randn(1, 77, width, generator=g)
    img = torch.rand(1, 64, 64, 3, generator=g)
    with torch.no_grad():
        ours = model.model.diffusion_model(x, timesteps=t.float(), context=ctx).float()
        theirs = unet(x, t, ctx).sample
        host_mean = vae.encode(img).float()  # the host encodes the mean (unscaled)
        ref_mean = dvae.encode(img.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
        ids = tok("dog", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        host_ctx = clip.encode_from_tokens(clip.tokenize("dog"))[0].float()
        ref_ctx = te(ids)[0]
        host_ids = [t[0] for t in clip.tokenize("dog")[key.split("_")[1]][0]]

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    info = {"unet_rel": rel(ours, theirs), "vae_rel": rel(host_mean, ref_mean), "text_rel": rel(host_ctx, ref_ctx),
            "same_token_ids": host_ids == ids[0].tolist(), "text_layers": n}
    with open(os.path.join(out, "export.json"), "w") as f:
        json.dump(info, f)
    return info


# ---- the reference run (child: side folder only) -----------------------------------------------------------

def run_reference(script: str, pipe: str, images: str, out: str, schedule: str, args: list[str]) -> None:
    """Run ``train_cones2.py`` (unedited) with the draws of ``schedule`` injected; write ``out/result.pt``."""
    import runpy
    from pathlib import Path

    import diffusers
    import diffusers.models.autoencoders.vae as dvae
    import torch
    import torch.utils.data
    import tqdm.std

    sched = torch.load(schedule)
    names = [p.name for p in Path(images).iterdir()]  # the order the script's dataset lists them in
    order = [names.index(n) for n in sched["images"]]
    noise, timesteps = list(sched["noise"]), [int(t) for t in sched["timesteps"]]
    rec: dict = {"losses": [], "pixels": [], "noise_used": 0, "timesteps_used": 0}

    def sampler_iter(self):  # the dataloader's shuffle: the given images, in order (any extra prefetch: image 0)
        for _ in range(len(self.data_source)):
            yield order.pop(0) if order else 0

    randn_like, randint = torch.randn_like, torch.randint

    def injected_randn_like(x, *a, **k):
        if noise and tuple(x.shape) == tuple(noise[0].shape):
            rec["noise_used"] += 1
            return noise.pop(0).to(device=x.device, dtype=x.dtype)
        return randn_like(x, *a, **k)

    def injected_randint(*a, **k):
        if len(a) >= 3 and a[0] == 0 and a[1] == 1000 and tuple(a[2]) == (1,) and timesteps:
            rec["timesteps_used"] += 1
            return torch.tensor([timesteps.pop(0)], dtype=torch.long, device=k.get("device"))
        return randint(*a, **k)

    encode = diffusers.AutoencoderKL.encode

    def recorded_encode(self, x, *a, **k):
        rec["pixels"].append(x.detach().clone())
        return encode(self, x, *a, **k)

    set_postfix = tqdm.std.tqdm.set_postfix

    def recorded_postfix(self, *a, **k):
        if "loss" in k:
            rec["losses"].append(float(k["loss"]))
        return set_postfix(self, *a, **k)

    tensor_to = torch.Tensor.to

    def cpu_to(self, *a, **k):  # the script reads the residual off on "cuda": here that is the CPU
        a = tuple("cpu" if isinstance(v, str) and v.startswith("cuda") else v for v in a)
        if isinstance(k.get("device"), str) and k["device"].startswith("cuda"):
            k["device"] = "cpu"
        return tensor_to(self, *a, **k)

    pipe_to = diffusers.DiffusionPipeline.to

    def pipeline_to(self, *a, **k):
        a = tuple("cpu" if isinstance(v, str) and v.startswith("cuda") else v for v in a)
        return pipe_to(self, *a, **k)

    torch.utils.data.RandomSampler.__iter__ = sampler_iter
    torch.randn_like, torch.randint = injected_randn_like, injected_randint
    dvae.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    diffusers.AutoencoderKL.encode = recorded_encode
    tqdm.std.tqdm.set_postfix = recorded_postfix
    torch.Tensor.to = cpu_to
    diffusers.DiffusionPipeline.to = pipeline_to

    sys.argv = [script, "--pretrained_model_name_or_path", pipe, "--instance_data_dir", images,
                "--output_dir", os.path.join(out, "run"), "--report_to", "tensorboard", *args]
    runpy.run_path(script, run_name="__main__")
    rec["residual_file"] = os.path.join(out, "run", "residual.pt")
    rec["pixels"] = torch.cat(rec["pixels"]) if rec["pixels"] else None
    torch.save(rec, os.path.join(out, "result.pt"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--family", choices=sorted(UNETS), required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--layers", type=int, default=2)
    e.add_argument("--host", required=True)
    r = sub.add_parser("reference")
    for name in ("--script", "--pipe", "--images", "--out", "--schedule"):
        r.add_argument(name, required=True)
    a, rest = ap.parse_known_args(argv)
    if a.cmd == "export":
        info = export(a.ckpt, a.family, a.out, a.layers, a.host)
        sys.stdout.write(json.dumps(info) + "\n")
    else:
        run_reference(a.script, a.pipe, a.images, a.out, a.schedule, [x for x in rest if x != "--"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
