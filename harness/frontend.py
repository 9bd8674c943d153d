"""The newest ComfyUI frontend, installed beside the host for the browser tests.

The host pins its own frontend (ComfyUI 0.3.64: comfyui-frontend-package 1.27.10) and serves it by default;
users update the frontend on its own. The browser tests also run the layout editor against NEWEST_FRONTEND,
installed once with pip into a side folder under ~/.cache/comfyui-cones2/ (never into the venv, so the host's
own frontend stays what the host serves) and served with ``main.py --front-end-root``
(``ComfyServer(front_end_root=...)``).

Bump NEWEST_FRONTEND on purpose, when a newer frontend is out and the browser tests pass on it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

log = logging.getLogger("comfyui-cones2")

PACKAGE = "comfyui-frontend-package"
NEWEST_FRONTEND = "1.58.1"  # the newest frontend on PyPI, tested in both renderers (classic and Nodes 2.0)
VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"  # "Modern Node Design (Nodes 2.0)", the Vue node renderer


class FrontendInstallFailed(RuntimeError):
    pass


def default_cache_dir(version: str = NEWEST_FRONTEND) -> str:
    """~/.cache/comfyui-cones2/frontend-<version>; CONES2_FRONTEND_DIR overrides it."""
    return os.environ.get("CONES2_FRONTEND_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "comfyui-cones2", f"frontend-{version}")


def static_dir(target: str) -> str:
    """The folder ``--front-end-root`` takes, inside a pip --target folder of the package."""
    return os.path.join(target, "comfyui_frontend_package", "static")


def install(version: str = NEWEST_FRONTEND, target: str | None = None, python: str | None = None,
            timeout: float = 900.0) -> str:
    """Installs comfyui-frontend-package==version (no dependencies) into ``target`` once; returns its static
    folder. A finished install is marked by a ``.complete`` file; an unfinished one is removed and redone."""
    target = target or default_cache_dir(version)
    static = static_dir(target)
    if os.path.isfile(os.path.join(target, ".complete")) and os.path.isfile(os.path.join(static, "index.html")):
        return static
    shutil.rmtree(target, ignore_errors=True)
    partial = target + ".part"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    log.info("installing %s==%s into %s (once)", PACKAGE, version, target)
    cmd = [python or sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q",
           "--no-deps", "--target", partial, f"{PACKAGE}=={version}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FrontendInstallFailed(f"{' '.join(cmd)}: {e}") from e
    if res.returncode != 0 or not os.path.isfile(os.path.join(static_dir(partial), "index.html")):
        shutil.rmtree(partial, ignore_errors=True)
        raise FrontendInstallFailed(f"{' '.join(cmd)} exited with {res.returncode}:\n"
                                    f"{(res.stderr or res.stdout).strip()[-3000:]}")
    os.replace(partial, target)
    with open(os.path.join(target, ".complete"), "w") as f:
        f.write(version + "\n")
    return static
