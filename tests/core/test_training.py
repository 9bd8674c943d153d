"""The pure parts of residual training: templates, losses against hand computations, residual averaging
(``objective``), the gradient-memory machinery (``gradients``) and the loss-curve picture (``figures``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comfyui_cones2.cones2_core import figures
from comfyui_cones2.cones2_core import gradients as gr
from comfyui_cones2.cones2_core import objective as ob
from comfyui_cones2.cones2_core.errors import Cones2Error


def test_templates_are_the_reference_27():
    assert len(ob.TEMPLATES) == 27 and len(set(ob.TEMPLATES)) == 27
    assert ob.TEMPLATES[0] == "a photo of a {}" and ob.TEMPLATES[-1] == "a photo of a small {}"
    prompts = ob.template_prompts("dog")
    assert prompts[9] == "a close-up photo of a dog" and all(p.endswith(" dog") for p in prompts)


def test_preservation_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    tuned = torch.randn(1, 77, 8, generator=g)
    frozen = torch.randn(1, 77, 8, generator=g)
    # subject "dog" = 1 token at row 1: start row 0, rest rows 2..76
    got = ob.preservation_loss(tuned, frozen, [1], 1e-2, 1e-3)
    d0 = (tuned[0, 0] - frozen[0, 0]).tolist()
    rest = (tuned[0, 2:] - frozen[0, 2:]).flatten().tolist()
    expect = 1e-2 * math.sqrt(sum(v * v for v in d0)) + 1e-3 * math.sqrt(sum(v * v for v in rest))
    assert got.item() == pytest.approx(expect, rel=1e-5)
    # two-token subject at rows 1, 2: rest starts at row 3; the subject rows never count
    moved = tuned.clone()
    moved[0, 1:3] += 100.0
    assert ob.preservation_loss(moved, tuned, [1, 2], 1.0, 1.0).item() == 0.0
    moved[0, 3, 0] += 2.0
    assert ob.preservation_loss(moved, tuned, [1, 2], 1.0, 0.5).item() == pytest.approx(1.0)


def test_preservation_loss_is_a_plain_norm_not_squared_or_mean():
    tuned = torch.zeros(1, 77, 4)
    tuned[0, 0] = 3.0  # ||(3, 3, 3, 3)|| = 6
    assert ob.preservation_loss(tuned, torch.zeros(1, 77, 4), [1], 1.0, 0.0).item() == pytest.approx(6.0)


def test_preservation_rows_and_errors():
    assert ob.preservation_rows([1], 5) == ([0], [2, 3, 4])
    assert ob.preservation_rows([1, 2], 4) == ([0], [3])
    with pytest.raises(Cones2Error, match="do not fit"):
        ob.preservation_rows([0], 5)


def test_residual_is_the_template_mean_of_deltas():
    g = torch.Generator().manual_seed(1)
    frozen = [torch.randn(77, 6, generator=g) for _ in range(3)]
    tuned = [f.clone() for f in frozen]
    rows = [[5], [4], [6]]
    shifts = [1.0, 2.0, 6.0]
    for t, r, s in zip(tuned, rows, shifts, strict=True):
        t[r[0]] += s
        t[0] += 50.0  # other rows never enter the residual
    res = ob.residual_from_templates(tuned, frozen, rows)
    assert res.shape == (1, 6)
    assert torch.allclose(res, torch.full((1, 6), 3.0))
    with pytest.raises(Cones2Error, match="different token count"):
        ob.residual_from_templates(tuned[:2], frozen[:2], [[5], [4, 5]])


def test_split_channels_sdxl():
    res = torch.arange(2 * 2048, dtype=torch.float32).reshape(2, 2048)
    parts = ob.split_channels(res, "sdxl")
    assert parts["l"].shape == (2, 768) and parts["g"].shape == (2, 1280)
    assert torch.equal(torch.cat([parts["l"], parts["g"]], -1), res)
    assert set(ob.split_channels(torch.zeros(1, 1024), "sd2")) == {"h"}


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diffusion_loss_from_denoised_equals_target_mse(prediction):
    """The host returns x0_hat; our weighting must give exactly the reference's MSE(pred, eps or v)."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.05, 1.0, 14.0])
    pred = torch.randn(3, 4, 8, 8, generator=g)  # the network's raw output
    s = sigma.view(-1, 1, 1, 1)
    x_t = x0 + s * eps
    if prediction == "eps":
        denoised = x_t - pred * s  # the host's EPS.calculate_denoised
        target = eps
    else:
        denoised = x_t / (s ** 2 + 1) - pred * s / (s ** 2 + 1) ** 0.5  # V_PREDICTION, sigma_data = 1
        alpha, sig_t = 1 / (1 + s ** 2) ** 0.5, s / (1 + s ** 2) ** 0.5  # diffusers' v = alpha * eps - sigma_t * x0
        target = alpha * eps - sig_t * x0
    expect = torch.nn.functional.mse_loss(pred, target)
    got = ob.diffusion_loss(denoised, x0, sigma, prediction)
    assert got.item() == pytest.approx(expect.item(), rel=1e-4)
    with pytest.raises(Cones2Error, match="unknown prediction"):
        ob.diffusion_loss(denoised, x0, sigma, "x0")


