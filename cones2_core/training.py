"""The pure parts of Cones 2 residual training (no host imports).

Cones 2 (arXiv 2305.19327, Sec. 3.1) fine-tunes a copy of the text encoder on a few images of a subject
with the class word alone as the prompt ("dog"). The loss is the diffusion loss plus a *text-embedding
preservation* loss that keeps the encoder's output at the start token and at every token after the subject
close to the frozen encoder's output::

    L = L_diffusion + w_start * ||e_0 - e*_0||_2 + w_rest * ||e_{1+n:} - e*_{1+n:}||_2

(plain L2 norms of the difference tensors, neither squared nor averaged). The subject's *residual* is then
the mean, over 27 prompt templates, of (tuned - frozen) output embedding at the subject's token rows.

This module holds those formulas, the settings and their defaults, the latent crops, the diffusion-loss
weighting that turns the host's denoised prediction into the paper's eps or v target, and the loss-curve
picture. The host-facing loop lives in ``nodes/train_nodes.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .conditioning import CHANNELS
from .errors import Cones2Error

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
PREDICTIONS = ("eps", "v")
PAPER_LEARNING_RATE = 5e-6
FAST_LEARNING_RATE = 1e-3
DEFAULT_STEPS = 4000
MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 1e-2  # AdamW default of the reference script (paper mode only)


def template_prompts(subject: str) -> list[str]:
    """The 27 template prompts with ``subject`` filled in."""
    return [t.format(subject) for t in TEMPLATES]


def default_resolution(family: str, prediction: str) -> int:
    """Training resolution when the node's input is 0: the family's native size (SD2.x 768-v: 768)."""
    if family == "sdxl":
        return 1024
    if family == "sd2" and prediction == "v":
        return 768
    return 512


# ---- losses -------------------------------------------------------------------------------------------------

def x0_loss_weight(prediction: str, sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """Per-sample weight w(sigma) with ``w * ||x0_hat - x0||^2 == ||pred - target||^2``.

    The host's models return the denoised ``x0_hat``; with ``x_t = x0 + sigma * eps``:

    * eps-prediction: ``x0_hat = x_t - sigma * eps_hat``, so ``eps_hat - eps = -(x0_hat - x0) / sigma``;
    * v-prediction: ``x0_hat = x_t * sd^2 / (sigma^2 + sd^2) - v_hat * sigma * sd / sqrt(sigma^2 + sd^2)``, so
      ``v_hat - v = -(x0_hat - x0) * sqrt(sigma^2 + sd^2) / (sigma * sd)``.
    """
    sigma = sigma.float()
    if prediction == "eps":
        return 1.0 / sigma.pow(2)
    if prediction == "v":
        sd2 = sigma_data * sigma_data
        return (sigma.pow(2) + sd2) / (sigma.pow(2) * sd2)
    raise Cones2Error(f"unknown prediction type {prediction!r}; Cones 2 training supports {', '.join(PREDICTIONS)}")


def diffusion_loss(denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, prediction: str,
                   sigma_data: float = 1.0) -> torch.Tensor:
    """The reference's MSE on the eps or v target, computed from the host's denoised output.

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


def split_channels(residual: torch.Tensor, family: str) -> dict[str, torch.Tensor]:
    """Cut a [n, C] residual of the whole conditioning into per-encoder tensors (SDXL: 'l' 768 + 'g' 1280)."""
    if family not in CHANNELS:
        raise Cones2Error(f"unknown family {family!r}")
    return {k: residual[:, off:off + w].contiguous() for k, (off, w) in CHANNELS[family].items()}


def add_at_rows(context: torch.Tensor, rows: Sequence[int], residual: torch.Tensor) -> torch.Tensor:
    """``context`` [B, T, C] plus ``residual`` [n, C] at ``rows`` (differentiable, not in place)."""
    delta = torch.zeros(context.shape[1:], dtype=residual.dtype, device=context.device)
    delta = delta.index_add(0, torch.tensor(list(rows), device=context.device), residual.to(context.device))
    return context + delta.to(context.dtype).unsqueeze(0)


def unet_autocast(compute_dtype: torch.dtype, bf16_supported: bool) -> bool:
    """Whether the frozen UNet's training passes run under bf16 autocast.

    Only a float32 UNet gains from it (bf16 kernels). A UNet the host already runs in float16 or bf16 runs as
    it is: autocast would make a bf16 copy of every weight at each forward and keep it for backward (5 GB for
    SDXL), while the weights themselves can be used in place."""
    return compute_dtype == torch.float32 and bf16_supported


def needs_loss_scaling(compute_dtype: torch.dtype, autocast_bf16: bool) -> bool:
    """Whether backward should run on a scaled loss (the usual float16 mixed-precision recipe).

    A UNet computing in float16 (without bf16 autocast) passes small gradients back to the text conditioning,
    which can underflow float16; bf16 and float32 have float32's exponent range and need no scaling."""
    return compute_dtype == torch.float16 and not autocast_bf16


