"""The family table: every other module reads it, so its records must be consistent."""

from __future__ import annotations

import dataclasses

import pytest

from comfyui_cones2.cones2_core.errors import Cones2Error
from comfyui_cones2.cones2_core.families import (
    FAMILIES,
    article,
    by_context_width,
    by_encoder_keys,
    by_reference_width,
    by_widths,
    family,
    family_name,
)
from comfyui_cones2.cones2_core.residual import family_from_widths


@pytest.mark.parametrize("key", sorted(FAMILIES))
def test_each_record_is_consistent_and_found_by_every_lookup(key):
    f = FAMILIES[key]
    assert f.key == key and family(key) is f
    for group in f.groups:  # the encoders of a row group sit side by side along the channels, in order
        offset = 0
        for enc in group:
            assert enc.offset == offset
            offset += enc.width
    assert f.width == max(e.offset + e.width for e in f.encoders)
    assert by_encoder_keys([*f.conditioning_keys, *f.pooled_only]) is f
    assert f.conditioning_keys == tuple(e.key for e in f.encoders) and not set(f.pooled_only) & set(f.conditioning_keys)
    assert f.chunk is None or f.chunk > 0
    if sum(g.widths == f.widths for g in FAMILIES.values()) == 1:
        assert by_widths(f.widths) is f
    else:  # Flux and Chroma: one 4096-wide T5-XXL each
        with pytest.raises(Cones2Error, match=f"could be .*{f.name} \\('{f.key}'\\)"):
            by_widths(f.widths)
    if sum(g.width == f.width for g in FAMILIES.values()) == 1:
        assert by_context_width(f.width) is f
    else:  # Flux, SD3.5 and Wan all read 4096-wide text
        with pytest.raises(Cones2Error, match=f"a {f.width}-wide conditioning could be .*{f.name}"):
            by_context_width(f.width)
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
                try:
                    assert by_widths({enc.key: enc.width}) is not f
                except Cones2Error as e:  # SD3.5's T5-XXL alone: Flux's or Chroma's widths, refused as ambiguous
                    assert f"{f.name} ('{f.key}')" not in str(e)
        assert by_widths({**f.widths, "x": 1}) is None
        assert by_encoder_keys(f.tokenizer_keys | {"x"}) is None
        if f.pooled_only:  # its conditioning encoders alone are another family or none, never this one
            assert by_encoder_keys(f.conditioning_keys) is not f
    widths = {f.width for f in FAMILIES.values()}
    assert by_context_width(max(widths) + 1) is None and by_context_width(0) is None
    assert by_reference_width(0) is None
    assert by_encoder_keys({"l", "g", "t5xxl", "llama"}) is None  # HiDream's tokenizer: no family of ours
    assert by_encoder_keys({"l", "g", "t5xxl"}) is FAMILIES["sd3"]


def test_a_width_shared_by_two_families_is_never_a_silent_pick(monkeypatch):
    """Flux's T5-XXL and Wan's umT5-XXL are both 4096 wide: the encoder key tells them apart, the width alone
    does not (an error); a family with the very same keys and widths as another would be an error naming both."""
    assert by_widths({"umt5xxl": 4096}) is FAMILIES["wan"]
    with pytest.raises(Cones2Error, match="4096-wide conditioning could be"):
        by_context_width(4096)
    twin = dataclasses.replace(FAMILIES["wan"], key="wan_twin", name="Wan twin")
    monkeypatch.setitem(FAMILIES, "wan_twin", twin)
    with pytest.raises(Cones2Error, match=r"could be Wan \('wan'\) or Wan twin \('wan_twin'\).*cones2.family"):
        by_widths({"umt5xxl": 4096})
    with pytest.raises(Cones2Error, match="could be Wan"):
        family_from_widths({"umt5xxl": 4096})


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
        assert f.width == max(e.offset + e.width for e in f.encoders)
    flux = FAMILIES["flux"]
    assert flux.pooled_only and by_encoder_keys(flux.tokenizer_keys) is flux
    assert by_encoder_keys({"l"}) is FAMILIES["sd1"]


def test_families_of_the_same_widths_are_an_error_not_a_guess(monkeypatch):
    """Two records with the same encoder widths (a file without its family's name cannot tell them apart): the
    lookup says to name the family instead of picking the first record; residual files without metadata get
    that error through family_from_widths."""
    import dataclasses

    from comfyui_cones2.cones2_core import families
    from comfyui_cones2.cones2_core.residual import family_from_widths

    twin = dataclasses.replace(FAMILIES["sd2"], key="twin", name="Twin")
    monkeypatch.setitem(families.FAMILIES, "twin", twin)
    for lookup in (by_widths, family_from_widths):
        with pytest.raises(Cones2Error, match=r"could be SD2.x \('sd2'\) or Twin \('twin'\).*'cones2.family'"):
            lookup({"h": 1024})
    assert by_widths(FAMILIES["sd3"].widths) is FAMILIES["sd3"]  # SD3.5's three widths are its own
    assert family_from_widths({"l": 768, "g": 1280, "t5xxl": 4096}) == "sd3"


def test_two_families_with_the_same_encoder_widths_are_an_error_not_a_guess(monkeypatch):
    """A residual file without family metadata is told by its widths; when two families share them (Qwen-Image
    and another family built on Qwen2.5-VL-7B's 3584-wide rows), the lookup says so instead of picking the first."""
    import dataclasses

    from comfyui_cones2.cones2_core import families
    from comfyui_cones2.cones2_core.residual import family_from_widths

    qwen = FAMILIES["qwen_image"]
    assert by_widths({"qwen25_7b": 3584}) is qwen and family_from_widths({"qwen25_7b": 3584}) == "qwen_image"
    twin = dataclasses.replace(qwen, key="qwen_twin", name="Qwen Twin")
    monkeypatch.setitem(families.FAMILIES, twin.key, twin)
    for lookup in (by_widths, family_from_widths):
        with pytest.raises(Cones2Error, match=r"could be Qwen-Image \('qwen_image'\) or Qwen Twin \('qwen_twin'\).*"
                                              r"'cones2.family'"):
            lookup({"qwen25_7b": 3584})
    assert by_widths({"l": 768}) is FAMILIES["sd1"]  # the others are untouched


def test_flux_and_chroma_share_their_widths_and_are_told_by_their_tokenizer_keys():
    """Flux and Chroma: one 4096-wide T5-XXL tensor each. A residual file without cones2.family is an error that
    names both and says to set the metadata, never a silent pick; their CLIPs' tokenizer keys differ ({"l",
    "t5xxl"} vs {"t5xxl"}), which is how Apply Residuals tells them apart."""
    from comfyui_cones2.cones2_core.residual import family_from_widths

    flux, chroma = FAMILIES["flux"], FAMILIES["chroma"]
    assert flux.widths == chroma.widths == {"t5xxl": 4096}
    for lookup in (by_widths, family_from_widths):
        with pytest.raises(Cones2Error, match=r"could be Flux \('flux'\) or Chroma \('chroma'\).*'cones2.family'"):
            lookup({"t5xxl": 4096})
    assert by_encoder_keys({"t5xxl"}) is chroma and by_encoder_keys({"l", "t5xxl"}) is flux
