"""The registry of model architectures: one module per architecture, one list that names them all.

Each family record (``cones2_core/families.py``) names its architecture (``Family.architecture``); each module
here defines one ``base.Architecture`` (its ``ARCHITECTURE``) with the genuinely architecture-specific parts of
Layout Guidance and Train Residual. Both nodes find a model's architecture here, by its family:

* ``for_model(model)``: Layout Guidance, from the host's model config (``base.model_family``);
* ``for_family(family)``: Train Residual, from the CLIP's family, after checking the model is of that family.

Adding a family: its record in ``FAMILIES``; an architecture module here only if its attention is reached
differently from every existing one (docs/porting.md walks the steps).
"""

from __future__ import annotations

from ...cones2_core.errors import Cones2Error
from ...cones2_core.families import Family, article
from . import chroma, flux, qwen_image, sd3, unet, wan
from .base import Architecture, describe_model, model_family, supported_names

ARCHITECTURES: dict[str, Architecture] = {a.key: a for a in (unet.ARCHITECTURE, flux.ARCHITECTURE, sd3.ARCHITECTURE,
                                                             qwen_image.ARCHITECTURE, wan.ARCHITECTURE,
                                                             chroma.ARCHITECTURE)}


def for_family(family: Family) -> Architecture:
    return ARCHITECTURES[family.architecture]


def for_model(model_patcher, node: str = "Layout Guidance") -> tuple[Family, Architecture]:
    """The family and architecture of a MODEL; an error naming what is supported for a model of none."""
    fam = model_family(model_patcher)
    if fam is None:
        raise Cones2Error(f"{node} supports {supported_names()} models, and this is {describe_model(model_patcher)}: "
                          "connect the MODEL of such a loader")
    return fam, for_family(fam)


def check_same_family(model_patcher, clip_family: Family, node: str = "Train Residual") -> Architecture:
    """The architecture of ``clip_family`` when the MODEL is of that family too; else an error saying which
    MODEL to connect."""
    fam = model_family(model_patcher)
    if fam is not None and fam.key != clip_family.key:
        raise Cones2Error(f"the MODEL is {article(fam.name)} {fam.name} model but the CLIP is {clip_family.name}'s: "
                          f"connect the MODEL and CLIP of one {clip_family.name} checkpoint (or loaders) to {node}")
    return for_family(clip_family)


def prediction_type(model_patcher) -> tuple[str, float, object]:
    """(``"eps"``/``"v"``/``"flow"``, sigma_data, model_sampling) of a MODEL of a supported family."""
    fam, arch = for_model(model_patcher, node="Train Residual")
    return arch.prediction_type(model_patcher, fam)


__all__ = ["ARCHITECTURES", "Architecture", "check_same_family", "for_family", "for_model", "model_family", "prediction_type"]
