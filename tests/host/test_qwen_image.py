"""Qwen-Image's own behaviour, through the real host's Qwen-Image classes, tokenizer and samplers.

* Layout Guidance on its joint attention, on a small Qwen-Image built in-process (the host's
  ``model_base.QwenImage`` and ``comfy.ldm.qwen_image`` block, hidden 64, text width 3584 as the real one, one block, random weights): the bias the
  host's attention receives equals the documented formula re-derived in float64; a soft layout's in-box share
  rises with the positive weight; a reference latent (Qwen-Image-Edit's ReferenceLatent) is attended unbiased.
* The word finder on the host's Qwen2.5 tokenizer (byte-level BPE behind a chat template), against the
  independent search of harness.test_helpers and on the cases that make it differ from CLIP's.
* On the loader-detected bed (harness/tiny_qwen_image.py): the causal LLM carries the subject word into every
  later row, which a residual at the word's own rows leaves as it is (measured).
"""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_cones2.cones2_core.errors import Cones2Error
from harness.beds import BEDS
from harness.host import build
from harness.test_helpers import (
    assert_composes_with_controlnet,
    assert_share_rises_with_positive_weight,
    controlled,
    independent_rows,
    randomise,
)

TWO_BOXES = ('{"version":1,"boxes":[{"subject":"dog","x":0.0,"y":0.0,"w":0.5,"h":1.0},'
             '{"subject":"cat","x":0.5,"y":0.1,"w":0.5,"h":0.9}]}')
T = 12  # text rows of the hand-made prompt
WORDS = {"dog": [1], "cat": [4]}
SMALL_QWEN = {"image_model": "qwen_image", "in_channels": 64, "num_layers": 1, "num_attention_heads": 2,
              "attention_head_dim": 32, "joint_attention_dim": 3584, "axes_dims_rope": (8, 12, 12)}


@pytest.fixture(scope="module")
def small_qwen(comfy, pack):
    """(MODEL, positive, negative): the small Qwen-Image and a prompt whose record says where 'dog' and 'cat' are."""
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.QwenImage(dict(SMALL_QWEN))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _name, p in sorted(model.diffusion_model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 if p.ndim > 1 else torch.ones(p.shape))
    mp = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    record = pack.cones2_core.prompt.PromptRecord("a dog and a cat", "qwen_image", T,
                                                  {w: tuple(r) for w, r in WORDS.items()})
    pos = [[torch.randn(1, T, 3584, generator=g), {"cones2": record}]]
    neg = [[torch.randn(1, T, 3584, generator=g) * 0.1, {}]]
    return mp, pos, neg


def guide(pack, model, cond, gw=0.08, pw=2.5, nw=-1e8, record=True):
    node = pack.nodes.layout_node.Cones2LayoutGuidance
    return node.execute(model, cond, TWO_BOXES, gw, pw, nw, 0.0, 1.0, False, record_maps=record).result


