"""Encoding a prompt exactly as CLIPTextEncode does, plus where its words sit: the one "word -> rows" service.

The host's tokenizer finds each word's tokens per encoder; the family record (``cones2_core.families``) says how an
encoder's token rows map to rows of the conditioning (its row group and skipped rows); the result is a typed
``cones2_core.prompt.PromptRecord`` that Apply Residuals attaches to the conditioning and Layout Guidance reads.
The core (``cones2_core.conditioning``) adds the residuals.
"""

from __future__ import annotations

import logging

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
from ..cones2_core.prompt import AppliedResidual, PromptRecord, prompt_words, spelled_positions
from ..cones2_core.residual import Residual

log = logging.getLogger("comfyui-cones2")

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


# The host's attribute of each encoder in its CLIP model (comfy/sd1_clip.py SD1ClipModel, sdxl_clip, sd3_clip, flux)
_ENCODER_ATTRIBUTES = {"l": "clip_l", "g": "clip_g", "h": "clip_h", "t5xxl": "t5xxl"}


def present_keys(clip, family: Family) -> tuple[str, ...]:
    """The family's conditioning encoders that this CLIP has. The host's SD3 loaders build its CLIP without the
    encoders they were not given (``sd3_clip.SD3ClipModel``: CLIP-L + CLIP-G without T5, or any one alone): a
    missing T5 leaves its rows out of the conditioning, a missing CLIP-L or CLIP-G leaves its channels zero. The
    rows and residuals follow what the CLIP produces (``word_rows``, ``encode_with_residuals``)."""
    model = getattr(clip, "cond_stage_model", None)
    return tuple(e.key for e in family.encoders
                 if getattr(model, _ENCODER_ATTRIBUTES.get(e.key, e.key), True) is not None)


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


def _encoder_tokenizer(clip, key: str):
    """The host's per-encoder tokenizer object (``clip_l`` for CLIP's "l"; the key itself for LLM encoders such
    as Qwen-Image's "qwen25_7b"), or None."""
    return getattr(clip.tokenizer, f"clip_{key}", None) or getattr(clip.tokenizer, key, None)


def _template(clip, enc) -> tuple[list, list]:
    """An encoder's chat template around the prompt (``Encoder.skip_rows`` > 0): the token ids before the prompt
    (which the host drops) and after it (which stay in the conditioning), read off the host's tokenisation of an
    empty prompt."""
    ids = [t[0] for t in clip.tokenize("")[enc.key][0]]
    return ids[:enc.skip_rows], ids[enc.skip_rows:]


def _prompt_span(clip, tokens, enc) -> tuple[int, int]:
    """The token positions ``start, stop`` of the user's prompt in an encoder's single chunk: after the chat
    template's prefix and before its tail (the whole chunk without a template). An error when the tokens are not
    the host's template around the prompt (a prompt that brings its own template)."""
    chunk = tokens[enc.key][0]
    if not enc.skip_rows:
        return 0, len(chunk)
    prefix, tail = _template(clip, enc)
    ids = [t[0] for t in chunk]
    if ids[:len(prefix)] != prefix or len(ids) < len(prefix) + len(tail) or ids[len(ids) - len(tail):] != tail:
        raise Cones2Error(f"this prompt does not sit in the host's {enc.name} chat template: a prompt that starts "
                          "with its own template (<|im_start|> ...) moves the rows the host drops, so its words "
                          "cannot be placed; write the prompt as plain text")
    return len(prefix), len(ids) - len(tail)


def _byte_bpe_text(clip, tokens, enc) -> list[list[bytes | None]]:
    """A byte-level BPE encoder's tokens as the bytes they spell, as conditioning rows: the template's dropped
    prefix left out, its tail and anything not a vocabulary token None (never part of a word)."""
    start, stop = _prompt_span(clip, tokens, enc)
    vocab = getattr(_encoder_tokenizer(clip, enc.key), "inv_vocab", None)
    if not isinstance(vocab, dict):
        raise Cones2Error(f"the {enc.name} tokenizer of this CLIP has no vocabulary to read words from; connect "
                          "the CLIP of the host's own loader")
    chunk = tokens[enc.key][0]
    return [[bpe_token_bytes(vocab.get(t[0])) if start <= p < stop and isinstance(t[0], int) else None
             for p, t in enumerate(chunk)][enc.skip_rows:]]


def word_tokens(clip, word: str) -> dict[str, list[int]]:
    """The tokens of ``word`` alone, per conditioning encoder key, without start/end/padding tokens (word id 0
    marks those, for CLIP's BPE and T5's SentencePiece alike; a byte-level BPE's are the tokens that spell the
    word inside its chat template)."""
    toks = clip.tokenize(escape_word(word), return_word_ids=True)
    family = by_encoder_keys(toks)
    out = {}
    for k in _conditioning_keys(toks):
        enc = family.encoder(k) if family is not None else None
        if enc is not None and enc.tokenizer == "byte_bpe":
            found = find_spelled(_byte_bpe_text(clip, toks, enc), word, len(toks[k][0]), whole_words=True)
            out[k] = [toks[k][0][r + enc.skip_rows][0] for r in found[0]] if found else []
        else:
            out[k] = [t for t, _w, wid in toks[k][0] if wid != 0 and isinstance(t, int)]
    return out


