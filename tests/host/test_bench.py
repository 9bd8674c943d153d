"""The benchmark scripts keep working (functional checks, no timings asserted): one short configuration of each
training row kind, in the subprocess form the benchmark itself uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("mode", ["reference-like", "paper", "fast"])
def test_train_bench_one_configuration(host_dir, tiny_ckpts, mode, tmp_path):
    cfg = {"comfyui": host_dir, "device": "cpu", "ckpt": tiny_ckpts["sd1"], "mode": mode, "resolution": 64,
           "steps": 2}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_residual.py"), "--one", json.dumps(cfg)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env=dict(os.environ, COMFYUI_DIR=host_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1])
    assert m["s_per_step"] > 0 and m["total_s"] >= m["s_per_step"]
    assert m["base_mib"] > 100 and m["peak_mib"] >= m["base_mib"]
    if mode != "fast":  # the encoder copy alone is hundreds of MiB
        assert m["peak_mib"] - m["base_mib"] > 200
    host_residuals = os.path.join(host_dir, "models", "cones2_residuals")
    assert not os.path.exists(os.path.join(host_residuals, f"bench_{mode}.safetensors"))  # writes to a temp dir


@pytest.mark.parametrize(("family", "model_class", "unet_millions"),
                         [("sd1", "SD15", 859.52), ("sd2", "SD20", 865.91), ("sdxl", "SDXL", 2567.46)])
def test_full_size_bench_architectures_are_the_real_ones(comfy, family, model_class, unet_millions):
    """The GPU benchmark's full-size random-weight UNets (built on the meta device here: shapes only) are what
    the host detects as SD1.5 / SD2.x / SDXL, with the real models' parameter counts."""
    import importlib.util

    import comfy.model_detection
    import comfy.supported_models
    import torch

    spec = importlib.util.spec_from_file_location("cones2_bench_train", os.path.join(ROOT, "bench", "train_residual.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = getattr(comfy.supported_models, model_class)(dict(bench.FULL_FAMILIES[family]))
    with torch.device("meta"):
        unet = config.get_model({}).diffusion_model
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    found = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    assert type(found).__name__ == model_class
    assert sum(p.numel() for p in unet.parameters()) / 1e6 == pytest.approx(unet_millions, abs=0.01)
