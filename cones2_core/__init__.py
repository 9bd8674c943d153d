"""Cones 2 core: residual math and file format, layout rasterisation, the attention bias and the
training objective. Standalone torch: nothing here imports ComfyUI (``comfy``)."""

from .errors import Cones2Error

__all__ = ["Cones2Error"]
