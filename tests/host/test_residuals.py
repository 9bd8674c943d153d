"""Residuals through the real host: Load Residual and Apply Residuals to Conditioning (SD1.5, SD2.x, SDXL)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from comfyui_cones2.cones2_core.errors import Cones2Error
from comfyui_cones2.cones2_core.families import FAMILIES
from harness import tiny_checkpoints
from harness.test_helpers import independent_rows

# The tiny checkpoints exist for the UNet families (Flux has its own bed: test_flux_*.py).
UNET_FAMILIES = sorted(k for k, f in FAMILIES.items() if f.architecture == "unet")


@pytest.fixture(scope="module")
def clips(comfy, tiny_ckpts):
    import comfy.sd

    out = {}
    for fam, path in tiny_ckpts.items():
        _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=True)
        out[fam] = clip
    return out


def make_residual(pack, fam, subject="dog", n_tokens=1, seed=0, strength=1.0):
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(n_tokens, w, generator=g) for k, w in FAMILIES[fam].widths.items()}
    return pack.cones2_core.residual.Residual(subject=subject, family=fam, tensors=tensors, strength=strength)


def text_encode(clip, text):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def apply(pack, clip, text, residuals):
    node = pack.nodes.residual_nodes.Cones2ApplyResiduals
    return node.execute(clip, text, residuals).result[0]


def expected(pack, fam, base, positions_by_res):
    """base + strength * residual at the given rows, channel block by encoder."""
    exp = base.clone()
    for res, rows in positions_by_res:
        for enc in FAMILIES[fam].encoders:
            off, w = enc.offset, enc.width
            for r in rows:
                exp[0, r, off:off + w] = exp[0, r, off:off + w] + res.tensors[enc.key][0] * res.strength
    return exp


@pytest.mark.parametrize("fam", UNET_FAMILIES)
def test_two_subjects_compose_additively(pack, clips, fam):
    clip = clips[fam]
    text = "a dog and a cat on a sofa"
    dog, cat = make_residual(pack, fam, "dog", seed=1), make_residual(pack, fam, "cat", seed=2, strength=1.5)
    base = text_encode(clip, text)[0][0]
    both = apply(pack, clip, text, [dog, cat])[0][0]
    only_dog = apply(pack, clip, text, [dog])[0][0]
    only_cat = apply(pack, clip, text, [cat])[0][0]
    assert torch.allclose(both - base, (only_dog - base) + (only_cat - base), atol=1e-6)
    assert torch.equal(both, expected(pack, fam, base, [(dog, independent_rows(clip, text, "dog", next(iter(clip.tokenize(text))))),
                                                        (cat, independent_rows(clip, text, "cat", next(iter(clip.tokenize(text)))))]))


def test_long_prompt_places_residual_in_second_chunk(pack, clips):
    clip = clips["sd1"]
    text = ", ".join(["a red house"] * 30) + ", a dog"
    res = make_residual(pack, "sd1")
    base = text_encode(clip, text)[0][0]
    assert base.shape[1] >= 154  # more than one 77-token chunk
    out = apply(pack, clip, text, [res])[0][0]
    rows = independent_rows(clip, text, "dog", next(iter(clip.tokenize(text))))
    assert len(rows) == 1 and rows[0] > 77
    assert torch.equal(out, expected(pack, "sd1", base, [(res, rows)]))


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_weighted_prompt(pack, clips, fam):
    clip = clips[fam]
    text = "a photo of a (dog:1.4), (cat:0.8)"
    res = make_residual(pack, fam)
    base = text_encode(clip, text)[0][0]
    out = apply(pack, clip, text, [res])[0][0]
    rows = independent_rows(clip, text, "dog", next(iter(clip.tokenize(text))))
    assert rows == [5]
    assert torch.equal(out, expected(pack, fam, base, [(res, rows)]))


def test_multi_token_word(pack, clips):
    clip = clips["sd1"]
    word = "corgipuppers"
    ntok = len([t for t, _w, wid in clip.tokenize(word, return_word_ids=True)["l"][0] if wid != 0])
    assert ntok >= 2
    res = make_residual(pack, "sd1", subject=word, n_tokens=ntok)
    text = f"a {word} in the snow"
    base = text_encode(clip, text)[0][0]
    out = apply(pack, clip, text, [res])[0][0]
    changed = (out != base).any(-1)[0].nonzero().flatten().tolist()
    assert changed == list(range(2, 2 + ntok))
    assert torch.equal(out[0, 2:2 + ntok], base[0, 2:2 + ntok] + res.tensors["l"])


def test_error_subject_missing_lists_words(pack, clips):
    with pytest.raises(Cones2Error, match=r"'dog' .* not in the prompt; the prompt's words are: a, photo, of, cat"):
        apply(pack, clips["sd1"], "a photo of a cat", [make_residual(pack, "sd1")])
    # nothing half-applied: a good residual before the bad one does not produce an output either
    with pytest.raises(Cones2Error):
        apply(pack, clips["sd1"], "a photo of a cat", [make_residual(pack, "sd1", "cat"), make_residual(pack, "sd1")])


def test_error_residual_with_more_tokens_than_word(pack, clips):
    with pytest.raises(Cones2Error, match=r"has 2 token rows but the word 'dog' has 1 token"):
        apply(pack, clips["sd1"], "a dog", [make_residual(pack, "sd1", n_tokens=2)])


def test_error_sdxl_residual_missing_half(pack):
    Residual = pack.cones2_core.residual.Residual
    with pytest.raises(Cones2Error, match=r"SDXL residual needs both 'l' \(768\) and 'g' \(1280\)"):
        Residual(subject="dog", family="sdxl", tensors={"l": torch.randn(1, 768)}).validate()


@pytest.fixture
def residual_dir(pack, tmp_path, monkeypatch):
    import folder_paths

    folder = tmp_path / "cones2_residuals"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "cones2_residuals",
                        ([str(folder)], {".safetensors", ".pt"}))
    return folder


def test_load_residual_node_chain_and_strength(pack, clips, residual_dir):
    save = pack.cones2_core.residual.save_residual
    save(make_residual(pack, "sd1", "dog", seed=3), str(residual_dir / "my_dog.safetensors"))
    torch.save(torch.randn(1, 1024), str(residual_dir / "ref_cat.pt"))
    node = pack.nodes.residual_nodes.Cones2LoadResidual
    chain = node.execute("my_dog.safetensors", 0.5).result[0]
    assert len(chain) == 1 and chain[0].subject == "dog" and chain[0].strength == 0.5
    chain2 = node.execute("ref_cat.pt", 1.0, "cat", chain).result[0]
    assert [r.subject for r in chain2] == ["dog", "cat"] and len(chain) == 1  # input chain not mutated
    assert chain2[1].family == "sd2" and chain2[1].tensors["h"].shape == (1, 1024)
    # strength flows through to the conditioning
    out = apply(pack, clips["sd1"], "a dog", chain)[0][0]
    base = text_encode(clips["sd1"], "a dog")[0][0]
    assert torch.equal(out[0, 2], base[0, 2] + chain[0].tensors["l"][0] * 0.5)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_residual_node_refuses_pickle_and_traversal(pack, residual_dir, tmp_path):
    marker = tmp_path / "pwned"
    with open(residual_dir / "evil.pt", "wb") as f:
        pickle.dump(_Evil(str(marker)), f)
    node = pack.nodes.residual_nodes.Cones2LoadResidual
    with pytest.raises(Cones2Error, match="refused to load"):
        node.execute("evil.pt", 1.0)
    assert not marker.exists()
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    with pytest.raises(Cones2Error, match="must be relative to models/cones2_residuals"):
        node.execute("../outside.safetensors", 1.0)
    with pytest.raises(Cones2Error, match="must be relative to models/cones2_residuals"):
        node.execute(str(tmp_path / "outside.safetensors"), 1.0)


def test_sd2_residual_file_under_5kb(pack, tmp_path):
    path = tmp_path / "dog.safetensors"
    pack.cones2_core.residual.save_residual(make_residual(pack, "sd2"), str(path))
    assert os.path.getsize(path) < 5 * 1024


# ---- through the real server ------------------------------------------------------------------------------

def _residual_prompt(ckpt, text, loads):
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    prev = None
    for i, (name, strength, subject) in enumerate(loads):
        nid = str(10 + i)
        inputs = {"residual_name": name, "strength": strength, "subject": subject}
        if prev:
            inputs["residuals"] = [prev, 0]
        prompt[nid] = {"class_type": "Cones2LoadResidual", "inputs": inputs}
        prev = nid
    apply_inputs = {"clip": ["1", 1], "text": text}
    if prev:
        apply_inputs["residuals"] = [prev, 0]
    prompt.update({
        "2": {"class_type": "Cones2ApplyResiduals", "inputs": apply_inputs},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                    "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "residuals"}},
    })
    return prompt


def test_nodes_listed_with_tooltips_and_descriptions(client):
    info = client.object_info()
    ours = {k: v for k, v in info.items() if k.startswith("Cones2")}
    assert {"Cones2LoadResidual", "Cones2ApplyResiduals"} <= set(ours)
    for node_id, spec in ours.items():
        assert spec["description"], node_id
        assert spec["display_name"].startswith("Cones2 ")
        for section in ("required", "optional"):
            for name, inp in spec["input"].get(section, {}).items():
                assert len(inp) > 1 and inp[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_residuals_through_server(server, client, pack):
    from harness.client import PromptFailed

    folder = server.models_dir("cones2_residuals")
    save = pack.cones2_core.residual.save_residual
    save(make_residual(pack, "sd1", "dog", seed=5), os.path.join(folder, "srv_dog.safetensors"))
    save(make_residual(pack, "sd1", "cat", seed=6), os.path.join(folder, "srv_cat.safetensors"))
    assert {"srv_dog.safetensors", "srv_cat.safetensors"} <= set(server.get_json("/models/cones2_residuals"))
    info = client.object_info("Cones2LoadResidual")["Cones2LoadResidual"]
    assert "srv_dog.safetensors" in info["input"]["required"]["residual_name"][1]["options"] or \
        "srv_dog.safetensors" in info["input"]["required"]["residual_name"][0]
    ckpt = tiny_checkpoints.FAMILIES["sd1"]["file"]
    entry = client.run(_residual_prompt(ckpt, "a dog and a cat", [("srv_dog.safetensors", 1.0, ""),
                                                                  ("srv_cat.safetensors", 0.8, "")]))
    assert len(client.output_files(entry, server.output_dir, node_id="7")) == 1
    with pytest.raises(PromptFailed) as err:
        client.run(_residual_prompt(ckpt, "a photo of a horse", [("srv_dog.safetensors", 1.0, "")]))
    assert err.value.exception_type.endswith("Cones2Error")
    assert "'dog'" in err.value.exception_message and "horse" in err.value.exception_message
