"""The README's main job (scripts/demo.py) runs end to end and writes its image, maps and report."""

from __future__ import annotations

import os
import subprocess
import sys

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_writes_image_maps_and_report(host_dir, tiny_ckpts, tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "demo.py"), "--out", str(out), "--steps", "2"],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "COMFYUI_DIR": host_dir})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    names = sorted(os.listdir(out))
    assert "cones2_attention_maps.png" in names and "cones2_report.txt" in names
    images = [n for n in names if n.startswith("cones2_demo_") and n.endswith(".png")]
    assert len(images) == 1
    with Image.open(out / images[0]) as im:
        assert im.size == (64, 64)
    with Image.open(out / "cones2_attention_maps.png") as im:
        assert im.size[0] > im.size[1] > 0  # two panels side by side
    report = (out / "cones2_report.txt").read_text()
    shares = [float(line.rsplit(" ", 1)[1]) for line in report.splitlines() if "in-region share" in line]
    assert len(shares) == 2 and min(shares) >= 0.99, report
    assert "s per sampler step" in report and "images are noise" in report
