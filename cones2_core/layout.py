"""Layouts for Cones 2 guidance: boxes, masks and colour maps -> subject regions -> weight map W.

The layout editor writes JSON like::

    {"version": 1, "boxes": [{"subject": "dog", "x": 0.05, "y": 0.1, "w": 0.4, "h": 0.8, "weight": 2.5}]}

with coordinates as fractions of the image (x, y = top-left corner). A subject may have several boxes;
its region is their union. Regions are bool grids [height, width]; the weight map is float32
[height*width, n_tokens] with pixels flattened row-major (index i*width + j).
"""

import json
import math
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import Cones2Error, short

LAYOUT_VERSION = 1
MAX_LAYOUT_CHARS = 1_000_000
MAX_BOX_WEIGHT = 50.0  # the node's positive_weight maximum
_SLACK = 1e-6  # tolerance on coordinates just outside 0..1 (float rounding in the editor)
_BOX_EXAMPLE = '{"subject": "dog", "x": 0.1, "y": 0.1, "w": 0.4, "h": 0.8}'
_EXAMPLE = '{"version": 1, "boxes": [' + _BOX_EXAMPLE + ']}'


@dataclass(frozen=True)
class Keyframe:
    """Where a moving box is at clip time ``t`` (0 = the first frame, 1 = the last): x, y, w, h as a Box's."""

    t: float
    x: float
    y: float
    w: float
    h: float


@dataclass(frozen=True)
class Box:
    """One box; x, y (top-left), w, h are fractions of the image. weight None = the node's positive_weight.

    ``frames``: a video box's track, keyframes in increasing ``t`` (``at`` interpolates them); empty for a box that
    holds still. Image models (one frame) use x, y, w, h; the editor keeps them equal to the track at t = 0."""

    subject: str
    x: float
    y: float
    w: float
    h: float
    weight: float | None = None
    frames: tuple[Keyframe, ...] = ()

    def at(self, t: float) -> "Box":
        """The still box at clip time ``t`` (0..1): its keyframes linearly interpolated, held before the first and
        after the last; the box itself when it has no keyframes."""
        if not self.frames:
            return self
        t = float(t)
        f = self.frames
        if t <= f[0].t:
            a, b, u = f[0], f[0], 0.0
        elif t >= f[-1].t:
            a, b, u = f[-1], f[-1], 0.0
        else:
            i = next(i for i in range(1, len(f)) if f[i].t >= t)
            a, b = f[i - 1], f[i]
            u = (t - a.t) / (b.t - a.t)
        x, y, w, h = ((1 - u) * getattr(a, k) + u * getattr(b, k) for k in "xywh")
        return Box(self.subject, x, y, w, h, self.weight)