def sample(model, pos, neg, cfg=2.5, seed=1, steps=2, h=64, w=80):
    import nodes

    latent = {"samples": torch.zeros(1, 16, h // 8, w // 8)}
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]


def shares(pack, model) -> dict[str, float]:
    return {r["subject"]: r["share"] for r in pack.nodes.maps_node.attention_report(model)}


def documented_bias(q, k, heads, txt, n, weight_map, t, gw):
    """The Cones 2 mask of cones2_core/joint_attention.py's docstring, in float64 from the host's [B, L, heads*d]
    q and k: on image rows x text columns, scale * gw * W * log(1 + sigma^2) * std(Q_img K_txt^T) with std
    unbiased over heads, image and text tokens and sigma = t / (1 - t) capped at SD's 14.6146; zero elsewhere."""
    b, length, c = q.shape
    d = c // heads
    q4 = q.double().view(b, length, heads, d).transpose(1, 2)
    k4 = k.double().view(b, length, heads, d).transpose(1, 2)
    mask = torch.zeros(b, 1, length, length, dtype=torch.float64)
    for i in range(b):
        s = q4[i, :, txt:txt + n] @ k4[i, :, :txt].transpose(-1, -2)
        ti = float(t[i] if len(t) > 1 else t[0])
        sigma = 14.6146 if ti >= 1 else min(ti / (1 - ti), 14.6146)
        mask[i, 0, txt:txt + n, :txt] = d ** -0.5 * gw * math.log1p(sigma ** 2) * s.std() * weight_map.double()
    return mask


def test_the_bias_the_host_attention_receives_is_the_documented_formula(pack, small_qwen):
    """Qwen-Image's blocks call optimized_attention_masked(q, k, v, heads, mask, ...) with [B, L, heads*d] tensors
    and the mask by position; another pack's override set first is kept inside ours and, in the guided calls, gets
    the Cones 2 mask there, equal to the formula re-derived from the same q and k."""
    model, pos, neg = small_qwen
    seen = []

    def theirs(func, *args, **kwargs):
        seen.append((args[0].clone(), args[1].clone(), args[3], args[4], kwargs["transformer_options"]))
        return func(*args, **kwargs)

    m = model.clone()
    m.model_options["transformer_options"]["optimized_attention_override"] = theirs
    gm, gpos = guide(pack, m, pos, gw=0.08, nw=-5.0, record=False)
    sample(gm, gpos, neg, steps=2)
    plain = [s for s in seen if s[3] is None]
    masked = [s for s in seen if s[3] is not None]
    # CFG 2.5: per step, the host's call over cond + uncond (one block), then the guided row again with the mask
    assert len(plain) == len(masked) == 2 and all(s[0].shape[0] == 2 for s in plain)
    for q, k, heads, mask, opts in masked:
        assert q.dim() == 3 and q.shape[0] == 1  # the [B, L, heads*d] layout, the guided row alone
        rows = opts["cones2_rows"][0]
        txt, h, w = opts["cones2_joint_grid"]
        assert (txt, h, w) == (T, 4, 5) and q.shape[1] == T + h * w
        wm = rows.spec.weight_map(rows.subjects, rows.offsets, h, w, txt, q.device)
        want = documented_bias(q, k, heads, txt, h * w, wm, rows.sigmas, 0.08)
        torch.testing.assert_close(mask.double(), want, rtol=1e-4, atol=1e-5)
        assert float(want.abs().sum()) > 0
    assert float(masked[0][4]["cones2_rows"][0].sigmas[0]) == pytest.approx(1.0)  # t = 1: the capped sigma


def test_soft_layout_share_rises_with_positive_weight(pack, small_qwen):
    model, pos, neg = small_qwen

    def run(gw, pw, nw):
        gm, gpos = guide(pack, model, pos, gw=gw, pw=pw, nw=nw)
        sample(gm, gpos, neg)
        return shares(pack, gm)

    assert_share_rises_with_positive_weight(pack, run)


def test_a_reference_latent_is_attended_unbiased(pack, small_qwen):
    """Qwen-Image-Edit's reference latent (the host's ReferenceLatent node) adds its tokens after the image's; the
    guided mask leaves their rows and columns at zero and the subjects still land in their boxes."""
    from comfy_extras.nodes_edit_model import ReferenceLatent

    model, pos, neg = small_qwen
    ref = {"samples": torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(5))}
    pos_ref = ReferenceLatent.execute(pos, ref).result[0]
    assert "reference_latents" in pos_ref[0][1] and "cones2" in pos_ref[0][1]
    masks = []

    def theirs(func, *args, **kwargs):
        if args[4] is not None:
            masks.append((args[4], kwargs["transformer_options"]["cones2_joint_grid"]))
        return func(*args, **kwargs)

    m = model.clone()
    m.model_options["transformer_options"]["optimized_attention_override"] = theirs
    gm, gpos = guide(pack, m, pos_ref)
    sample(gm, gpos, neg)
    assert masks
    for mask, (txt, h, w) in masks:
        assert mask.shape[-1] == txt + h * w + 2 * 2  # the reference's 2 x 2 tokens after the image's
        assert not mask[..., txt + h * w:, :].any() and not mask[..., txt + h * w:].any()
    assert min(shares(pack, gm).values()) >= 0.99


