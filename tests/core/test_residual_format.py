"""Residual objects and the Cones 2 residual file format (safetensors, reference .pt import, path confinement)."""

from __future__ import annotations

import os
import pickle
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_cones2.cones2_core import residual as rmod
from comfyui_cones2.cones2_core.errors import Cones2Error
from comfyui_cones2.cones2_core.families import FAMILIES
from comfyui_cones2.cones2_core.residual import (
    Residual,
    family_from_widths,
    load_residual,
    resolve_residual_path,
    save_residual,
)


def make(family: str = "sd2", n_tokens: int = 1, subject: str = "dog", seed: int = 0, **kw) -> Residual:
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(n_tokens, w, generator=gen) for k, w in FAMILIES[family].widths.items()}
    return Residual(subject, family, tensors, **kw)


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


# --- round trip -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "n_tokens"), [("sd1", 1), ("sd2", 2), ("sdxl", 3), ("flux", 2), ("chroma", 2)])
def test_round_trip_is_bit_exact_and_keeps_metadata(tmp_path, family, n_tokens):
    res = make(family, n_tokens, subject="teddy", metadata={"steps": "800", "cones2.lr": "5e-5"})
    path = tmp_path / f"teddy_{family}.safetensors"
    save_residual(res, path)
    back = load_residual(path)
    assert (back.subject, back.family, back.n_tokens, back.strength) == ("teddy", family, n_tokens, 1.0)
    assert back.source == f"teddy_{family}.safetensors"
    assert set(back.tensors) == set(FAMILIES[family].widths)
    for key, t in res.tensors.items():
        assert back.tensors[key].dtype == torch.float32
        assert torch.equal(back.tensors[key], t)
    assert back.metadata == {"cones2.steps": "800", "cones2.lr": "5e-5"}
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    assert raw == {
        "cones2.format": "1",
        "cones2.subject": "teddy",
        "cones2.family": family,
        "cones2.n_tokens": str(n_tokens),
        "cones2.steps": "800",
        "cones2.lr": "5e-5",
    }
    assert files_in(tmp_path) == [f"teddy_{family}.safetensors"]


def test_half_precision_input_is_stored_as_float32(tmp_path):
    t = torch.randn(1, 1024).half()
    res = Residual("cat", "sd2", {"h": t})
    assert res.tensors["h"].dtype == torch.float32
    save_residual(res, tmp_path / "cat.safetensors")
    with safe_open(str(tmp_path / "cat.safetensors"), framework="pt") as f:
        stored = f.get_tensor("h")
    assert stored.dtype == torch.float32
    assert torch.equal(stored, t.float())


def test_subject_argument_overrides_stored_subject(tmp_path):
    save_residual(make("sd1", subject="dog"), tmp_path / "d.safetensors")
    assert load_residual(tmp_path / "d.safetensors", subject=" puppy ").subject == "puppy"
    assert load_residual(tmp_path / "d.safetensors").subject == "dog"


def test_sd2_subject_file_is_under_5_kb(tmp_path):
    path = tmp_path / "dog.safetensors"
    save_residual(make("sd2", metadata={"steps": "1000", "lr": "5e-5"}), path)
    assert 4096 < os.path.getsize(path) < 5 * 1024


# --- Residual object ------------------------------------------------------------------------------------


def test_copies_never_mutate_the_original():
    src = {"h": torch.randn(1, 1024)}
    res = Residual("dog", "sd2", src, metadata={"steps": "5"})
    src["h"] = torch.zeros(1, 7)  # changing the caller's dict must not reach the residual
    assert res.tensors["h"].shape == (1, 1024)
    strong = res.with_strength(0.5)
    renamed = res.with_subject(" cat ")
    assert (strong.strength, strong.subject) == (0.5, "dog")
    assert (renamed.subject, renamed.strength) == ("cat", 1.0)
    assert (res.strength, res.subject) == (1.0, "dog")
    assert renamed.metadata == {"cones2.steps": "5"} and renamed.tensors["h"] is res.tensors["h"]
    with pytest.raises(AttributeError):
        res.strength = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1.0", None, True])