@dataclass(frozen=True)
class Layout:
    """The boxes of one layout, in drawing order."""

    boxes: tuple[Box, ...]
    version: int = LAYOUT_VERSION

    def __post_init__(self):
        object.__setattr__(self, "boxes", tuple(self.boxes))

    def subjects(self) -> list[str]:
        """Subject words in order of first appearance, without repeats."""
        return list(dict.fromkeys(box.subject for box in self.boxes))

    @property
    def moving(self) -> bool:
        """Whether any box has a track (keyframes)."""
        return any(box.frames for box in self.boxes)

    def at(self, t: float) -> "Layout":
        """The layout of still boxes at clip time ``t`` (0..1), see Box.at."""
        return Layout(tuple(box.at(t) for box in self.boxes), self.version)

    def to_json(self) -> str:
        """The editor's JSON; parse_layout(layout.to_json()) == layout."""
        boxes = []
        for box in self.boxes:
            item = {"subject": box.subject, "x": box.x, "y": box.y, "w": box.w, "h": box.h}
            if box.weight is not None:
                item["weight"] = box.weight
            if box.frames:
                item["frames"] = [{"t": f.t, "x": f.x, "y": f.y, "w": f.w, "h": f.h} for f in box.frames]
            boxes.append(item)
        return json.dumps({"version": self.version, "boxes": boxes})


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Cones2Error(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise Cones2Error(f"{what} must be a finite number, got {value!r}")
    return number


def _rect(raw: dict, name: str) -> tuple[float, float, float, float]:
    """x, y, w, h of a box (or keyframe) object, checked to lie in the image with a positive area."""
    coords = {}
    for key in ("x", "y", "w", "h"):
        if key not in raw:
            raise Cones2Error(f"{name} is missing {key!r}: every box needs x, y, w and h")
        value = _number(raw[key], f"{name}: {key!r}")
        if not -_SLACK <= value <= 1 + _SLACK:
            raise Cones2Error(
                f"{name}: {key!r} = {value} is outside 0..1; coordinates are fractions of the image size "
                "(0 = left/top edge, 1 = right/bottom edge)"
            )
        coords[key] = min(max(value, 0.0), 1.0)
    x, y, w, h = coords["x"], coords["y"], coords["w"], coords["h"]
    if w <= 0 or h <= 0:
        raise Cones2Error(f"{name} has zero area (w={w}, h={h}): give it a positive width and height")
    if x + w > 1 + _SLACK:
        raise Cones2Error(f"{name} extends past the right edge (x + w = {x + w:.6g} > 1): move it left or narrow it")
    if y + h > 1 + _SLACK:
        raise Cones2Error(f"{name} extends past the bottom edge (y + h = {y + h:.6g} > 1): move it up or shorten it")
    return x, y, w, h


MAX_KEYFRAMES = 1000


def _parse_frames(raw, name: str) -> tuple[Keyframe, ...]:
    """A box's ``frames`` (its track): a list of {t, x, y, w, h} with t in 0..1, each t once, any order (sorted)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise Cones2Error(f"{name}: 'frames' must be a list of keyframes like "
                          f'{{"t": 0.5, "x": 0.1, "y": 0.1, "w": 0.4, "h": 0.8}}, got a {type(raw).__name__}')
    if len(raw) > MAX_KEYFRAMES:
        raise Cones2Error(f"{name} has {len(raw)} keyframes; a track holds at most {MAX_KEYFRAMES}")
    frames = []
    for j, item in enumerate(raw):
        where = f"{name}, keyframe {j}"
        if not isinstance(item, dict):
            raise Cones2Error(f"{where} is not an object like {{\"t\": 0.5, \"x\": 0.1, \"y\": 0.1, \"w\": 0.4, "
                              f"\"h\": 0.8}}, got {short(repr(item))}")
        if "t" not in item:
            raise Cones2Error(f"{where} is missing 't' (its time in the clip, 0 = first frame, 1 = last)")
        t = _number(item["t"], f"{where}: 't'")
        if not 0 <= t <= 1:
            raise Cones2Error(f"{where}: 't' = {t:g} is outside 0..1 (0 = the first frame, 1 = the last)")
        frames.append(Keyframe(t, *_rect(item, where)))
    frames.sort(key=operator.attrgetter("t"))
    for a, b in zip(frames, frames[1:], strict=False):
        if a.t == b.t:
            raise Cones2Error(f"{name} has two keyframes at t = {a.t:g}: keep one")
    return tuple(frames)


def _parse_box(index: int, raw) -> Box:
    if not isinstance(raw, dict):
        raise Cones2Error(f"box {index} is not an object: each box must look like {_BOX_EXAMPLE}, got {raw!r}")
    subject = raw.get("subject")
    if not isinstance(subject, str) or not subject.strip():
        raise Cones2Error(f"box {index} has no subject: type the subject word for it (e.g. \"dog\")")
    subject = subject.strip()
    name = f"box {index} ({short(repr(subject))})"
    x, y, w, h = _rect(raw, name)
    weight = raw.get("weight")
    if weight is not None:
        weight = _number(weight, f"{name}: 'weight'")
        if not 0 <= weight <= MAX_BOX_WEIGHT:
            raise Cones2Error(f"{name}: 'weight' = {weight:g} is outside 0..{MAX_BOX_WEIGHT:g} (the range of the "
                              "node's positive_weight); leave it empty to use positive_weight")
    return Box(subject, x, y, w, h, weight, _parse_frames(raw.get("frames"), name))


def parse_layout(text: str) -> Layout:
    """Parse and validate the layout JSON; raises Cones2Error saying what to fix."""
    if not isinstance(text, str):
        raise Cones2Error(f"the layout must be JSON text, got {type(text).__name__}")
    if not text.strip():
        raise Cones2Error(f"the layout is empty: draw at least one box in the layout editor (or paste {_EXAMPLE})")
    if len(text) > MAX_LAYOUT_CHARS:
        raise Cones2Error(f"the layout is {len(text)} characters long; a layout is at most {MAX_LAYOUT_CHARS} "
                          f"(a few boxes like {_EXAMPLE})")
    try:
        data = json.loads(text)
    except RecursionError:
        raise Cones2Error(f"the layout's JSON is nested too deeply to read; a layout is one object with a list of "
                          f"boxes, e.g. {_EXAMPLE}") from None
    except json.JSONDecodeError as err:
        raise Cones2Error(
            f"the layout is not valid JSON: {err.msg} at line {err.lineno} column {err.colno} (char {err.pos}); "
            f"fix the text or redraw the boxes. Expected e.g. {_EXAMPLE}"
        ) from None
    if not isinstance(data, dict):
        raise Cones2Error(f"the layout must be a JSON object like {_EXAMPLE}, got a {type(data).__name__}")
    version = data.get("version", LAYOUT_VERSION)
    if isinstance(version, bool) or version != LAYOUT_VERSION:
        raise Cones2Error(
            f"unsupported layout version {version!r}: this node reads version {LAYOUT_VERSION}; "
            "redraw or re-save the layout with this version of the editor"
        )
    boxes = data.get("boxes")
    if boxes is None or boxes == []:
        raise Cones2Error("the layout has no boxes: draw at least one box and type its subject word")
    if not isinstance(boxes, list):
        raise Cones2Error(f"'boxes' must be a list of box objects, got a {type(boxes).__name__}")
    return Layout(tuple(_parse_box(i, raw) for i, raw in enumerate(boxes)), LAYOUT_VERSION)


def _check_grid(height: int, width: int) -> None:
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise Cones2Error(f"grid {name} must be a positive integer, got {size!r}")


def _axis_cells(start: float, size: float, n: int) -> torch.Tensor:
    """bool [n]: cells whose centre (k + 0.5) / n lies in [start, start + size); never empty."""
    centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    inside = (centres >= start) & (centres < start + size)
    if not inside.any():  # too thin to hold a centre: take the cell holding the box's own centre
        inside[min(max(math.floor((start + size / 2) * n), 0), n - 1)] = True
    return inside


def rasterize_boxes(boxes: Iterable[Box], height: int, width: int) -> torch.Tensor:
    """Union of boxes on a [height, width] grid -> bool [height, width].

    Pixel (i, j) is inside a box when its centre ((j + 0.5) / width, (i + 0.5) / height) lies in
    [x, x + w) x [y, y + h); a box thinner than one cell still marks the cells holding its centre.
    """
    _check_grid(height, width)
    boxes = list(boxes)
    if not boxes:
        raise Cones2Error("no boxes to rasterise: give each guided subject at least one box")
    mask = torch.zeros(height, width, dtype=torch.bool)
    for box in boxes:
        mask |= _axis_cells(box.y, box.h, height)[:, None] & _axis_cells(box.x, box.w, width)[None, :]
    return mask


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A mask [H0, W0] (or [1, H0, W0]) with values 0..1 -> bool [height, width].

    Area-averages onto the grid (adaptive average pooling; equals mode="area") and keeps cells >= 0.5.
    A mask whose pixels reach 0.5 but average out everywhere keeps its single strongest cell.
    """
    _check_grid(height, width)
    m = torch.as_tensor(mask)
    if m.dim() == 3 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2 or m.numel() == 0:
        raise Cones2Error(f"expected one mask of shape [H, W] or [1, H, W], got shape {tuple(m.shape)}; "
                          "pass a single mask, not a batch")
    m = m.detach().float()
    if not bool((m >= 0.5).any()):
        raise Cones2Error("the mask is empty (no pixel reaches 0.5): paint the subject's region in the mask")
    avg = F.adaptive_avg_pool2d(m[None, None], (height, width))[0, 0]
    out = avg >= 0.5
    if not out.any():
        out.view(-1)[avg.argmax()] = True
    return out


def _parse_colour(colour) -> tuple[int, int, int]:
    if isinstance(colour, str):
        match = re.fullmatch(r"#?([0-9a-fA-F]{6})", colour.strip())
        if match:
            return tuple(int(match.group(1)[i : i + 2], 16) for i in (0, 2, 4))
    elif isinstance(colour, Sequence) and len(colour) == 3 and all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in colour
    ):
        return tuple(colour)
    raise Cones2Error(
        f"bad colour {colour!r}: write colours as '#rrggbb' hex (e.g. '#ff0000') or an (r, g, b) tuple of 0..255 ints"
    )


