"""Self-recurrence schedule, guidance window, attention-map figures and the layout boxes drawn on a picture."""

import math

import numpy as np
import pytest
import torch

from comfyui_cones2.cones2_core.figures import (
    BOX_COLOUR,
    LABEL_BACKGROUND,
    colourise,
    draw_boxes,
    outline,
    render_panel,
    share_inside,
)
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


def test_every_layout_box_gets_a_label_that_reads_on_its_own_colour():
    """The demo's comparison figure: every box is outlined and labelled with its subject, on a dark tag, so the
    label reads even where the picture under it has the label's colour (the cat's green label on the green cat
    was invisible). Bright green pixels inside each tag are its text (the font may be antialiased)."""
    from PIL import Image

    boxes = [{"subject": "dog", "x": 0.05, "y": 0.2, "w": 0.4, "h": 0.6},
             {"subject": "cat", "x": 0.55, "y": 0.3, "w": 0.4, "h": 0.6}]
    img = Image.new("RGB", (256, 256), (128, 128, 128))
    img.paste(BOX_COLOUR, (130, 70, 256, 256))  # a green object under the cat's box and its label
    tags = draw_boxes(img, boxes)
    pix = np.asarray(img)
    assert len(tags) == len(boxes)
    for b, (left, top, right, bottom) in zip(boxes, tags, strict=True):
        x0, y0 = round(b["x"] * 256), round(b["y"] * 256)
        assert x0 <= left < right <= x0 + b["w"] * 256 and y0 <= top < bottom <= y0 + b["h"] * 256  # inside its box
        tag = pix[top:bottom + 1, left:right + 1].reshape(-1, 3)
        text = (tag[:, 1] > 100).sum()
        dark = (tag == LABEL_BACKGROUND).all(-1).sum()
        assert text >= 10 and dark > text, (b["subject"], text, dark)  # letters on a dark tag
        assert (pix[y0 + round(b["h"] * 128), x0] == BOX_COLOUR).all()  # the outline's left edge
    # a label is its subject's text: two different words give two different tags' pixels
    dog, cat = tags
    a = pix[dog[1]:dog[3] + 1, dog[0]:dog[0] + 12]
    c = pix[cat[1]:cat[1] + a.shape[0], cat[0]:cat[0] + 12]
    assert not np.array_equal(a, c)
