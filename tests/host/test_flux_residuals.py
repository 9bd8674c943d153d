"""Residuals on Flux through the real host: the tiny Flux bed (harness/tiny_flux.py) loads through the host's
loaders, and Apply Residuals adds a residual at the subject's T5 rows only."""

from __future__ import annotations

import os

import pytest
import torch

from comfyui_cones2.cones2_core.errors import Cones2Error
from comfyui_cones2.cones2_core.families import FAMILIES
from harness.test_helpers import FLUX_T5_TOKENS as SHORT
from harness.test_helpers import apply_residuals as apply
from harness.test_helpers import independent_rows, short_clip, text_encode


def make_residual(pack, subject="dog", n_tokens=1, seed=0, strength=1.0, fam="flux"):
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(n_tokens, w, generator=g) for k, w in FAMILIES[fam].widths.items()}
    return pack.cones2_core.residual.Residual(subject=subject, family=fam, tensors=tensors, strength=strength)


def test_bed_loads_through_the_host_as_flux(pack, flux, tiny_flux):
    import comfy.latent_formats
    import comfy.model_base
    import comfy.utils

    model, clip, vae = flux
    assert type(model.model) is comfy.model_base.Flux
    assert isinstance(model.model.latent_format, comfy.latent_formats.Flux)
    assert model.model.latent_format.latent_channels == 16 and vae.latent_channels == 16
    cfg = model.model.model_config.unet_config
    assert (cfg["depth"], cfg["depth_single_blocks"], cfg["hidden_size"], cfg["context_in_dim"]) == (1, 1, 3072, 4096)
    assert cfg["guidance_embed"] is True and cfg["vec_in_dim"] == 768
    file_keys = set(comfy.utils.load_torch_file(tiny_flux["unet"]))
    assert set(model.model.diffusion_model.state_dict()) == file_keys  # nothing missing, nothing left over
    assert 5.0e8 < sum(p.numel() for p in model.model.diffusion_model.parameters()) < 6.0e8
    assert set(clip.tokenize("a dog")) == {"l", "t5xxl"}
    t5 = clip.cond_stage_model.t5xxl.transformer
    assert (t5.num_layers, t5.shared.weight.shape[1]) == (1, 4096)  # the small T5 of T5-XXL's width
    assert pack.nodes.encoding.clip_family(clip).key == "flux"
    cond = text_encode(clip, "a photo of a dog")
    assert cond[0][0].shape == (1, 256, 4096) and cond[0][1]["pooled_output"].shape == (1, 768)


def test_no_residuals_equals_clip_text_encode_and_records_t5_rows(pack, flux):
    clip = flux[1]
    text = "a photo of a (dog:1.3) on the beach"
    base = text_encode(clip, text)
    out = apply(pack, clip, text, None)
    assert len(out) == len(base) == 1
    assert torch.equal(out[0][0], base[0][0])
    assert torch.equal(out[0][1]["pooled_output"], base[0][1]["pooled_output"])
    record = out[0][1]["cones2"]
    assert record.family == "flux" and record.n_tokens == 256 and record.token_text == {}
    # T5 has no start token: "a" is "▁" + "a" (rows 0, 1), "photo" row 2, ... "dog" row 6
    assert record.words["a"] == (0, 1, 4, 5) and record.words["photo"] == (2,)
    assert list(record.words["dog"]) == independent_rows(clip, text, "dog", "t5xxl") == [6]
    short = apply(pack, short_clip(clip), text, None)[0]
    assert short[0].shape == (1, SHORT, 4096) and short[1]["cones2"].n_tokens == SHORT
    assert short[1]["cones2"].words == record.words


@pytest.mark.parametrize("min_length", [SHORT, 256])
def test_residual_added_exactly_at_subject_t5_rows(pack, flux, min_length):
    clip = short_clip(flux[1], min_length)
    text = "a photo of a dog next to another dog"
    res = make_residual(pack, strength=0.7)
    base = text_encode(clip, text)[0]
    out = apply(pack, clip, text, [res])[0]
    rows = independent_rows(clip, text, "dog", "t5xxl")
    assert rows == [6, 10] and out[0].shape == base[0].shape == (1, min_length, 4096)
    changed = (out[0] != base[0]).any(-1)[0].nonzero().flatten().tolist()
    assert changed == rows  # every other row bit-identical
    for r in rows:
        torch.testing.assert_close(out[0][0, r] - base[0][0, r], 0.7 * res.tensors["t5xxl"][0], atol=1e-5, rtol=0)
    assert torch.equal(out[1]["pooled_output"], base[1]["pooled_output"])  # CLIP-L's pooled output untouched
    assert list(out[1]["cones2"].words["dog"]) == rows and out[1]["cones2"].family == "flux"


def test_multi_token_subject_covers_all_its_t5_rows(pack, flux):
    clip = short_clip(flux[1], 24)
    text = "a dalmatian on a sofa"
    n = len(pack.nodes.encoding.word_tokens(clip, "dalmatian")["t5xxl"])
    assert n > 1 and set(pack.nodes.encoding.word_tokens(clip, "dalmatian")) == {"t5xxl"}  # never CLIP-L's
    res = make_residual(pack, "dalmatian", n_tokens=n, seed=3)
    base = text_encode(clip, text)[0][0]
    out = apply(pack, clip, text, [res])[0][0]
    rows = independent_rows(clip, text, "dalmatian", "t5xxl")
    assert len(rows) == n and rows[0] == 2  # after "▁" "a"
    torch.testing.assert_close(out[0, rows] - base[0, rows], res.tensors["t5xxl"], atol=1e-5, rtol=0)
    assert (out != base).any(-1)[0].nonzero().flatten().tolist() == rows
    with pytest.raises(Cones2Error, match=rf"has 1 token rows but the word 'dalmatian' has {n} token"):
        apply(pack, clip, text, [make_residual(pack, "dalmatian")])