def test_add_at_rows_is_differentiable_and_exact():
    ctx = torch.zeros(2, 5, 3)
    r = torch.ones(2, 3, requires_grad=True)
    out = ob.add_at_rows(ctx, [1, 2], r)
    assert torch.equal(out[:, 1:3], torch.ones(2, 2, 3)) and out[:, [0, 3, 4]].abs().sum() == 0
    out.sum().backward()
    assert torch.equal(r.grad, torch.full((2, 3), 2.0))  # one per batch item


def test_latent_batch_is_seeded_and_in_bounds():
    lats = [torch.arange(4 * 10 * 12, dtype=torch.float32).reshape(4, 10, 12), torch.randn(4, 8, 8)]
    a = ob.latent_batch(lats, 8, 5, torch.Generator().manual_seed(3))
    b = ob.latent_batch(lats, 8, 5, torch.Generator().manual_seed(3))
    c = ob.latent_batch(lats, 8, 5, torch.Generator().manual_seed(4))
    assert a.shape == (5, 4, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    s = ob.sample_sigmas(torch.linspace(0.03, 14.6, 1000), 6, torch.Generator().manual_seed(0))
    assert s.shape == (6,) and bool(((s >= 0.03) & (s <= 14.6)).all())


def test_settings_defaults_and_validation():
    s = ob.TrainSettings().resolved("sd1", "eps")
    assert (s.learning_rate, s.resolution, s.steps) == (5e-6, 512, 4000)
    fast = ob.TrainSettings(mode="fast").resolved("sd2", "v")
    assert (fast.learning_rate, fast.steps) == (1e-2, 100)  # chosen from the toy world's lift curve (docs/training.md)
    assert ob.TrainSettings(mode="fast", steps=7).resolved("sd1", "eps").steps == 7
    assert ob.TrainSettings().resolved("sd2", "v").resolution == 768
    assert ob.TrainSettings().resolved("sd2", "eps").resolution == 512
    assert ob.TrainSettings().resolved("sdxl", "eps").resolution == 1024
    for bad, msg in ((dict(mode="x"), "mode must be"), (dict(steps=-1), "steps must"),
                     (dict(resolution=100), "multiple of 64"), (dict(learning_rate=-1.0), "learning_rate"),
                     (dict(batch_size=0), "batch_size")):
        with pytest.raises(Cones2Error, match=msg):
            ob.TrainSettings(**bad).resolved("sd1", "eps")
    meta = s.metadata(prediction="eps")
    assert meta["cones2.train.learning_rate"] == "5e-06" and meta["cones2.train.prediction"] == "eps"
    assert all(isinstance(v, str) for v in meta.values())
    assert "cones2.train.guidance" not in meta and s.guidance is None  # only Flux reads the guidance value
    flux = ob.TrainSettings(mode="fast", guidance=2.5).resolved("flux", "flow")
    assert (flux.resolution, flux.guidance) == (512, 2.5)
    assert flux.metadata()["cones2.train.guidance"] == "2.5"
    with pytest.raises(Cones2Error, match="guidance must be a finite number"):
        ob.TrainSettings(mode="fast", guidance=float("inf")).resolved("flux", "flow")


def test_flow_matching_loss_is_the_velocity_mse():
    """Flux (the host's CONST sampling): x_t = (1 - s) x0 + s eps, denoised = x_t - s v_hat; the loss computed
    from denoised is the MSE of v_hat against the velocity eps - x0, per sample at its own sigma."""
    g = torch.Generator().manual_seed(1)
    x0, eps, v_hat = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    sigma = torch.tensor([0.05, 0.5, 0.97])
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    got = ob.diffusion_loss(x_t - s * v_hat, x0, sigma, "flow")
    assert got.item() == pytest.approx(((v_hat - (eps - x0)) ** 2).mean().item(), rel=1e-5)


def test_loss_curve_picture():
    pic = figures.draw_loss_curve([1.0, 0.8, 0.9, 0.5], [(0, 0.95), (4, 0.6)], title="t")
    assert pic.shape == (256, 512, 3) and pic.dtype == np.float32
    assert 0.0 <= pic.min() and pic.max() <= 1.0
    blue = (pic[..., 2] > 0.7) & (pic[..., 0] < 0.3)
    red = (pic[..., 0] > 0.7) & (pic[..., 1] < 0.3)
    assert blue.sum() > 50 and red.sum() > 10
    assert figures.draw_loss_curve([], ()).shape == (256, 512, 3)
    assert figures.smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])


