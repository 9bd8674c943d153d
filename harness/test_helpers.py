"""Small helpers shared by the host tests (development only): training images, and the tiny Flux bed's text."""

from __future__ import annotations

import torch

FLUX_T5_TOKENS = 16  # T5 tokens the Flux tests pad to (T5TokenizerOptions' min_length): a short text part keeps
# the full-width bed's forward quick


def blob_images(n: int = 3, size: int = 64) -> torch.Tensor:
    """``n`` IMAGE rows [n, size, size, 3]: a red blob on grey, moved a little in each image."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    imgs = torch.full((n, size, size, 3), 0.5)
    for i in range(n):
        m = ((yy - size // 2 - 4 * i) ** 2 + (xx - size // 2 + 3 * i) ** 2) < (size * 0.28) ** 2
        imgs[i][m] = torch.tensor([0.9, 0.2, 0.1])
    return imgs


def short_clip(clip, min_length: int = FLUX_T5_TOKENS):
    """The CLIP as the host's T5TokenizerOptions node leaves it: T5 padded to ``min_length`` tokens."""
    from comfy_extras.nodes_cond import T5TokenizerOptions

    return T5TokenizerOptions.execute(clip, 0, min_length).result[0]


def text_encode(clip, text: str):
    """CLIP Text Encode's conditioning."""
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def apply_residuals(pack, clip, text: str, residuals):
    """Cones2 Apply Residuals to Conditioning's conditioning."""
    return pack.nodes.residual_nodes.Cones2ApplyResiduals.execute(clip, text, residuals).result[0]


def independent_rows(clip, text: str, word: str, key: str) -> list[int]:
    """The rows of ``word``'s tokens in ``text``'s encoder ``key``, found by the host's tokenizer alone (not by the
    pack): every position where the word's own tokens (without start/end/padding) appear in a chunk, as flat rows
    (chunk index x chunk length + position)."""
    template = getattr(clip.tokenizer, "llama_template", None)
    if template is not None:  # an LLM encoder behind a chat template (Qwen-Image)
        return _template_rows(clip, text, word, key, template)
    chunks = clip.tokenize(text)[key]
    pattern = [t for t, _w, wid in clip.tokenize(word, return_word_ids=True)[key][0] if wid != 0]
    rows = []
    for c, chunk in enumerate(chunks):
        ids = [t for t, _w in chunk]
        for i in range(len(ids) - len(pattern) + 1):
            if ids[i:i + len(pattern)] == pattern:
                rows += [c * len(chunk) + i + j for j in range(len(pattern))]
    return rows


def independent_context_rows(clip, text: str, word: str, family, key: str) -> list[int]:
    """``independent_rows`` as rows of the whole conditioning: after the rows of the family record's earlier row
    groups (SD3.5: a T5 row comes after all of the prompt's CLIP chunks), each group as long as the host's
    tokenisation of ``text`` for its first encoder."""
    tokens = clip.tokenize(text)
    enc = family.encoder(key)
    start = sum(len(tokens[g[0].key]) * len(tokens[g[0].key][0]) - g[0].skip_rows
                for g in family.groups if g[0].group < enc.group)
    rows = independent_rows(clip, text, word, key)
    if getattr(clip.tokenizer, "llama_template", None) is None:  # (an LLM template's rows come without its prefix)
        rows = [r - enc.skip_rows for r in rows if r >= enc.skip_rows]
    return [start + r for r in rows]


def word_context_rows(clip, text: str, word: str, family) -> list[int]:
    """Every encoder's ``independent_context_rows`` of ``word``, together, sorted."""
    return sorted({r for e in family.encoders for r in independent_context_rows(clip, text, word, family, e.key)})


def _template_rows(clip, text: str, word: str, key: str, template: str) -> list[int]:
    """``independent_rows`` for an LLM encoder whose prompt sits in the host's chat template (its
    ``llama_template``) and whose byte-level BPE spells a word " dog" after a space and "dog" after a bracket or at
    the start: the rows of either token sequence of the word, found by the host's Hugging Face tokenizer alone, in
    the prompt's part of the tokens (the template's prefix, which the host drops, and its tail left out), where
    the tokens before and after do not continue the word; row 0 is the prompt's first token."""
    hf = getattr(clip.tokenizer, key).tokenizer
    before, after = template.split("{}")
    first, tail = len(hf(before)["input_ids"]), len(hf(after)["input_ids"])
    ids = [t for t, _w in clip.tokenize(text)[key][0]]
    assert ids[:first] == hf(before)["input_ids"], "the prompt is not in the host's template"
    prompt = ids[first:len(ids) - tail]
    rows = []
    for pattern in (hf(word)["input_ids"], hf(" " + word)["input_ids"]):
        for i in range(len(prompt) - len(pattern) + 1):
            if prompt[i:i + len(pattern)] != pattern:
                continue
            prev = hf.decode(prompt[i - 1:i]) if i and hf.decode(pattern)[:1].isalnum() else ""  # " dog": any
            nxt = hf.decode(prompt[i + len(pattern):i + len(pattern) + 1])
            if not (prev[-1:].isalnum() or nxt[:1].isalnum()):
                rows += range(i, i + len(pattern))
    return sorted(rows)


