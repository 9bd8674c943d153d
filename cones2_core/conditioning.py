"""Placing residuals in a prompt embedding: token positions of words and the residual addition.

The host tokenises a prompt into chunks of 77 tokens per text encoder; the encoder's output is the
concatenation of the chunks along the token axis, so a token at position ``p`` of chunk ``c`` sits at row
``c * chunk_len + p`` of the conditioning tensor. For SDXL the context is the CLIP-L (768) and CLIP-G
(1280) outputs side by side along the channel axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import Cones2Error

# Channel layout of each family's conditioning: encoder key -> (offset, width).
CHANNELS = {
    "sd1": {"l": (0, 768)},
    "sd2": {"h": (0, 1024)},
    "sdxl": {"l": (0, 768), "g": (768, 1280)},
}


def family_of_encoder_keys(keys) -> str | None:
    """The family whose text encoders are exactly ``keys`` (as the host's tokenizer names them)."""
    keys = set(keys)
    for family, chans in CHANNELS.items():
        if set(chans) == keys:
            return family
    return None


def find_occurrences(chunks: Sequence[Sequence[object]], pattern: Sequence[int], chunk_len: int) -> list[list[int]]:
    """All occurrences of the token sequence ``pattern`` in the tokenised prompt.

    ``chunks``: one list of token ids per 77-token chunk (entries that are not ints, such as embedding
    tensors, never match). Returns one list of flat row indices per occurrence, in order.
    """
    if not pattern:
        raise Cones2Error("the word has no tokens")
    n = len(pattern)
    found = []
    for c, chunk in enumerate(chunks):
        ids = [t if isinstance(t, int) else None for t in chunk]
        for p in range(len(ids) - n + 1):
            if ids[p:p + n] == list(pattern):
                found.append([c * chunk_len + p + i for i in range(n)])
    return found


@dataclass(frozen=True)
class Placement:
    """One residual tensor to add: ``rows`` [n_tokens, width] at each occurrence, channels from ``offset``."""

    occurrences: tuple[tuple[int, ...], ...]
    rows: torch.Tensor
    offset: int
    scale: float


def add_residuals(cond: torch.Tensor, placements: Sequence[Placement]) -> torch.Tensor:
    """Return ``cond`` [B, T, C] plus every placement (a new tensor; ``cond`` is not modified)."""
    out = cond.clone()
    for pl in placements:
        rows = pl.rows.to(device=out.device, dtype=torch.float32) * pl.scale
        width = rows.shape[-1]
        if pl.offset + width > out.shape[-1]:
            raise Cones2Error(f"a residual of width {width} at channel {pl.offset} does not fit a conditioning "
                              f"of width {out.shape[-1]}")
        for occ in pl.occurrences:
            if len(occ) != rows.shape[0]:
                raise Cones2Error(f"a residual of {rows.shape[0]} token rows cannot be placed on {len(occ)} tokens")
            if max(occ) >= out.shape[1]:
                raise Cones2Error(f"token position {max(occ)} is outside the conditioning ({out.shape[1]} tokens)")
            idx = torch.tensor(occ, device=out.device)
            seg = out[:, idx, pl.offset:pl.offset + width]
            out[:, idx, pl.offset:pl.offset + width] = (seg.float() + rows).to(out.dtype)
    return out
