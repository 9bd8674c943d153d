"""Cones 2 layout guidance on joint attention (Flux's double and single blocks).

A joint-attention model attends over one sequence ``[text tokens (T), image tokens (N), more image tokens]``:
every query sees every key. The Cones 2 bias belongs on the block where image queries meet the subject's text
keys, which is what cross-attention is in a UNet::

    S      = Q_img K_txt^T                       (per head, before the softmax scale; [N, T])
    bias   = guidance_weight * W * log(1 + s^2) * std(S)
    out    = softmax((Q K^T + B) * scale) V,     B = bias on [image rows, text columns], 0 elsewhere

* ``W [N, T]`` is :func:`cones2_core.layout.build_weight_map` for the text part (the subject's tokens get the
  positive weight inside its region and the negative weight outside; every other token 0).
* ``std(S)`` is the unbiased standard deviation of one sample's image-to-text scores over all heads, image tokens
  and text tokens: the same statistic as the UNet's ``std(QK^T)`` of a cross-attention layer, whose keys are the
  text. It is accumulated over chunks of image tokens, so no ``[N, T]`` block of every head is kept, and the
  ``[L, L]`` scores are never formed here: the bias is handed to the host's attention as a float mask broadcast
  over heads.
* ``s`` is the noise level: Flux's sigma is the flow time ``t`` in 0..1 (``x_t = (1 - t) x_0 + t eps``), which
  has the signal-to-noise ratio of the variance-exploding ``sigma = t / (1 - t)`` that the paper's
  ``log(1 + sigma^2)`` was written for (``x_t / (1 - t) = x_0 + sigma eps``). :func:`flow_sigma` maps it, capped
  at ``FLOW_SIGMA_CAP``, SD's largest sigma, because Flux starts at ``t = 1`` exactly (sigma infinite): the
  factor then runs over SD's range, 5.4 at the first step down to 0 at the last.
* Text queries, other image tokens (Kontext references) and the unconditional pass get no bias.
"""

from __future__ import annotations

import torch

from .errors import Cones2Error
from .score_stats import MAX_CHUNK_ELEMENTS, bias_coefficient, combine, moments, unbiased_std

FLOW_SIGMA_CAP = 14.6146  # SD1.x/2.x's sigma_max (scaled-linear betas, 1000 steps)
MERGE_CHUNK_ELEMENTS = 1 << 20  # float32 elements of one [B, heads, rows, d] chunk of the mask-free path: 4 MiB


def flow_sigma(t: float | torch.Tensor) -> float | torch.Tensor:
    """The variance-exploding sigma of flow time ``t`` (same signal-to-noise ratio): t / (1 - t), capped."""
    if isinstance(t, torch.Tensor):
        t = t.double()
        return torch.where(t >= 1, torch.full_like(t, FLOW_SIGMA_CAP),
                           (t / (1 - t).clamp_min(1e-12)).clamp(0, FLOW_SIGMA_CAP))
    t = float(t)
    return FLOW_SIGMA_CAP if t >= 1 else min(max(t, 0.0) / (1 - t), FLOW_SIGMA_CAP)


def _check_shapes(q, k, txt_len: int, img_len: int):
    if q.dim() != 4 or k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise Cones2Error(f"joint attention needs q and k as [B, heads, L, d], got {tuple(q.shape)} and "
                          f"{tuple(k.shape)}")
    length = q.shape[2]
    if txt_len < 1 or img_len < 1 or txt_len + img_len > length or k.shape[2] != length:
        raise Cones2Error(f"a joint sequence of {length} tokens cannot hold {txt_len} text and {img_len} image tokens")


def _check(q, k, txt_len: int, img_len: int, weight_map):
    _check_shapes(q, k, txt_len, img_len)
    b = q.shape[0]
    w = weight_map.unsqueeze(0) if weight_map.dim() == 2 else weight_map
    if w.dim() != 3 or w.shape[0] not in (1, b) or tuple(w.shape[1:]) != (img_len, txt_len):
        raise Cones2Error(f"the layout weight map has shape {tuple(weight_map.shape)} but this attention needs "
                          f"[{b} or 1, {img_len}, {txt_len}] (image tokens x text tokens)")
    return w.to(device=q.device, dtype=torch.float32)