def test_grad_free_alias_shares_memory_and_takes_no_gradient():
    with torch.inference_mode():
        w = torch.randn(6, 4)
    p = torch.nn.Parameter(torch.randn(6, 4))
    for t in (w, p):
        a = gr.grad_free_alias(t)
        assert a.data_ptr() == t.data_ptr() and torch.equal(a, t)
        assert not a.is_inference() and not a.requires_grad and a.grad_fn is None
    # a strided view aliases the same elements
    view = p[:, 1:3]
    assert torch.equal(gr.grad_free_alias(view), view) and gr.grad_free_alias(view).stride() == view.stride()


def test_gradient_free_weights_backward_reaches_inputs_only_without_copies():
    """An inference-mode Linear runs forward and backward under the mode; the input gradient equals the one a
    cloned weight gives; the weights get no gradient, are never copied, and the module is not touched."""
    with torch.inference_mode():
        lin = torch.nn.Linear(4, 3)
        conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    x = torch.randn(5, 4, requires_grad=True)
    img = torch.randn(1, 2, 6, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        lin(x).sum().backward()  # what the mode exists for
    mode = gr.GradientFreeWeights()
    with mode:
        y = lin(x)
        z = conv(img)
    (y.square().sum() + z.square().sum()).backward()
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    x2 = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w, b).square().sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert lin.weight.grad is None and conv.weight.grad is None
    assert all(t.is_inference() for t in (lin.weight, lin.bias, conv.weight, conv.bias))
    # the aliases are cached per tensor and share the weights' memory
    aliases = {id(t): a for t, a in mode._cache.values()}
    assert aliases[id(lin.weight)].data_ptr() == lin.weight.data_ptr()
    # trainable parameters passed in are treated as frozen too (a frozen network never differentiates its weights)
    p = torch.nn.Parameter(torch.randn(3, 4))
    with gr.GradientFreeWeights():
        out = torch.nn.functional.linear(x.detach().requires_grad_(), p)
    out.sum().backward()
    assert p.grad is None


def test_loss_scaling_only_for_float16_compute_without_bf16_autocast():
    assert gr.needs_loss_scaling(torch.float16, autocast_bf16=False)
    assert not gr.needs_loss_scaling(torch.float16, autocast_bf16=True)
    assert not gr.needs_loss_scaling(torch.bfloat16, autocast_bf16=False)
    assert not gr.needs_loss_scaling(torch.float32, autocast_bf16=False)


def test_unet_autocast_only_for_a_float32_unet():
    assert gr.unet_autocast(torch.float32, bf16_supported=True)
    assert not gr.unet_autocast(torch.float32, bf16_supported=False)
    assert not gr.unet_autocast(torch.float16, bf16_supported=True)  # runs in its own float16, loss scaled
    assert not gr.unet_autocast(torch.bfloat16, bf16_supported=True)