def colour_map_regions(
    image: torch.Tensor, colours: Mapping[str | tuple[int, int, int], str], tolerance: float = 0.1
) -> dict[str, torch.Tensor]:
    """Regions painted in a colour map -> {subject: bool [H, W]}.

    image float [H, W, 3] (or [1, H, W, 3]) in 0..1; colours maps '#rrggbb' or (r, g, b) to a subject word.
    A pixel matches a colour when its largest channel difference is <= tolerance; a pixel that matches
    several colours goes to the nearest one. Colours of the same subject are united.
    """
    img = torch.as_tensor(image)
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 3 or img.shape[-1] < 3:
        raise Cones2Error(f"expected one RGB image [H, W, 3] (or [1, H, W, 3]), got shape {tuple(img.shape)}")
    if not colours:
        raise Cones2Error("no colours given: map each colour of the colour map to a subject, e.g. {'#ff0000': 'dog'}")
    if not 0 <= tolerance < 1:
        raise Cones2Error(f"tolerance must be in 0..1 (colour units), got {tolerance}")
    rgbs, subjects = [], []
    for colour, subject in colours.items():
        rgb = _parse_colour(colour)
        if rgb in rgbs:
            raise Cones2Error(f"colour #{bytes(rgb).hex()} is listed twice: give each colour one subject")
        if not isinstance(subject, str) or not subject.strip():
            raise Cones2Error(f"colour #{bytes(rgb).hex()} has no subject word: type the subject it marks")
        rgbs.append(rgb)
        subjects.append(subject.strip())
    ref = torch.tensor(rgbs, dtype=torch.float32, device=img.device) / 255  # [K, 3]
    dist = (img[None, ..., :3].float() - ref[:, None, None, :]).abs().amax(dim=-1)  # [K, H, W]
    nearest_dist, nearest = dist.min(dim=0)  # [H, W]
    matched = nearest_dist <= tolerance + 1e-6
    regions: dict[str, torch.Tensor] = {}
    for k, (rgb, subject) in enumerate(zip(rgbs, subjects, strict=True)):
        region = matched & (nearest == k)
        if not region.any():
            raise Cones2Error(
                f"colour #{bytes(rgb).hex()} (subject {subject!r}) was not found in the colour map "
                f"(each channel within {tolerance:g} of it): write the colour as it is painted (a colour picker "
                "shows it), or repaint that region in the listed colour"
            )
        regions[subject] = regions[subject] | region if subject in regions else region
    return regions