def test_with_strength_rejects_non_finite_numbers(bad):
    with pytest.raises(Cones2Error, match="strength must be a finite number"):
        make().with_strength(bad)


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_with_subject_rejects_empty_words(bad):
    with pytest.raises(Cones2Error, match="subject word is .*set it to the class word"):
        make().with_subject(bad)


def test_family_from_widths():
    assert family_from_widths({"l": 768}) == "sd1"
    assert family_from_widths({"h": 1024}) == "sd2"
    assert family_from_widths({"g": 1280, "l": 768}) == "sdxl"
    assert family_from_widths({"g": 1280, "l": 768, "t5xxl": 4096}) == "sd3"
    with pytest.raises(Cones2Error, match=r"tensor widths \('g' 1280\) match no supported model family"):
        family_from_widths({"g": 1280})
    with pytest.raises(Cones2Error, match=r"\('h' 768\)"):
        family_from_widths({"h": 768})


@pytest.mark.parametrize(
    ("family", "tensors", "message"),
    [
        (
            "sdxl",
            {"l": torch.zeros(1, 768)},
            "an SDXL residual needs both 'l' (768) and 'g' (1280) tensors; this one has only 'l'",
        ),
        (
            "sd2",
            {"l": torch.zeros(1, 768)},
            "an SD2.x residual needs one 'h' (1024) tensor; this one has 'l'",
        ),
        (
            "sd1",
            {"l": torch.zeros(1, 768), "g": torch.zeros(1, 1280)},
            "an SD1.5 residual needs one 'l' (768) tensor; this one has 'g', 'l'",
        ),
        ("sd1", {}, "an SD1.5 residual needs one 'l' (768) tensor; this one has none"),
        (
            "flux",
            {"l": torch.zeros(1, 768)},
            "a Flux residual needs one 't5xxl' (4096) tensor; this one has 'l'",
        ),
        (
            "flux",
            {"t5xxl": torch.zeros(1, 768)},
            "the 't5xxl' tensor of a Flux residual must have shape [n_tokens, 4096]; got [1, 768]",
        ),
        (
            "sd1",
            {"l": torch.zeros(1, 1024)},
            "the 'l' tensor of an SD1.5 residual must have shape [n_tokens, 768]; got [1, 1024]",
        ),
        (
            "sd2",
            {"h": torch.zeros(1024)},
            "the 'h' tensor of an SD2.x residual must have shape [n_tokens, 1024]; got [1024]",
        ),
        ("sd2", {"h": torch.zeros(0, 1024)}, "the 'h' tensor has no token rows"),
        (
            "sdxl",
            {"l": torch.zeros(2, 768), "g": torch.zeros(1, 1280)},
            "the tensors of encoders that share their rows need the same number of token rows; 'l' has 2, 'g' has 1",
        ),
        ("sd2", {"h": torch.zeros(1, 1024, dtype=torch.int64)}, "must be floating point; got a torch.int64"),
        ("sd9", {"h": torch.zeros(1, 1024)}, "unknown model family 'sd9'; use one of 'sd1' (SD1.5)"),
        (
            "sd3",
            {"l": torch.zeros(1, 768), "g": torch.zeros(1, 1280)},
            "an SD3.5 residual needs the 'l' (768), 'g' (1280) and 't5xxl' (4096) tensors; this one has only 'g', 'l'",
        ),
        (
            "sd3",
            {"l": torch.zeros(1, 768), "g": torch.zeros(2, 1280), "t5xxl": torch.zeros(1, 4096)},
            "the tensors of encoders that share their rows need the same number of token rows; 'l' has 1, 'g' has 2",
        ),
    ],
)
def test_validate_messages(family, tensors, message):
    with pytest.raises(Cones2Error, match=re.escape(message)):
        Residual("dog", family, tensors).validate()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_validate_rejects_non_finite_values(value):
    t = torch.zeros(1, 1280)
    t[0, 5] = value
    with pytest.raises(Cones2Error, match="'g' tensor contains NaN or infinite values"):
        Residual("dog", "sdxl", {"l": torch.zeros(1, 768), "g": t}).validate()