def test_low_rank_grad_linear_gives_the_exact_gradients_as_factors():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    x1 = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    x2 = torch.randn(5, 4, generator=g, requires_grad=True)
    target = torch.randn(2, 3, 6, generator=g)
    # reference: autograd's own gradients, two calls of the same layer in one step
    loss = ((torch.nn.functional.linear(x1, w, b) - target) ** 3).sum() + torch.nn.functional.linear(x2, w, b).sum()
    gw, gb, gx1, gx2 = torch.autograd.grad(loss, (w, b, x1, x2))
    sink = []
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y1 = gr.LowRankGradLinear.apply(x1, w2, b2, sink)
    y2 = gr.LowRankGradLinear.apply(x2, w2, b2, sink)
    assert torch.equal(y1, torch.nn.functional.linear(x1, w, b))
    fx1, fx2 = (x1.detach().clone().requires_grad_(), x2.detach().clone().requires_grad_())
    sink.clear()
    loss2 = ((gr.LowRankGradLinear.apply(fx1, w2, b2, sink) - target) ** 3).sum() + \
        gr.LowRankGradLinear.apply(fx2, w2, b2, sink).sum()
    loss2.backward()
    assert w2.grad is None and len(sink) == 2  # the weight gradient is only in the factors
    assert torch.allclose(gr.factored_grad(sink), gw, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gr.factored_sq_norm(sink), gw.pow(2).sum(), rtol=1e-5)
    assert torch.allclose(b2.grad, gb, rtol=1e-5, atol=1e-5)
    assert torch.allclose(fx1.grad, gx1, rtol=1e-5, atol=1e-5) and torch.allclose(fx2.grad, gx2, rtol=1e-5, atol=1e-5)
    del y1, y2


def test_low_rank_grad_linear_keeps_no_low_precision_weight_copy_under_autocast():
    """Under autocast a leaf weight that requires grad would have its bf16 copy cached until the autocast region
    ends (for the text encoder: every weight at once). The low-rank Linear's copy dies with its own call."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    class BF16Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and out.shape == (64, 32):
                self.refs.append(weakref.ref(out))  # the cast copy of the [64, 32] weight
            return out

    def alive_copies(fn):
        w = torch.randn(64, 32, requires_grad=True)
        x = torch.randn(3, 32, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with BF16Copies() as mode:
                y = fn(x, w)
            assert y.dtype == torch.bfloat16 and len(mode.refs) == 1  # the weight was cast once, in the region
            return sum(r() is not None for r in mode.refs)

    # the plain linear shows what the test detects: autocast's cache keeps the copy alive
    assert alive_copies(lambda x, w: torch.nn.functional.linear(x, w)) == 1
    assert alive_copies(lambda x, w: gr.LowRankGradLinear.apply(x, w, None, [])) == 0


def test_boundary_loss_scaler_rescues_float16_gradients_that_underflow():
    """A float16 layer whose true gradient underflows float16 (zero without scaling) gets it back through the
    boundary scaler, unscaled exactly; a term outside the boundary is never scaled."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, generator=g).half()
    x0 = torch.randn(4, 8, generator=g)

    def grads(scaler):
        x = x0.clone().requires_grad_(True)
        inner = x if scaler is None else scaler.boundary(x)
        small = 1e-9 * (inner.half() @ w).float().sum()  # d small / d (x @ w) = 1e-9: below float16's 6e-8
        outside = 0.5 * x.pow(2).sum()
        (small + outside if scaler is None else small * scaler.scale + outside).backward()
        return x.grad

    exact = 1e-9 * w.float().sum(1).expand(4, 8) + x0
    plain, scaled = grads(None), grads(gr.BoundaryLossScaler())
    assert torch.equal(plain, x0)  # the small term's gradient underflowed to zero
    assert torch.allclose(scaled, exact, rtol=1e-3, atol=0) and not torch.equal(scaled, x0)


def test_boundary_loss_scaler_skips_overflowed_steps_and_adapts_its_scale():
    sc = gr.BoundaryLossScaler(scale=1024.0, interval=3)

    def backward(value):
        x = torch.ones(3, requires_grad=True)
        (sc.boundary(x) * value).sum().backward()
        return x.grad

    assert torch.equal(backward(1024.0), torch.ones(3))  # a scaled gradient comes out unscaled
    assert sc.update() and sc.scale == 1024.0
    backward(float("inf"))
    assert not sc.update() and sc.scale == 512.0  # overflow: skip the step, halve the scale
    backward(float("nan"))
    assert not sc.update() and sc.scale == 256.0
    for _ in range(3):
        backward(1.0)
        assert sc.update()
    assert sc.scale == 512.0  # doubled after `interval` good steps in a row
    assert sc.update() and sc.scale == 512.0  # a step that never reached the boundary counts as finite
