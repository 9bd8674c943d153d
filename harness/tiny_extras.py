"""Deterministic tiny extra files for the example workflows' tests and the demo: a LoRA and a ControlNet that
fit the tiny SD1.5 UNet of ``tiny_checkpoints``, placeholder Cones 2 residuals and small input images.

The LoRA and the ControlNet are built through the host's own classes (``comfy.supported_models``,
``comfy.cldm.cldm.ControlNet``) and checked with the host's loaders before they are written: every LoRA key
must map to a UNet weight through ``comfy.lora``'s key map, and ``comfy.controlnet.load_controlnet`` must load
the ControlNet with no missing keys. Weights are random (seeded), never zero, so both visibly act.
Files are cached outside the repository under a key that changes when this file or the tiny checkpoints'
construction changes.

Run as a script (inside the project's venv) to build them; prints ``kind<TAB>path`` lines:
    python harness/tiny_extras.py --comfyui ~/ComfyUI [--out DIR]

Or, to regenerate the example workflows in workflows/ through the real frontend (starts a ComfyUI server with
the tiny checkpoints and these files, then runs tests/browser/make_workflow.js in headless Chromium):
    python harness/tiny_extras.py --comfyui ~/ComfyUI --make-workflows [--ckpt-dir /tmp/tinyck]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import zlib

log = logging.getLogger("comfyui-cones2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_VERSION = 1

LORA_FILE = "cones2_tiny_sd15_lora.safetensors"
CONTROLNET_FILE = "cones2_tiny_sd15_controlnet.safetensors"
LORA_RANK = 4
# The placeholder residuals the example workflows load: file stem -> subject word.
DEMO_RESIDUALS = {"demo_dog": "dog", "demo_cat": "cat", "demo_bear": "bear"}
# Input images the example workflows name: file -> (seed, kind).
INPUT_IMAGES = {"cones2_example_dog.png": (11, "subject"), "cones2_example_control.png": (12, "edges")}
# Which server folder each kind of file goes into.
FOLDERS = {"lora": "loras", "controlnet": "controlnet", "residual": "cones2_residuals", "image": "input"}


def cache_key() -> str:
    """Changes whenever this file or the tiny checkpoints' construction changes."""
    from harness import tiny_checkpoints

    return hashlib.sha256(tiny_checkpoints.code_digest(__file__) + tiny_checkpoints.cache_key().encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "comfyui-cones2", f"extras-v{BUILD_VERSION}-{cache_key()}")


def _gen(seed: int, name: str):
    import torch

    return torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))


