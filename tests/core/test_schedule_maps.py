"""Self-recurrence schedule, guidance window and attention-map figures."""

import math

import pytest
import torch

from comfyui_cones2.cones2_core.figures import colourise, outline, render_panel, share_inside
from comfyui_cones2.cones2_core.schedule import in_window, recurrence_plan, renoise_scale


def test_recurrence_plan_doubles_guided_steps_only():
    sigmas = [14.6, 8.0, 4.0, 2.0, 1.0, 0.0]
    plan = recurrence_plan(sigmas, [True, True, False, False, False])
    assert plan == [(0, 1, 2), (1, 2, 2), (2, 5, 1)]
    assert recurrence_plan(sigmas, [False] * 5) == [(0, 5, 1)]
    assert recurrence_plan(sigmas, [False, True, False, True, False]) == [(0, 1, 1), (1, 2, 2), (2, 3, 1), (3, 4, 2),
                                                                         (4, 5, 1)]
    with pytest.raises(ValueError, match="one flag per step"):
        recurrence_plan(sigmas, [True])


def test_renoise_scale_and_window():
    assert renoise_scale(5.0, 3.0) == pytest.approx(4.0)
    assert renoise_scale(1.0, 0.0) == 1.0
    assert math.isclose(renoise_scale(2.0, 2.0), 0.0)
    assert in_window(3.0, 10.0, 1.0) and in_window(10.0, 10.0, 1.0) and in_window(1.0, 10.0, 1.0)
    assert not in_window(10.5, 10.0, 1.0) and not in_window(0.5, 10.0, 1.0)


def test_maps_panel_and_share():
    attn = torch.zeros(4, 6)
    attn[1:3, 0:3] = 1.0
    attn[0, 5] = 1.0
    region = torch.zeros(4, 6, dtype=torch.bool)
    region[1:3, 0:3] = True
    assert share_inside(attn, region) == pytest.approx(6 / 7)
    panel = render_panel(attn, region, 40, 60)
    assert panel.shape == (40, 60, 3) and panel.min() >= 0 and panel.max() <= 1
    edge = outline(torch.nn.functional.interpolate(region.float()[None, None], size=(40, 60))[0, 0] > 0.5)
    assert torch.allclose(panel[edge], torch.tensor([0.2, 1.0, 0.4]).expand(int(edge.sum()), 3))
    ramp = colourise(torch.tensor([[0.0, 1.0]]))
    assert ramp[0, 0].sum() < 0.1 and ramp[0, 1].sum() > 2.5  # dark for 0, bright for the max