class CallLog:
    """A unet function wrapper (the host's API) keeping every model call's output per cond/uncond chunk
    (``calls[i][0]``: the conditional pass, ``[1]``: the unconditional one)."""

    def __init__(self):
        self.calls = []

    def __call__(self, apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        chunks = out.chunk(len(args["cond_or_uncond"]))
        self.calls.append({k: c.clone() for k, c in zip(args["cond_or_uncond"], chunks, strict=True)})
        return out


def logged(model):
    """A clone of ``model`` whose calls a CallLog records (set it after any patching clone: a clone deep-copies
    the model options), and the log."""
    m = model.clone()
    log = CallLog()
    m.set_model_unet_function_wrapper(log)
    return m, log


def assert_share_rises_with_positive_weight(pack, run, margin: float = 0.2, subjects=("dog", "cat")) -> None:
    """With a soft negative weight (-5) the in-box attention share of every subject rises with positive_weight
    (0, 2.5, 10 at guidance weight 0.08) and ends above the unbiased share (guidance weight 0) by ``margin``: a
    test that fails without the bias. ``run(gw, pw, nw)``: guide a copy of the family's model, sample once, and
    return the Attention Maps report's shares {subject: share}."""
    got = {pw: run(0.08, pw, -5.0) for pw in (0.0, 2.5, 10.0)}
    off = run(0.0, 10.0, -5.0)
    for subject in subjects:
        series = [got[pw][subject] for pw in (0.0, 2.5, 10.0)]
        assert series[0] < series[1] < series[2], (subject, series)
        assert series[2] > off[subject] + margin, (subject, series, off[subject])


def randomise(module, seed: int, scale: float = 0.02) -> None:
    """Deterministic random weights for a host module built with ``disable_weight_init``: every matrix or kernel
    N(0, scale) (so a ControlNet's zero-initialised output projections are nonzero and it visibly acts), the
    vector weights (norm scales) 1, biases 0; and every floating buffer N(0, scale): the host makes some with
    ``torch.empty`` for a checkpoint to fill (the SD3 MMDiT ControlNet's ``pos_embed``), and a test reading one
    unfilled reads whatever memory it got (once NaN, failing a CI run). A caller with a meaningful value for a
    buffer copies it in afterwards."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * scale if p.ndim > 1 else
                    torch.full(p.shape, 1.0 if name.endswith(("scale", "weight")) else 0.0))
        for _name, b in sorted(module.named_buffers()):
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g) * scale)


def controlled(pos, neg, control, hint, vae=None):
    """(positive, negative) after the host's ControlNetApplyAdvanced (strength 1 over the whole schedule)."""
    import nodes

    return nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control, hint, 1.0, 0.0, 1.0, vae=vae)


def assert_composes_with_controlnet(pack, plain, with_control, guide, sample, shares) -> None:
    """A ControlNet and Layout Guidance on the same model: ``plain`` is (model, positive, negative) without the
    ControlNet, ``with_control`` the same with it (conditioning from ``controlled``, or a model patched by a
    model-patch ControlNet). The ControlNet acts (with and without guidance), guidance still puts every subject's
    attention in its box, at guidance_weight 0 the sample is bit for bit the ControlNet's alone, and guidance
    reaches only the base model's attention: an override set before ours is handed the same calls (count and
    shapes) with the ControlNet as without it, so none of the ControlNet's own attention calls (the host hands it
    no transformer_options) goes through ours. ``guide(pack, model, cond, gw=..., record=...)``,
    ``sample(model, pos, neg)`` and ``shares(pack, model)`` are the family test's own."""
    model, pos, neg = plain
    cmodel, cpos, cneg = with_control
    alone = sample(cmodel, cpos, cneg)
    assert torch.isfinite(alone).all()
    assert not torch.equal(alone, sample(model, pos, neg))  # the ControlNet acts
    gm, gpos = guide(pack, cmodel, cpos)
    both = sample(gm, gpos, cneg)
    assert min(shares(pack, gm).values()) >= 0.99
    gm_only, gpos_only = guide(pack, model, pos)
    assert not torch.equal(both, sample(gm_only, gpos_only, neg))  # ... and still acts under guidance
    off, opos = guide(pack, cmodel, cpos, gw=0.0, record=False)
    assert torch.equal(sample(off, opos, cneg), alone)
    calls = {}
    for name, (mo, p, n) in {"with": with_control, "without": plain}.items():
        seen = []

        def theirs(func, *args, _seen=seen, **kwargs):
            _seen.append(tuple(args[0].shape))
            return func(*args, **kwargs)

        m = mo.clone()
        m.model_options["transformer_options"]["optimized_attention_override"] = theirs
        gm, gp = guide(pack, m, p, record=False)
        sample(gm, gp, n)
        calls[name] = seen
    assert calls["with"] and calls["with"] == calls["without"]