def _atomic_save(sd: dict, path: str, metadata: dict) -> str:
    import comfy.utils

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        comfy.utils.save_torch_file(sd, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _tiny_sd1_model():
    """The tiny SD1.5 BaseModel (empty weights: only names and shapes are used)."""
    import comfy.supported_models

    from harness.tiny_checkpoints import FAMILIES

    spec = FAMILIES["sd1"]
    config = getattr(comfy.supported_models, spec["model_class"])(dict(spec["unet"]))
    return config, config.get_model({})


def build_lora(path: str, seed: int = 0) -> str:
    """A rank-4 LoRA (kohya key names) on every attention projection of the tiny SD1.5 UNet."""
    import comfy.lora
    import torch

    _, model = _tiny_sd1_model()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    sd = {}
    for key in sorted(shapes):
        if not (key.startswith("diffusion_model.") and key.endswith(".weight")):
            continue
        if not any(f".{a}.{p}.weight" in key for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")):
            continue
        out_f, in_f = shapes[key]
        name = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
        sd[f"{name}.lora_down.weight"] = torch.randn(LORA_RANK, in_f, generator=_gen(seed, name + "down")) / in_f**0.5
        sd[f"{name}.lora_up.weight"] = torch.randn(out_f, LORA_RANK, generator=_gen(seed, name + "up")) * 0.05
        sd[f"{name}.alpha"] = torch.tensor(float(LORA_RANK))
    # The host must map every key: the same check as LoraLoader's "lora key not loaded" warning.
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    modules = {k.rsplit(".", 2)[0] if not k.endswith(".alpha") else k[:-len(".alpha")] for k in sd}
    if not modules or len(patches) != len(modules):
        raise RuntimeError(f"the host maps {len(patches)} of the tiny LoRA's {len(modules)} modules")
    sd = {k: (v.to(torch.float16) if v.ndim else v).contiguous() for k, v in sd.items()}
    return _atomic_save(sd, path, {"cones2.tiny": "sd1-lora", "cones2.build": str(BUILD_VERSION)})


def build_controlnet(path: str, seed: int = 0) -> str:
    """A ControlNet (``control_model.*`` keys, 3-channel hint) matching the tiny SD1.5 UNet."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import torch

    from harness.tiny_checkpoints import _init_module

    config, _ = _tiny_sd1_model()
    cfg = dict(config.unet_config)
    cfg.pop("out_channels", None)
    cfg.pop("transformer_depth_output", None)
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, **cfg)
    _init_module(net, seed + 5)
    with torch.no_grad():  # zero convs start at zero in real training; small random values here so it acts
        for name, p in net.named_parameters():
            if name.startswith(("zero_convs.", "middle_block_out.")) and p.ndim > 1:
                p.mul_(0.1)
    sd = {f"control_model.{k}": v.to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    _atomic_save(sd, path, {"cones2.tiny": "sd1-controlnet", "cones2.build": str(BUILD_VERSION)})
    control = comfy.controlnet.load_controlnet(path)
    if control is None or not isinstance(control, comfy.controlnet.ControlNet):
        os.remove(path)
        raise RuntimeError("the host's load_controlnet did not detect the tiny ControlNet")
    loaded = control.control_model.state_dict()
    missing = [k for k in sd if k[len("control_model."):] not in loaded]
    if missing or len(loaded) != len(sd):
        os.remove(path)
        raise RuntimeError(f"the tiny ControlNet does not load completely (unmatched: {missing[:5]})")
    return path


def build_residual(path: str, subject: str, family: str = "sd1", seed: int = 0, std: float = 0.1) -> str:
    """A placeholder residual (random offset, std ``std``) for ``subject``; no host needed."""
    import torch

    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from cones2_core.families import FAMILIES as CORE_FAMILIES
    from cones2_core.residual import Residual, save_residual

    tensors = {k: torch.randn(1, w, generator=_gen(seed, f"{family}/{subject}/{k}")) * std
               for k, w in CORE_FAMILIES[family].widths.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_residual(Residual(subject=subject, family=family, tensors=tensors,
                           metadata={"note": "placeholder: random offset, not trained"}), path)
    return path


def build_image(path: str, seed: int, kind: str, size: int = 64) -> str:
    """A small deterministic RGB PNG: a blob on a plain background ("subject") or white lines on black ("edges")."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    if kind == "edges":
        img = Image.new("RGB", (size, size), (0, 0, 0))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
            draw.line([x0, y0, x1, y1], fill=(255, 255, 255), width=2)
    else:
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(150, 255, 3)))
        draw = ImageDraw.Draw(img)
        c = size // 2
        draw.ellipse([c - size // 3, c - size // 4, c + size // 3, c + size // 3],
                     fill=tuple(int(v) for v in rng.integers(0, 120, 3)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def ensure(out_dir: str) -> dict[str, str]:
    """Build what is missing in ``out_dir``; return {name: path} for the LoRA, ControlNet, residuals, images.
    The LoRA and ControlNet need the host importable (see ``main``)."""
    paths = {"lora": os.path.join(out_dir, LORA_FILE), "controlnet": os.path.join(out_dir, CONTROLNET_FILE)}
    if not os.path.exists(paths["lora"]):
        log.info("building tiny LoRA %s", paths["lora"])
        build_lora(paths["lora"])
    if not os.path.exists(paths["controlnet"]):
        log.info("building tiny ControlNet %s", paths["controlnet"])
        build_controlnet(paths["controlnet"])
    for stem, subject in DEMO_RESIDUALS.items():
        path = paths[stem] = os.path.join(out_dir, "residuals", f"{stem}.safetensors")
        if not os.path.exists(path):
            build_residual(path, subject)
    for name, (seed, kind) in INPUT_IMAGES.items():
        path = paths[name] = os.path.join(out_dir, "images", name)
        if not os.path.exists(path):
            build_image(path, seed, kind)
    return paths


def kind_of(name: str) -> str:
    if name in ("lora", "controlnet"):
        return name
    return "residual" if name in DEMO_RESIDUALS else "image"


def install(paths: dict[str, str], server) -> dict[str, str]:
    """Copy the files into a ``harness.server.ComfyServer``'s folders (loras, controlnet, cones2_residuals,
    input); returns {name: installed path}. Existing files of the same name are replaced only if different."""
    out = {}
    for name, src in paths.items():
        kind = kind_of(name)
        folder = server.input_dir if kind == "image" else server.models_dir(FOLDERS[kind])
        os.makedirs(folder, exist_ok=True)
        dst = os.path.join(folder, os.path.basename(src))
        if not (os.path.exists(dst) and _same(src, dst)):
            shutil.copyfile(src, dst + ".part")
            os.replace(dst + ".part", dst)
        out[name] = dst
    return out


def _same(a: str, b: str) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def _import_host(comfyui: str) -> None:
    sys.path.insert(0, os.path.abspath(comfyui))
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    sys.argv = [sys.argv[0], "--cpu"]  # the host parses its own CLI arguments on import
    import comfy.options

    comfy.options.enable_args_parsing()


def make_workflows(comfyui: str, ckpt_dir: str | None, extras: dict[str, str], out_dir: str) -> None:
    """Start a server with the tiny checkpoints and the extras, then write the example workflows through the
    real frontend (tests/browser/make_workflow.js)."""
    from harness import tiny_checkpoints
    from harness.server import ComfyServer

    ckpts = tiny_checkpoints.ensure(ckpt_dir or tiny_checkpoints.default_cache_dir(), ("sd1",))
    with ComfyServer(checkpoints=ckpts, host=comfyui) as srv:
        install(extras, srv)
        res = subprocess.run(["node", os.path.join(REPO, "tests", "browser", "make_workflow.js"), srv.url, out_dir],
                             cwd=REPO, text=True, capture_output=True, timeout=300)
        sys.stderr.write(res.stderr[-4000:])
        if res.returncode != 0:
            raise RuntimeError(f"make_workflow.js failed:\n{res.stdout[-2000:]}")
        sys.stdout.write(res.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", required=True, help="the ComfyUI folder (the host)")
    ap.add_argument("--out", default=None, help="output folder (default: the versioned cache folder)")
    ap.add_argument("--make-workflows", action="store_true", help="regenerate workflows/*.json via the frontend")
    ap.add_argument("--ckpt-dir", default=os.environ.get("CONES2_CKPT_DIR"), help="tiny checkpoints folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comfyui = os.path.abspath(os.path.expanduser(args.comfyui))
    _import_host(comfyui)
    out = args.out or default_cache_dir()
    paths = ensure(out)
    if args.make_workflows:
        make_workflows(comfyui, args.ckpt_dir, paths, os.path.join(REPO, "workflows"))
        return 0
    for name, path in paths.items():
        sys.stdout.write(f"{name}\t{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
