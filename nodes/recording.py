"""What guided sampling runs recorded, per Layout Guidance node: the attention maps (read by Cones2 Attention Maps)
and how many model calls were guided (read by the sampler wrapper's "nothing was guided" warning)."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class Recording:
    """Per grid (h, w): per subject, the attention mass of its tokens per pixel, summed over heads, layers,
    guided rows and guided calls; plus the subject's region on that grid. ``calls``: guided model calls."""

    def __init__(self):
        self.maps: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.regions: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.calls = 0

    def add(self, h: int, w: int, masses: torch.Tensor, subjects, window=None) -> None:
        """``masses`` [subjects, h * w]: each subject's attention mass per pixel in one call (guided_attention's
        token_mass)."""
        grid = self.maps.setdefault((h, w), {})
        regions = self.regions.setdefault((h, w), {})
        for s, m in zip(subjects, masses, strict=True):
            # stays on the attention's device (no sync per layer); read out by the Attention Maps node
            mass = m.reshape(h, w)
            grid[s.subject] = grid[s.subject] + mass if s.subject in grid else mass
            if s.subject not in regions:
                regions[s.subject] = s.mask(h, w, window)


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
