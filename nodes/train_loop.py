"""Train Residual's training loop: one run learns a Cones 2 subject residual from a few images.

"paper" mode follows the reference (Cones-V2 ``train_cones2.py``): a private copy of the whole text encoder is
fine-tuned with the diffusion loss plus the text-embedding preservation loss, with the class word alone as the
prompt; the residual is then the mean over 27 templates of (tuned - frozen) output embedding at the subject's
tokens. "fast" mode is our addition: it optimises the output-space residual itself (added at the subject's
tokens of the frozen encoder's output) against the same diffusion loss; no text-encoder copy, no preservation
loss needed (other tokens cannot move).

Host specifics handled here: node execution runs under ``torch.inference_mode()`` and loaded weights are
inference tensors, so training runs under ``inference_mode(False)``; the text-encoder copy gets fresh float32
parameters; the frozen UNet runs through a clone of the user's ModelPatcher under a torch-function mode that
hands its ops gradient-free aliases of the weights (no copies), so gradients reach the context only. The host's CLIP
layers add residuals in place (``x += ...``), which breaks backward: the private copy's layers run an
out-of-place forward. The user's MODEL and CLIP are left bit-identical.

The private encoder is in ``train_encoder.py``, the frozen model in its architecture's module
(``architectures/``), the node in ``train_node.py``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math

import numpy as np
import torch

from ..cones2_core.errors import Cones2Error
from ..cones2_core.figures import draw_loss_curve
from ..cones2_core.gradients import (
    BoundaryLossScaler,
    GradientFreeWeights,
    factored_grad,
    factored_sq_norm,
    needs_loss_scaling,
    unet_autocast,
)
from ..cones2_core.objective import (
    MAX_GRAD_NORM,
    WEIGHT_DECAY,
    add_at_rows,
    channel_mask,
    diffusion_loss,
    latent_batch,
    preservation_loss,
    residual_from_templates,
    sample_sigmas,
    template_prompts,
)
from .architectures.base import sdpa_attention
from .encoding import clip_family, escape_word, word_rows
from .train_encoder import private_text_encoder, subject_rows

log = logging.getLogger("comfyui-cones2")

EVAL_SAMPLES = 8
LOW_RANK_CHUNK = 16 * 2**20  # bytes of weight gradients formed at once from their factors
PREVIEW_UPDATES = 20


class Trainer:
    """One training run (all state local to a node call)."""

    def __init__(self, model, clip, prediction, sigma_data, model_sampling, settings, subject, latents, device,
                 arch):
        """``arch``: the model's architecture (``nodes/architectures``: ``for_family``), which gives the frozen
        model (``frozen_model``) and its extra inputs (``training_conds``)."""
        self.model, self.clip, self.arch = model, clip, arch
        self.prediction, self.sigma_data, self.ms = prediction, sigma_data, model_sampling
        self.s, self.device = settings, device
        self.latents = [lat.to(device) for lat in latents]
        self.size = settings.resolution // 8
        self.cuda = device.type == "cuda"
        self.amp = (self.cuda and torch.cuda.is_bf16_supported()) or (
            device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        compute = getattr(model.model, "manual_cast_dtype", None) or model.model.get_dtype()
        self.unet_amp = unet_autocast(compute, self.amp)  # the encoders always run in float32 (see _encode)
        self.scaler = BoundaryLossScaler() if needs_loss_scaling(compute, self.unet_amp) else None
        self.instance_tokens = clip.tokenize(escape_word(subject))
        self.instance_rows = subject_rows(clip, subject, escape_word(subject))
        # each encoder's rows among instance_rows (SD3.5: the CLIP rows, then the T5 rows), and which channels of
        # each row a residual part covers (None: all of them, every family of one row group)
        by_key = word_rows(clip, self.instance_tokens, subject)
        self.rows_by_key = {k: [self.instance_rows.index(r) for r in occ[-1]] for k, occ in by_key.items()}
        self.mask = channel_mask(clip_family(clip).key, self.rows_by_key, len(self.instance_rows))
        self.templates = template_prompts(escape_word(subject))
        self.template_tokens = [clip.tokenize(t) for t in self.templates]
        self.template_rows = [subject_rows(clip, subject, t) for t in self.templates]
        self.sigmas = model_sampling.sigmas.detach().float().cpu()
        self.frozen = GradientFreeWeights()
        # (weight, its factor sink) per low-rank-gradient Linear (see _clip_gradients_and_step)
        self.low_rank: list = []
        self.low_rank_opt = None

    def _autocast(self, amp: bool = True):
        """bf16 autocast for the training passes where the device supports it (CUDA, CPUs with bf16 kernels)."""
        if amp and self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _encode(self, enc, tokens):
        """(context [1, T, C], pooled) of one prompt: through the private copy ``enc``, or the user's CLIP (None).

        Always float32, never under bf16 autocast: the paper's steps change each weight by about the learning
        rate (5e-6), 50 times less than a bf16 rounding step of a typical weight (2.4e-4 at 0.036), so a bf16
        forward sees the trained weights only as rounding flips. Worse, weights stored in float16 (most
        checkpoints) sit exactly halfway between two bf16 values one time in eight; the first step of any size
        tips all of them the same way, which moved the subject's output by as much as a whole residual at any
        learning rate (5e-8 as 5e-6) on the toy world."""
        out = enc.encode_token_weights(tokens) if enc is not None else \
            self.clip.encode_from_tokens(tokens, return_pooled=True)
        return out[0].float().to(self.device), out[1]

    def _encode_templates(self, enc) -> list[torch.Tensor]:
        """The template prompts' contexts, one batched encoder pass (each template is one 77-token chunk).

        Always float32: the residual is a small difference of two of these, which bf16 rounding would swamp."""
        merged = {k: [chunk for t in self.template_tokens for chunk in t[k]] for k in self.template_tokens[0]}
        ctx = self._encode(enc, merged)[0].cpu()
        return list(ctx.reshape(len(self.template_tokens), -1, ctx.shape[-1]))

    def _denoise(self, mp, x0, noise, sigma, context, conds, amp: bool = True):
        """The frozen model's denoised output; ``conds``: its extra inputs (training_conds), sliced to the batch."""
        x_t = self.ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0)
        extra = {k: v[: x0.shape[0]] for k, v in (conds or {}).items()}
        topts = copy.copy(mp.model_options.get("transformer_options", {}))
        topts.setdefault("optimized_attention_override", sdpa_attention)
        with self._autocast(amp and self.unet_amp), self.frozen:
            out = mp.model.apply_model(self.arch.model_latent(x_t), sigma,
                                       c_crossattn=context.expand(x0.shape[0], -1, -1), transformer_options=topts,
                                       **extra)
            return self.arch.from_model_latent(out).float()

    def _eval_set(self):
        g = torch.Generator().manual_seed((self.s.seed + 1) % 2**64)
        x0 = torch.cat([latent_batch(self.latents, self.size, 1, g, flip=False) for _ in range(EVAL_SAMPLES)])
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        q = torch.linspace(0.1, 0.9, EVAL_SAMPLES)
        sigma = self.sigmas[(q * (len(self.sigmas) - 1)).round().long()].to(self.device)
        return x0, noise, sigma

    def _eval_loss(self, mp, context, y, eval_set) -> float:
        """Mean diffusion loss over the evaluation set, one sample at a time (no batch-sized activations)."""
        x0, noise, sigma = eval_set
        total = 0.0
        with torch.no_grad():
            for i in range(x0.shape[0]):
                one = slice(i, i + 1)
                den = self._denoise(mp, x0[one], noise[one], sigma[one], context, y, amp=False)  # float32
                total += float(diffusion_loss(den, x0[one], sigma[one], self.prediction, self.sigma_data))
        return total / x0.shape[0]

    def _step(self, mp, opt, params, context, frozen_ctx, x0, noise, sigma, y, paper: bool) -> torch.Tensor:
        """One optimisation step; returns the (detached) loss. The gradients are dropped before the forward, so
        a step that fails before ``opt.step()`` leaves the trainable state as it was."""
        s = self.s
        opt.zero_grad(set_to_none=True)
        for _, sink in self.low_rank:
            sink.clear()
        sc = self.scaler  # float16 UNet: its loss is scaled, and its gradient unscaled where it leaves the UNet
        if sc is not None:
            sc.finite = None  # nothing left over from a step that ran out of memory
        ctx = context()
        den = self._denoise(mp, x0, noise, sigma, ctx if sc is None else sc.boundary(ctx), y)
        diffusion = diffusion_loss(den, x0, sigma, self.prediction, self.sigma_data)
        keep = preservation_loss(ctx, frozen_ctx, self.instance_rows, s.preservation_weight_start,
                                 s.preservation_weight_rest) if paper else 0.0
        loss = diffusion + keep
        (loss if sc is None else diffusion * sc.scale + keep).backward()
        if sc is None or sc.update():
            self._clip_gradients_and_step(opt, params)
        else:
            log.info("training step skipped: the float16 UNet's gradient overflowed; loss scale lowered to %g",
                     sc.scale)
        return loss.detach()

    def _clip_gradients_and_step(self, opt, params) -> None:
        """clip_grad_norm_(all trainable parameters, MAX_GRAD_NORM), then AdamW. The low-rank Linears' gradients
        are formed from their factors a few at a time (LOW_RANK_CHUNK bytes), each batch stepped and dropped,
        so the step never holds them all."""
        if not self.low_rank:
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            return
        grads = [p.grad for p in params if p.grad is not None]
        sq = sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=self.device))
        for _, sink in self.low_rank:
            if sink:
                sq = sq + factored_sq_norm(sink)
        coef = (MAX_GRAD_NORM / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_ computes it
        for g in grads:
            g.mul_(coef.to(g.dtype))
        opt.step()
        pending, size = [], 0
        for i, (w, sink) in enumerate(self.low_rank):
            if sink:
                w.grad = factored_grad(sink).mul_(coef).to(w.dtype)
                sink.clear()
                pending.append(w)
                size += w.numel() * w.element_size()
            if pending and (size >= LOW_RANK_CHUNK or i == len(self.low_rank) - 1):
                self.low_rank_opt.step()  # steps exactly the weights that hold a gradient now
                for p in pending:
                    p.grad = None
                pending, size = [], 0

    def run(self, pbar=None, eval_every: int = 0):
        """The whole run: setup (the private encoder, its frozen outputs, the optimiser), the loop, the extraction
        of the residual. Returns (residual delta [rows, width] on CPU, training losses, [(step, eval loss)])."""
        s = self.s
        paper = s.mode == "paper"
        ids = [t[0] for chunks in self.instance_tokens.values() for chunk in chunks for t in chunk
               if isinstance(t[0], int)]
        # Low-rank gradients keep a step's weight gradients as factors (exact, a few % of the memory)
        enc = private_text_encoder(self.clip, self.device, trainable_ids=ids, low_rank_grads=True) if paper else None
        opt = None
        try:
            with torch.no_grad():
                frozen_ctx, pooled = self._encode(enc, self.instance_tokens)
                frozen_templates = self._encode_templates(enc) if paper else None
            y = self.arch.training_conds(self.model, pooled, s, max(s.batch_size, EVAL_SAMPLES), self.device)
            opt, params, residual = self._optimiser(enc, frozen_ctx)

            mask = None if self.mask is None else self.mask.to(self.device)

            def context():
                if residual is not None:
                    return add_at_rows(frozen_ctx, self.instance_rows, residual if mask is None else residual * mask)
                return self._encode(enc, self.instance_tokens)[0]

            losses, eval_points = self._loop(opt, params, context, frozen_ctx, y, paper, pbar, eval_every)
            if not paper:
                return (residual if mask is None else residual * mask).detach().float().cpu(), losses, eval_points
            # the optimiser state (two moments per trainable weight) is done with: free it before the template
            # pass, so that pass reuses its memory instead of adding to the peak
            opt = params = None
            self.low_rank, self.low_rank_opt = [], None
            return self._extract(enc, frozen_templates), losses, eval_points
        finally:
            enc = opt = None  # drop the private encoder and optimiser state now
            self.low_rank, self.low_rank_opt = [], None
            if self.cuda:
                torch.cuda.empty_cache()

    # ---- setup ------------------------------------------------------------------------------------------------

    def _optimiser(self, enc, frozen_ctx):
        """(optimiser, its parameters, the fast-mode residual or None): paper mode trains the private encoder
        ``enc`` (its low-rank Linears under their own AdamW, see _clip_gradients_and_step), fast mode a zero
        residual at the subject's rows of the frozen output ``frozen_ctx``."""
        s = self.s
        if enc is not None:
            fused = self.device.type in ("cpu", "cuda")
            self.low_rank = [(m.weight, m.lowrank_sink) for m in enc.modules() if hasattr(m, "lowrank_sink")]
            factored = {id(w) for w, _ in self.low_rank}
            self.low_rank_opt = torch.optim.AdamW([w for w, _ in self.low_rank], lr=s.learning_rate,
                                                  weight_decay=WEIGHT_DECAY, fused=fused) if self.low_rank else None
            params = [p for p in enc.parameters() if p.requires_grad and id(p) not in factored]
            return torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=WEIGHT_DECAY, fused=fused), params, None
        # the frozen outputs are all fast mode needs
        residual = torch.zeros(len(self.instance_rows), frozen_ctx.shape[-1], device=self.device, requires_grad=True)
        return torch.optim.AdamW([residual], lr=s.learning_rate, weight_decay=0.0), [residual], residual

    # ---- the loop -------------------------------------------------------------------------------------------

    def _loop(self, opt, params, context, frozen_ctx, y, paper: bool, pbar, eval_every: int):
        """The optimisation steps through the frozen model, with the evaluation loss before, every ``eval_every``
        steps and after, and the progress bar's preview. Returns (losses, eval points)."""
        import comfy.model_management as mm

        s = self.s
        gen = torch.Generator().manual_seed(s.seed)
        losses: list[float] = []
        eval_points: list[tuple[int, float]] = []
        with self.arch.frozen_model(self.model, self.device, self.frozen) as frozen_model:
            mp = frozen_model.mp
            eval_set = self._eval_set()
            with torch.no_grad():
                eval_points.append((0, self._eval_loss(mp, context(), y, eval_set)))
            every = max(1, s.steps // PREVIEW_UPDATES)
            for step in range(s.steps):
                mm.throw_exception_if_processing_interrupted()
                # paper mode crops as the reference does (no flips: they would mirror text and logos); fast mode
                # (ours) keeps its random horizontal flips
                x0 = latent_batch(self.latents, self.size, s.batch_size, gen, flip=not paper)
                noise = torch.randn(x0.shape, generator=gen).to(self.device)
                sigma = sample_sigmas(self.sigmas, s.batch_size, gen).to(self.device)
                loss = self._step_or_checkpoint(frozen_model, opt, params, context, frozen_ctx, x0, noise, sigma,
                                                y, paper, step)
                value = float(loss)
                if not math.isfinite(value):
                    raise Cones2Error(f"the training loss became {value} at step {step + 1}; lower the "
                                      "learning_rate")
                losses.append(value)
                if eval_every and (step + 1) % eval_every == 0 and step + 1 < s.steps:
                    with torch.no_grad():
                        eval_points.append((step + 1, self._eval_loss(mp, context(), y, eval_set)))
                if pbar is not None:
                    preview = None
                    if (step + 1) % every == 0 or step + 1 == s.steps:
                        from PIL import Image

                        pic = draw_loss_curve(losses, eval_points, title=f"loss {value:.4g}")
                        preview = ("JPEG", Image.fromarray((pic * 255).astype(np.uint8)), 512)
                    pbar.update_absolute(step + 1, s.steps, preview)
            with torch.no_grad():
                eval_points.append((s.steps, self._eval_loss(mp, context(), y, eval_set)))
        return losses, eval_points

    def _step_or_checkpoint(self, frozen_model, opt, params, context, frozen_ctx, x0, noise, sigma, y, paper, step):
        """One step; on running out of memory, gradient checkpointing of the model is switched on and the step
        redone (once); out of memory with checkpointing on is an error saying what to lower."""
        for _attempt in range(2):
            try:
                return self._step(frozen_model.mp, opt, params, context, frozen_ctx, x0, noise, sigma, y, paper)
            except torch.OutOfMemoryError as e:
                if frozen_model.checkpointing:
                    raise Cones2Error(
                        f"out of {self.device.type.upper()} memory at training step {step + 1}, even "
                        "with gradient checkpointing; lower the resolution or batch_size"
                        + (", or use mode 'fast'" if paper else "")) from e
                oom = str(e).splitlines()[0] if str(e) else "out of memory"
            # here, outside the except block, its frames (and their activations) are already freed;
            # drop the failed backward's partial gradients too before the allocator gives memory back
            opt.zero_grad(set_to_none=True)
            if self.cuda:
                torch.cuda.empty_cache()
            log.warning("out of memory at training step %d (%s); switching on gradient checkpointing "
                        "of the model (slower, much less memory) and redoing the step", step + 1, oom)
            frozen_model.checkpoint_layers()
        raise AssertionError("unreachable: the second attempt runs with checkpointing on")

    # ---- extraction ------------------------------------------------------------------------------------------

    def _extract(self, enc, frozen_templates) -> torch.Tensor:
        """Paper mode's residual: the mean over the templates of (tuned - frozen) output at the subject's rows."""
        with torch.no_grad():
            tuned = self._encode_templates(enc)
            return residual_from_templates(tuned, frozen_templates, self.template_rows)
