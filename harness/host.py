"""Finding the ComfyUI host and importing it in-process."""

from __future__ import annotations

import os
import subprocess
import sys

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class HostNotFound(RuntimeError):
    pass


class BuildFailed(RuntimeError):
    pass


def find_host() -> str:
    """The host folder: COMFYUI_DIR, else the pack's grandparent when the pack sits in ComfyUI/custom_nodes/,
    else ~/ComfyUI."""
    env = os.environ.get("COMFYUI_DIR")
    if env:
        if os.path.isfile(os.path.join(env, "main.py")) and os.path.isdir(os.path.join(env, "comfy")):
            return os.path.abspath(env)
        raise HostNotFound(f"COMFYUI_DIR={env} holds no ComfyUI (no main.py and comfy/ there).")
    parent = os.path.dirname(PACK_DIR)
    if os.path.basename(parent) == "custom_nodes" and os.path.isfile(os.path.join(parent, "..", "main.py")):
        return os.path.abspath(os.path.join(parent, ".."))
    home = os.path.join(os.path.expanduser("~"), "ComfyUI")
    if os.path.isfile(os.path.join(home, "main.py")):
        return home
    raise HostNotFound(
        "ComfyUI not found: set COMFYUI_DIR, install this pack in ComfyUI/custom_nodes/, or export ComfyUI "
        "into ~/ComfyUI (scripts/setup_env.sh does this)."
    )


def import_host(host: str | None = None) -> str:
    """Make the host importable in this process (CPU only), as the host's own tests do."""
    host = host or find_host()
    if host not in sys.path:
        sys.path.insert(0, host)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    return host


PACK_NAME = "comfyui_cones2"


def pack_package(name: str = PACK_NAME):
    """This pack registered as the package ``name`` without running its __init__.py (which needs the host), so that
    ``name.cones2_core`` (no host imports) can be imported anywhere, the host's tests and the core tests alike;
    load_pack runs the __init__ later on the same module. One name for the pack in a process: its classes
    (Cones2Error, the family records) are then the same objects in every test."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(PACK_DIR, "__init__.py"), submodule_search_locations=[PACK_DIR]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    return module


def load_pack(name: str = PACK_NAME):
    """Import this pack as a package, the way ComfyUI's loader does (relative imports inside)."""
    import importlib
    import pkgutil

    module = pack_package(name)
    if "comfy_entrypoint" not in vars(module):  # its __init__.py has not run yet
        module.__spec__.loader.exec_module(module)
    for sub in ("cones2_core", "nodes"):  # import every submodule, so tests can reach them as attributes
        pkg = importlib.import_module(f"{name}.{sub}")
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{name}.{sub}.{info.name}")
    return module


def build(script: str, host: str, *args: str, out: str | None = None, timeout: float | None = None,
          show_log: bool = False) -> dict[str, str]:
    """Run one of harness/'s builders (tiny_checkpoints, tiny_extras, tiny_flux, toy_world: ``script`` is its
    ``__file__``) as a script in its own process, so the host parses its own CPU arguments there; returns what it
    printed, ``{kind: path}`` (its ``kind<TAB>path`` lines). ``out``: the builder's --out folder (else its
    default); ``args``: more arguments (tiny_checkpoints: the families). Its log (stderr) is shown as it comes with
    ``show_log`` (a build of minutes), else kept for the error. A failed build raises BuildFailed with its output."""
    cmd = [sys.executable, script, "--comfyui", host, *(["--out", out] if out else []), *args]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if show_log else subprocess.PIPE, text=True,
                         timeout=timeout)
    if res.returncode != 0:
        log = "(its log is above)" if show_log else (res.stderr or "")[-4000:]
        raise BuildFailed(f"{os.path.basename(script)} failed with exit code {res.returncode}:\n{res.stdout}\n{log}")
    return dict(line.split("\t", 1) for line in res.stdout.strip().splitlines() if "\t" in line)