def build_weight_map(
    bindings: Sequence[tuple[list[int], torch.Tensor, float]],
    height: int,
    width: int,
    n_tokens: int,
    negative_weight: float = -1e8,
    allow_empty: bool = False,
) -> torch.Tensor:
    """Cones 2 weight map W -> float32 [height*width, n_tokens] (CPU).

    bindings: (token_positions, region bool [height, width], positive_weight) per subject. The columns of
    a binding's tokens hold positive_weight inside its region and negative_weight elsewhere (pixels
    row-major, index i*width + j); all other columns are 0. ``allow_empty``: a region may miss the grid (a
    part of the image that the subject's box does not reach), its tokens then get negative_weight everywhere.
    """
    _check_grid(height, width)
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise Cones2Error(f"n_tokens must be a positive integer, got {n_tokens!r}")
    negative_weight = _number(negative_weight, "negative_weight")
    weights = torch.zeros(height * width, n_tokens, dtype=torch.float32)
    owner: dict[int, int] = {}
    for index, (tokens, region, positive_weight) in enumerate(bindings):
        region = torch.as_tensor(region)
        if tuple(region.shape) != (height, width):
            raise Cones2Error(f"binding {index}: the region has shape {tuple(region.shape)} but the grid is "
                              f"[{height}, {width}]; resize it to this grid (resize_mask / rasterize_boxes)")
        inside = region.detach().reshape(-1).cpu().bool()
        if not inside.any() and not allow_empty:
            raise Cones2Error(f"binding {index}: the region is empty; give the subject a box or mask area")
        if not tokens:
            raise Cones2Error(f"binding {index} has no token positions: is its subject word in the prompt?")
        column = torch.where(inside, _number(positive_weight, f"binding {index}: positive_weight"), negative_weight)
        for token in tokens:
            try:
                if isinstance(token, bool):
                    raise TypeError
                position = operator.index(token)
            except TypeError:
                raise Cones2Error(f"binding {index}: token position {token!r} is not an integer") from None
            if not 0 <= position < n_tokens:
                raise Cones2Error(f"binding {index}: token position {position} is out of range 0..{n_tokens - 1} "
                                  f"(the prompt has {n_tokens} tokens)")
            if owner.setdefault(position, index) != index:
                raise Cones2Error(f"token {position} is bound by binding {owner[position]} and binding {index}: a "
                                  "token can guide only one subject; give the subjects different words")
            weights[:, position] = column
    return weights


__all__ = [
    "Box",
    "Layout",
    "build_weight_map",
    "colour_map_regions",
    "parse_layout",
    "rasterize_boxes",
    "resize_mask",
]
