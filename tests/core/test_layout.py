"""Layout JSON, rasterisation, masks, colour maps and the weight map W."""

import json

import pytest
import torch

from comfyui_cones2.cones2_core.errors import Cones2Error
from comfyui_cones2.cones2_core.layout import (
    Box,
    Layout,
    build_weight_map,
    colour_map_regions,
    parse_layout,
    rasterize_boxes,
    resize_mask,
)


def layout_text(*boxes, version=1) -> str:
    return json.dumps({"version": version, "boxes": list(boxes)})


BOX = {"subject": "dog", "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.4}


def test_parse_and_round_trip():
    text = layout_text(
        {"subject": "  dog ", "x": 0.05, "y": 0.1, "w": 0.4, "h": 0.8, "weight": 2.5},
        {"subject": "cat", "x": 0.5, "y": 0, "w": 0.5, "h": 1},
        {"subject": "dog", "x": -1e-7, "y": 0.0, "w": 0.1 + 5e-7, "h": 0.1, "weight": None},
    )
    layout = parse_layout(text)
    assert layout.boxes == (
        Box("dog", 0.05, 0.1, 0.4, 0.8, 2.5),
        Box("cat", 0.5, 0.0, 0.5, 1.0),
        Box("dog", 0.0, 0.0, 0.1 + 5e-7, 0.1),  # slack clamped to the edge
    )
    assert layout.version == 1
    assert layout.subjects() == ["dog", "cat"]
    assert parse_layout(layout.to_json()) == layout
    assert json.loads(layout.to_json())["boxes"][1] == {"subject": "cat", "x": 0.5, "y": 0.0, "w": 0.5, "h": 1.0}
    assert parse_layout(json.dumps({"boxes": [BOX]})).boxes == (Box("dog", 0.1, 0.2, 0.3, 0.4),)  # version optional
    assert Layout([Box("a", 0, 0, 1, 1)]).boxes == (Box("a", 0, 0, 1, 1),)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"version": 1, "boxes": [', r"not valid JSON: .* line 1 column 26 \(char 25\)"),
        ("   ", "layout is empty"),
        ("[1, 2]", "must be a JSON object"),
        (layout_text(BOX, version=2), "unsupported layout version 2"),
        (layout_text(BOX, version=True), "unsupported layout version True"),
        ('{"version": 1}', "the layout has no boxes: draw at least one box"),
        (layout_text(), "the layout has no boxes: draw at least one box"),
        ('{"boxes": {"subject": "dog"}}', "'boxes' must be a list"),
        (layout_text(BOX, "dog"), "box 1 is not an object"),
        (layout_text({**BOX, "subject": "  "}), "box 0 has no subject"),
        (layout_text({k: v for k, v in BOX.items() if k != "subject"}), "box 0 has no subject"),
        (layout_text({k: v for k, v in BOX.items() if k != "h"}), r"box 0 \('dog'\) is missing 'h'"),
        (layout_text({**BOX, "y": "0.2"}), r"box 0 \('dog'\): 'y' must be a number, got '0.2'"),
        (layout_text({**BOX, "x": True}), r"'x' must be a number"),
        ('{"boxes": [{"subject": "dog", "x": NaN, "y": 0, "w": 0.1, "h": 0.1}]}', "'x' must be a finite number"),
        (layout_text(BOX, {**BOX, "subject": "cat", "x": 1.2}), r"box 1 \('cat'\): 'x' = 1.2 is outside 0..1"),
        (layout_text({**BOX, "h": -0.01}), r"box 0 \('dog'\): 'h' = -0.01 is outside 0..1"),
        (layout_text({**BOX, "w": 0}), r"box 0 \('dog'\) has zero area"),
        (layout_text({**BOX, "x": 0.7, "w": 0.4}), r"box 0 \('dog'\) extends past the right edge \(x \+ w = 1.1"),
        (layout_text({**BOX, "y": 0.7, "h": 0.4}), r"box 0 \('dog'\) extends past the bottom edge \(y \+ h = 1.1"),
        (layout_text({**BOX, "weight": "strong"}), r"box 0 \('dog'\): 'weight' must be a number"),
    ],
)
def test_parse_errors(text, match):
    with pytest.raises(Cones2Error, match=match):
        parse_layout(text)


def test_rasterize_non_square_grid_exact():
    # 5 rows x 7 columns: column centres 1/14, 3/14, ..., row centres 0.1, 0.3, ..., 0.9.
    boxes = [Box("dog", 0.2, 0.25, 0.5, 0.5), Box("dog", 0.9, 0.0, 0.1, 0.2)]
    expected = torch.zeros(5, 7, dtype=torch.bool)
    expected[1:4, 1:5] = True  # centres 3/14..9/14 in [0.2, 0.7), 0.3..0.7 in [0.25, 0.75)
    expected[0, 6] = True  # 13/14 in [0.9, 1.0), 0.1 in [0, 0.2)
    mask = rasterize_boxes(boxes, 5, 7)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)
    # Half-open [x, x + w): on 5 columns (centres 0.1, 0.3, 0.5, ...) [0.1, 0.5) holds the first two centres.
    row = torch.tensor([[True, True, False, False, False]])
    assert torch.equal(rasterize_boxes([Box("a", 0.1, 0.0, 0.4, 1.0)], 1, 5), row)
    assert bool(rasterize_boxes([Box("a", 0.0, 0.0, 1.0, 1.0)], 3, 5).all())


