"""The Layout Attention Guidance node: boxes, masks or a colour map per subject, bound to the prompt's tokens,
installed on a clone of the model by its architecture (``nodes/architectures/``)."""

from __future__ import annotations

import json
import logging
import re
import uuid

import torch
from comfy_api.latest import io

from ..cones2_core.errors import Cones2Error, check_number, short
from ..cones2_core.families import FAMILIES, family_name
from ..cones2_core.families import names as family_names
from ..cones2_core.layout import MAX_BOX_WEIGHT, MAX_LAYOUT_CHARS, colour_map_regions, parse_layout
from ..cones2_core.prompt import PromptRecord
from . import architectures
from .common import CATEGORY, warn
from .encoding import COND_KEY
from .guidance import GuidanceSpec, SubjectRegion, check_one_subject_per_token

log = logging.getLogger("comfyui-cones2")

DEFAULT_LAYOUT = '{"version": 1, "boxes": []}'
# With self_recurrence on, the guided steps before this point of the schedule are taken twice; 1 = every guided
# step, the paper's. Re-taking only the first quarter placed subjects worse where placement is hard
# (docs/toy_world.md, "Where placement is hard").
RECURRENCE_END_PERCENT = 1.0


def _split_names(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"[,\n]", text or "") if t.strip()]


def _colour_pairs(text: str) -> dict[str, str]:
    """'#ff0000=dog, #00ff00=cat' -> {'#ff0000': 'dog', ...}"""
    pairs = {}
    for item in _split_names(text):
        if "=" not in item:
            raise Cones2Error(f"colour_subjects entry '{item}' needs the form '#rrggbb=word', e.g. '#ff0000=dog'")
        colour, word = (p.strip() for p in item.split("=", 1))
        if colour.lower() in (c.lower() for c in pairs):
            raise Cones2Error(f"colour_subjects lists the colour {colour} twice: give each colour one subject word")
        pairs[colour] = word
    return pairs


def _has_boxes(text: str) -> bool:
    if not text or not text.strip():
        return False
    if len(text) > MAX_LAYOUT_CHARS:
        return True  # let parse_layout report the size
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return True  # let parse_layout report the JSON error
    return not isinstance(data, dict) or bool(data.get("boxes"))


def subject_positions(record: PromptRecord, subject: str) -> tuple[int, ...]:
    """Token rows of ``subject`` (a word or a phrase of the prompt) from Apply Residuals' record."""
    return record.rows_of(subject)


