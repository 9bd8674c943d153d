"""ComfyUI nodes of the pack: thin translators between the host's types and ``cones2_core``."""

from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

log = logging.getLogger("comfyui-cones2")

CATEGORY = "conditioning/cones2"


def _node_modules():
    # Each feature module exposes NODES, a list of io.ComfyNode classes.
    from . import residual_nodes

    return [residual_nodes]


class Cones2Extension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        nodes: list[type[io.ComfyNode]] = []
        for module in _node_modules():
            nodes.extend(module.NODES)
        return nodes


async def comfy_entrypoint() -> ComfyExtension:
    return Cones2Extension()