def _chunk(b: int, heads: int, width: int, chunk_size: int | None) -> int:
    if chunk_size is not None and chunk_size < 1:
        raise Cones2Error(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return chunk_size or max(1, MAX_CHUNK_ELEMENTS // max(1, b * heads * width))


def image_text_std(q, k, txt_len: int, img_len: int, chunk_size: int | None = None) -> torch.Tensor:
    """Per-sample unbiased std [B] (float64) of S = Q_img K_txt^T over heads, image and text tokens."""
    b, heads = q.shape[:2]
    kt = k[:, :, :txt_len].float().transpose(-1, -2)
    chunk = _chunk(b, heads, txt_len, chunk_size)
    stats = None
    for start in range(txt_len, txt_len + img_len, chunk):
        stop = min(start + chunk, txt_len + img_len)
        part = moments(q[:, :, start:stop].float() @ kt)
        stats = part if stats is None else combine(stats, part)
    return unbiased_std(stats)


def image_text_std_gram(q, k, txt_len: int, img_len: int, chunk_size: int | None = None) -> torch.Tensor:
    """:func:`image_text_std` without forming S = Q_img K_txt^T: per head, sum(S) = (sum_i q_i) . (sum_j k_j) and
    sum(S^2) = <Q^T Q, K^T K> (the Frobenius product of the two [d, d] Gram matrices, float32 products summed in
    float64); var = (sum(S^2) - sum(S)^2 / n) / (n - 1). O((N + T) d^2) instead of O(N T d) and no [N, T] block (the
    direct statistic's float64 sums of S cost about as much as the attention itself at Flux's size), ``chunk_size``
    image rows at a time (default: 4 MiB of float32). The same value up to float32
    rounding of the Gram matrices (~1e-6 relative; more only where |mean(S)| >> std(S))."""
    b, heads, _, d = q.shape
    kt = k[:, :, :txt_len].float()
    gram_k = torch.zeros(b, heads, d, d, dtype=torch.float64, device=q.device)
    gram_k += kt.transpose(-1, -2) @ kt  # [B, heads, d, d] (added in float64: no float64 copy of the products)
    sum_k = kt.sum(dim=2, dtype=torch.float64)  # [B, heads, d]
    qi = q[:, :, txt_len:txt_len + img_len]
    gram_q, sum_q = torch.zeros_like(gram_k), torch.zeros_like(sum_k)
    chunk = chunk_size or max(1, MERGE_CHUNK_ELEMENTS // max(1, b * heads * d))
    for start in range(0, img_len, chunk):  # (a matmul of the whole strided slice would copy it: chunks bound that)
        qc = qi[:, :, start:start + chunk].float()
        gram_q += qc.transpose(-1, -2) @ qc
        sum_q += qc.sum(dim=2, dtype=torch.float64)
    n = heads * img_len * txt_len
    total = (sum_q * sum_k).sum(dim=(1, 2))
    squares = (gram_q * gram_k).sum(dim=(1, 2, 3))
    return torch.sqrt((squares - total * total / n).clamp_min(0) / max(n - 1, 1))


def joint_bias(q, k, txt_len: int, img_len: int, weight_map, sigma, guidance_weight: float,
               scale: float | None = None, chunk_size: int | None = None, text_queries: bool = False) -> torch.Tensor:
    """The Cones 2 bias as an additive attention mask [B, 1, L, L] (float32), already multiplied by the softmax
    scale (the host adds masks to the scaled scores): zero but on image rows x text columns.

    q, k: [B, heads, L, d] after the positional embedding (what the host's attention receives); text tokens are
    rows ``0 .. txt_len - 1``, the image's ``txt_len .. txt_len + img_len - 1``. ``sigma``: the noise level in
    sigma units per sample (``flow_sigma`` of Flux's flow time) or one float. ``text_queries``: also bias the
    subject's text queries x image keys with the same weights (an experiment; off in the node)."""
    w = _check(q, k, txt_len, img_len, weight_map)
    b, _, length, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    coef = bias_coefficient(image_text_std(q, k, txt_len, img_len, chunk_size), sigma, guidance_weight)  # [B]
    mask = torch.zeros(b, 1, length, length, dtype=torch.float32, device=q.device)
    block = (scale * coef).view(b, 1, 1) * w
    mask[:, 0, txt_len:txt_len + img_len, :txt_len] = block
    if text_queries:  # also confine the subject's text queries to its region (the transposed block)
        mask[:, 0, :txt_len, txt_len:txt_len + img_len] = block.transpose(1, 2)
    return mask


def token_mass(q, k, mask, txt_len: int, img_len: int, tokens, scale: float | None = None,
               chunk_size: int | None = None) -> torch.Tensor:
    """Attention mass of each token list on every image token, float32 [len(tokens), img_len], summed over batch,
    heads and the list's tokens: the probabilities of the joint softmax (all L keys, ``mask`` added), taken chunk
    by chunk of image queries (what the attention maps need; never the whole [L, L])."""
    b, heads, length, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    kt = k.float().transpose(-1, -2)
    picks = [torch.as_tensor(list(t), dtype=torch.long, device=q.device) for t in tokens]
    chunk = _chunk(b, heads, length, chunk_size)
    out = []
    for start in range(txt_len, txt_len + img_len, chunk):
        stop = min(start + chunk, txt_len + img_len)
        s = (q[:, :, start:stop].float() @ kt) * scale
        if mask is not None:
            s = s + mask[:, :, start:stop].float()
        p = torch.softmax(s, dim=-1)
        out.append(torch.stack([p.index_select(-1, i).sum(dim=(0, 1, 3)) for i in picks]) if picks
                   else p.new_zeros(0, stop - start))
    return torch.cat(out, dim=1)





# ---------------------------------------------------------------------------------------------------------------
# Guided joint attention without the [L, L] mask.
#
# The bias sits only on the subject's few text columns C (|C| = m << L) of the image rows. Keys are a set, so
#
#     out_i = (Z_R * out_R,i + sum_{j in C} exp(s_ij + b_ij) v_j) / (Z_R + sum_{j in C} exp(s_ij + b_ij))
#
# exactly, with out_R, log Z_R = lse_R the plain attention (host mask kept, no bias) over the other keys R. That is
# one call of an unmasked attention kernel that returns its log-sum-exp (flash on CPU and CUDA), over L queries and
# L - m keys, plus an explicit [L, m] block per head; merged in the log domain, so a weight of -1e8 gives
# exp(-huge) = 0 and never a cancellation. Every row takes the merge (text and reference-image rows with b = 0),
# so one kernel call serves the whole sequence.
#
# R as a view: the columns of C are swapped with the first m positions of k and v (in place, m rows per head,
# restored afterwards), so the kernel reads ``k[:, :, m:]`` and no copy of k or v is made.
# ---------------------------------------------------------------------------------------------------------------


class SubjectColumns:
    """What guided joint attention needs from the layout weight map and does not change between the blocks of one
    model call: build it once per call (:func:`subject_columns`) and pass it to every block's
    :func:`guided_joint_attention` (or pass the weight map and let each call build it: a few small ops).

    ``cols``: the biased text columns, sorted (LongTensor [m]); ``weights``: W at those columns, float32
    [B or 1, img_len, m]; ``swap_a`` / ``swap_b``: the pairs of key positions swapped so that C occupies the
    first m positions (``swap_a`` in ``0 .. m-1`` not in C, ``swap_b`` in C from m on)."""

    __slots__ = ("txt_len", "img_len", "cols", "weights", "swap_a", "swap_b")

    def __init__(self, txt_len, img_len, cols, weights, swap_a, swap_b):
        self.txt_len, self.img_len = txt_len, img_len
        self.cols, self.weights, self.swap_a, self.swap_b = cols, weights, swap_a, swap_b

    @property
    def m(self) -> int:
        return int(self.cols.numel())

    def key_order(self, length: int) -> torch.Tensor:
        """The key positions in the order the swapped k and v hold them ([length] LongTensor)."""
        perm = torch.arange(length, device=self.cols.device)
        perm[self.swap_a] = self.swap_b
        perm[self.swap_b] = self.swap_a
        return perm

    def to(self, device) -> SubjectColumns:
        return SubjectColumns(self.txt_len, self.img_len, self.cols.to(device), self.weights.to(device),
                              self.swap_a.to(device), self.swap_b.to(device))


def subject_columns(weight_map, txt_len: int, img_len: int, tokens=()) -> SubjectColumns:
    """The :class:`SubjectColumns` of a weight map [B or 1, img_len, txt_len] (or [img_len, txt_len]): the text
    columns where W is nonzero for any sample and image row, plus ``tokens`` (columns whose attention mass is wanted,
    e.g. a recorded subject whose weights are 0)."""
    w = weight_map.unsqueeze(0) if weight_map.dim() == 2 else weight_map
    if w.dim() != 3 or tuple(w.shape[1:]) != (img_len, txt_len):
        raise Cones2Error(f"the layout weight map has shape {tuple(weight_map.shape)} but this attention needs "
                          f"[B or 1, {img_len}, {txt_len}] (image tokens x text tokens)")
    used = (w != 0).any(dim=1).any(dim=0)
    extra = [int(t) for t in tokens]
    if any(t < 0 or t >= txt_len for t in extra):
        raise Cones2Error(f"token columns {extra} must lie in 0 .. {txt_len - 1} (the text)")
    if extra:
        used[torch.as_tensor(extra, dtype=torch.long, device=used.device)] = True
    cols = used.nonzero().flatten()
    m = cols.numel()
    head = torch.zeros(max(m, 1), dtype=torch.bool, device=cols.device)[:m]
    head[cols[cols < m]] = True
    swap_a = (~head).nonzero().flatten()
    swap_b = cols[cols >= m]
    return SubjectColumns(txt_len, img_len, cols, w.float().index_select(2, cols), swap_a, swap_b)


def _mask4(mask, dtype):
    """The host's mask as a 4-d additive float mask (its own float dtype, or ``dtype`` for a boolean one)."""
    if mask is None:
        return None
    m = mask
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))
    while m.dim() < 4:
        m = m.unsqueeze(0) if m.dim() == 2 else m.unsqueeze(1)
    return m


def attention_lse_math(q, k, v, mask=None, scale=None, chunk_size: int | None = None):
    """Plain attention and its log-sum-exp, chunk by chunk of queries in float32: the fallback of :func:`sdpa_lse`
    (and a reference). Returns (out [B, heads, Lq, d] in q's dtype, lse [B, heads, Lq] float32)."""
    b, heads, length, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    mask = _mask4(mask, torch.float32)
    kt, vf = k.float().transpose(-1, -2), v.float()
    out = q.new_empty(b, heads, length, v.shape[-1])
    lse = torch.empty(b, heads, length, dtype=torch.float32, device=q.device)
    chunk = chunk_size or max(1, MERGE_CHUNK_ELEMENTS // max(1, b * heads * k.shape[2]))
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        s = (q[:, :, start:stop].float() @ kt) * scale
        if mask is not None:
            s = s + mask[:, :, start:stop].float() if mask.shape[2] > 1 else s + mask.float()
        part = torch.logsumexp(s, dim=-1)
        lse[:, :, start:stop] = part
        out[:, :, start:stop] = (torch.exp(s - part.unsqueeze(-1)) @ vf).to(out.dtype)
    return out, lse


def sdpa_lse(q, k, v, mask=None, scale=None):
    """Plain attention (additive float or boolean ``mask``, no bias) with its log-sum-exp, on torch's fused kernels:
    flash on CPU (any mask), flash on CUDA without a mask (half precision), memory-efficient on CUDA otherwise;
    :func:`attention_lse_math` where none applies. (out [B, heads, Lq, d] in q's dtype, lse [B, heads, Lq] float32)."""
    mask = _mask4(mask, q.dtype)
    ops = torch.ops.aten
    try:
        if q.device.type == "cpu" and hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
            out, lse = ops._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                       scale=scale)
            return out, lse.float()
        if q.device.type == "cuda":
            if mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 \
                    and q.shape[-1] <= 256:
                res = ops._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
                return res[0], res[1].float()
            bias = None if mask is None else mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            res = ops._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False, scale=scale)
            return res[0], res[1][..., :q.shape[2]].float()
    except (RuntimeError, NotImplementedError):  # a kernel that refuses these shapes / dtypes: the math path
        pass
    return attention_lse_math(q, k, v, mask, scale)