class _Unscale(torch.autograd.Function):
    """Identity forward; backward divides the gradient by the scale and records whether it is finite."""

    @staticmethod
    def forward(ctx, x, scaler):
        ctx.scaler = scaler
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        sc = ctx.scaler
        finite = torch.isfinite(grad).all()
        sc.finite = finite if sc.finite is None else sc.finite & finite
        return grad / sc.scale, None


class BoundaryLossScaler:
    """Dynamic loss scaling for a float16 network inside an otherwise float32/bf16 graph, confined to it.

    The float16 network's loss is multiplied by ``scale`` for backward, so its small gradients do not underflow
    float16, and its input passes through ``boundary()``, which divides the gradient by ``scale`` on the way out
    (exact: the scale is a power of two). Everything upstream (the text encoder, its low-rank gradient factors,
    the clipping and the optimiser) sees true gradients, and terms outside the network (the preservation loss)
    are never scaled. A step whose boundary gradient is not finite is skipped and the scale halved; after
    ``interval`` good steps in a row it doubles. The constants are GradScaler's defaults."""

    def __init__(self, scale: float = 2.0 ** 16, growth: float = 2.0, backoff: float = 0.5, interval: int = 2000):
        self.scale, self.growth, self.backoff, self.interval = float(scale), growth, backoff, interval
        self.finite: torch.Tensor | None = None
        self.good_steps = 0

    def boundary(self, x: torch.Tensor) -> torch.Tensor:
        return _Unscale.apply(x, self)

    def update(self) -> bool:
        """After backward: whether the step's gradients are finite (take the step); adjusts the scale."""
        ok = self.finite is None or bool(self.finite)
        self.finite = None
        if ok:
            self.good_steps += 1
            if self.good_steps >= self.interval:
                self.scale *= self.growth
                self.good_steps = 0
        else:
            self.scale *= self.backoff
            self.good_steps = 0
        return ok


# ---- low-rank weight gradients --------------------------------------------------------------------------------

