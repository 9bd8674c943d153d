"""What guided sampling runs recorded, per Layout Guidance node: the attention maps (read by Cones2 Attention Maps)
and how many model calls were guided (read by the sampler wrapper's "nothing was guided" warning)."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from ..cones2_core.video import latent_frame_times


class Recording:
    """Per grid (h, w): per subject, the attention mass of its tokens per pixel, summed over heads, layers,
    guided rows and guided calls; plus the subject's region on that grid. ``calls``: guided model calls.

    A video's grid is its frames stacked top to bottom (a strip, ``frames * h`` rows of ``w``: frame f's rows
    are ``f * h ..``, its region that of the boxes at the frame's clip time); ``frames[grid]`` says how many."""

    def __init__(self):
        self.maps: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.regions: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.frames: dict[tuple[int, int], int] = {}
        self.calls = 0

    def add(self, h: int, w: int, masses: torch.Tensor, subjects, window=None, frames: int | None = None) -> None:
        """``masses`` [subjects, h * w]: each subject's attention mass per pixel in one call (guided_attention's
        token_mass); of a video of ``frames`` latent frames, [subjects, frames * h * w], recorded as the strip
        (frames * h, w)."""
        n = frames or 1
        key = (n * h, w)
        grid = self.maps.setdefault(key, {})
        regions = self.regions.setdefault(key, {})
        self.frames[key] = n
        for s, m in zip(subjects, masses, strict=True):
            # stays on the attention's device (no sync per layer); read out by the Attention Maps node
            mass = m.reshape(n * h, w)
            grid[s.subject] = grid[s.subject] + mass if s.subject in grid else mass
            if s.subject not in regions:
                times = (None,) if frames is None else latent_frame_times(frames)
                regions[s.subject] = torch.cat([s.mask(h, w, window, at) for at in times])


_RECORDINGS: OrderedDict[str, Recording] = OrderedDict()
_LOCK = threading.Lock()
_MAX_RECORDINGS = 32  # the most recent guidance nodes' runs are kept


def start_recording(uid: str) -> Recording:
    """A fresh recording for the guidance ``uid`` (at the start of each sampling run)."""
    with _LOCK:
        rec = _RECORDINGS[uid] = Recording()
        _RECORDINGS.move_to_end(uid)
        while len(_RECORDINGS) > _MAX_RECORDINGS:
            _RECORDINGS.popitem(last=False)
        return rec


def find_recording(uid: str) -> Recording | None:
    """The recording of the guidance ``uid``'s last sampling run; None outside any (e.g. a guided model trained on)."""
    with _LOCK:
        return _RECORDINGS.get(uid)
