"""Shared bits of the nodes."""

from __future__ import annotations

import logging

from comfy_api.latest import io

CATEGORY = "conditioning/cones2"
log = logging.getLogger("comfyui-cones2")

# The residual chain passed between nodes: a list of cones2_core.residual.Residual (never mutated).
Residuals = io.Custom("CONES2_RESIDUALS")


def warn(message: str, *args) -> None:
    """A warning in the log and as text on the node that is running (the host's progress-text message, which
    the frontend shows on that node), so that someone who never reads the console still sees it."""
    log.warning(message, *args)
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:  # the host without its server (scripts, in-process tests)
        return
    context = get_executing_context()
    server = getattr(PromptServer, "instance", None)
    if context is None or server is None:
        return
    server.send_progress_text(message % args if args else message, context.node_id)