def _can_swap(k, v) -> bool:
    """Whether k and v may be permuted in place for the call (and restored): not under autograd, not inference
    tensors outside inference mode, not one tensor."""
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        return False
    if (k.is_inference() or v.is_inference()) and not torch.is_inference_mode_enabled():
        return False
    return k.data_ptr() != v.data_ptr()


def _swap(x, a, b):
    """Swap positions a and b (LongTensors, same length) of x [B, heads, L, d] along L, in place."""
    xa = x.index_select(2, a)
    x.index_copy_(2, a, x.index_select(2, b))
    x.index_copy_(2, b, xa)


def guided_joint_attention(q, k, v, txt_len: int, img_len: int, weight_map, sigma, guidance_weight: float,
                           host_mask=None, attend=None, scale: float | None = None, chunk_size: int | None = None,
                           text_queries: bool = False, inplace: bool | None = None, return_mass: bool = False):
    """``softmax(Q K^T * scale + host_mask + joint_bias(...)) V`` exactly, without forming an [L, L] mask.

    q, k, v: [B, heads, L, d] (what the host's attention receives with ``skip_reshape``), text rows
    ``0 .. txt_len - 1``, image rows ``txt_len .. txt_len + img_len - 1``, any further rows (reference images)
    unbiased. ``weight_map``: the layout weights [B or 1, img_len, txt_len], or the :class:`SubjectColumns` of them
    kept for the model call. ``sigma`` (per sample or one float), ``guidance_weight``, ``scale``, ``text_queries``: as
    :func:`joint_bias`; the std of Q_img K_txt^T is :func:`image_text_std`'s statistic, computed by
    :func:`image_text_std_gram`. ``host_mask``: the host's additive
    (or boolean) mask, any shape the host's attention takes (Chroma's text padding); it is added to every row as
    the host would. ``attend(q, k, v, mask) -> (out, lse)``: plain attention with its float32 log-sum-exp
    [B, heads, Lq] (default :func:`sdpa_lse`; under autograd :func:`attention_lse_math`, because the fused kernels'
    backward ignores the log-sum-exp: a custom ``attend`` used with gradients must differentiate it). ``inplace``: permute the rows of k and v in place during the call
    (restored before returning) so the kernel reads a view; None: whenever that is safe (:func:`_can_swap`).
    ``chunk_size``: query rows per chunk of the std and the merge (default: 4 MiB of float32 per chunk).

    Returns the output [B, heads, L, d] in q's dtype; with ``return_mass`` also the attention mass of each column
    of ``cols`` on every image token, summed over batch and heads (float32 [m, img_len]), what
    :func:`token_mass` gives for those columns."""
    cols = weight_map if isinstance(weight_map, SubjectColumns) else None
    if cols is None:
        _check(q, k, txt_len, img_len, weight_map)
        cols = subject_columns(weight_map, txt_len, img_len)
    else:
        _check_shapes(q, k, txt_len, img_len)
        if (cols.txt_len, cols.img_len) != (txt_len, img_len):
            raise Cones2Error(f"these subject columns were built for {cols.txt_len} text and {cols.img_len} image "
                              f"tokens, not {txt_len} and {img_len}")
    cols = cols.to(q.device) if cols.cols.device != q.device else cols
    if cols.weights.shape[0] not in (1, q.shape[0]):
        raise Cones2Error(f"the layout weights are for {cols.weights.shape[0]} samples, the batch has {q.shape[0]}")
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if attend is None:  # torch's fused kernels give no gradient through their log-sum-exp: the math path under grad
        attend = attention_lse_math if grad else sdpa_lse
    b, heads, length, d = q.shape
    m, n, t0 = cols.m, img_len, txt_len
    scale_f = d**-0.5 if scale is None else float(scale)
    mask = _mask4(host_mask, q.dtype)
    if m == 0:
        out = attend(q, k, v, mask)[0]
        return (out, torch.zeros(0, n, device=q.device)) if return_mass else out
    per_row = b * heads * max(d, m)
    chunk = chunk_size or max(1, MERGE_CHUNK_ELEMENTS // per_row)
    if guidance_weight != 0:
        coef = bias_coefficient(image_text_std_gram(q, k, txt_len, img_len, chunk_size), sigma, guidance_weight)
        bias = (scale_f * coef).view(-1, 1, 1) * cols.weights  # [B, N, m] float32, the dense block's columns
    else:
        bias = None
    kc, vc = k.index_select(2, cols.cols).float(), v.index_select(2, cols.cols).float()
    mask_c = None if mask is None else mask.index_select(3, cols.cols)

    swap = _can_swap(k, v) if inplace is None else inplace
    if swap:
        mask_r = None if mask is None else mask.index_select(3, cols.key_order(length)[m:])
        _swap(k, cols.swap_a, cols.swap_b)
        _swap(v, cols.swap_a, cols.swap_b)
        try:
            out, lse_r = attend(q, k[:, :, m:], v[:, :, m:], mask_r)
        finally:
            _swap(k, cols.swap_a, cols.swap_b)
            _swap(v, cols.swap_a, cols.swap_b)
    else:
        keep = torch.ones(length, dtype=torch.bool, device=q.device)
        keep[cols.cols] = False
        keep = keep.nonzero().flatten()
        mask_r = None if mask is None else mask.index_select(3, keep)
        out, lse_r = attend(q, k.index_select(2, keep), v.index_select(2, keep), mask_r)
    if out.dtype != q.dtype or out.shape != (b, heads, length, v.shape[-1]):
        out = out.to(q.dtype).reshape(b, heads, length, v.shape[-1])

    mass = torch.zeros(m, n, dtype=torch.float32, device=q.device) if return_mass else None
    in_place = not grad and out.dtype == torch.float32
    pieces = []  # under autograd the merge is out of place (the kernel's backward keeps its output)
    kct = kc.transpose(-1, -2)
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        s = (q[:, :, start:stop].float() @ kct) * scale_f  # [B, heads, rows, m]
        if mask_c is not None:
            s = s + (mask_c[:, :, start:stop] if mask_c.shape[2] > 1 else mask_c).float()
        lo, hi = max(start, t0), min(stop, t0 + n)  # image rows of this chunk
        if bias is not None and lo < hi:  # (s is this chunk's own tensor: in place is autograd-safe)
            s[:, :, lo - start:hi - start] += bias[:, lo - t0:hi - t0].unsqueeze(1)
        lse_part = lse_r[:, :, start:stop]
        total = torch.logaddexp(lse_part, torch.logsumexp(s, dim=-1))
        p = torch.exp(s - total.unsqueeze(-1))
        if in_place:  # float32 output: merged where it lies (the same float32 ops, no chunk copies)
            out[:, :, start:stop].mul_(torch.exp(lse_part - total).unsqueeze(-1)).add_(p @ vc)
        else:
            merged = torch.exp(lse_part - total).unsqueeze(-1) * out[:, :, start:stop].float()
            merged = merged + p @ vc if grad else merged.add_(p @ vc)
            if grad:
                pieces.append(merged.to(out.dtype))
            else:
                out[:, :, start:stop] = merged.to(out.dtype)
        if mass is not None and lo < hi:
            mass[:, lo - t0:hi - t0] += p[:, :, lo - start:hi - start].sum(dim=(0, 1)).transpose(0, 1)

    if grad:
        out = torch.cat(pieces, dim=2)
    if text_queries and bias is not None:  # the subject's text rows: biased on the image columns, m rows explicitly
        rows = cols.cols
        s = (q.index_select(2, rows).float() @ k.float().transpose(-1, -2)) * scale_f  # [B, heads, m, L]
        if mask is not None:
            s = s + (mask.index_select(2, rows) if mask.shape[2] > 1 else mask).float()
        s[:, :, :, t0:t0 + n] += bias.transpose(1, 2).unsqueeze(1)
        out = out.index_copy(2, rows, (torch.softmax(s, dim=-1) @ v.float()).to(out.dtype))
    return (out, mass) if return_mass else out


__all__ = ["FLOW_SIGMA_CAP", "MERGE_CHUNK_ELEMENTS", "SubjectColumns", "attention_lse_math", "flow_sigma",
           "guided_joint_attention", "image_text_std", "image_text_std_gram", "joint_bias", "sdpa_lse", "subject_columns", "token_mass"]