class LowRankGradLinear(torch.autograd.Function):
    """``F.linear`` whose weight gradient is not formed in backward but kept as its factors.

    For inputs ``x`` [..., in] (T rows in all) and output gradient ``g`` [..., out], the weight gradient is
    ``g^T x`` [out, in], of rank at most T. Training the text encoder on one 77-token prompt, T = 77 while a
    weight has 768 x 3072 entries: appending (g, x) to ``sink`` keeps the step's gradients at a few percent of
    their full size, and ``factored_grad`` / ``factored_sq_norm`` give the exact gradient and its norm later.
    The input and bias gradients are returned as usual; the weight gets no ``.grad``."""

    @staticmethod
    def forward(ctx, x, weight, bias, sink):
        ctx.save_for_backward(x, weight)
        ctx.sink, ctx.has_bias = sink, bias is not None
        # detach(): under autocast a leaf weight that requires grad would have its low-precision copy cached
        # until the autocast region ends (the whole encoder's weights at once); each is used once per forward
        return torch.nn.functional.linear(x, weight.detach(), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        ctx.sink.append((g, x.reshape(-1, x.shape[-1])))
        grad_x = (g @ weight.to(g.dtype)).reshape(*grad_out.shape[:-1], weight.shape[1])
        return grad_x.to(x.dtype), None, (g.sum(0) if ctx.has_bias else None), None


def _stacked(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(factors) == 1:
        return factors[0]
    return torch.cat([f[0] for f in factors]), torch.cat([f[1] for f in factors])


def factored_grad(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum_k g_k^T x_k as float32: the weight gradient from LowRankGradLinear's factors. The product runs in
    the output gradient's precision (bf16 under autocast, as autograd's own weight gradient would)."""
    g, x = _stacked(factors)
    return (g.T @ x.to(g.dtype)).float()


def factored_sq_norm(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """||sum_k g_k^T x_k||_F^2 without forming it: sum((G G^T) * (X X^T)) over the T x T Gram matrices."""
    g, x = _stacked(factors)
    g, x = g.float(), x.float()
    return ((g @ g.T) * (x @ x.T)).sum()


# ---- frozen weights without copies -------------------------------------------------------------------------

def grad_free_alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor sharing ``t``'s memory that autograd may save for backward and never differentiates.

    Weights loaded under ``torch.inference_mode()`` are inference tensors, which autograd refuses to save, and
    parameters may require grad. ``clone()`` would fix both at the cost of a copy of every weight per forward
    (kept alive until backward); this view of the same storage costs nothing. Plain tensors only: a tensor
    subclass (e.g. a quantised weight) is detached instead, and copied when it is an inference tensor."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.is_sparse or t.device.type == "meta":
        return t.clone().detach() if t.is_inference() else t.detach()
    with torch.inference_mode(False):
        out = torch.empty(0, dtype=t.dtype, device=t.device)
        out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return out


class FrozenWeights(torch.overrides.TorchFunctionMode):
    """While active, every parameter or inference tensor handed to a torch function is replaced by its
    ``grad_free_alias``: a frozen network can run forward and backward (gradients reach only its other
    inputs) without touching its modules and without copying its weights. Aliases are cached per tensor."""

    def __init__(self):
        super().__init__()
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _swap(self, a):
        if isinstance(a, torch.Tensor):
            if isinstance(a, torch.nn.Parameter) or a.is_inference():
                hit = self._cache.get(id(a))
                if hit is None or hit[0] is not a:
                    hit = (a, grad_free_alias(a))  # holding ``a`` keeps its id from being reused
                    self._cache[id(a)] = hit
                return hit[1]
            return a
        if type(a) in (list, tuple) and any(isinstance(x, torch.Tensor) for x in a):
            return type(a)(self._swap(x) for x in a)
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # This runs for every torch call, and most calls only see activations (plain, non-inference tensors):
        # look before rebuilding anything, with the cheapest checks first.
        for a in args:
            t = type(a)
            if t is _Tensor:
                if not a.is_inference():
                    continue
            elif t is not list and t is not tuple and not isinstance(a, _Tensor):
                continue
            args = tuple(self._swap(x) for x in args)
            break
        if kwargs:
            return func(*args, **{k: self._swap(v) for k, v in kwargs.items()})
        return func(*args)


_Tensor = torch.Tensor


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
    steps: int = DEFAULT_STEPS
    learning_rate: float = 0.0  # 0 = the mode's default
    preservation_weight_start: float = 1e-2
    preservation_weight_rest: float = 1e-3
    resolution: int = 0  # 0 = the family's default
    batch_size: int = 1
    seed: int = 0

    def resolved(self, family: str, prediction: str) -> TrainSettings:
        """Check the values and fill in the automatic ones."""
        if self.mode not in MODES:
            raise Cones2Error(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.steps < 1:
            raise Cones2Error(f"steps must be at least 1; got {self.steps}")
        if self.batch_size < 1:
            raise Cones2Error(f"batch_size must be at least 1; got {self.batch_size}")
        for name in ("learning_rate", "preservation_weight_start", "preservation_weight_rest"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise Cones2Error(f"{name} must be a finite number >= 0; got {v!r}")
        lr = self.learning_rate or (PAPER_LEARNING_RATE if self.mode == "paper" else FAST_LEARNING_RATE)
        res = self.resolution or default_resolution(family, prediction)
        if res < 64 or res % 64:
            raise Cones2Error(f"resolution must be a multiple of 64 and at least 64 (or 0 = auto); got {res}")
        return TrainSettings(self.mode, self.steps, lr, self.preservation_weight_start,
                             self.preservation_weight_rest, res, self.batch_size, self.seed)

    def metadata(self, **extra: object) -> dict[str, str]:
        """``cones2.train.*`` string metadata for the residual file."""
        items = {**asdict(self), **extra}
        return {f"cones2.train.{k}": _meta_str(v) for k, v in items.items()}


def _meta_str(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


# ---- loss curve ---------------------------------------------------------------------------------------------

def smooth(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (the usual training-loss smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * float(v)
        out.append(avg / (1 - beta ** i))
    return out


def draw_loss_curve(losses: Sequence[float], eval_points: Sequence[tuple[int, float]] = (),
                    width: int = 512, height: int = 256, title: str = "") -> np.ndarray:
    """A loss-curve picture as float32 [H, W, 3] in 0..1: raw loss (grey), smoothed (blue), evaluation (red)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 48, width - 10, 22, height - 20
    d.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    finite = [float(v) for v in losses if math.isfinite(v)] + [v for _, v in eval_points if math.isfinite(v)]
    if title:
        d.text((left, 4), title, fill=(0, 0, 0))
    if finite:
        lo, hi = min(finite), max(finite)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * abs(lo or 1.0), hi + 0.5 * abs(hi or 1.0)
        n = max(len(losses), 1 + max((s for s, _ in eval_points), default=0), 2)

        def xy(i: float, v: float) -> tuple[float, float]:
            x = left + (right - left) * i / (n - 1)
            y = bottom - (bottom - top) * (v - lo) / (hi - lo)
            return x, y

        for series, colour in ((losses, (190, 190, 190)), (smooth(losses), (30, 80, 220))):
            pts = [xy(i, v) for i, v in enumerate(series) if math.isfinite(v)]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=2)
            elif pts:
                d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        for s, v in eval_points:
            if math.isfinite(v):
                x, y = xy(s, v)
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(220, 40, 40))
        d.text((2, top), f"{hi:.4g}", fill=(0, 0, 0))
        d.text((2, bottom - 10), f"{lo:.4g}", fill=(0, 0, 0))
        d.text((left, bottom + 4), f"step 1 .. {n}", fill=(0, 0, 0))
    return np.asarray(img, dtype=np.float32) / 255.0
