"""The paper's objective for Cones 2 residual training (no host imports).

Cones 2 (arXiv 2305.19327, Sec. 3.1) fine-tunes a copy of the text encoder on a few images of a subject
with the class word alone as the prompt ("dog"). The loss is the diffusion loss plus a *text-embedding
preservation* loss that keeps the encoder's output at the start token and at every token after the subject
close to the frozen encoder's output::

    L = L_diffusion + w_start * ||e_0 - e*_0||_2 + w_rest * ||e_{1+n:} - e*_{1+n:}||_2

(plain L2 norms of the difference tensors, neither squared nor averaged). The subject's *residual* is then
the mean, over 27 prompt templates, of (tuned - frozen) output embedding at the subject's token rows.

This module holds those formulas, the settings and their defaults, the latent crops, and the diffusion-loss
weighting that turns the host's denoised prediction into the paper's eps or v target. The memory machinery of
the gradients is in ``gradients.py``, the loss-curve picture in ``figures.py``, the host-facing loop in
``nodes/train_loop.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .errors import Cones2Error
from .families import family as family_record

# The 27 ImageNet-style templates of the reference implementation, in its order.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)

MODES = ("paper", "fast")
PREDICTIONS = ("eps", "v", "flow")
PAPER_LEARNING_RATE = 5e-6
# Fast mode's defaults, ours to choose: picked from the toy world's steps-versus-lift curve at batch 1 (its
# measurements are in docs/training.md; bench/toy_training_effects.py --items curve remeasures them).
FAST_LEARNING_RATE = 1e-2
PAPER_STEPS = 4000
FAST_STEPS = 100


def default_steps(mode: str) -> int:
    """Steps when the node's input is 0: the paper's 4000 in paper mode, 100 in fast mode."""
    return PAPER_STEPS if mode == "paper" else FAST_STEPS
MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 1e-2  # AdamW default of the reference script (paper mode only)


def template_prompts(subject: str) -> list[str]:
    """The 27 template prompts with ``subject`` filled in."""
    return [t.format(subject) for t in TEMPLATES]


# ---- losses -------------------------------------------------------------------------------------------------

def x0_loss_weight(prediction: str, sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """Per-sample weight w(sigma) with ``w * ||x0_hat - x0||^2 == ||pred - target||^2``.

    The host's models return the denoised ``x0_hat``; with ``x_t = x0 + sigma * eps`` (eps and v):

    * eps-prediction: ``x0_hat = x_t - sigma * eps_hat``, so ``eps_hat - eps = -(x0_hat - x0) / sigma``;
    * v-prediction: ``x0_hat = x_t * sd^2 / (sigma^2 + sd^2) - v_hat * sigma * sd / sqrt(sigma^2 + sd^2)``, so
      ``v_hat - v = -(x0_hat - x0) * sqrt(sigma^2 + sd^2) / (sigma * sd)``;
    * flow matching (Flux; the host's CONST sampling): ``x_t = (1 - sigma) * x0 + sigma * eps``, the model
      predicts the velocity ``v = eps - x0`` and ``x0_hat = x_t - sigma * v_hat``, so
      ``v_hat - v = -(x0_hat - x0) / sigma``: the same weight as eps-prediction, on another ``x_t``.
    """
    sigma = sigma.float()
    if prediction in ("eps", "flow"):
        return 1.0 / sigma.pow(2)
    if prediction == "v":
        sd2 = sigma_data * sigma_data
        return (sigma.pow(2) + sd2) / (sigma.pow(2) * sd2)
    raise Cones2Error(f"unknown prediction type {prediction!r}; Cones 2 training supports {', '.join(PREDICTIONS)}")


def diffusion_loss(denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, prediction: str,
                   sigma_data: float = 1.0) -> torch.Tensor:
    """The reference's MSE on the eps or v target (Flux: the flow-matching velocity), from the host's denoised
    output.

    ``denoised``/``x0``: [B, C, H, W]; ``sigma``: [B]. Mean over every element, as ``F.mse_loss`` does.
    """
    per_sample = (denoised.float() - x0.float()).pow(2).flatten(1).mean(1)
    return (per_sample * x0_loss_weight(prediction, sigma.to(per_sample.device), sigma_data)).mean()


def preservation_rows(subject_rows: Sequence[int], n_tokens: int) -> tuple[list[int], list[int]]:
    """(start rows, rest rows) of the preservation loss: row 0, and every row after the subject's last token."""
    rows = sorted(int(r) for r in subject_rows)
    if not rows or rows[0] < 1 or rows[-1] >= n_tokens:
        raise Cones2Error(f"subject token rows {rows} do not fit a {n_tokens}-token prompt embedding")
    return [0], list(range(rows[-1] + 1, n_tokens))


def preservation_loss(tuned: torch.Tensor, frozen: torch.Tensor, subject_rows: Sequence[int],
                      w_start: float, w_rest: float) -> torch.Tensor:
    """``w_start * ||e_0 - e*_0||_2 + w_rest * ||e_{1+n:} - e*_{1+n:}||_2`` on [B, T, C] output embeddings.

    Norms are the plain Frobenius norms of the whole difference tensors (over batch, rows and channels).
    """
    start, rest = preservation_rows(subject_rows, tuned.shape[1])
    frozen = frozen.to(device=tuned.device, dtype=tuned.dtype)
    loss = w_start * torch.linalg.vector_norm(tuned[:, start] - frozen[:, start])
    if rest:
        loss = loss + w_rest * torch.linalg.vector_norm(tuned[:, rest] - frozen[:, rest])
    return loss


# ---- the residual -------------------------------------------------------------------------------------------

def residual_from_templates(tuned: Sequence[torch.Tensor], frozen: Sequence[torch.Tensor],
                            rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Mean over templates of ``tuned[i][rows[i]] - frozen[i][rows[i]]`` -> [n_tokens, C] float32.

    ``tuned``/``frozen``: one [T, C] (or [1, T, C]) output embedding per template prompt.
    """
    if not tuned or not (len(tuned) == len(frozen) == len(rows)):
        raise Cones2Error("need the same number (>= 1) of tuned and frozen embeddings and token-row lists")
    deltas = []
    for t, f, r in zip(tuned, frozen, rows, strict=True):
        t = t.reshape(-1, t.shape[-1]).float().cpu()
        f = f.reshape(-1, f.shape[-1]).float().cpu()
        idx = torch.tensor(list(r), dtype=torch.long)
        deltas.append(t[idx] - f[idx])
    if len({tuple(d.shape) for d in deltas}) != 1:
        raise Cones2Error("the subject has a different token count in some templates; use a plain class word")
    return torch.stack(deltas).mean(0)


def split_channels(residual: torch.Tensor, family: str, rows_by_key=None) -> dict[str, torch.Tensor]:
    """Cut a [n, C] residual of the whole conditioning into per-encoder tensors (SDXL: 'l' 768 + 'g' 1280).
    ``rows_by_key``: which of the n rows are each encoder's (a family of several row groups, SD3.5: the word's
    CLIP rows, then its T5 rows); every row by default."""
    out = {}
    for e in family_record(family).encoders:
        part = residual[:, e.offset:e.offset + e.width]
        out[e.key] = (part if rows_by_key is None else part[list(rows_by_key[e.key])]).contiguous()
    return out


def channel_mask(family: str, rows_by_key, n_rows: int) -> torch.Tensor | None:
    """[n_rows, C] ones where a residual row's channels belong to an encoder of that row (``rows_by_key``: each
    encoder's rows among the n), zeros elsewhere (SD3.5's CLIP rows: channels 2048..4095 are the host's zero
    padding, which no residual part covers); None when every row covers every channel (the other families)."""
    fam = family_record(family)
    mask = torch.zeros(n_rows, fam.width)
    for e in fam.encoders:
        mask[list(rows_by_key[e.key]), e.offset:e.offset + e.width] = 1.0
    return None if bool(mask.all()) else mask


def add_at_rows(context: torch.Tensor, rows: Sequence[int], residual: torch.Tensor) -> torch.Tensor:
    """``context`` [B, T, C] plus ``residual`` [n, C] at ``rows`` (differentiable, not in place)."""
    delta = torch.zeros(context.shape[1:], dtype=residual.dtype, device=context.device)
    delta = delta.index_add(0, torch.tensor(list(rows), device=context.device), residual.to(context.device))
    return context + delta.to(context.dtype).unsqueeze(0)


# ---- data ---------------------------------------------------------------------------------------------------

def latent_batch(latents: Sequence[torch.Tensor], size: int, batch: int, generator: torch.Generator,
                 flip: bool = True) -> torch.Tensor:
    """``batch`` random ``size`` x ``size`` crops (random image each, random horizontal flip) of [C, H, W] latents."""
    out = []
    for _ in range(batch):
        i = int(torch.randint(len(latents), (1,), generator=generator))
        lat = latents[i]
        h, w = lat.shape[-2:]
        top = int(torch.randint(h - size + 1, (1,), generator=generator))
        left = int(torch.randint(w - size + 1, (1,), generator=generator))
        crop = lat[:, top:top + size, left:left + size]
        if flip and bool(torch.rand((), generator=generator) < 0.5):
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out)


def sample_sigmas(sigmas: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Uniformly drawn training timesteps (as the host's sigmas), like the reference's uniform t."""
    idx = torch.randint(len(sigmas), (batch,), generator=generator)
    return sigmas.float().cpu()[idx]


