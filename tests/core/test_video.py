"""Latent frames of a video model (cones2_core/video.py): which pixel frames each covers, which clip time it gets."""

from __future__ import annotations

import pytest

from comfyui_cones2.cones2_core.errors import Cones2Error
from comfyui_cones2.cones2_core.layout import Box, Keyframe
from comfyui_cones2.cones2_core.video import (
    covered_pixel_frames,
    latent_frame_time,
    latent_frame_times,
    pixel_frames,
)


def test_latent_frames_cover_wans_pixel_frames():
    """Wan's default clip: 81 pixel frames are 21 latent frames; frame 0 alone, then four each, no gap or overlap."""
    assert pixel_frames(21) == 81 and pixel_frames(1) == 1 and pixel_frames(3) == 9
    assert list(covered_pixel_frames(0)) == [0]
    assert list(covered_pixel_frames(1)) == [1, 2, 3, 4]
    assert list(covered_pixel_frames(20)) == [77, 78, 79, 80]
    every = [p for k in range(21) for p in covered_pixel_frames(k)]
    assert every == list(range(81))


def test_each_latent_frame_gets_the_mean_time_of_its_pixel_frames():
    assert latent_frame_time(0, 21) == 0.0
    assert latent_frame_time(1, 21) == pytest.approx(2.5 / 80, abs=0)
    assert latent_frame_time(20, 21) == pytest.approx(78.5 / 80, abs=0)
    assert latent_frame_times(3) == (0.0, 2.5 / 8, 6.5 / 8)
    assert latent_frame_times(1) == (0.0,)  # a still image
    times = latent_frame_times(21)
    assert all(a < b for a, b in zip(times, times[1:], strict=False)) and 0 <= times[0] and times[-1] < 1


def test_a_track_gives_each_latent_frame_its_interpolated_box():
    box = Box("dog", 0.0, 0.2, 0.3, 0.5, frames=(Keyframe(0.0, 0.0, 0.2, 0.3, 0.5), Keyframe(1.0, 0.7, 0.2, 0.3, 0.5)))
    xs = [box.at(t).x for t in latent_frame_times(3)]
    assert xs == pytest.approx([0.0, 0.7 * 2.5 / 8, 0.7 * 6.5 / 8])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_frame_counts_are_refused(bad):
    with pytest.raises(Cones2Error, match="latent frames must be a positive integer"):
        latent_frame_times(bad)
    with pytest.raises(Cones2Error, match="outside a clip of 3 latent frames"):
        latent_frame_time(3, 3)
    with pytest.raises(Cones2Error, match="latent frame index must be an integer >= 0"):
        covered_pixel_frames(-1)