@pytest.fixture(scope="module")
def qwen_bed_vae(comfy, host_dir):
    """The Qwen-Image bed's VAE alone (the host's Wan 2.1 VAE, as VAELoader loads it): the InstantX ControlNet's
    hint is a latent of it."""
    import comfy.sd
    import comfy.utils

    builder = BEDS["qwen_image"].builder_module()
    paths = build(builder.__file__, host_dir, out=builder.default_cache_dir(), timeout=1200)
    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(paths["vae"]))


def test_composes_with_an_instantx_qwen_image_controlnet(pack, small_qwen, qwen_bed_vae):
    """The host's QwenImageControlNetModel (InstantX Qwen-Image ControlNets, built as load_controlnet_qwen_instantx
    builds it: one block of the small model's width, random, its output projections nonzero), applied with
    ControlNetApplyAdvanced and the hint through the bed's VAE: guidance still places the subjects, the ControlNet
    still acts, at guidance_weight 0 the sample is the ControlNet's alone, and the ControlNet's own joint
    attention is never biased (harness.test_helpers.assert_composes_with_controlnet)."""
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ldm.qwen_image.controlnet
    import comfy.ops

    model, pos, neg = small_qwen
    config = {k: v for k, v in SMALL_QWEN.items() if k != "image_model"}
    net = comfy.ldm.qwen_image.controlnet.QwenImageControlNetModel(operations=comfy.ops.disable_weight_init,
                                                                   dtype=torch.float32, **config)
    randomise(net, 5, scale=0.05)
    control = comfy.controlnet.ControlNet(net, compression_ratio=1, latent_format=comfy.latent_formats.Wan21(),
                                          load_device=torch.device("cpu"), manual_cast_dtype=None, extra_conds=[])
    hint = torch.rand(1, 64, 80, 3, generator=torch.Generator().manual_seed(6))
    assert_composes_with_controlnet(pack, (model, pos, neg), (model, *controlled(pos, neg, control, hint, qwen_bed_vae)),
                                    guide, sample, shares)


