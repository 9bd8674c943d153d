"""Load Residual and Apply Residuals to Conditioning."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from ..cones2_core.errors import Cones2Error
from ..cones2_core.families import FAMILIES
from ..cones2_core.families import names as family_names
from ..cones2_core.residual import load_residual, resolve_residual_path
from .common import CATEGORY, Residuals
from .encoding import encode_with_residuals
from .paths import FOLDER, residual_folders

log = logging.getLogger("comfyui-cones2")


def find_residual_file(name: str) -> str:
    """The file ``name`` in one of the residual folders, confined to that folder."""
    for root in residual_folders():
        path = resolve_residual_path(root, name)
        if os.path.isfile(path):
            return path
    raise Cones2Error(f"no residual file '{name}' in {', '.join(residual_folders())}: put it in "
                      "models/cones2_residuals/ and refresh the node list (press R)")


class Cones2LoadResidual(io.ComfyNode):
    # The model families (cones2_core.families keys) it works with; its help page names each (tested).
    SUPPORTED_FAMILIES = tuple(FAMILIES)  # every family of the table

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Cones2LoadResidual",
            display_name="Cones2 Load Residual",
            category=CATEGORY,
            description=(
                "Loads one Cones 2 subject residual (a few-KB offset for the text encoder's output at the "
                "subject's class word) from models/cones2_residuals/. Chain several Load Residual nodes to "
                "stack subjects, then connect the chain to Apply Residuals to Conditioning."),
            inputs=[
                io.Combo.Input("residual_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip=f"A .safetensors residual written by Train Residual ({family_names()}), "
                                       "or a reference .pt (SD2.1, 1024 floats), loaded safely (no "
                                       "pickled code)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Scale of the residual: 1.0 as trained; lower it if the subject dominates."),
                io.String.Input("subject", default="", optional=True,
                                tooltip="The word in your prompt that this residual customises (e.g. 'dog'). "
                                        "Empty: the word stored in the file (for .pt files: the file name)."),
                Residuals.Input("residuals", optional=True,
                                tooltip="Residuals loaded earlier in a chain; this one is added to them."),
            ],
            outputs=[Residuals.Output(display_name="residuals",
                                      tooltip="The chain of residuals, for Apply Residuals to Conditioning.")],
        )

    @classmethod
    def execute(cls, residual_name, strength=1.0, subject="", residuals=None) -> io.NodeOutput:
        path = find_residual_file(residual_name)
        res = load_residual(path, subject=(subject or "").strip() or None)
        res = res.with_strength(strength)
        chain = list(residuals or [])
        if any(r.subject == res.subject for r in chain):
            raise Cones2Error(f"the chain already has a residual for the subject '{res.subject}': give one of them "
                              "another subject word")
        log.info("loaded residual %s (subject %r, %s, strength %.2f)", residual_name, res.subject, res.family, strength)
        return io.NodeOutput(chain + [res])


class Cones2ApplyResiduals(io.ComfyNode):
    # The model families (cones2_core.families keys) it works with; its help page names each (tested).
    SUPPORTED_FAMILIES = tuple(FAMILIES)  # every family of the table

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Cones2ApplyResiduals",
            display_name="Cones2 Apply Residuals to Conditioning",
            category=CATEGORY,
            description=(
                "Encodes the prompt exactly as CLIP Text Encode does, then adds each residual at every "
                "occurrence of its subject word (all 77-token chunks, weighted words, SDXL's two encoders, Flux's "
                "T5 rows, SD3.5's CLIP and T5 rows, Qwen-Image's LLM rows, Wan's umT5 rows; the pooled output is left as the host made it). "
                "Any number of subjects compose without retraining. The output also records where each word "
                "of the prompt sits, so Layout Guidance can bind boxes to words."),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of one of these families (how to load it): " + "; ".join(
                    f"{f.name} ({f.clip_loader})" for f in FAMILIES.values()) + "."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt; it must contain each residual's subject word, e.g. "
                                        "'a dog and a cat on a sofa'."),
                Residuals.Input("residuals", optional=True,
                                tooltip="From Load Residual (or Train Residual). Without it this node equals "
                                        "CLIP Text Encode."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The prompt's conditioning with the residuals added.")],
        )

    @classmethod
    def execute(cls, clip, text, residuals=None) -> io.NodeOutput:
        return io.NodeOutput(encode_with_residuals(clip, text, residuals))


NODES = [Cones2LoadResidual, Cones2ApplyResiduals]