def build_spec(model, conditioning, layout, guidance_weight, positive_weight, negative_weight, start_percent,
               end_percent, self_recurrence, masks=None, mask_subjects="", colour_map=None, colour_subjects="",
               record_maps=False, recurrence_end_percent=RECURRENCE_END_PERCENT):
    if not conditioning:
        raise Cones2Error("the conditioning input is empty: connect Cones2 Apply Residuals to Conditioning")
    # The API accepts NaN and values past the widgets' limits; every number is checked here, not at the sampler.
    guidance_weight = check_number(guidance_weight, "guidance_weight", 0.0, 2.0)
    positive_weight = check_number(positive_weight, "positive_weight", 0.0, MAX_BOX_WEIGHT)
    negative_weight = check_number(negative_weight, "negative_weight", -1e9, 0.0)
    start_percent = check_number(start_percent, "start_percent", 0.0, 1.0)
    end_percent = check_number(end_percent, "end_percent", 0.0, 1.0)
    recurrence_end_percent = check_number(recurrence_end_percent, "recurrence_end_percent", 0.0, 1.0)
    if not start_percent <= end_percent:
        raise Cones2Error(f"need 0 <= start_percent <= end_percent <= 1, got {start_percent} and {end_percent}")
    if start_percent == end_percent:
        warn("Cones2 Layout Guidance: start_percent = end_percent = %g leaves no part of the schedule to guide, "
             "so this node changes nothing; widen the window (e.g. 0 to 1)", start_percent)
    # regions per subject, from boxes, masks and a colour map
    boxes: dict[str, list] = {}
    weights: dict[str, float] = {}
    region_masks: dict[str, list] = {}
    if _has_boxes(layout) or (masks is None and colour_map is None):
        for box in parse_layout(layout).boxes:
            boxes.setdefault(box.subject, []).append(box)
            if box.weight is not None:
                weights[box.subject] = max(weights.get(box.subject, box.weight), box.weight)
    if masks is not None:
        names = _split_names(mask_subjects)
        m = masks if masks.ndim == 3 else masks[None]
        if len(names) != m.shape[0]:
            raise Cones2Error(f"{m.shape[0]} mask(s) but {len(names)} word(s) in mask_subjects: list one subject word "
                              "per mask, comma-separated, in the masks' order")
        for name, mask in zip(names, m, strict=True):
            mask = mask.float().cpu()
            if not bool(torch.isfinite(mask).all()):
                raise Cones2Error(f"the mask for '{short(name)}' holds NaN or infinite values: connect a mask with "
                                  "values from 0 to 1")
            if not bool((mask >= 0.5).any()):
                raise Cones2Error(f"the mask for '{short(name)}' is empty or too weak (its largest value is "
                                  f"{float(mask.max()):.3g}; a region is where the mask reaches 0.5): paint the "
                                  f"subject's region, or remove '{short(name)}' from mask_subjects")
            region_masks.setdefault(name, []).append(mask)
    if colour_map is not None:
        if colour_map.shape[0] > 1:
            warn("Cones2 Layout Guidance: the colour_map input holds %d images; only the first is used "
                 "(one layout for every sample of the batch)", colour_map.shape[0])
        pairs = _colour_pairs(colour_subjects)
        if not pairs:
            raise Cones2Error("a colour_map is connected but colour_subjects is empty: write '#rrggbb=word' pairs")
        for name, region in colour_map_regions(colour_map[0].float().cpu(), pairs).items():
            region_masks.setdefault(name, []).append(region.float())
    subjects = list(dict.fromkeys([*boxes, *region_masks]))
    conds = []
    family = architectures.for_model(model)[0]
    for cond, extra in conditioning:
        record = extra.get(COND_KEY)
        if not isinstance(record, PromptRecord):
            raise Cones2Error("this conditioning does not say where the prompt's words are: encode the prompt with "
                              "'Cones2 Apply Residuals to Conditioning' (it works without residuals too) instead of "
                              "CLIP Text Encode, and connect its output here")
        if record.family != family.key or cond.shape[-1] != family.width:
            raise Cones2Error(f"the conditioning is {family_name(record.family, 'another model')} text "
                              f"({cond.shape[-1]} wide) but the model is {family.name} (it reads {family.width}-wide "
                              "text): encode the prompt with the CLIP of the same checkpoint as the model")
        regions = tuple(SubjectRegion(s, subject_positions(record, s), tuple(boxes.get(s, ())),
                                      tuple(region_masks.get(s, ())), float(weights.get(s, positive_weight)))
                        for s in subjects)
        check_one_subject_per_token(regions)
        conds.append((cond.detach().to("cpu").clone(), regions))
    sampling = model.get_model_object("model_sampling")
    return GuidanceSpec(uid=uuid.uuid4().hex, conds=conds, guidance_weight=float(guidance_weight),
                        negative_weight=float(negative_weight),
                        sigma_start=float(sampling.percent_to_sigma(start_percent)),
                        sigma_end=float(sampling.percent_to_sigma(end_percent)) if end_percent < 1.0 else 0.0,
                        self_recurrence=bool(self_recurrence), record=bool(record_maps),
                        chunk=family.chunk,
                        recurrence_sigma_end=(float(sampling.percent_to_sigma(recurrence_end_percent))
                                              if recurrence_end_percent < 1.0 else 0.0))