# ---- settings -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainSettings:
    mode: str = "paper"
    steps: int = 0  # 0 = the mode's default (default_steps)
    learning_rate: float = 0.0  # 0 = the mode's default
    preservation_weight_start: float = 1e-2
    preservation_weight_rest: float = 1e-3
    resolution: int = 0  # 0 = the family's default
    batch_size: int = 1
    seed: int = 0
    guidance: float | None = 3.5  # Flux's distilled guidance (FluxGuidance's value); None for other families

    def resolved(self, family: str, prediction: str) -> TrainSettings:
        """Check the values and fill in the automatic ones."""
        if self.mode not in MODES:
            raise Cones2Error(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.steps < 0:
            raise Cones2Error(f"steps must be at least 1 (or 0 = the mode's default); got {self.steps}")
        if self.batch_size < 1:
            raise Cones2Error(f"batch_size must be at least 1; got {self.batch_size}")
        fam = family_record(family)
        guidance = self.guidance if fam.distilled_guidance else None  # only such models (Flux) read it
        for name in ("learning_rate", "preservation_weight_start", "preservation_weight_rest", "guidance"):
            v = guidance if name == "guidance" else getattr(self, name)
            if v is not None and (not math.isfinite(v) or v < 0):
                raise Cones2Error(f"{name} must be a finite number >= 0; got {v!r}")
        lr = self.learning_rate or (PAPER_LEARNING_RATE if self.mode == "paper" else FAST_LEARNING_RATE)
        res = self.resolution or fam.default_resolution(prediction)
        if res < 64 or res % 64:
            raise Cones2Error(f"resolution must be a multiple of 64 and at least 64 (or 0 = auto); got {res}")
        return TrainSettings(self.mode, self.steps or default_steps(self.mode), lr, self.preservation_weight_start,
                             self.preservation_weight_rest, res, self.batch_size, self.seed, guidance)

    def metadata(self, **extra: object) -> dict[str, str]:
        """``cones2.train.*`` string metadata for the residual file."""
        items = {k: v for k, v in {**asdict(self), **extra}.items() if v is not None}
        return {f"cones2.train.{k}": _meta_str(v) for k, v in items.items()}


def _meta_str(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
