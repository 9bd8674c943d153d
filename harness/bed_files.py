"""What every test bed builder (harness/tiny_flux.py, tiny_wan.py, tiny_qwen_image.py, tiny_sd3.py) does with its
files besides building them: build once into a folder, link them into a test server's model folders, and run as a
script that prints ``name<TAB>path`` lines (what ``harness.host.build`` reads). Development only."""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("comfyui-cones2.harness")


def save(sd: dict, path: str, dtype, metadata: dict[str, str]) -> None:
    """Save a state dict (floating tensors as ``dtype``) as safetensors with ``metadata``, atomically."""
    import comfy.utils

    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        comfy.utils.save_torch_file(sd, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def ensure(files: dict[str, str], out_dir: str, build, what: str) -> dict[str, str]:
    """Build the bed into ``out_dir`` (``build(out_dir)``) unless all its ``files`` are there; {name: path}."""
    paths = {k: os.path.join(out_dir, f) for k, f in files.items()}
    if not all(os.path.exists(p) for p in paths.values()):
        log.info("building the %s in %s", what, out_dir)
        build(out_dir)
    return paths


def install(paths: dict[str, str], server, folders: dict[str, str]) -> dict[str, str]:
    """Link the bed's files into a ``harness.server.ComfyServer``'s model folders (``folders``: name -> folder);
    returns {name: file name as the loaders list it}."""
    out = {}
    for name, src in paths.items():
        dst = os.path.join(server.models_dir(folders[name]), os.path.basename(src))
        if not os.path.lexists(dst):
            os.symlink(os.path.abspath(src), dst)
        out[name] = os.path.basename(src)
    return out


def main(argv, doc: str, ensure_in, default_cache_dir) -> int:
    """A builder's command line: ``--comfyui HOST [--out DIR]``; builds (``ensure_in(dir)``) and prints the files."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", required=True, help="the ComfyUI folder (the host)")
    ap.add_argument("--out", default=None, help="output folder (default: the versioned cache folder)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, os.path.abspath(args.comfyui))
    sys.argv = [sys.argv[0], "--cpu"]  # the host parses its own CLI arguments on import
    import comfy.options

    comfy.options.enable_args_parsing()
    for name, path in ensure_in(args.out or default_cache_dir()).items():
        sys.stdout.write(f"{name}\t{path}\n")
    return 0