def test_validate_rejects_bad_metadata_and_passes_good_residuals():
    assert make("sdxl", 2).validate().n_tokens == 2
    with pytest.raises(Cones2Error, match="metadata must map strings to strings"):
        make(metadata={"steps": 800}).validate()
    with pytest.raises(Cones2Error, match="'cones2.subject' is reserved"):
        make(metadata={"subject": "cat"}).validate()


# --- saving ---------------------------------------------------------------------------------------------


def test_save_refuses_other_extensions_and_invalid_residuals(tmp_path):
    with pytest.raises(Cones2Error, match=r"saved as \.safetensors; change the file name 'dog\.pt'"):
        save_residual(make(), tmp_path / "dog.pt")
    bad = Residual("dog", "sdxl", {"l": torch.zeros(1, 768)})
    with pytest.raises(Cones2Error, match="needs both 'l' \\(768\\) and 'g' \\(1280\\)"):
        save_residual(bad, tmp_path / "dog.safetensors")
    with pytest.raises(Cones2Error, match="does not exist"):
        save_residual(make(), tmp_path / "missing" / "dog.safetensors")
    assert files_in(tmp_path) == []


def _fail_after_write(monkeypatch, name):
    def boom(*args, **kwargs):
        raise RuntimeError(f"simulated {name} failure")

    monkeypatch.setattr(rmod.os, name, boom)


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_save_leaves_no_file_and_no_temp(tmp_path, monkeypatch, failing):
    _fail_after_write(monkeypatch, failing)
    with pytest.raises(RuntimeError, match=f"simulated {failing} failure"):
        save_residual(make(), tmp_path / "dog.safetensors")
    assert files_in(tmp_path) == []


def test_failed_save_keeps_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "dog.safetensors"
    old = make(seed=1)
    save_residual(old, path)
    before = path.read_bytes()
    _fail_after_write(monkeypatch, "fsync")
    with pytest.raises(RuntimeError):
        save_residual(make(seed=2), path)
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["dog.safetensors"]
    monkeypatch.undo()
    assert torch.equal(load_residual(path).tensors["h"], old.tensors["h"])


def test_save_failure_from_the_os_becomes_a_cones2_error(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rmod.os, "fsync", disk_full)
    with pytest.raises(Cones2Error, match="could not write residual .*No space left on device"):
        save_residual(make(), tmp_path / "dog.safetensors")
    assert files_in(tmp_path) == []


# --- loading safetensors --------------------------------------------------------------------------------


def test_corrupt_safetensors_are_refused(tmp_path):
    good = tmp_path / "good.safetensors"
    save_residual(make(), good)
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(256))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("trunc", "noise", "empty"):
        with pytest.raises(Cones2Error, match=rf"{name}\.safetensors is corrupt or not a safetensors file"):
            load_residual(tmp_path / f"{name}.safetensors")


def test_safetensors_without_cones2_metadata_is_refused(tmp_path):
    save_file({"h": torch.zeros(1, 1024)}, str(tmp_path / "plain.safetensors"))
    save_file({"h": torch.zeros(1, 1024)}, str(tmp_path / "lora.safetensors"), metadata={"format": "pt"})
    for name in ("plain", "lora"):
        with pytest.raises(Cones2Error, match=rf"{name}\.safetensors is not a Cones 2 residual file"):
            load_residual(tmp_path / f"{name}.safetensors")


def test_unknown_format_version_is_refused(tmp_path):
    meta = {"cones2.format": "2", "cones2.subject": "dog", "cones2.family": "sd2"}
    save_file({"h": torch.zeros(1, 1024)}, str(tmp_path / "v2.safetensors"), metadata=meta)
    with pytest.raises(Cones2Error, match="format '2', but this version reads format '1'; update"):
        load_residual(tmp_path / "v2.safetensors")


