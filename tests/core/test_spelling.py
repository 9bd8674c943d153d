"""Finding a word of a script written without spaces by what a prompt's CLIP BPE tokens spell."""

from __future__ import annotations

from comfyui_cones2.cones2_core.conditioning import bpe_token_bytes, find_spelled, spelled_without_spaces


def test_bpe_tokens_spell_their_utf8_bytes():
    # CLIP's tokens for "犬" alone: 'ç', 'Ĭ', '¬</w>' (bytes e7 8a ac, the last one word-final)
    assert b"".join(bpe_token_bytes(t) for t in ["ç", "Ĭ", "¬</w>"]) == "犬 ".encode()
    assert bpe_token_bytes("a</w>") == b"a " and bpe_token_bytes("Ġ") == bytes([0x20])
    assert bpe_token_bytes(None) is None and bpe_token_bytes("\u4e00") is None  # not in the byte alphabet


def test_find_spelled_gives_the_rows_of_every_overlapping_token():
    chunk = [None, *(bpe_token_bytes(t) for t in ["ä¸", "Ģ", "åı", "ª", "ç", "Ĭ", "¬", "å", "Ĵ", "Į", "ç", "Į",
                                                  "«</w>"]), None, None]
    assert find_spelled([chunk], "犬", len(chunk)) == [[5, 6, 7]]
    assert find_spelled([chunk], "猫", len(chunk)) == [[11, 12, 13]]
    assert find_spelled([chunk, chunk], "一只", len(chunk)) == [[1, 2, 3, 4], [17, 18, 19, 20]]
    assert find_spelled([chunk], "狗", len(chunk)) == []
    # nothing matches across a start/end token
    assert find_spelled([[bpe_token_bytes("ç"), None, bpe_token_bytes("Ĭ")]], "犬", 3) == []


def test_which_words_are_found_by_spelling():
    assert spelled_without_spaces("犬") and spelled_without_spaces("🐶") and spelled_without_spaces("ねこ")
    assert not spelled_without_spaces("dog") and not spelled_without_spaces("café")


def test_whole_words_only_match_at_word_boundaries():
    chunk = [None, *(bpe_token_bytes(t) for t in ["a</w>", "red</w>", "dog", "house</w>", "red</w>", "dog</w>"])]
    assert find_spelled([chunk], "red dog", len(chunk)) == [[2, 3], [5, 6]]
    assert find_spelled([chunk], "red dog", len(chunk), whole_words=True) == [[5, 6]]
    assert find_spelled([chunk], "ed dog", len(chunk), whole_words=True) == []
