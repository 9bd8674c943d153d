"""Gradient machinery of residual training that keeps its memory small (no host imports).

The frozen UNet runs forward and backward without copies of its weights (``grad_free_alias``,
``GradientFreeWeights``); the private text encoder's Linear weight gradients are kept as low-rank factors
(``LowRankGradLinear``); a float16 UNet's small gradients are rescued by a loss scaler confined to it
(``BoundaryLossScaler``), and the precision choices that decide whether it is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# ---- precision ----------------------------------------------------------------------------------------------

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


class GradientFreeWeights(torch.overrides.TorchFunctionMode):
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


class OutOfPlaceAdds(torch.overrides.TorchFunctionMode):
    """While active, ``x += y`` on a tensor that autograd tracks computes ``x + y`` into a new tensor (Python
    rebinds ``x`` to it) instead of adding in place.

    Some frozen networks add their residuals in place (the host's Flux blocks: ``txt += ...``, ``x += ...``) into
    tensors an earlier op saved for backward, or into a checkpointed block's own input; autograd then refuses to
    differentiate. The sum is the same either way. Python hands ``x += y`` to torch as ``x.add_(y)``, so a bare
    ``x.add_(y)`` statement whose result is dropped would lose the add on tracked tensors: use this mode only
    around code that adds in place by ``+=`` (the Flux blocks, with the training's SDPA attention)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _ADD_ and args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            return torch.add(*args, **kwargs)
        return func(*args, **kwargs)


_ADD_ = torch._C.TensorBase.add_  # what ``x += y`` calls
