"""Encoding a prompt exactly as CLIPTextEncode does, plus the token positions Cones 2 needs.

Host-facing half of residual application: the host's tokenizer finds where each word sits; the core
(``cones2_core.conditioning``) adds the residuals.
"""

from __future__ import annotations

import re

from ..cones2_core.conditioning import (
    Placement,
    add_residuals,
    agreed_occurrences,
    bpe_token_bytes,
    find_occurrences,
    find_spelled,
    spelled_without_spaces,
)
from ..cones2_core.errors import Cones2Error, short
from ..cones2_core.families import FAMILIES, Family, article, by_encoder_keys
from ..cones2_core.residual import Residual

COND_KEY = "cones2"  # key of our record in the conditioning dict


def clip_family(clip) -> Family:
    """The family of a host CLIP object, told by its tokenizer's encoder keys."""
    keys = clip.tokenize("a").keys()
    family = by_encoder_keys(keys)
    if family is None:
        supported = ", ".join(f"{f.name} ({' + '.join((*f.conditioning_keys, *f.pooled_only))})"
                              for f in FAMILIES.values())
        raise Cones2Error(f"this CLIP has text encoders {sorted(keys)}; Cones 2 supports {supported}: connect the "
                          "CLIP output of such a checkpoint loader (for Flux, DualCLIPLoader with type flux)")
    return family


def _conditioning_keys(keys) -> tuple[str, ...]:
    """Of a tokenizer's keys, those whose rows form the conditioning (Flux: "t5xxl", not the pooled-only "l");
    all of them when the keys are no family's."""
    family = by_encoder_keys(keys)
    return family.conditioning_keys if family is not None else tuple(keys)


def _token_ids(chunks) -> list[list[object]]:
    """Token ids per chunk (entries are (token, weight[, word_id]))."""
    return [[t[0] if isinstance(t[0], int) else None for t in chunk] for chunk in chunks]


def escape_word(word: str) -> str:
    """``word`` with the host's prompt-weighting characters escaped, so it tokenises as plain text."""
    return word.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def word_tokens(clip, word: str) -> dict[str, list[int]]:
    """The tokens of ``word`` alone, per conditioning encoder key, without start/end/padding tokens (word id 0
    marks those, for CLIP's BPE and T5's SentencePiece alike)."""
    toks = clip.tokenize(escape_word(word), return_word_ids=True)
    return {k: [t for t, _w, wid in toks[k][0] if wid != 0 and isinstance(t, int)] for k in _conditioning_keys(toks)}


def prompt_words(text: str) -> list[str]:
    """The plain words of a prompt (weight syntax and punctuation removed), lower-cased, in order, unique."""
    cleaned = re.sub(r":\s*-?[0-9.]+\s*\)", " ", text)  # "(dog:1.2)" -> "(dog "
    words = re.findall(r"[^\W_]+(?:['-][^\W_]+)*", cleaned.lower())
    return list(dict.fromkeys(words))


def token_text(clip, text: str) -> dict[str, list[list[bytes | None]]]:
    """Per encoder key, per chunk, per token: the UTF-8 bytes the token spells (b" " after a word's last token),
    None for start/end/padding/embeddings. Empty when the tokenizer is not a CLIP byte-level BPE (Flux's T5)."""
    out = {}
    toks = clip.tokenize(text, return_word_ids=True)
    for key in _conditioning_keys(toks):
        chunks = toks[key]
        vocab = getattr(getattr(clip.tokenizer, f"clip_{key}", None), "inv_vocab", None)
        if not isinstance(vocab, dict):
            return {}
        out[key] = [[bpe_token_bytes(vocab.get(t)) if wid != 0 and isinstance(t, int) else None
                     for t, _weight, wid in chunk] for chunk in chunks]
    return out


def spelled_positions(text_by_key: dict, text: str, whole_words: bool = False) -> list[list[int]]:
    """Occurrences of ``text`` found by what the prompt's tokens spell (``text_by_key``, from ``token_text``),
    agreeing across SDXL's encoders: a word inside a longer run ("犬" in "一只犬和猫", "🐶"), or with
    ``whole_words`` a phrase as one contiguous run of words ("red dog")."""
    if not text_by_key:
        return []
    return agreed_occurrences({k: find_spelled(chunks, text, len(chunks[0]), whole_words)
                               for k, chunks in text_by_key.items()})


