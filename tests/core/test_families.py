"""The family table: every other module reads it, so its records must be consistent."""

from __future__ import annotations

import pytest

from comfyui_cones2.cones2_core.errors import Cones2Error
from comfyui_cones2.cones2_core.families import (
    FAMILIES,
    article,
    by_context_width,
    by_encoder_keys,
    by_reference_width,
    by_widths,
    families_by_widths,
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
    assert f in families_by_widths(f.widths)
    shared = [g for g in FAMILIES.values() if g.widths == f.widths]
    assert by_widths(f.widths) is (f if shared == [f] else None)  # several (Flux, Chroma): no guess
    assert by_context_width(f.width) is (f if [g for g in FAMILIES.values() if g.width == f.width] == [f] else None)
    if f.reference_width is not None:
        assert by_reference_width(f.reference_width) is f
    assert f.describe().startswith(f.name)


def test_lookups_refuse_what_no_record_has():
    """Every lookup of a near miss (a width off by one, an encoder more or less, another width) finds nothing,
    rather than the nearest family."""
    for f in FAMILIES.values():
        for enc in f.encoders:
            assert by_widths({**f.widths, enc.key: enc.width + 1}) is None
            if len(f.encoders) > 1:  # one encoder of a pair is not this family (SDXL's CLIP-L alone is SD1.5)
                assert by_widths({enc.key: enc.width}) is not f
        assert by_widths({**f.widths, "x": 1}) is None
        assert by_encoder_keys(f.tokenizer_keys | {"x"}) is None
        if f.pooled_only:  # its conditioning encoders alone are another family or none, never this one
            assert by_encoder_keys(f.conditioning_keys) is not f
    widths = {f.width for f in FAMILIES.values()}
    assert by_context_width(max(widths) + 1) is None and by_context_width(0) is None
    assert by_reference_width(0) is None
    assert by_encoder_keys({"l", "g", "t5xxl"}) is None  # SD3's tokenizer: no family of ours


def test_widths_several_families_share_find_none_of_them():
    """Flux and Chroma: one T5-XXL of width 4096 each; only the tokenizer keys ({"l", "t5xxl"} vs {"t5xxl"}) and
    a file's cones2.family metadata tell them apart."""
    flux, chroma = FAMILIES["flux"], FAMILIES["chroma"]
    assert families_by_widths({"t5xxl": 4096}) == (flux, chroma)
    assert by_widths({"t5xxl": 4096}) is None and by_context_width(4096) is None
    assert by_encoder_keys({"t5xxl"}) is chroma and by_encoder_keys({"l", "t5xxl"}) is flux


def test_family_names_and_refusals_come_from_the_table():
    for f in FAMILIES.values():
        assert family_name(f.key) == f.name and family_name(f.key, "other") == f.name
        described = f.describe()  # every encoder with its width, in channel order
        positions = [described.index(f"{e.name} {e.width}") for e in f.encoders]
        assert positions == sorted(positions) and described.startswith(f"{f.name} (")
        assert f.default_resolution("eps") == f.resolution
        assert f.default_resolution("v") == (f.v_resolution or f.resolution)
    assert family_name("sd9", "another model") == "another model" and family_name("sd9") == "'sd9'"
    with pytest.raises(Cones2Error, match="unknown model family 'sd9'; use one of") as err:
        family("sd9")
    for f in FAMILIES.values():  # the refusal lists every family, by key and name
        assert f"'{f.key}' ({f.name})" in str(err.value)
    # the article goes with how the name is read: letter by letter ("an SD1.5", "an SDXL"), else as a word
    assert [article(n) for n in ("SD1.5", "SD2.x", "SDXL", "Flux", "Apple", "Qwen-Image")] == ["an", "an", "an", "a",
                                                                                                "an", "a"]


def test_pooled_only_encoders_give_no_rows():
    """Flux: the tokenizer's "l" (CLIP-L) gives only the pooled vector; the conditioning is the other encoders'
    rows alone, and {"l"} alone is still SD1.5."""
    for f in FAMILIES.values():
        assert not set(f.pooled_only) & set(f.widths)
        assert f.width == sum(f.widths.values())
    flux = FAMILIES["flux"]
    assert flux.pooled_only and by_encoder_keys(flux.tokenizer_keys) is flux
    assert by_encoder_keys({"l"}) is FAMILIES["sd1"]