def test_tiny_box_marks_one_pixel():
    mask = rasterize_boxes([Box("dot", 0.52, 0.3, 0.001, 0.001)], 4, 6)
    assert mask.sum() == 1 and bool(mask[1, 3])  # centre (0.5205, 0.3005) lies in row 1, column 3
    line = rasterize_boxes([Box("pole", 0.1, 0.0, 0.01, 1.0)], 4, 6)
    assert torch.equal(line.nonzero()[:, 1], torch.zeros(4, dtype=torch.long))  # a thin box keeps its length
    assert line.sum() == 4
    with pytest.raises(Cones2Error, match="no boxes"):
        rasterize_boxes([], 4, 6)
    with pytest.raises(Cones2Error, match="grid width must be a positive integer"):
        rasterize_boxes([Box("dot", 0, 0, 1, 1)], 4, 0)


def test_resize_mask():
    mask = torch.zeros(8, 8)
    mask[:4, :4] = 1.0
    assert torch.equal(resize_mask(mask, 2, 2), torch.tensor([[True, False], [False, False]]))
    # Non-integer ratio 10x10 -> 3x4: column bins [0,3) [2,5) [5,8) [7,10) over a left half of ones.
    half = torch.zeros(1, 10, 10, dtype=torch.bool)
    half[..., :5] = True
    assert torch.equal(resize_mask(half, 3, 4), torch.tensor([[True, True, False, False]] * 3))
    # Threshold is >= 0.5: two cells each half covered are both kept.
    stripes = torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 2)
    assert torch.equal(resize_mask(stripes, 1, 2), torch.tensor([[True, True]]))
    # Upsampling keeps the shape of the region.
    assert torch.equal(resize_mask(torch.tensor([[0.0, 1.0]]), 2, 4), torch.tensor([[False, False, True, True]] * 2))
    # A single strong pixel that averages below 0.5 still marks its cell.
    dot = torch.zeros(16, 16)
    dot[13, 2] = 1.0
    small = resize_mask(dot, 4, 4)
    assert small.sum() == 1 and bool(small[3, 0])
    with pytest.raises(Cones2Error, match="mask is empty"):
        resize_mask(torch.zeros(8, 8), 2, 2)
    with pytest.raises(Cones2Error, match="mask is empty"):
        resize_mask(torch.full((8, 8), 0.3), 2, 2)
    with pytest.raises(Cones2Error, match=r"got shape \(2, 8, 8\)"):
        resize_mask(torch.ones(2, 8, 8), 2, 2)


