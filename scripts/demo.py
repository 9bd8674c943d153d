"""The pack's main job through the real ComfyUI host: runs a generation on the user's checkpoint (--ckpt)
or on a tiny random-weight one, and writes the results into output/ (random weights give noise images)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import tiny_checkpoints  # noqa: E402
from harness.client import ComfyClient  # noqa: E402
from harness.host import find_host  # noqa: E402
from harness.server import ComfyServer  # noqa: E402
from harness.workflows import basic_txt2img  # noqa: E402

log = logging.getLogger("comfyui-cones2")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", help="an SD1.5 / SD2.x / SDXL checkpoint file (default: a tiny random-weight SD1.5)")
    ap.add_argument("--out", default="output", help="where to write the results (default: output/)")
    ap.add_argument("--size", type=int, default=64, help="image width and height (default 64 for the tiny model)")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[cones2-demo] %(message)s")
    host = find_host()
    if args.ckpt:
        ckpt = os.path.abspath(args.ckpt)
        if not os.path.isfile(ckpt):
            log.error("no checkpoint file at %s", ckpt)
            return 2
    else:
        import subprocess

        res = subprocess.run([sys.executable, tiny_checkpoints.__file__, "--comfyui", host, "sd15"],
                             check=True, capture_output=True, text=True)
        ckpt = res.stdout.strip().split("\t")[1]
    os.makedirs(args.out, exist_ok=True)
    with ComfyServer(checkpoints={"main": ckpt}, host=host) as server:
        client = ComfyClient(server.url)
        t0 = time.time()
        entry = client.run(basic_txt2img(os.path.basename(ckpt), width=args.size, height=args.size,
                                         steps=args.steps, prefix="cones2_demo"))
        elapsed = time.time() - t0
        for path in client.output_files(entry, server.output_dir):
            dst = os.path.join(args.out, os.path.basename(path))
            shutil.copyfile(path, dst)
            log.info("wrote %s", dst)
    log.info("generation took %.1f s (%d steps)", elapsed, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