def test_loaded_files_are_validated_and_errors_name_the_file(tmp_path):
    meta = {"cones2.format": "1", "cones2.subject": "dog", "cones2.family": "sdxl"}
    save_file({"l": torch.zeros(1, 768)}, str(tmp_path / "half.safetensors"), metadata=meta)
    with pytest.raises(
        Cones2Error, match=r"^half\.safetensors: an SDXL residual needs both .* this one has only 'l'$"
    ):
        load_residual(tmp_path / "half.safetensors")
    nan = torch.zeros(1, 1024)
    nan[0, 0] = float("nan")
    save_file({"h": nan}, str(tmp_path / "nan.safetensors"), metadata={**meta, "cones2.family": "sd2"})
    with pytest.raises(Cones2Error, match=r"^nan\.safetensors: the 'h' tensor contains NaN"):
        load_residual(tmp_path / "nan.safetensors")
    tokens = {**meta, "cones2.family": "sd2", "cones2.n_tokens": "3"}
    save_file({"h": torch.zeros(1, 1024)}, str(tmp_path / "tok.safetensors"), metadata=tokens)
    with pytest.raises(Cones2Error, match="tok.safetensors is corrupt: its metadata says 3 tokens"):
        load_residual(tmp_path / "tok.safetensors")


def test_missing_family_is_inferred_from_widths(tmp_path):
    meta = {"cones2.format": "1", "cones2.subject": "cat"}
    save_file(
        {"l": torch.ones(1, 768), "g": torch.ones(1, 1280)}, str(tmp_path / "x.safetensors"), metadata=meta
    )
    assert load_residual(tmp_path / "x.safetensors").family == "sdxl"


def test_widths_two_families_share_are_refused_without_family_metadata(tmp_path):
    """Flux's and Chroma's T5-XXL rows are both 4096 wide: a file without cones2.family is refused, saying what to
    set, instead of being read as whichever family comes first; with the metadata each loads as its own."""
    meta = {"cones2.format": "1", "cones2.subject": "dog"}
    save_file({"t5xxl": torch.ones(2, 4096)}, str(tmp_path / "t5.safetensors"), metadata=meta)
    with pytest.raises(Cones2Error, match=r"could be Flux \('flux'\) or Chroma \('chroma'\).*'cones2.family'"):
        load_residual(tmp_path / "t5.safetensors")
    for key in ("flux", "chroma"):
        save_file({"t5xxl": torch.ones(2, 4096)}, str(tmp_path / f"{key}.safetensors"),
                  metadata={**meta, "cones2.family": key})
        assert load_residual(tmp_path / f"{key}.safetensors").family == key


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "dog.ckpt").write_bytes(b"x")
    with pytest.raises(
        Cones2Error, match=r"dog\.ckpt: unsupported .* use one of \.safetensors, \.pt, \.pth, \.bin"
    ):
        load_residual(tmp_path / "dog.ckpt")
    with pytest.raises(Cones2Error, match="residual file 'nope.safetensors' not found"):
        load_residual(tmp_path / "nope.safetensors")


# --- reference .pt import -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1024), (1024,)])
def test_reference_pt_imports_as_sd2(tmp_path, shape):
    t = torch.randn(*shape)
    path = tmp_path / "my_dog.pt"
    torch.save(t, path)
    res = load_residual(path, subject="dog")
    assert (res.subject, res.family, res.n_tokens, res.source) == ("dog", "sd2", 1, "my_dog.pt")
    assert list(res.tensors) == ["h"] and res.tensors["h"].shape == (1, 1024)
    assert torch.equal(res.tensors["h"], t.reshape(1, 1024))
    assert res.metadata == {"cones2.imported_from": "reference-pt"}
    assert load_residual(path).subject == "my_dog"


def test_reference_import_can_be_resaved_as_safetensors(tmp_path):
    torch.save({"cat": torch.randn(1024)}, tmp_path / "cat.bin")
    res = load_residual(tmp_path / "cat.bin")
    save_residual(res, tmp_path / "cat.safetensors")
    back = load_residual(tmp_path / "cat.safetensors")
    assert (back.subject, back.family) == ("cat", "sd2")
    assert back.metadata == {"cones2.imported_from": "reference-pt"}
    assert torch.equal(back.tensors["h"], res.tensors["h"])


