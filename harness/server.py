"""Start the real ComfyUI server with this pack loaded, on loopback, in its own base directory."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from .host import PACK_DIR, find_host

log = logging.getLogger("comfyui-cones2")
PACK_LINK_NAME = "comfyui-cones2"
DEV_NODES_LINK_NAME = "cones2-dev-nodes"  # harness/dev_nodes: development-only nodes, never part of the pack
DEV_NODES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dev_nodes")
_FAILURE_MARKS = ("IMPORT FAILED", "Cannot import", "Error while calling comfy_entrypoint", "did not return", "Skip ")


# The test session's running servers by fixture name (tests/conftest.py stops each after its last user).
SESSION_SERVERS: dict[str, ComfyServer] = {}


def _die_with_parent() -> None:
    """In the server's child process before exec (Linux): the kernel sends it SIGTERM when the process that started
    it dies, so a test run killed outright (SIGKILL, the out-of-memory killer) leaves no server holding memory."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A running ComfyUI (``main.py --cpu``) whose base directory is a fresh temp folder holding
    custom_nodes/comfyui-cones2 (a link to this pack), models/checkpoints (links to the given files),
    input/, output/ and user/. ``dev_nodes``: also link harness/dev_nodes (the tiny Flux bed's CLIP loader)
    into custom_nodes/, next to the pack. ``front_end_root``: serve the frontend from that folder (a
    comfyui-frontend-package's ``static`` folder, see harness/frontend.py) instead of the host's own."""

    def __init__(self, checkpoints: dict[str, str] | None = None, base_dir: str | None = None,
                 host: str | None = None, python: str | None = None, extra_args: list[str] | None = None,
                 extra_model_paths: str | None = None, dev_nodes: bool = False, front_end_root: str | None = None):
        self.host = host or find_host()
        self.python = python or sys.executable
        self.own_base = base_dir is None
        self.base = base_dir or tempfile.mkdtemp(prefix="cones2-comfy-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.base, "comfyui.log")
        self.extra_args = extra_args or []
        self.extra_model_paths = extra_model_paths
        self.front_end_root = front_end_root
        for sub in ("custom_nodes", "models/checkpoints", "input", "output", "user", "temp"):
            os.makedirs(os.path.join(self.base, sub), exist_ok=True)
        link = os.path.join(self.base, "custom_nodes", PACK_LINK_NAME)
        if not os.path.lexists(link):
            os.symlink(PACK_DIR, link)
        self.dev_nodes = dev_nodes
        dev_link = os.path.join(self.base, "custom_nodes", DEV_NODES_LINK_NAME)
        if dev_nodes and not os.path.lexists(dev_link):
            os.symlink(DEV_NODES_DIR, dev_link)
        for path in (checkpoints or {}).values():
            dst = os.path.join(self.base, "models", "checkpoints", os.path.basename(path))
            if not os.path.lexists(dst):
                os.symlink(os.path.abspath(path), dst)

    @property
    def output_dir(self) -> str:
        return os.path.join(self.base, "output")

    @property
    def input_dir(self) -> str:
        return os.path.join(self.base, "input")

    def models_dir(self, kind: str) -> str:
        d = os.path.join(self.base, "models", kind)
        os.makedirs(d, exist_ok=True)
        return d

    def start(self, timeout: float = 120.0) -> ComfyServer:
        cmd = [self.python, os.path.join(self.host, "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--disable-auto-launch", "--base-directory", self.base,
               "--database-url", f"sqlite:///{os.path.join(self.base, 'user', 'comfyui.db')}", *self.extra_args]
        if self.extra_model_paths:
            cmd += ["--extra-model-paths-config", self.extra_model_paths]
        if self.front_end_root:
            if not os.path.isfile(os.path.join(self.front_end_root, "index.html")):
                raise RuntimeError(f"front_end_root {self.front_end_root} holds no frontend (no index.html)")
            cmd += ["--front-end-root", self.front_end_root]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.host, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info/CheckpointLoaderSimple", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.3)
        else:
            self.stop()
            raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")
        failure = self.pack_import_failure()
        if failure:
            self.stop()
            raise RuntimeError(f"ComfyUI could not import the pack:\n{failure}")
        return self

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def pack_loaded(self) -> bool:
        """True when the host's import-time report lists the pack without a failure."""
        return any(PACK_LINK_NAME in line and "IMPORT FAILED" not in line and "seconds" in line
                   for line in self.log_text().splitlines())

    def pack_import_failure(self) -> str | None:
        text = self.log_text()
        lines = text.splitlines()
        names = (PACK_LINK_NAME, DEV_NODES_LINK_NAME) if self.dev_nodes else (PACK_LINK_NAME,)
        for i, line in enumerate(lines):
            if any(n in line for n in names) and any(m in line for m in _FAILURE_MARKS):
                return "\n".join(lines[max(0, i - 30): i + 5])
        return None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        if self.own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())
