"""Latent frames of a video model and the clip time each one gets (which box of a track it is guided by).

Wan's VAE (2.1 and 2.2) compresses time 4x and causally: a clip of ``P = 4 * (F - 1) + 1`` pixel frames becomes
``F`` latent frames, and

* latent frame 0 covers pixel frame 0 alone;
* latent frame ``k >= 1`` covers pixel frames ``4k - 3 .. 4k`` (four of them).

A layout box's track (``cones2_core.layout.Box.frames``) is written in clip time ``t`` in 0..1, where pixel frame
``p`` is at ``t = p / (P - 1)`` (the first frame 0, the last 1). Latent frame ``k`` is guided by the box at the
**mean clip time of the pixel frames it covers**:

* ``t_0 = 0``;
* ``t_k = (4k - 1.5) / (4 (F - 1))`` for ``k >= 1`` (the middle of pixel frames ``4k - 3 .. 4k``).

So with ``F = 21`` latent frames (81 pixel frames, Wan's default length), latent frame 1 (pixel frames 1..4) gets
``t = 2.5 / 80``, the last one (pixel frames 77..80) ``t = 78.5 / 80``. A single latent frame (a still image)
gets ``t = 0``. Only ``F`` is known to the diffusion model, so the clip is taken as ``4 * (F - 1) + 1`` frames
long, as the host's Wan latent nodes make it (a length of ``4n + 1``); a clip of another length has its last
latent frame cover fewer pixel frames, and its times are those of the ``4n + 1`` clip.
"""

from __future__ import annotations

from .errors import Cones2Error

TIME_COMPRESSION = 4  # pixel frames per latent frame after the first (Wan's VAE)


def _check_frames(frames: int) -> int:
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise Cones2Error(f"latent frames must be a positive integer, got {frames!r}")
    return frames


def pixel_frames(latent_frames: int, compression: int = TIME_COMPRESSION) -> int:
    """The pixel frames of a clip of ``latent_frames`` latent frames: ``compression * (F - 1) + 1``."""
    return compression * (_check_frames(latent_frames) - 1) + 1


def covered_pixel_frames(k: int, compression: int = TIME_COMPRESSION) -> range:
    """The pixel frames latent frame ``k`` covers: ``0..0`` for ``k = 0``, ``4k - 3 .. 4k`` after."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise Cones2Error(f"a latent frame index must be an integer >= 0, got {k!r}")
    return range(0, 1) if k == 0 else range(compression * (k - 1) + 1, compression * k + 1)


def latent_frame_time(k: int, latent_frames: int, compression: int = TIME_COMPRESSION) -> float:
    """The clip time (0..1) latent frame ``k`` of ``latent_frames`` is guided at: the mean time of its pixel
    frames (see the module docstring)."""
    f = _check_frames(latent_frames)
    if not 0 <= k < f:
        raise Cones2Error(f"latent frame {k!r} is outside a clip of {f} latent frames")
    if f == 1:
        return 0.0
    frames = covered_pixel_frames(k, compression)
    return (sum(frames) / len(frames)) / (pixel_frames(f, compression) - 1)


def latent_frame_times(latent_frames: int, compression: int = TIME_COMPRESSION) -> tuple[float, ...]:
    """``latent_frame_time`` of every latent frame, in order."""
    return tuple(latent_frame_time(k, latent_frames, compression) for k in range(_check_frames(latent_frames)))


__all__ = ["TIME_COMPRESSION", "covered_pixel_frames", "latent_frame_time", "latent_frame_times", "pixel_frames"]