def test_colour_map_with_jpeg_noise():
    image = torch.zeros(6, 8, 3)
    image[:, :3] = torch.tensor([1.0, 0.0, 0.0])
    image[:, 3:6] = torch.tensor([0.0, 0.0, 1.0])
    image[:, 6:] = torch.tensor([1.0, 1.0, 1.0])  # background
    noisy = (image + (torch.rand(image.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.06).clamp(0, 1)
    regions = colour_map_regions(noisy[None], {"#FF0000": "dog ", (0, 0, 255): "cat"})
    assert list(regions) == ["dog", "cat"]
    expected_dog = torch.zeros(6, 8, dtype=torch.bool)
    expected_dog[:, :3] = True
    expected_cat = torch.zeros(6, 8, dtype=torch.bool)
    expected_cat[:, 3:6] = True
    assert torch.equal(regions["dog"], expected_dog) and torch.equal(regions["cat"], expected_cat)
    # Two colours of one subject are united.
    both = colour_map_regions(noisy, {"ff0000": "pet", "#0000ff": "pet"})
    assert torch.equal(both["pet"], expected_dog | expected_cat)
    with pytest.raises(Cones2Error, match=r"colour #00ff00 \(subject 'tree'\) was not found"):
        colour_map_regions(noisy, {"#ff0000": "dog", "#00ff00": "tree"})
    shifted = image.clone()
    shifted[:, :3, 1] = 0.05  # red painted as (255, 13, 0)
    assert torch.equal(colour_map_regions(shifted, {"#ff0000": "dog"})["dog"], expected_dog)
    with pytest.raises(Cones2Error, match="was not found"):
        colour_map_regions(shifted, {"#ff0000": "dog"}, tolerance=0.04)
    with pytest.raises(Cones2Error, match="bad colour '#ggg000'"):
        colour_map_regions(noisy, {"#ggg000": "dog"})
    with pytest.raises(Cones2Error, match="bad colour"):
        colour_map_regions(noisy, {(256, 0, 0): "dog"})


def test_colour_map_overlap_goes_to_nearest():
    image = torch.zeros(2, 4, 3)
    image[:, :2] = torch.tensor([1.0, 0.0, 0.0])
    image[:, 2:] = torch.tensor([240 / 255, 10 / 255, 0.0])  # within 0.1 of both colours
    regions = colour_map_regions(image, {"#ff0000": "dog", "#f00a00": "cat"}, tolerance=0.1)
    assert torch.equal(regions["dog"], torch.tensor([[True, True, False, False]] * 2))
    assert torch.equal(regions["cat"], torch.tensor([[False, False, True, True]] * 2))


def test_build_weight_map_values():
    dog = torch.zeros(2, 3, dtype=torch.bool)
    dog[1, 0] = True  # flattened index 1*3 + 0 = 3
    cat = torch.ones(2, 3, dtype=torch.bool)
    cat[0, 2] = False  # index 2
    w = build_weight_map([([1, 2], dog, 2.5), ([4], cat, 1.0)], 2, 3, 6)
    assert w.dtype == torch.float32 and w.shape == (6, 6)
    dog_col = torch.full((6,), -1e8)
    dog_col[3] = 2.5
    cat_col = torch.ones(6)
    cat_col[2] = -1e8
    assert torch.equal(w[:, 1], dog_col) and torch.equal(w[:, 2], dog_col)
    assert torch.equal(w[:, 4], cat_col)
    assert torch.equal(w[:, [0, 3, 5]], torch.zeros(6, 3))
    w2 = build_weight_map([([0], dog, 3.0)], 2, 3, 2, negative_weight=-5.0)
    assert torch.equal(w2[:, 0], torch.tensor([-5.0, -5.0, -5.0, 3.0, -5.0, -5.0]))


def test_build_weight_map_errors():
    region = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(Cones2Error, match=r"token position 6 is out of range 0..5"):
        build_weight_map([([1, 6], region, 2.5)], 2, 3, 6)
    with pytest.raises(Cones2Error, match="token position -1 is out of range"):
        build_weight_map([([-1], region, 2.5)], 2, 3, 6)
    with pytest.raises(Cones2Error, match="token 2 is bound by binding 0 and binding 1"):
        build_weight_map([([1, 2], region, 2.5), ([2, 3], region, 2.5)], 2, 3, 6)
    with pytest.raises(Cones2Error, match=r"region has shape \(3, 2\) but the grid is \[2, 3\]"):
        build_weight_map([([1], torch.ones(3, 2, dtype=torch.bool), 2.5)], 2, 3, 6)
    with pytest.raises(Cones2Error, match="region is empty"):
        build_weight_map([([1], torch.zeros(2, 3, dtype=torch.bool), 2.5)], 2, 3, 6)
    with pytest.raises(Cones2Error, match="no token positions"):
        build_weight_map([([], region, 2.5)], 2, 3, 6)


# ---- box tracks (video): keyframes ----------------------------------------------------------------------------

TRACK = ('{"version": 1, "boxes": [{"subject": "dog", "x": 0.0, "y": 0.2, "w": 0.2, "h": 0.4, "frames": ['
         '{"t": 1, "x": 0.8, "y": 0.2, "w": 0.2, "h": 0.4}, {"t": 0, "x": 0.0, "y": 0.2, "w": 0.2, "h": 0.4}]},'
         '{"subject": "cat", "x": 0.5, "y": 0.5, "w": 0.5, "h": 0.5}]}')


def test_track_interpolates_between_keyframes_and_holds_outside():
    layout = parse_layout(TRACK)
    dog, cat = layout.boxes
    assert [f.t for f in dog.frames] == [0.0, 1.0]  # sorted
    assert dog.at(0.25).x == pytest.approx(0.2) and dog.at(0.25).w == pytest.approx(0.2)
    assert dog.at(0.5).x == pytest.approx(0.4)
    assert dog.at(-1).x == 0.0 and dog.at(2).x == pytest.approx(0.8)
    assert cat.at(0.7) is cat  # no keyframes: holds still
    assert layout.moving and not parse_layout(TRACK).at(0.5).moving
    assert parse_layout(layout.to_json()) == layout


@pytest.mark.parametrize("frames, match", [
    ('{"t": 0.5}', "not an object|must be a list"),
    ('[{"x": 0, "y": 0, "w": 0.5, "h": 0.5}]', "missing 't'"),
    ('[{"t": 1.5, "x": 0, "y": 0, "w": 0.5, "h": 0.5}]', "outside 0..1"),
    ('[{"t": 0.5, "x": 0.9, "y": 0, "w": 0.5, "h": 0.5}]', "keyframe 0.*right edge"),
    ('[{"t": 0.5, "x": 0, "y": 0, "w": 0.5, "h": 0.5}, {"t": 0.5, "x": 0, "y": 0, "w": 0.2, "h": 0.2}]',
     "two keyframes at t = 0.5"),
])
def test_bad_tracks_say_what_to_fix(frames, match):
    text = '{"boxes": [{"subject": "dog", "x": 0, "y": 0, "w": 0.5, "h": 0.5, "frames": ' + frames + "}]}"
    with pytest.raises(Cones2Error, match=match):
        parse_layout(text)
