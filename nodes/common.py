"""Shared bits of the nodes."""

from comfy_api.latest import io

CATEGORY = "conditioning/cones2"

# The residual chain passed between nodes: a list of cones2_core.residual.Residual (never mutated).
Residuals = io.Custom("CONES2_RESIDUALS")