def test_composes_with_a_diffsynth_model_patch_controlnet(pack, small_qwen, qwen_bed_vae):
    """The DiffSynth Qwen-Image ControlNets (ModelPatchLoader + QwenImageDiffsynthControlnet: a double-block patch
    that adds a projection of the hint's latent to the image stream after every block; here one block of the small
    model's width, random) compose the same way, applied before Layout Guidance on the MODEL."""
    import comfy.model_patcher
    import comfy.ops
    from comfy_extras.nodes_model_patch import QwenImageBlockWiseControlNet, QwenImageDiffsynthControlnet

    model, pos, neg = small_qwen
    net = QwenImageBlockWiseControlNet(num_layers=1, dim=SMALL_QWEN["num_attention_heads"] *
                                       SMALL_QWEN["attention_head_dim"], operations=comfy.ops.manual_cast)
    randomise(net, 5, scale=0.05)
    patch = comfy.model_patcher.ModelPatcher(net, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    hint = torch.rand(1, 64, 80, 3, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():  # the host runs nodes without autograd (its patch keeps the hint's latent for later)
        patched = QwenImageDiffsynthControlnet().diffsynth_controlnet(model, patch, qwen_bed_vae, hint, 1.0)[0]
    assert_composes_with_controlnet(pack, (model, pos, neg), (patched, pos, neg), guide, sample, shares)


# ---- the word finder on the host's Qwen2.5 tokenizer ---------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_tokens(comfy):
    """A CLIP object of the host with Qwen-Image's tokenizer and no text model (only its words are looked at)."""
    import comfy.sd
    import comfy.text_encoders.qwen_image

    clip = comfy.sd.CLIP(no_init=True)
    clip.tokenizer = comfy.text_encoders.qwen_image.QwenImageTokenizer()
    clip.tokenizer_options = {}
    return clip


@pytest.mark.parametrize("text, word, rows", [
    ("a photo of a (dog:1.3) next to another dog and a cat", "dog", [5, 14]),  # "dog" after " (" and " dog"
    ("Dog and cat", "dog", [0]),  # the prompt's first word, capitalised: "Dog", no space before it
    ("a hotdog and a dog", "dog", [5]),  # not the "dog" inside "hotdog"
    ("a dog, a doggy", "dog", [1]),  # a word ends at the comma; "doggy" is another word
    ("an assistant", "assistant", [1]),  # not the template tail's "assistant"
    ("a teddy bear", "teddy", [1, 2]),  # " teddy" is two tokens
])
def test_words_are_found_at_word_boundaries_in_the_prompts_part(pack, qwen_tokens, text, word, rows):
    enc = pack.nodes.encoding
    tokens = qwen_tokens.tokenize(text)
    found = enc.word_positions(qwen_tokens, tokens, word)
    assert sorted(r for occ in found for r in occ) == rows
    if word in text:  # (the independent search looks for the word as written, not capitalised)
        assert rows == independent_rows(qwen_tokens, text, word, "qwen25_7b")
    n = len(tokens["qwen25_7b"][0])
    assert all(0 <= r < n - 34 - 5 for r in rows)  # rows of the conditioning, inside the prompt's part


def test_a_word_inside_a_run_without_spaces_is_found_by_spelling(pack, qwen_tokens):
    text = "一只犬和猫"
    found = pack.nodes.encoding.word_positions(qwen_tokens, qwen_tokens.tokenize(text), "犬")
    hf = qwen_tokens.tokenizer.qwen25_7b.tokenizer
    ids = hf(text)["input_ids"]
    assert found == [[ids.index(hf("犬")["input_ids"][0])]]


def test_a_prompt_with_its_own_chat_template_is_refused(pack, qwen_tokens):
    """Qwen-Image-Edit's template (with <|vision_start|><|image_pad|>...) or any prompt starting with <|im_start|>
    makes the host skip its own template, which moves the rows it drops: refused before anything is encoded."""
    edit = ("<|im_start|>system\nDescribe the key features of the input image.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|image_pad|><|vision_end|>a dog<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(Cones2Error, match="chat template.*write the prompt as plain text"):
        pack.nodes.encoding.encode_with_residuals(qwen_tokens, edit, [])


# ---- the loader-detected bed: what a residual at the word's rows does in a causal LLM -----------------------

@pytest.fixture(scope="module")
def qwen_bed(comfy, host_dir):
    spec = BEDS["qwen_image"]
    builder = spec.builder_module()
    return spec.load(build(builder.__file__, host_dir, out=builder.default_cache_dir(), timeout=1200))


def test_the_causal_llm_carries_the_word_into_every_later_row_which_a_residual_leaves(pack, qwen_bed):
    """Qwen2.5 is causal: the subject word reaches every row after it (changing 'dog' to 'wolf' changes the word's
    row and all later ones, none before), while a residual changes the word's own row alone; the later rows keep
    saying 'dog'. The measured sizes go to docs/qwen_image.md."""
    _model, clip, _vae = qwen_bed
    text = "a photo of a dog and a cat on a sofa"
    rows = pack.nodes.encoding.word_positions(clip, clip.tokenize(text), "dog")
    assert rows == [[4]] and rows[0] == independent_rows(clip, text, "dog", "qwen25_7b")
    base = pack.nodes.encoding.encode_with_residuals(clip, text, [])[0][0]
    wolf = pack.nodes.encoding.encode_with_residuals(clip, text.replace("dog", "wolf"), [])[0][0]
    assert base.shape == wolf.shape
    changed = (base != wolf).any(-1)[0].nonzero().flatten().tolist()
    assert changed == list(range(4, base.shape[1]))  # the word's row and every later one (the template's tail too)
    res = pack.cones2_core.residual.Residual("dog", "qwen_image", {"qwen25_7b": torch.randn(1, 3584)})
    out = pack.nodes.encoding.encode_with_residuals(clip, text, [res])[0][0]
    assert (out != base).any(-1)[0].nonzero().flatten().tolist() == [4]
