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
    cfg = {"comfyui": host_dir, "device": "cpu", "ckpt": tiny_ckpts["sd15"], "mode": mode, "resolution": 64,
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
