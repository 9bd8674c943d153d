"""What a prompt's conditioning knows about its words: the typed record Apply Residuals attaches to it, read by
Layout Guidance (which rows a box's subject binds to) and matching the widget's word list.

Words are found by one rule (``WORD_PATTERN``): runs of letters and digits, joined by an apostrophe or a hyphen
("dog", "don't", "t-rex"), lower-cased, with the host's weight syntax ("(dog:1.2)") removed. The layout widget's
JavaScript applies the same rule (``web/js/layout/graph.js``: ``promptWords``); ``tests/fixtures/prompt_words.json``
holds the cases both sides are tested against.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .conditioning import agreed_occurrences, find_spelled, spelled_without_spaces
from .errors import Cones2Error, short

WORD_PATTERN = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
_WEIGHT = re.compile(r":\s*-?[0-9.]+\s*\)")  # the ":1.2)" of "(dog:1.2)"


def word_parts(text: str) -> list[str]:
    """The words of ``text`` by ``WORD_PATTERN``, lower-cased, in order (repeats kept)."""
    return WORD_PATTERN.findall(text.lower())


def prompt_words(text: str) -> list[str]:
    """The plain words of a prompt (weight syntax and punctuation removed), lower-cased, in order, unique."""
    return list(dict.fromkeys(word_parts(_WEIGHT.sub(" ", text))))


def spelled_positions(text_by_key: Mapping, text: str, whole_words: bool = False) -> list[list[int]]:
    """Occurrences of ``text`` found by what the prompt's tokens spell (``text_by_key``: per encoder key, per
    chunk, per token, its UTF-8 bytes), agreeing across the encoders: a word inside a longer run ("犬" in
    "一只犬和猫", "🐶"), or with ``whole_words`` a phrase as one contiguous run of words ("red dog")."""
    if not text_by_key:
        return []
    return agreed_occurrences({k: find_spelled(chunks, text, len(chunks[0]), whole_words)
                               for k, chunks in text_by_key.items()})


@dataclass(frozen=True)
class AppliedResidual:
    subject: str
    source: str
    strength: float


@dataclass(frozen=True)
class PromptRecord:
    """Where the words of one encoded prompt sit in its conditioning tensor ``[1, n_tokens, width]``.

    ``words``: each plain word of the prompt -> its rows (every occurrence, every encoder's rows, sorted);
    ``token_text``: per encoder key whose tokenizer spells bytes (CLIP's BPE), per chunk, per token, the bytes it
    spells (None for start/end/padding), so words inside a longer run and phrases can be found; ``residuals``:
    what Apply Residuals added."""

    prompt: str
    family: str
    n_tokens: int
    words: Mapping[str, tuple[int, ...]]
    token_text: Mapping[str, list] = field(default_factory=dict)
    residuals: tuple[AppliedResidual, ...] = ()

    def rows_of(self, subject: str) -> tuple[int, ...]:
        """The rows a layout subject binds to: a word of the prompt; a word spelled inside a longer run (CJK,
        emoji); a phrase, as its one contiguous run of words (as in the reference); or several words apart, each
        bound. An error that lists the prompt's words when it is none of these."""
        key = subject.lower().strip()
        if key in self.words:
            return tuple(self.words[key])
        if spelled_without_spaces(key):  # "犬" inside "一只犬和猫", "🐶"
            spelled = spelled_positions(self.token_text, key)
            if spelled:
                return tuple(sorted({r for o in spelled for r in o}))
        parts = word_parts(key)
        if len(parts) > 1 and self.token_text:  # a phrase binds its contiguous run, as in the reference
            occ = spelled_positions(self.token_text, " ".join(key.split()), whole_words=True)
            if occ:
                return tuple(sorted({r for o in occ for r in o}))
            if all(p in self.words for p in parts):
                raise Cones2Error(f"the layout's subject '{short(subject)}' is not in the prompt as one run of words "
                                  "(its words are there, apart): write the phrase as the prompt has it, or give "
                                  "each word its own box")
        elif parts and all(p in self.words for p in parts):
            return tuple(sorted({r for p in parts for r in self.words[p]}))
        raise Cones2Error(f"the layout's subject '{short(subject)}' is not a word of the prompt; the prompt's words "
                          f"are: {short(', '.join(self.words) or '(none)', 400)}. Rename the box or add the word to "
                          "the prompt")


__all__ = ["WORD_PATTERN", "AppliedResidual", "PromptRecord", "prompt_words", "spelled_positions", "word_parts"]
