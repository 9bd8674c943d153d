"""Foundation: the real ComfyUI host loads the pack, detects the tiny checkpoints and generates with them."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from comfyui_cones2.cones2_core.families import FAMILIES, by_context_width
from harness import tiny_checkpoints
from harness.workflows import basic_txt2img

EXPECTED = {  # family -> (host model class, model type, text encoder class)
    "sd1": ("SD15", "EPS", "SD1ClipModel"),
    "sd2": ("SD20", "V_PREDICTION", "SD2ClipModel"),
    "sdxl": ("SDXL", "EPS", "SDXLClipModel"),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_tiny_checkpoint_detection(comfy, tiny_ckpts, family):
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(tiny_ckpts[family], output_vae=True, output_clip=True)
    cls, mtype, clip_cls = EXPECTED[family]
    assert type(model.model.model_config).__name__ == cls
    assert model.model.model_type.name == mtype
    assert type(clip.cond_stage_model).__name__ == clip_cls
    assert vae is not None
    n_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    assert n_params < 200e6, "the tiny UNets must stay small"


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_family_record_matches_the_host_models(pack, loaded, family):
    """The family table against what the host builds: the record is found from the CLIP's tokenizer keys and the
    model's context width, the encoders' widths add up to the model's context_dim, and each encoder's own output
    sits at its record's channels of the whole conditioning."""
    import torch

    f = FAMILIES[family]
    model, clip = loaded(family)
    assert pack.nodes.encoding.clip_family(clip) is f
    context_dim = model.model.model_config.unet_config["context_dim"]
    assert context_dim == f.width and by_context_width(context_dim) is f
    tokens = clip.tokenize("a dog on a sofa")
    cond = clip.encode_from_tokens(tokens)
    assert cond.shape[-1] == f.width
    for enc in f.encoders:
        own = getattr(clip.cond_stage_model, f"clip_{enc.key}").encode_token_weights(tokens[enc.key])[0]
        assert own.shape[-1] == enc.width, enc
        n = min(own.shape[1], cond.shape[1])
        assert torch.allclose(cond[:, :n, enc.offset:enc.offset + enc.width], own[:, :n].to(cond), atol=1e-5), enc


def test_tiny_checkpoints_are_deterministic(comfy, tmp_path):
    path = tiny_checkpoints.build("sd1", str(tmp_path / "a.safetensors"))
    import safetensors.torch

    a = safetensors.torch.load_file(path)
    b = safetensors.torch.load_file(tiny_checkpoints.ensure(str(tmp_path / "b"), ["sd1"])["sd1"])
    assert a.keys() == b.keys()
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert (a[key] == b[key]).all() and a[key].float().std() > 0
    assert not any(os.path.basename(p).endswith(".tmp") for p in os.listdir(tmp_path))


def test_pack_loads_in_server(server):
    assert server.pack_loaded(), server.log_tail()
    assert server.pack_import_failure() is None


def test_residual_model_folder_registered(server):
    assert "cones2_residuals" in server.get_json("/models")
    listed = server.get_json("/models/cones2_residuals")  # the session server holds the demo residuals
    assert {"demo_dog.safetensors", "demo_cat.safetensors"} <= set(listed)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_basic_generation_through_server(server, client, family):
    ckpt = tiny_checkpoints.FAMILIES[family]["file"]
    width, height = (64, 96) if family != "sd2" else (64, 64)
    prompt = basic_txt2img(ckpt, width=width, height=height, prefix=f"basic_{family}")
    entry = client.run(prompt, timeout=300)
    files = client.output_files(entry, server.output_dir, node_id="7")
    assert len(files) == 1 and os.path.isfile(files[0])
    with Image.open(files[0]) as im:
        assert im.size == (width, height)
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 1, "a flat image means the pipeline did not run"


def test_a_failed_checkpoint_build_says_which_builder_and_why(host_dir, tmp_path):
    """harness.host.build (every fixture's and benchmark's builds): a builder that fails raises BuildFailed naming
    the builder, its exit code and its error output, instead of a parse error on its missing paths."""
    from harness.host import BuildFailed, build

    with pytest.raises(BuildFailed, match=r"tiny_checkpoints\.py failed with exit code [1-9]") as e:
        build(tiny_checkpoints.__file__, host_dir, "no_such_family", out=str(tmp_path))
    assert "no_such_family" in str(e.value)
