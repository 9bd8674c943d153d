"""Guidance windows and the self-recurrence schedule (pure functions on sigma lists)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence


def in_window(sigma: float, sigma_start: float, sigma_end: float) -> bool:
    """True when ``sigma`` lies in the guided window [sigma_end, sigma_start] (sigmas fall over sampling)."""
    return sigma_end <= sigma <= sigma_start


def recurrence_plan(sigmas: Sequence[float], guided: Sequence[bool]) -> list[tuple[int, int, int]]:
    """Split a sampling schedule into segments ``(start, stop, repeats)`` of sigma indices.

    Each guided step i (sigma_i -> sigma_{i+1}) becomes its own segment taken twice (the paper's
    self-recurrence: step, re-noise back to sigma_i, step again); runs of unguided steps stay one segment,
    taken once. ``guided[i]`` says whether step i is guided; len(guided) == len(sigmas) - 1.
    """
    n = len(sigmas) - 1
    if len(guided) != n:
        raise ValueError(f"need one flag per step ({n}), got {len(guided)}")
    plan: list[tuple[int, int, int]] = []
    i = 0
    while i < n:
        if guided[i]:
            plan.append((i, i + 1, 2))
            i += 1
        else:
            j = i
            while j < n and not guided[j]:
                j += 1
            plan.append((i, j, 1))
            i = j
    return plan


def renoise_scale(sigma_from: float, sigma_to: float) -> float:
    """Noise to add after a step sigma_from -> sigma_to to return to sigma_from: sqrt(from^2 - to^2)."""
    return math.sqrt(max(sigma_from**2 - sigma_to**2, 0.0))


def segment_seed(seed: int, segment: int) -> int:
    """The sampler seed for the ``segment``-th restart of a self-recurrent run: seed-determined and different for
    every segment and repeat, so samplers that draw their noise from the seed (ancestral, SDE, LCM) get fresh
    noise each time instead of the first step's noise again. Any int seed (the host allows up to 2^64 - 1)."""
    digest = hashlib.sha256(f"cones2-segment:{int(seed)}:{int(segment)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2^63: safe for torch generators and Brownian trees
