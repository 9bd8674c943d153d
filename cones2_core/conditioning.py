"""Placing residuals in a prompt embedding: token positions of words and the residual addition.

The host tokenises a prompt into chunks per text encoder: 77 tokens each for the CLIP encoders, and one chunk
of the prompt's length for T5 (padded to the tokenizer's ``min_length``; ``Family.chunk`` is None). The
encoder's output is the concatenation of the chunks along the token axis, so a token at position ``p`` of chunk
``c`` sits at row ``c * chunk_len + p`` of the conditioning tensor. For SDXL the context is the CLIP-L (768)
and CLIP-G (1280) outputs side by side along the channel axis; for Flux it is the T5-XXL rows alone.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import Cones2Error


def find_occurrences(chunks: Sequence[Sequence[object]], pattern: Sequence[int], chunk_len: int) -> list[list[int]]:
    """All occurrences of the token sequence ``pattern`` in the tokenised prompt.

    ``chunks``: one list of token ids per chunk (``chunk_len`` tokens each; entries that are not ints, such as embedding
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


def _bpe_byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (CLIP, GPT-2): the printable character each byte is written as -> the byte.
    Printable Latin-1 bytes stand for themselves; the other 68 bytes are written as chr(256 + k) in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    alphabet = {chr(b): b for b in kept}
    others = [b for b in range(256) if b not in alphabet.values()]
    alphabet.update({chr(256 + k): b for k, b in enumerate(others)})
    return alphabet


_BPE_BYTES = _bpe_byte_alphabet()


def bpe_token_bytes(token: object) -> bytes | None:
    """The UTF-8 bytes a CLIP BPE token (e.g. 'ç', 'Ĭ', '¬</w>') spells; a word-final token gets a trailing b" ".
    None for anything that is not such a token."""
    if not isinstance(token, str):
        return None
    final = token.endswith("</w>")
    try:
        piece = bytes(_BPE_BYTES[ch] for ch in token.removesuffix("</w>"))
    except KeyError:
        return None
    return piece + b" " if final else piece


def spelled_without_spaces(word: str) -> bool:
    """Whether ``word`` holds a letter of a script written without spaces (CJK, kana, Thai: Unicode category
    Lo) or a symbol such as an emoji (category S*). Such a word can sit inside a longer run of text ("犬" in
    "一只犬和猫", "🐶" in "🐶🐱") where its own tokens differ from the run's, so it is found by spelling."""
    return any(unicodedata.category(ch) == "Lo" or unicodedata.category(ch).startswith("S") for ch in word)


def _word_char(ch: str) -> bool:
    """Whether ``ch`` (one character or none) is part of a word: a letter or a digit."""
    return ch.isalnum()


def find_spelled(token_text: Sequence[Sequence[bytes | None]], word: str, chunk_len: int,
                 whole_words: bool = False) -> list[list[int]]:
    """Occurrences of ``word`` found by what the prompt's tokens spell, as lists of flat token rows.

    ``token_text``: per chunk, per token, the UTF-8 bytes the token decodes to (CLIP's word-final token ends with
    b" "; a byte-level BPE token without end marks starts with the space before its word, b" dog"), or None for
    start, end, padding and embedding tokens. Each occurrence is the rows of every token whose bytes overlap the
    word's; the text is lower-cased (ASCII) as CLIP's tokenizer does (a byte-level BPE keeps case: "Dog" is
    found for "dog"). ``whole_words``: only occurrences with no letter or digit right before or after them (a
    phrase "red dog", not "red doghouse"; the word "dog" in " (dog:1.3)" or "dog," but not in "hotdog").
    """
    needle = " ".join(word.lower().split()).encode("utf-8")
    if not needle:
        return []
    found = []
    for c, chunk in enumerate(token_text):
        text, spans = b"", []
        for p, piece in enumerate(chunk):
            if piece is None:
                text += b"\0"  # nothing matches across a start, end or embedding token
                continue
            spans.append((len(text), len(text) + len(piece), c * chunk_len + p))
            text += piece
        text = text.lower()
        start = text.find(needle)
        while start >= 0:
            end = start + len(needle)
            bounded = not _word_char(text[:start].decode("utf-8", "ignore")[-1:]) and not _word_char(
                text[end:end + 4].decode("utf-8", "ignore")[:1])
            rows = [row for a, b, row in spans if a < end and b > start]
            hit = bool(rows) and (bounded or not whole_words)
            if hit:
                found.append(rows)
            start = text.find(needle, end if hit else start + 1)
    return found


def agreed_occurrences(per_key: Mapping[str, list[list[int]]]) -> list[list[int]]:
    """One list of occurrences from each text encoder's (SDXL has two): theirs when they agree, else the
    shortest, so that no row is guided or changed that one encoder does not give the word."""
    results = list(per_key.values())
    if not results:
        return []
    return results[0] if all(r == results[0] for r in results) else min(results, key=len)


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
