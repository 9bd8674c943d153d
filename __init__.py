"""comfyui-cones2: Cones 2 (arXiv 2305.19327) for ComfyUI.

Multi-subject customisation with residual embeddings and layout attention guidance. ComfyUI loads this
file; the maths lives in ``cones2_core/`` (no ComfyUI imports), the nodes in ``nodes/``, the layout widget
in ``web/``. Nothing here patches ComfyUI: models are patched per node, on clones, through the host's APIs.
"""

from .nodes import comfy_entrypoint
from .nodes.paths import register_model_folder

WEB_DIRECTORY = "./web"

register_model_folder()

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