class Cones2LayoutGuidance(io.ComfyNode):
    # The model families (cones2_core.families keys) it works with; its help page names each (tested).
    SUPPORTED_FAMILIES = tuple(FAMILIES)  # every family of the table

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Cones2LayoutGuidance",
            display_name="Cones2 Layout Guidance",
            category=CATEGORY,
            description=(
                "Places each subject in its own region (Cones 2 layout guidance). During the chosen part of "
                "sampling, the cross-attention scores of the guided prompt's conditional pass get a bias "
                "guidance_weight * w * log(1 + sigma^2) * std(QK^T), with w = positive_weight inside the "
                "subject's box and negative_weight outside it, for the subject's tokens. Returns a patched "
                "copy of the model (the input model is unchanged) and the conditioning to sample with."),
            inputs=[
                io.Model.Input("model", tooltip=f"The model to guide ({family_names()}). It is cloned, not changed."),
                io.Conditioning.Input("conditioning", tooltip="The positive prompt, from Cones2 Apply Residuals to "
                                      "Conditioning (with or without residuals)."),
                io.String.Input("layout", default=DEFAULT_LAYOUT, multiline=True,
                                tooltip="The boxes, drawn in the layout editor: JSON {\"version\": 1, \"boxes\": "
                                        "[{\"subject\": \"dog\", \"x\": 0.05, \"y\": 0.1, \"w\": 0.4, \"h\": 0.8}]} "
                                        "with coordinates as fractions of the image; optional per-box \"weight\"."),
                io.Float.Input("guidance_weight", default=0.08, min=0.0, max=2.0, step=0.01,
                               tooltip="Strength of the layout bias (paper default 0.08). Raise it if subjects "
                                       "leave their boxes; lower it if images look stiff. 0 turns guidance off "
                                       "(sampling is exactly as without this node; with record_maps on the "
                                       "attention maps still record)."),
                io.Float.Input("positive_weight", default=2.5, min=0.0, max=50.0, step=0.1,
                               tooltip="w inside a subject's region (paper: 2.5); a box's own \"weight\" overrides it."),
                io.Float.Input("negative_weight", default=-1e8, min=-1e9, max=0.0, step=1.0,
                               tooltip="w outside a subject's region (paper: -1e8, i.e. the subject's tokens get no "
                                       "attention there). Use e.g. -5 for a soft layout."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where guidance starts in the schedule (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where guidance ends (1 = last step; the paper guides all 50 steps). "
                                       "Ending earlier (e.g. 0.4) keeps layouts and frees details."),
                io.Boolean.Input("self_recurrence", default=False,
                                 tooltip="Take every guided step twice, re-noising in between (the paper's "
                                         "self-recurrence). Doubles the guided steps' cost (see "
                                         "recurrence_end_percent); off by default because it placed subjects no "
                                         "better in our measurements (docs/nodes.md). Samplers with a history "
                                         "(dpmpp_2m, uni_pc, ...) take their re-taken steps as euler steps."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Regions as masks instead of (or besides) boxes: one mask per subject, "
                                      "named in mask_subjects."),
                io.String.Input("mask_subjects", default="", optional=True,
                                tooltip="Comma-separated subject words, one per mask, in order (e.g. 'dog, cat')."),
                io.Image.Input("colour_map", optional=True,
                               tooltip="Regions painted in flat colours (the reference's format); colours are "
                                       "matched with a tolerance, so JPEGs work."),
                io.String.Input("colour_subjects", default="", optional=True,
                                tooltip="Colour to subject pairs for colour_map, e.g. '#ff0000=dog, #00ff00=cat'."),
                io.Boolean.Input("record_maps", default=False, optional=True,
                                 tooltip="Record where each subject's words attend, for Cones2 Attention Maps and the "
                                         "layout editor's heatmaps. Off: nothing is recorded (faster, less memory); "
                                         "turn it on when an Attention Maps node reads this model."),
                io.Float.Input("recurrence_end_percent", default=RECURRENCE_END_PERCENT, min=0.0, max=1.0,
                               step=0.01, optional=True,
                               tooltip="With self_recurrence on, only the guided steps before this point of the "
                                       "schedule are taken twice (the early steps, where the layout forms); 1 = "
                                       "every guided step, as in the paper (twice the guided steps' cost)."),
            ],
            outputs=[
                io.Model.Output(tooltip="The guided model: connect it to the sampler."),
                io.Conditioning.Output(tooltip="The conditioning to sample with (the input, unchanged: the guided "
                                                "model finds it by its tensors)."),
            ],
        )

    @classmethod
    def execute(cls, model, conditioning, layout, guidance_weight, positive_weight, negative_weight,
                start_percent, end_percent, self_recurrence, masks=None, mask_subjects="", colour_map=None,
                colour_subjects="", record_maps=False,
                recurrence_end_percent=RECURRENCE_END_PERCENT) -> io.NodeOutput:
        spec = build_spec(model, conditioning, layout, guidance_weight, positive_weight, negative_weight,
                          start_percent, end_percent, self_recurrence, masks, mask_subjects, colour_map,
                          colour_subjects, record_maps, recurrence_end_percent)
        guided = architectures.for_model(model)[1].install(model, spec)
        subjects = [r.subject for r in spec.conds[0][1]]
        log.info("layout guidance on %s (weight %.3g, %s)", ", ".join(subjects), guidance_weight,
                 "self-recurrence" if self_recurrence else "no self-recurrence")
        return io.NodeOutput(guided, conditioning)


NODES = [Cones2LayoutGuidance]