def test_wrong_subject_and_wrong_family_are_clear_errors(pack, flux, loaded):
    clip = short_clip(flux[1])
    with pytest.raises(Cones2Error, match=r"the subject word 'horse' .* is not in the prompt; the prompt's words are: "
                                          r"a, photo, of, dog\. Add 'horse'"):
        apply(pack, clip, "a photo of a dog", [make_residual(pack, "horse")])
    with pytest.raises(Cones2Error, match=r"is for SD1\.5 \(CLIP-L 768\) but the connected CLIP is Flux \(T5-XXL "
                                          r"4096\): connect the CLIP of an SD1\.5 model or use a residual made for Flux"):
        apply(pack, clip, "a photo of a dog", [make_residual(pack, fam="sd1")])
    sd1_clip = loaded("sd1")[1]
    with pytest.raises(Cones2Error, match=r"is for Flux \(T5-XXL 4096\) but the connected CLIP is SD1\.5 \(CLIP-L "
                                          r"768\): connect the CLIP of a Flux model or use a residual made for SD1\.5"):
        apply(pack, sd1_clip, "a photo of a dog", [make_residual(pack)])


def test_residual_changes_the_flux_sample(pack, flux):
    """A 64x64 (16 image tokens), 2-step euler sample at cfg 1 (the model's default guidance 3.5): equal to
    CLIPTextEncode's without residuals, deterministic, and moved by a residual at the subject's rows."""
    import nodes

    model, clip = flux[0], short_clip(flux[1])
    text = "a photo of a dog"
    latent = {"samples": torch.zeros(1, 16, 8, 8)}

    def sample(cond):
        return nodes.common_ksampler(model, 7, 2, 1.0, "euler", "simple", cond, cond, latent)[0]["samples"]

    plain = sample(text_encode(clip, text))
    assert plain.shape == (1, 16, 8, 8) and torch.isfinite(plain).all() and plain.std() > 0.1
    assert torch.equal(sample(apply(pack, clip, text, None)), plain)
    res = make_residual(pack, seed=5)
    with_res = sample(apply(pack, clip, text, [res]))
    moved = (with_res - plain).abs().mean() / plain.abs().mean()
    assert moved > 1e-3, float(moved)  # 1.5% with this bed and seed
    other = sample(text_encode(clip, "a photo of a cat"))
    assert (other - plain).abs().mean() > 0  # the text reaches the image


def test_flux_residual_files_and_the_dev_loader_through_the_server(pack, flux_server):
    """The real server: the dev-only CLIP loader sits next to the pack (never in it); a Flux graph with a
    Flux residual file (UNETLoader, the dev loader, T5TokenizerOptions, Load Residual, Apply Residuals,
    FluxGuidance, KSampler, VAEDecode, SaveImage) runs and saves an image."""
    from harness.client import ComfyClient, PromptFailed

    client = ComfyClient(flux_server.url)
    assert "Cones2DevTinyFluxCLIPLoader" in client.object_info()
    import asyncio

    ours = asyncio.run(asyncio.run(pack.nodes.comfy_entrypoint()).get_node_list())
    assert ours and not any(n.define_schema().node_id.startswith("Cones2Dev") for n in ours)
    pack.cones2_core.residual.save_residual(make_residual(pack, seed=9),
                                            os.path.join(flux_server.models_dir("cones2_residuals"), "flux_dog.safetensors"))
    files = flux_server.flux_files

    def graph(text):
        return {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["unet"], "weight_dtype": "default"}},
            "2": {"class_type": "Cones2DevTinyFluxCLIPLoader", "inputs": {"clip_l_name": files["clip_l"],
                                                                         "t5_name": files["t5"]}},
            "3": {"class_type": "T5TokenizerOptions", "inputs": {"clip": ["2", 0], "min_padding": 0, "min_length": SHORT}},
            "4": {"class_type": "Cones2LoadResidual", "inputs": {"residual_name": "flux_dog.safetensors", "strength": 1.0,
                                                                 "subject": ""}},
            "5": {"class_type": "Cones2ApplyResiduals", "inputs": {"clip": ["3", 0], "text": text, "residuals": ["4", 0]}},
            "6": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["5", 0], "guidance": 3.5}},
            "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["6", 0], "negative": ["6", 0],
                                                       "latent_image": ["7", 0], "seed": 1, "steps": 2, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
            "9": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}},
            "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["9", 0]}},
            "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "flux"}},
        }

    entry = client.run(graph("a photo of a dog"))
    assert len(client.output_files(entry, flux_server.output_dir, node_id="11")) == 1
    with pytest.raises(PromptFailed) as err:
        client.run(graph("a photo of a horse"))
    assert err.value.exception_type.endswith("Cones2Error") and "'dog'" in err.value.exception_message
