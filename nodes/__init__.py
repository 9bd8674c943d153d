"""ComfyUI nodes of the pack: thin translators between the host's types and ``cones2_core``.

Every module of this package that defines ``NODES`` (a list of ``io.ComfyNode`` classes) is registered.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

from comfy_api.latest import ComfyExtension, io

log = logging.getLogger("comfyui-cones2")


def _node_modules():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NODES"):
            yield module


class Cones2Extension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        nodes: list[type[io.ComfyNode]] = []
        for module in _node_modules():
            nodes.extend(module.NODES)
        return nodes


async def comfy_entrypoint() -> ComfyExtension:
    return Cones2Extension()
