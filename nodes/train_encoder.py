"""Train Residual's private text encoder: a trainable copy of the user's CLIP (which stays bit-identical).

The copy gets fresh float32 parameters. The host's CLIP layers add residuals in place (``x += ...``), which
breaks backward: the copy's layers run an out-of-place forward. Only the instance prompt's rows of the token
tables train, and the Linear weights may keep their gradients as low-rank factors.
"""

from __future__ import annotations

import copy
import types

import torch

from ..cones2_core.errors import Cones2Error
from ..cones2_core.gradients import LowRankGradLinear, grad_free_alias
from .encoding import word_positions


def subject_rows(clip, subject: str, text: str) -> list[int]:
    """Token rows of ``subject`` in the encoding of ``text`` (its last occurrence)."""
    occ = word_positions(clip, clip.tokenize(text), subject)
    if not occ:
        raise Cones2Error(f"the subject {subject!r} is not found in its own prompt {text!r}; use a plain word")
    return occ[-1]


def _clip_layer_forward(self, x, mask=None, optimized_attention=None):
    """The host's CLIPLayer.forward without its in-place residual adds (which break backward)."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def _low_rank_linear_forward(self, x, *args, **kwargs):
    """A private encoder Linear whose weight gradient is kept as factors (see LowRankGradLinear)."""
    return LowRankGradLinear.apply(x, self.weight, self.bias, self.lowrank_sink)


class _RowDeltaEmbedding(torch.nn.Module):
    """A token embedding whose rows for ``ids`` train as a delta on the frozen table; other rows stay frozen.

    Only the rows of the instance prompt's tokens ever get a gradient, so training the whole 49408-row table
    (as the reference does) differs from this only by AdamW's weight decay on rows that no gradient reaches
    (a relative 5e-8 per step at the paper's settings), while it spends a third of the encoder's optimiser
    time and memory on them.
    """

    def __init__(self, weight: torch.Tensor, ids: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        slot = torch.full((weight.shape[0],), len(ids), dtype=torch.long, device=weight.device)
        slot[torch.tensor(ids, device=weight.device)] = torch.arange(len(ids), device=weight.device)
        self.register_buffer("slot", slot)
        self.delta = torch.nn.Parameter(torch.zeros(len(ids), weight.shape[1], device=weight.device))

    def forward(self, input, out_dtype=None, **kwargs):
        # The delta rows are picked by a one-hot product, not by indexing: the backward of an index
        # (index_put_ with accumulate) sums the many positions of one id (a prompt's padding repeats its end
        # token) in an order that varies between runs on a multi-threaded CPU, so two runs of one seed drifted
        # apart; a matrix product sums them in a fixed order.
        pick = torch.nn.functional.one_hot(self.slot[input], len(self.delta) + 1)[..., :-1].to(self.delta.dtype)
        out = torch.nn.functional.embedding(input, self.weight) + pick @ self.delta
        return out if out_dtype is None else out.to(out_dtype)


def private_text_encoder(clip, device: torch.device, trainable_ids: list[int] | None = None,
                         low_rank_grads: bool = False) -> torch.nn.Module:
    """A copy of the CLIP's text encoder(s) with fresh float32 trainable parameters on ``device``.

    With ``trainable_ids``, only those rows of the token-embedding tables train (see _RowDeltaEmbedding), and
    the frozen tables are not copied at all: they are gradient-free aliases of the user's tables (when those
    sit on ``device`` and no patch can rewrite them in place), which saves a table-sized copy per encoder.
    With ``low_rank_grads``, the transformer layers' Linear weights keep their gradients as factors in a
    ``lowrank_sink`` list on each Linear (see LowRankGradLinear) instead of in ``.grad``."""
    import comfy.clip_model
    import comfy.model_patcher

    clip.load_model()  # the effective weights (LoRA patches applied) sit in the module now
    src = clip.cond_stage_model
    # Copy the module tree only: the tensors are copied (or aliased) below, one at a time, never all twice.
    memo = {id(t): t for t in (*src.parameters(), *src.buffers())}
    enc = copy.deepcopy(src, memo)
    patched = " ".join(str(k) for k in getattr(clip.patcher, "patches", {}))
    shared_tables = set()
    if trainable_ids is not None and "token_embedding" not in patched:
        shared_tables = {id(m.token_embedding) for m in enc.modules() if isinstance(m, comfy.clip_model.CLIPEmbeddings)
                         and m.token_embedding.weight.device == device}
    for m in enc.modules():
        comfy.model_patcher.wipe_lowvram_weight(m)
        if id(m) in shared_tables:
            continue
        for name, p in list(m.named_parameters(recurse=False)):
            setattr(m, name, torch.nn.Parameter(p.detach().to(device=device, dtype=torch.float32, copy=True)))
        for name, b in list(m.named_buffers(recurse=False)):
            m._buffers[name] = b.detach().to(device=device, copy=True)
        if isinstance(m, comfy.clip_model.CLIPLayer):
            m.forward = types.MethodType(_clip_layer_forward, m)
            for lin in m.modules() if low_rank_grads else ():
                if isinstance(lin, torch.nn.Linear):
                    lin.lowrank_sink = []
                    lin.forward = types.MethodType(_low_rank_linear_forward, lin)
    enc.reset_clip_options()
    if clip.layer_idx is not None:
        enc.set_clip_options({"layer": clip.layer_idx})
    if trainable_ids is not None:
        ids = sorted(set(trainable_ids))
        for m in enc.modules():
            if isinstance(m, comfy.clip_model.CLIPEmbeddings):
                table = m.token_embedding.weight
                table = grad_free_alias(table) if id(m.token_embedding) in shared_tables else table.detach()
                m.token_embedding = _RowDeltaEmbedding(table, ids)
    enc.requires_grad_(True)
    for m in enc.modules():
        if isinstance(m, _RowDeltaEmbedding):
            m.weight.requires_grad_(False)  # only its delta rows train
    enc.train(False)  # no dropout in these encoders; keep eval semantics
    return enc
