"""Train Residual, the node: learn a Cones 2 subject residual from a few images of the subject and save it.

The node checks its destination before any training, gathers the images, runs the training (``train_loop.py``;
its module docstring describes the "paper" and "fast" modes) and writes the residual under a free name.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import torch
from comfy_api.latest import io

from ..cones2_core.errors import Cones2Error
from ..cones2_core.families import FAMILIES, resolutions
from ..cones2_core.families import names as family_names
from ..cones2_core.figures import draw_loss_curve
from ..cones2_core.objective import MODES, TrainSettings, default_steps, split_channels
from ..cones2_core.residual import Residual, resolve_residual_path, save_residual
from . import architectures
from .common import CATEGORY, Residuals
from .encoding import clip_family, present_keys, word_tokens
from .paths import default_residual_folder
from .train_images import collect_images, encode_latents
from .train_loop import Trainer

log = logging.getLogger("comfyui-cones2")

# The node's default mode. 'fast' trains on every family (paper mode is refused where the text encoder is an
# LLM-sized T5/Qwen/umT5) and, on both toy worlds, reached the oracle's lift in 100 steps where paper mode at the
# paper's settings did not in its 4000 (docs/training.md, "Which mode is the default").
DEFAULT_MODE = "fast"



def train_residual(model, clip, vae, images: list[torch.Tensor], subject: str, settings: TrainSettings,
                   pbar=None, eval_every: int = 0) -> tuple[Residual, list[float], list[tuple[int, float]]]:
    """Train a residual (nothing is written). Returns (residual, training losses, [(step, eval loss)]).

    The evaluation loss (fixed crops, noise and sigmas) is measured before the first and after the last step,
    and every ``eval_every`` steps in between when that is > 0.
    """
    import comfy.model_management as mm

    for value, what in ((model, "model"), (clip, "clip"), (vae, "vae")):
        if value is None:
            raise Cones2Error(f"the {what} input is empty: connect the {what.upper()} output of a checkpoint loader")
    fam = clip_family(clip)
    family = fam.key
    arch = architectures.check_same_family(model, fam)
    if settings.mode == "paper" and fam.paper_refusal:
        raise Cones2Error(fam.paper_refusal)
    subject = (subject or "").strip()
    if not subject:
        raise Cones2Error("the subject is empty; set it to the subject's class word, e.g. 'dog'")
    counts = {k: len(v) for k, v in word_tokens(clip, subject).items()}
    if not all(counts.values()):
        raise Cones2Error(f"the subject {subject!r} has no tokens for this CLIP; use a class word such as 'dog'")
    for group in fam.groups:  # encoders that share their rows (SDXL's, SD3.5's CLIP-L and CLIP-G) must agree
        if len({counts[e.key] for e in group if e.key in counts}) > 1:
            names = " and ".join(e.name for e in group)
            raise Cones2Error(f"the subject {subject!r} tokenises differently for the {names} encoders; use a plain "
                              "word")
    missing = [e.name for e in fam.encoders if e.key not in present_keys(clip, fam)]
    if missing:
        raise Cones2Error(f"this {fam.name} CLIP was loaded without {' and '.join(missing)}; Train Residual learns "
                          "every encoder's part of the residual: load the CLIP with all its text encoders "
                          "(TripleCLIPLoader with clip_l, clip_g and t5xxl, or a checkpoint that includes them)")
    prediction, sigma_data, ms = arch.prediction_type(model, fam)  # refuses a model of another kind
    s = settings.resolved(family, prediction)
    device = mm.get_torch_device()
    t0 = time.time()
    with torch.inference_mode(False), torch.enable_grad():
        latents = encode_latents(vae, model, images, s.resolution)
        trainer = Trainer(model, clip, prediction, sigma_data, ms, s, subject, latents, device, arch=arch)
        delta, losses, eval_points = trainer.run(pbar, eval_every)
    seconds = time.time() - t0
    meta = s.metadata(prediction=prediction, images=len(images), templates=len(trainer.templates),
                      eval_loss_start=repr(eval_points[0][1]), eval_loss_end=repr(eval_points[-1][1]),
                      loss_first=losses[0], loss_last=losses[-1], seconds=round(seconds, 1))
    residual = Residual(subject, family, split_channels(delta, family, trainer.rows_by_key), metadata=meta).validate()
    log.info("trained a %s residual for %r (%s mode, %d steps, %.1f s): eval loss %.5g -> %.5g",
             fam.name, subject, s.mode, s.steps, seconds, eval_points[0][1], eval_points[-1][1])
    return residual, losses, eval_points


def residual_save_path(save_name: str) -> str:
    """``models/cones2_residuals/<save_name>.safetensors``, confined to that folder."""
    name = (save_name or "").strip()
    if name and not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    return resolve_residual_path(default_residual_folder(), name)


MAX_NAME_BYTES = 200  # file systems allow 255; the counter and the temporary file's affixes need the rest


def free_path(path: str) -> str:
    """``path`` when no file is there, else the first free ``<stem>_00001.safetensors``, ``_00002``, ...: an
    existing residual is never replaced (the host's own savers number their files the same way)."""
    if not os.path.lexists(path):
        return path
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.lexists(f"{stem}_{n:05d}{ext}"):
        n += 1
    return f"{stem}_{n:05d}{ext}"


def prepare_destination(save_name: str) -> str:
    """Check, before any training, that the residual can be written: the name stays inside the residuals folder
    and is short enough, its sub-folders exist or can be made, and the folder is writable. Returns the path."""
    path = residual_save_path(save_name)
    name = os.path.basename(path)
    if len(name.encode()) > MAX_NAME_BYTES:
        raise Cones2Error(f"save_name is {len(name.encode())} bytes long as a file name; use at most "
                          f"{MAX_NAME_BYTES} (e.g. 'my_dog')")
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise Cones2Error(f"cannot write residuals into {folder!r} ({e.strerror or e}); pick another save_name or "
                          "make that folder writable") from e
    return path


class Cones2TrainResidual(io.ComfyNode):
    # The model families (cones2_core.families keys) it works with; its help page names each (tested).
    SUPPORTED_FAMILIES = tuple(FAMILIES)  # every family of the table

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Cones2TrainResidual",
            display_name="Cones2 Train Residual",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Learns a Cones 2 residual for one subject from a few (3-5) images of it and saves it to "
                "models/cones2_residuals/<save_name>.safetensors. 'fast' mode (the default; our addition) "
                "optimises the output-space residual directly against the diffusion loss. 'paper' mode "
                "fine-tunes a private copy of the text encoder exactly as the Cones 2 paper (diffusion loss + "
                "text-embedding preservation loss, prompt = the class word alone), then averages the change of "
                "the subject's output embedding over 27 prompt templates. On Flux, SD3.5, Qwen-Image and Wan only 'fast' mode trains "
                "(against the model's own flow-matching loss, at the subject's T5, LLM or umT5 rows, and on SD3.5 "
                "its CLIP rows too). Your MODEL and CLIP are not changed."),
            inputs=[
                io.Model.Input("model", tooltip=f"The diffusion model ({family_names()}) of the CLIP's checkpoint (kept "
                                                "frozen; gradients only flow through it)."),
                io.Clip.Input("clip", tooltip="The matching CLIP; a private copy is fine-tuned, yours is unchanged."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to encode the training images once."),
                io.String.Input("subject", default="dog",
                                tooltip="The subject's class word, e.g. 'dog'. Later prompts use this word; the "
                                        "residual is added at its tokens."),
                io.Int.Input("steps", default=0, min=0, max=100000,
                             tooltip="Optimisation steps; 0 = automatic: paper mode 4000 (the paper, at batch size "
                                     "1), fast mode 100."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-7,
                               tooltip="AdamW learning rate; 0 = automatic (paper mode 5e-6 as the paper, "
                                       "fast mode 1e-2)."),
                io.Float.Input("preservation_weight_start", default=1e-2, min=0.0, max=10.0, step=1e-5,
                               tooltip="Paper mode: weight of ||e_0 - e*_0|| (start token keeps its embedding). "
                                       "It is weighed against the diffusion loss: if the residual learns little, "
                                       "lower both weights (docs/training.md). The default 1e-2 (and 1e-3 for the "
                                       "rest) is the reference README's command; its script's defaults are half."),
                io.Float.Input("preservation_weight_rest", default=1e-3, min=0.0, max=10.0, step=1e-6,
                               tooltip="Paper mode: weight of ||e_{1+n:} - e*_{1+n:}|| (tokens after the subject "
                                       "keep their embeddings). Weighed against the diffusion loss, as the start "
                                       "weight."),
                io.Int.Input("resolution", default=0, min=0, max=2048, step=64,
                             tooltip=f"Training crop size in pixels; 0 = automatic ({resolutions()}; Wan's frames are "
                                     "trained as stills). Images are resized so their short side matches, then "
                                     "randomly cropped (fast mode also flips half the crops; paper mode does not, "
                                     "as the reference)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Crops per step (the paper uses 1)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the crops, noise and timesteps: the same seed gives the same "
                                     "residual."),
                io.String.Input("save_name", default="cones2_subject",
                                tooltip="File name in models/cones2_residuals/ ('.safetensors' is added; sub-folders "
                                        "are made). Written only when training finishes; an existing file is "
                                        "never replaced: a counter is added (name_00001) and the output says "
                                        "which file was written."),
                io.Combo.Input("mode", options=list(MODES), default=DEFAULT_MODE,
                               tooltip="fast (default): optimise the residual directly (our addition; 100 steps, "
                                       "little memory, every model family). paper: fine-tune a private "
                                       "text-encoder copy as the Cones 2 paper (4000 steps; SD1.5, SD2.x and SDXL "
                                       "only). Why fast is the default: the help page and docs/training.md."),
                io.Image.Input("images", optional=True,
                               tooltip="The subject's images (any sizes from 64 pixels on the short side; RGBA and "
                                       "greyscale are converted)."),
                io.String.Input("image_folder", default="", optional=True,
                                tooltip="Optional folder of images inside ComfyUI's input directory, e.g. "
                                        "'my_dog'; used in addition to 'images'."),
                io.Float.Input("flux_guidance", default=3.5, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="Flux only: the distilled guidance value the model is trained at (as "
                                       "FluxGuidance sets it when sampling; 3.5 is the host's default). Other "
                                       "models ignore it."),
            ],
            outputs=[
                Residuals.Output(display_name="residuals",
                                 tooltip="A chain holding the new residual, for Apply Residuals to Conditioning."),
                io.String.Output(display_name="filename", tooltip="The saved file's name in models/cones2_residuals/."),
                io.Image.Output(display_name="loss_curve",
                                tooltip="Training loss (grey raw, blue smoothed) and evaluation loss (red)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, subject, steps=0, learning_rate=0.0, preservation_weight_start=1e-2,
                preservation_weight_rest=1e-3, resolution=0, batch_size=1, seed=0, save_name="cones2_subject",
                mode=DEFAULT_MODE, images=None, image_folder="", flux_guidance=3.5) -> io.NodeOutput:
        import comfy.utils

        path = prepare_destination(save_name)  # refuse a bad destination before spending time on training
        pictures = collect_images(images, image_folder or "")
        settings = TrainSettings(mode=mode, steps=int(steps), learning_rate=float(learning_rate),
                                 preservation_weight_start=float(preservation_weight_start),
                                 preservation_weight_rest=float(preservation_weight_rest),
                                 resolution=int(resolution), batch_size=int(batch_size), seed=int(seed),
                                 guidance=float(flux_guidance))
        pbar = comfy.utils.ProgressBar(int(steps) or default_steps(mode))
        residual, losses, eval_points = train_residual(model, clip, vae, pictures, subject, settings, pbar)
        curve = draw_loss_curve(losses, eval_points, title=f"{residual.subject} ({mode}): "
                                f"eval {eval_points[0][1]:.4g} -> {eval_points[-1][1]:.4g}")
        outputs = ([residual.with_strength(1.0)], torch.from_numpy(curve).unsqueeze(0))
        final = free_path(path)
        try:
            save_residual(residual, final)
        except Cones2Error as e:  # the training is not lost: the residual still flows to the next nodes
            message = (f"the residual was trained but could not be written to {final}: {e}. It is still passed on "
                       "through the 'residuals' output; fix the folder and run again to save it")
            log.error("Cones2 Train Residual: %s", message)
            return io.NodeOutput(outputs[0], "", outputs[1], ui={"text": [message]})
        filename = os.path.relpath(final, default_residual_folder())
        note = "" if final == path else f" ({os.path.basename(path)} exists and was kept)"
        log.info("saved residual %s%s", final, note)
        return io.NodeOutput(outputs[0], filename, outputs[1], ui={"text": [f"saved {filename}{note}"]})


NODES = [Cones2TrainResidual]
