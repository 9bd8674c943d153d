"""The README's main job (scripts/demo.py) runs end to end on the toy world and writes its images, maps and
report."""

from __future__ import annotations

import os
import subprocess
import sys

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_writes_images_maps_comparison_and_report(host_dir, toy_ckpt, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "COMFYUI_DIR": host_dir}
    res = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "demo.py"), "--out", str(out), "--steps", "4"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    names = sorted(os.listdir(out))
    for name in ("cones2_attention_maps.png", "cones2_attention_maps_unguided.png", "cones2_compare.png",
                 "cones2_report.txt"):
        assert name in names, names
    guided = [n for n in names if n.startswith("cones2_demo_") and not n.startswith("cones2_demo_unguided")]
    unguided = [n for n in names if n.startswith("cones2_demo_unguided")]
    assert len(guided) == 1 and len(unguided) == 1, names
    for name in (guided[0], unguided[0]):
        with Image.open(out / name) as im:
            assert im.size == (128, 128)
    with Image.open(out / "cones2_attention_maps.png") as im:
        assert im.size[0] > im.size[1] > 0  # two panels side by side
    with Image.open(out / "cones2_compare.png") as im:
        assert im.size[0] > 2 * im.size[1] - 20  # unguided | guided
    report = (out / "cones2_report.txt").read_text()
    guided_part, unguided_part = report.split("without guidance", 1)
    shares = [float(line.rsplit(" ", 1)[1]) for line in guided_part.splitlines() if "in-region share" in line]
    assert len(shares) == 2 and min(shares) >= 0.99, report
    free = [float(line.rsplit(" ", 1)[1]) for line in unguided_part.splitlines() if "in-region share" in line]
    assert len(free) == 2 and max(free) < 0.99, report  # the unguided run's attention is not confined
    assert "s per sampler step" in report and "trained toy world" in report
    assert "Layout Guidance: dog" in report and "no guidance: cat" in report


def test_demo_on_your_checkpoint_with_one_residual(host_dir, tiny_ckpts, extras_files, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "COMFYUI_DIR": host_dir}
    res = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "demo.py"), "--out", str(out), "--steps", "2",
                          "--size", "64", "--ckpt", tiny_ckpts["sd1"], "--dog", extras_files["demo_dog"]],
                         capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = (out / "cones2_report.txt").read_text()
    assert "your checkpoint" in report and "where the toy world's objects landed" not in report, report
    with Image.open(out / "cones2_compare.png") as im:
        assert im.size[1] == 256
    bad = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "demo.py"), "--out", str(out), "--ckpt",
                          tiny_ckpts["sd2"], "--dog", extras_files["demo_dog"]],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode != 0 and "is a sd1 residual but the checkpoint is sd2" in bad.stderr, bad.stderr[-2000:]