def word_positions(clip, tokens, word: str, text_by_key: dict | None = None) -> list[list[int]]:
    """Occurrences of ``word`` in the prompt, as lists of rows of the conditioning tensor (agreeing across
    SDXL's encoders; for Flux the T5 rows, row 0 = the first word's first token).

    A word's own tokens are searched for first; a word of a script written without spaces, or a symbol, that
    sits inside a longer run is then found by what the tokens spell (``text_by_key``, from ``token_text``)."""
    per_key = {}
    for key, pattern in word_tokens(clip, word).items():
        if not pattern:
            return []
        chunks = tokens[key]
        per_key[key] = find_occurrences(_token_ids(chunks), pattern, len(chunks[0]))
    found = agreed_occurrences(per_key)
    if not found and spelled_without_spaces(word):
        found = spelled_positions(text_by_key or {}, word)
    return found


def encode_with_residuals(clip, text: str, residuals: list[Residual] | None):
    """CONDITIONING for ``text`` with each residual added at its subject word's tokens.

    Everything is checked before anything is built, so a bad residual leaves nothing half-applied.
    Returns the host's conditioning list, each dict carrying our record under ``COND_KEY``.
    """
    if clip is None:
        raise Cones2Error("the clip input is empty: connect the CLIP output of a checkpoint loader")
    residuals = list(residuals or [])
    family = clip_family(clip)
    tokens = clip.tokenize(text)
    spelled = token_text(clip, text)
    words = prompt_words(text)
    placements = []
    subjects: dict[str, list[list[int]]] = {}
    for res in residuals:
        name = res.source or res.subject
        if res.family != family.key:
            theirs = FAMILIES[res.family]  # a Residual's family is one of the table's (Residual.validate)
            raise Cones2Error(f"residual '{name}' is for {theirs.describe()} but the connected CLIP is "
                              f"{family.describe()}: connect the CLIP of {article(theirs.name)} {theirs.name} "
                              f"model or use a residual made for {family.name}")
        occ = word_positions(clip, tokens, res.subject, spelled)
        if not occ:
            raise Cones2Error(f"the subject word '{short(res.subject)}' of residual '{short(name)}' is not in the prompt; "
                              f"the prompt's words are: {short(', '.join(words) or '(none)', 400)}. Add "
                              f"'{short(res.subject)}' to the prompt or set the residual's subject to one of these words")
        if len(occ[0]) != res.n_tokens:
            raise Cones2Error(f"residual '{name}' has {res.n_tokens} token rows but the word '{res.subject}' has "
                              f"{len(occ[0])} token(s) for this tokenizer: set the subject to the word the residual "
                              "was made for")
        subjects[res.subject] = occ
        for enc in family.encoders:
            placements.append(Placement(tuple(tuple(o) for o in occ), res.tensors[enc.key], enc.offset,
                                        float(res.strength)))

    conditioning = clip.encode_from_tokens_scheduled(tokens)
    positions_by_word = {w: sorted(p for o in word_positions(clip, tokens, w) for p in o) for w in words}
    for subject, occ in subjects.items():
        positions_by_word[subject.lower()] = sorted(p for o in occ for p in o)
    out = []
    for cond, extra in conditioning:
        width = cond.shape[-1]
        if width != family.width:
            raise Cones2Error(f"the CLIP produced a {width}-wide conditioning; {family.describe()} needs "
                              f"{family.width}")
        record = {"version": 1, "prompt": text, "family": family.key, "n_tokens": int(cond.shape[1]),
                  "words": {w: p for w, p in positions_by_word.items() if p}, "token_text": spelled,
                  "residuals": [{"subject": r.subject, "source": r.source, "strength": float(r.strength)}
                                for r in residuals]}
        new_cond = add_residuals(cond, placements) if placements else cond
        out.append([new_cond, {**extra, COND_KEY: record}])
    return out