def test_reference_768_wide_imports_as_sd1(tmp_path):
    torch.save(torch.randn(2, 768), tmp_path / "vase.pth")
    res = load_residual(tmp_path / "vase.pth")
    assert (res.family, list(res.tensors), res.n_tokens) == ("sd1", ["l"], 2)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (torch.randn(1, 1280), r"shape \[1, 1280\]; reference residuals must be \[1024\]"),
        (torch.randn(2, 2, 1024), r"shape \[2, 2, 1024\]"),
        ({"a": torch.randn(1024), "b": torch.randn(1024)}, "dict with keys 'a', 'b'"),
        ([torch.randn(1024)], "holds a list; a reference residual file must hold one floating-point tensor"),
        (torch.zeros(1024, dtype=torch.int32), "holds a torch.int32 tensor"),
    ],
)
def test_reference_files_with_other_contents_are_refused(tmp_path, obj, message):
    torch.save(obj, tmp_path / "odd.pt")
    with pytest.raises(Cones2Error, match=message):
        load_residual(tmp_path / "odd.pt")


def test_corrupt_reference_file_is_refused(tmp_path):
    torch.save(torch.randn(1024), tmp_path / "ok.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:300])
    with pytest.raises(Cones2Error, match=r"trunc\.pt is corrupt or not a torch tensor file"):
        load_residual(tmp_path / "trunc.pt")


class Payload:
    """Unpickling this creates the file ``marker``: a stand-in for code execution."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_payload_really_runs_when_unpickled_unsafely(tmp_path):
    # Control for the test below: a permissive loader does run the payload.
    marker = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(Payload(str(marker)))).close()
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned_marker"
    path = tmp_path / "evil.pt"
    payload = {"h": Payload(str(marker))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(
        Cones2Error, match=r"refused to load evil\.pt: it needs unpickling of arbitrary Python objects"
    ):
        load_residual(path)
    assert not marker.exists()


# --- path confinement -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../x.safetensors", "uses '..'"),
        ("a/../../b.safetensors", "uses '..'"),
        ("sub\\..\\..\\b.safetensors", "uses '..'"),
        ("/etc/passwd", "absolute path"),
        ("C:\\Windows\\evil.safetensors", "absolute path"),
        ("", "empty name"),
        ("  ", "empty name"),
        ("dog\x00.safetensors", "NUL byte"),
        (".", "names the folder itself"),
    ],
)
def test_resolve_refuses_names_that_leave_the_folder(tmp_path, name, reason):
    with pytest.raises(
        Cones2Error, match=rf"^residual file names must be relative to models/cones2_residuals/; .*{reason}"
    ):
        resolve_residual_path(str(tmp_path), name)


def test_resolve_accepts_relative_names(tmp_path):
    root = str(tmp_path)
    assert resolve_residual_path(root, "sub/dog.safetensors") == os.path.join(root, "sub/dog.safetensors")
    assert resolve_residual_path(root, "dog.safetensors") == os.path.join(root, "dog.safetensors")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_resolve_refuses_symlink_escapes(tmp_path):
    root, outside = tmp_path / "residuals", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    save_residual(make(), outside / "secret.safetensors")
    try:
        os.symlink(outside, root / "escape", target_is_directory=True)
        os.symlink(outside / "secret.safetensors", root / "link.safetensors")
        os.symlink(root / "escape", root / "inner")  # a link to a link that leaves the folder
    except OSError:
        pytest.skip("symlinks not permitted here")
    for name in ("escape/secret.safetensors", "link.safetensors", "inner/secret.safetensors"):
        with pytest.raises(Cones2Error, match="resolves to .*outside that folder"):
            resolve_residual_path(str(root), name)
    (root / "real").mkdir()
    os.symlink(root / "real", root / "alias")  # links that stay inside are fine
    assert resolve_residual_path(str(root), "alias/dog.safetensors") == os.path.join(
        str(root), "alias/dog.safetensors"
    )


def test_sd3_residual_rows_agree_within_a_row_group_only():
    """SD3.5's CLIP-L and CLIP-G share their rows (the same count); its T5 rows are their own group, where the word
    may have another token count (a word of 2 CLIP tokens and 3 T5 tokens is a valid residual)."""
    res = Residual("corgi", "sd3", {"l": torch.zeros(2, 768), "g": torch.zeros(2, 1280),
                                    "t5xxl": torch.zeros(3, 4096)}).validate()
    assert res.tensors["t5xxl"].shape == (3, 4096)