def token_text(clip, text: str) -> dict[str, list[list[bytes | None]]]:
    """Per encoder key whose tokenizer is a byte-level BPE (CLIP's, or an LLM's: the family record's
    ``Encoder.tokenizer``), per chunk, per token (for an LLM: per conditioning row), the UTF-8 bytes the token
    spells (CLIP: b" " after a word's last token; an LLM's: the space before the word), None for
    start/end/padding/embeddings and a chat template's tail. Empty for a family without such an encoder (Flux's
    T5)."""
    toks = clip.tokenize(text, return_word_ids=True)
    family = by_encoder_keys(toks)
    out = {}
    for key in _conditioning_keys(toks):
        kind = family.encoder(key).tokenizer if family is not None else "clip_bpe"
        if kind == "byte_bpe":
            out[key] = _byte_bpe_text(clip, toks, family.encoder(key))
            continue
        if kind != "clip_bpe":
            continue
        vocab = getattr(_encoder_tokenizer(clip, key), "inv_vocab", None)
        if not isinstance(vocab, dict):
            return {}
        out[key] = [[bpe_token_bytes(vocab.get(t)) if wid != 0 and isinstance(t, int) else None
                     for t, _weight, wid in chunk] for chunk in toks[key]]
    return out


def word_rows(clip, tokens, word: str, text_by_key: dict | None = None) -> dict[str, list[list[int]]]:
    """Occurrences of ``word`` in the prompt per conditioning encoder key, as lists of rows of the conditioning
    tensor. The encoders of one row group (SDXL's CLIP-L and CLIP-G) agree on one list; the rows of a later group
    start after the earlier groups' rows (the family record's ``Encoder.group``), less its ``skip_rows``. For
    Flux's T5, row 0 is the first word's first token (no start token).

    A word's own tokens are searched for first; a word of a script written without spaces, or a symbol, that
    sits inside a longer run is then found by what the tokens spell (``text_by_key``, from ``token_text``). Empty
    when the word has no tokens or is not in the prompt."""
    family = by_encoder_keys(tokens) or clip_family(clip)
    text_by_key = text_by_key or {}
    patterns = word_tokens(clip, word)
    present = present_keys(clip, family)
    out: dict[str, list[list[int]]] = {}
    start = 0
    for group in family.groups:
        group = tuple(e for e in group if e.key in present)  # the CLIP's own encoders (see present_keys)
        if not group:  # a row group the CLIP does not produce (SD3.5 without T5): no rows
            continue
        skip = group[0].skip_rows
        if all(e.tokenizer == "byte_bpe" for e in group):  # by spelling, at word boundaries; already rows
            found = agreed_occurrences({e.key: find_spelled(_byte_bpe_text(clip, tokens, e), word, 0,
                                                            whole_words=not spelled_without_spaces(word))
                                        for e in group})
            rows = [[start + r for r in occ] for occ in found]
            for enc in group:
                out[enc.key] = rows
            start += len(tokens[group[0].key][0]) - skip
            continue
        per_key = {}
        for enc in group:
            if not patterns.get(enc.key):
                return {}
            chunks = tokens[enc.key]
            per_key[enc.key] = find_occurrences(_token_ids(chunks), patterns[enc.key], len(chunks[0]))
        found = agreed_occurrences(per_key)
        if not found and spelled_without_spaces(word):
            found = spelled_positions({e.key: text_by_key[e.key] for e in group if e.key in text_by_key}, word)
        rows = [[start + r - skip for r in occ] for occ in found if min(occ) >= skip]
        for enc in group:
            out[enc.key] = rows
        first = tokens[group[0].key]
        start += len(first) * len(first[0]) - skip
    return out


def merged_rows(by_key: dict[str, list[list[int]]]) -> list[list[int]]:
    """``word_rows``' occurrences with every encoder's rows of one occurrence together (for a family of one row
    group, that group's occurrences)."""
    per_group = list({id(rows): rows for rows in by_key.values()}.values())
    return [sorted({r for occ in occs for r in occ}) for occs in zip(*per_group, strict=False)]


def word_positions(clip, tokens, word: str, text_by_key: dict | None = None) -> list[list[int]]:
    """Occurrences of ``word`` as lists of conditioning rows, every encoder's rows of one occurrence together."""
    return merged_rows(word_rows(clip, tokens, word, text_by_key))


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
        by_key = word_rows(clip, tokens, res.subject, spelled)
        if not any(by_key.values()):
            raise Cones2Error(f"the subject word '{short(res.subject)}' of residual '{short(name)}' is not in the prompt; "
                              f"the prompt's words are: {short(', '.join(words) or '(none)', 400)}. Add "
                              f"'{short(res.subject)}' to the prompt or set the residual's subject to one of these words")
        for enc in family.encoders:
            if enc.key not in by_key:  # an encoder the CLIP was loaded without (present_keys)
                log.warning("Cones2 Apply Residuals: this %s CLIP has no %s, so the %s part of residual '%s' is "
                            "not applied (load the CLIP with all its encoders to apply all of it)", family.name,
                            enc.name, enc.name, name)
                continue
            occ = by_key[enc.key]
            rows = res.tensors[enc.key].shape[0]
            if not occ or len(occ[0]) != rows:
                raise Cones2Error(f"residual '{name}' has {rows} token rows but the word '{res.subject}' has "
                                  f"{len(occ[0]) if occ else 0} token(s) for this tokenizer: set the subject to the "
                                  "word the residual was made for")
            placements.append(Placement(tuple(tuple(o) for o in occ), res.tensors[enc.key], enc.offset,
                                        float(res.strength)))
        subjects[res.subject] = merged_rows(by_key)

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
        record = PromptRecord(prompt=text, family=family.key, n_tokens=int(cond.shape[1]),
                              words={w: tuple(p) for w, p in positions_by_word.items() if p}, token_text=spelled,
                              residuals=tuple(AppliedResidual(r.subject, r.source, float(r.strength))
                                              for r in residuals))
        new_cond = add_residuals(cond, placements) if placements else cond
        out.append([new_cond, {**extra, COND_KEY: record}])
    return out
