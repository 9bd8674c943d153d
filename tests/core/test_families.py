"""The family table: every other module reads it, so its records must be consistent."""

from __future__ import annotations

import pytest

from cones2_core.errors import Cones2Error
from cones2_core.families import (
    FAMILIES,
    article,
    by_context_width,
    by_encoder_keys,
    by_reference_width,
    by_widths,
    family,
    family_name,
)


@pytest.mark.parametrize("key", sorted(FAMILIES))
def test_each_record_is_consistent_and_found_by_every_lookup(key):
    f = FAMILIES[key]
    assert f.key == key and family(key) is f
    offset = 0
    for enc in f.encoders:  # encoders sit side by side along the channels, in order
        assert enc.offset == offset
        offset += enc.width
    assert f.width == offset
    assert by_encoder_keys([*f.conditioning_keys, *f.pooled_only]) is f
    assert f.conditioning_keys == tuple(e.key for e in f.encoders) and not set(f.pooled_only) & set(f.conditioning_keys)
    assert f.chunk is None or f.chunk > 0
    assert by_widths(f.widths) is f
    assert by_context_width(f.width) is f
    if f.reference_width is not None:
        assert by_reference_width(f.reference_width) is f
    assert f.describe().startswith(f.name)


def test_known_values():
    assert FAMILIES["sdxl"].describe() == "SDXL (CLIP-L 768 + CLIP-G 1280)"
    assert [FAMILIES[k].default_resolution("eps") for k in ("sd1", "sd2", "sdxl")] == [512, 512, 1024]
    assert FAMILIES["sd2"].default_resolution("v") == 768
    assert by_reference_width(1024).key == "sd2" and by_reference_width(2048) is None
    assert by_widths({"g": 1280}) is None and by_encoder_keys({"l", "h"}) is None
    assert by_encoder_keys({"l", "g", "t5xxl"}) is None  # SD3's tokenizer: no family of ours
    assert family_name("sd1") == "SD1.5" and family_name("sd9", "another model") == "another model"
    with pytest.raises(Cones2Error, match="unknown model family 'sd9'; use one of 'sd1' \\(SD1.5\\)"):
        family("sd9")


def test_flux_record():
    """Flux: the T5-XXL rows are the whole conditioning; the tokenizer's "l" (CLIP-L) gives only the pooled
    vector, and {"l"} alone is still SD1.5."""
    f = FAMILIES["flux"]
    assert f.describe() == "Flux (T5-XXL 4096)" and f.architecture == "flux"
    assert f.widths == {"t5xxl": 4096} and f.pooled_only == ("l",) and f.chunk is None
    assert f.reference_width is None and f.default_resolution("eps") == 512  # 1280 tokens per step instead of 4352 (docs/flux.md)
    assert by_encoder_keys({"l", "t5xxl"}) is f and by_encoder_keys({"l"}).key == "sd1"
    assert by_encoder_keys({"t5xxl"}) is None  # a Flux tokenizer always has "l" too
    assert by_widths({"t5xxl": 4096}) is f and by_context_width(4096) is f
    assert [article(FAMILIES[k].name) for k in ("sd1", "sd2", "sdxl", "flux")] == ["an", "an", "an", "a"]
