"""Finding the ComfyUI host and importing it in-process."""

from __future__ import annotations

import os
import sys

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class HostNotFound(RuntimeError):
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


def load_pack(name: str = "comfyui_cones2"):
    """Import this pack as a package, the way ComfyUI's loader does (relative imports inside)."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(PACK_DIR, "__init__.py"), submodule_search_locations=[PACK_DIR]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    import pkgutil

    for sub in ("cones2_core", "nodes"):  # import every submodule, so tests can reach them as attributes
        pkg = importlib.import_module(f"{name}.{sub}")
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{name}.{sub}.{info.name}")
    return module
