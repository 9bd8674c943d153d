"""Train Residual: learn a Cones 2 subject residual from a few images of the subject.

"paper" mode follows the reference (Cones-V2 ``train_cones2.py``): a private copy of the whole text encoder is
fine-tuned with the diffusion loss plus the text-embedding preservation loss, with the class word alone as the
prompt; the residual is then the mean over 27 templates of (tuned - frozen) output embedding at the subject's
tokens. "fast" mode is our addition: it optimises the output-space residual itself (added at the subject's
tokens of the frozen encoder's output) against the same diffusion loss; no text-encoder copy, no preservation
loss needed (other tokens cannot move).

Host specifics handled here: node execution runs under ``torch.inference_mode()`` and loaded weights are
inference tensors, so training runs under ``inference_mode(False)``; the text-encoder copy gets fresh float32
parameters; the frozen UNet runs through a clone of the user's ModelPatcher under a torch-function mode that
hands its ops gradient-free aliases of the weights (no copies), so gradients reach the context only. The host's CLIP
layers add residuals in place (``x += ...``), which breaks backward: the private copy's layers run an
out-of-place forward. The user's MODEL and CLIP are left bit-identical.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import time
import types

import numpy as np
import torch
from comfy_api.latest import io

from ..cones2_core.errors import Cones2Error
from ..cones2_core.residual import FAMILY_NAMES, Residual, resolve_residual_path, save_residual
from ..cones2_core.training import (
    MAX_GRAD_NORM,
    MODES,
    WEIGHT_DECAY,
    BoundaryLossScaler,
    FrozenWeights,
    LowRankGradLinear,
    TrainSettings,
    add_at_rows,
    diffusion_loss,
    draw_loss_curve,
    factored_grad,
    factored_sq_norm,
    grad_free_alias,
    latent_batch,
    needs_loss_scaling,
    preservation_loss,
    residual_from_templates,
    sample_sigmas,
    split_channels,
    template_prompts,
    unet_autocast,
)
from .common import CATEGORY, Residuals
from .encoding import clip_family, escape_word, word_positions, word_tokens
from .paths import default_residual_folder

log = logging.getLogger("comfyui-cones2")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EVAL_SAMPLES = 8
LOW_RANK_CHUNK = 16 * 2**20  # bytes of weight gradients formed at once from their factors
PREVIEW_UPDATES = 20


# ---- inputs -------------------------------------------------------------------------------------------------

def _to_rgb(img: torch.Tensor) -> torch.Tensor:
    """[H, W, C] in 0..1 with C of 1 (grey), 2 (grey + alpha), 3 or 4 (RGBA) -> RGB, alpha composited on white."""
    img = img.float()
    c = img.shape[-1]
    if c in (2, 4):
        alpha = img[..., -1:].clamp(0, 1)
        img = img[..., :-1] * alpha + (1.0 - alpha)
        c -= 1
    if c == 1:
        img = img.expand(*img.shape[:-1], 3)
    elif c != 3:
        raise Cones2Error(f"an image has {img.shape[-1]} channels; connect RGB, RGBA or greyscale images")
    return img.clamp(0, 1)


def _folder_images(image_folder: str) -> list[torch.Tensor]:
    """The images in a folder under ComfyUI's input directory (sorted by name), as [H, W, 3] tensors."""
    import folder_paths
    from PIL import Image, ImageOps

    root = folder_paths.get_input_directory()
    name = image_folder.strip()
    hint = "image_folder must be a folder inside ComfyUI's input directory, e.g. 'my_dog'"
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
        raise Cones2Error(f"{hint}; {image_folder!r} is absolute or climbs out with '..'")
    real_root = os.path.realpath(root)
    folder = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([real_root, folder]) != real_root:
        raise Cones2Error(f"{hint}; {image_folder!r} resolves outside it (via a symlink?)")
    if not os.path.isdir(folder):
        raise Cones2Error(f"{hint}; there is no folder {image_folder!r} in {root}")
    out = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if not entry.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(path):
            continue
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            continue
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                im = im.convert("RGBA" if ("A" in im.getbands() or "transparency" in im.info) else "RGB")
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except OSError as e:
            raise Cones2Error(f"cannot read the image {entry!r} in {image_folder!r} ({e}); remove or re-save it") from e
        out.append(_to_rgb(torch.from_numpy(arr.copy())))
    if not out:
        raise Cones2Error(f"the folder {image_folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return out


def collect_images(images: torch.Tensor | None, image_folder: str = "") -> list[torch.Tensor]:
    """All training images as RGB [H, W, 3] float tensors (the IMAGE batch, then the folder's files)."""
    out = []
    if images is not None:
        if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4):
            raise Cones2Error("the images input must be an IMAGE batch [B, H, W, C]; connect e.g. Load Image")
        batch = images if images.ndim == 4 else images.unsqueeze(0)
        out += [_to_rgb(img) for img in batch]
    if image_folder and image_folder.strip():
        out += _folder_images(image_folder)
    if not out:
        raise Cones2Error("no training images: connect 3-5 images of the subject to 'images' or name a folder of "
                          "them (inside ComfyUI's input directory) in 'image_folder'")
    return out


def _resize_for_training(img: torch.Tensor, resolution: int) -> torch.Tensor:
    """[H, W, 3] -> [h, w, 3] with the short side = resolution, the long side at most 2x, both multiples of 8."""
    h, w = img.shape[:2]
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    x = img.permute(2, 0, 1).unsqueeze(0)
    if (nh, nw) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    ch, cw = min(nh, 2 * resolution) // 8 * 8, min(nw, 2 * resolution) // 8 * 8
    top, left = (nh - ch) // 2, (nw - cw) // 2
    return x[0, :, top:top + ch, left:left + cw].permute(1, 2, 0).clamp(0, 1).contiguous()


def encode_latents(vae, model, images: list[torch.Tensor], resolution: int) -> list[torch.Tensor]:
    """Each image resized and VAE-encoded once, in the diffusion model's latent space: [C, h, w] each."""
    out = []
    with torch.no_grad():
        for img in images:
            pixels = _resize_for_training(img, resolution).unsqueeze(0)
            lat = model.model.process_latent_in(vae.encode(pixels).float())
            out.append(lat[0].detach().clone().cpu())
    return out


def _prediction(model) -> tuple[str, float, object]:
    import comfy.model_sampling as ms_mod

    ms = model.get_model_object("model_sampling")
    if isinstance(ms, ms_mod.EDM) or isinstance(ms, ms_mod.X0) or not isinstance(ms, ms_mod.EPS):
        raise Cones2Error(f"this model's sampling ({type(ms).__name__}) is neither eps- nor v-prediction; Cones 2 "
                          "training supports SD1.5, SD2.x and SDXL checkpoints")
    kind = "v" if isinstance(ms, ms_mod.V_PREDICTION) else "eps"
    return kind, float(getattr(ms, "sigma_data", 1.0)), ms


def _subject_rows(clip, subject: str, text: str) -> list[int]:
    """Token rows of ``subject`` in the encoding of ``text`` (its last occurrence)."""
    occ = word_positions(clip, clip.tokenize(text), subject)
    if not occ:
        raise Cones2Error(f"the subject {subject!r} is not found in its own prompt {text!r}; use a plain word")
    return occ[-1]


# ---- the private text encoder -------------------------------------------------------------------------------

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
        table = torch.cat([self.delta, self.delta.new_zeros(1, self.delta.shape[1])])
        out = torch.nn.functional.embedding(input, self.weight) + table[self.slot[input]]
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


def _sdpa_attention(func, q, k, v, heads, *args, **kwargs):
    """Training uses torch's scaled_dot_product_attention (fast forward and backward) whatever attention the
    host picked for sampling (on CPU it picks sub-quadratic attention, whose backward is slow)."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(q, k, v, heads, *args, **kwargs)  # kwargs carry the wrapper's re-entry flag


# ---- the frozen UNet ----------------------------------------------------------------------------------------

class FrozenUNet:
    """A clone of the user's ModelPatcher, loaded through the host's memory management, as a context manager.

    Its forward must run under ``frozen`` (a FrozenWeights mode), which hands every op gradient-free aliases
    of the weights, so backward reaches the context only and nothing is copied. ``checkpoint_layers()``
    switches on gradient checkpointing of the UNet's layers (the ResBlocks, transformers and resamplers inside
    its input, middle and output blocks): their forwards are wrapped until exit, then restored. The host runs a
    block by calling its layers one by one (``forward_timestep_embed``), so the layers are what gets wrapped."""

    def __init__(self, model, device: torch.device, frozen: FrozenWeights):
        self.model, self.device, self.frozen = model, device, frozen
        self.mp = None
        self.checkpointing = False
        self._patched: list = []

    def __enter__(self) -> FrozenUNet:
        import comfy.model_management as mm

        self.mp = self.model.clone()
        mm.load_models_gpu([self.mp], force_full_load=self.device.type != "cpu")
        return self

    def layers(self) -> list[torch.nn.Module]:
        """The UNet's layers with parameters, inside its input, middle and output blocks."""
        dm = self.mp.model.diffusion_model
        blocks = [*getattr(dm, "input_blocks", []), *getattr(dm, "output_blocks", [])]
        if getattr(dm, "middle_block", None) is not None:
            blocks.append(dm.middle_block)
        return [layer for block in blocks for layer in block if next(layer.parameters(), None) is not None]

    def checkpoint_layers(self) -> None:
        if self.checkpointing:
            return
        for layer in self.layers():
            self._patched.append((layer, layer.__dict__.get("forward")))
            layer.forward = self._checkpointed(layer.forward)
        self.checkpointing = True

    def _checkpointed(self, bound):
        frozen = self.frozen

        def run(*args, **kwargs):
            with frozen:  # the recomputation in backward runs outside the training forward's mode
                return bound(*args, **kwargs)

        def forward(*args, **kwargs):
            # The host updates transformer_options (block indices) as the forward goes on: the recomputation
            # must see the dict as it was at this call, not as it is at backward time.
            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

        return forward

    def __exit__(self, *exc) -> None:
        for module, original in reversed(self._patched):
            if original is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = original
        self._patched.clear()
        self.checkpointing = False


# ---- training -----------------------------------------------------------------------------------------------

class _Trainer:
    """One training run (all state local to a node call)."""

    def __init__(self, model, clip, family, prediction, sigma_data, model_sampling, settings, subject, latents,
                 device):
        self.model, self.clip, self.family = model, clip, family
        self.prediction, self.sigma_data, self.ms = prediction, sigma_data, model_sampling
        self.s, self.subject, self.device = settings, subject, device
        self.latents = [lat.to(device) for lat in latents]
        self.size = settings.resolution // 8
        self.cuda = device.type == "cuda"
        self.amp = (self.cuda and torch.cuda.is_bf16_supported()) or (
            device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        compute = getattr(model.model, "manual_cast_dtype", None) or model.model.get_dtype()
        self.unet_amp = unet_autocast(compute, self.amp)  # the encoder's float32 weights always use self.amp
        self.scaler = BoundaryLossScaler() if needs_loss_scaling(compute, self.unet_amp) else None
        self.instance_tokens = clip.tokenize(escape_word(subject))
        self.instance_rows = _subject_rows(clip, subject, escape_word(subject))
        self.templates = template_prompts(escape_word(subject))
        self.template_tokens = [clip.tokenize(t) for t in self.templates]
        self.template_rows = [_subject_rows(clip, subject, t) for t in self.templates]
        self.sigmas = model_sampling.sigmas.detach().float().cpu()
        self.frozen = FrozenWeights()
        self.low_rank: list = []  # (weight, its factor sink) per low-rank-gradient Linear (see _clip_and_step)
        self.low_rank_opt = None

    def _autocast(self, amp: bool = True):
        """bf16 autocast for the training passes where the device supports it (CUDA, CPUs with bf16 kernels)."""
        if amp and self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _encode(self, enc, tokens, amp: bool = True):
        """(context [1, T, C], pooled) of one prompt: through the private copy ``enc``, or the user's CLIP (None)."""
        with self._autocast(amp):
            out = enc.encode_token_weights(tokens) if enc is not None else \
                self.clip.encode_from_tokens(tokens, return_pooled=True)
        return out[0].float().to(self.device), out[1]

    def _encode_templates(self, enc) -> list[torch.Tensor]:
        """The template prompts' contexts, one batched encoder pass (each template is one 77-token chunk).

        Always float32: the residual is a small difference of two of these, which bf16 rounding would swamp."""
        merged = {k: [chunk for t in self.template_tokens for chunk in t[k]] for k in self.template_tokens[0]}
        ctx = self._encode(enc, merged, amp=False)[0].cpu()
        return list(ctx.reshape(len(self.template_tokens), -1, ctx.shape[-1]))

    def _adm(self, pooled, batch: int):
        """SDXL's ``y`` (pooled text + size embeddings) from the frozen pooled output; None for SD1.5/SD2.x."""
        if pooled is None:
            return None
        res = self.s.resolution
        y = self.model.model.encode_adm(pooled_output=pooled.float(), width=res, height=res, crop_w=0, crop_h=0,
                                        target_width=res, target_height=res, device=self.device)
        return None if y is None else y.to(self.device).repeat(batch, 1)

    def _denoise(self, mp, x0, noise, sigma, context, y, amp: bool = True):
        x_t = self.ms.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0)
        extra = {} if y is None else {"y": y[: x0.shape[0]]}
        topts = copy.copy(mp.model_options.get("transformer_options", {}))
        topts.setdefault("optimized_attention_override", _sdpa_attention)
        with self._autocast(amp and self.unet_amp), self.frozen:
            return mp.model.apply_model(x_t, sigma, c_crossattn=context.expand(x0.shape[0], -1, -1),
                                        transformer_options=topts, **extra).float()

    def _eval_set(self):
        g = torch.Generator().manual_seed((self.s.seed + 1) % 2**64)
        x0 = torch.cat([latent_batch(self.latents, self.size, 1, g, flip=False) for _ in range(EVAL_SAMPLES)])
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        q = torch.linspace(0.1, 0.9, EVAL_SAMPLES)
        sigma = self.sigmas[(q * (len(self.sigmas) - 1)).round().long()].to(self.device)
        return x0, noise, sigma

    def _eval_loss(self, mp, context, y, eval_set) -> float:
        """Mean diffusion loss over the evaluation set, one sample at a time (no batch-sized activations)."""
        x0, noise, sigma = eval_set
        total = 0.0
        with torch.no_grad():
            for i in range(x0.shape[0]):
                one = slice(i, i + 1)
                den = self._denoise(mp, x0[one], noise[one], sigma[one], context, y, amp=False)  # float32
                total += float(diffusion_loss(den, x0[one], sigma[one], self.prediction, self.sigma_data))
        return total / x0.shape[0]

    def _step(self, mp, opt, params, context, frozen_ctx, x0, noise, sigma, y, paper: bool) -> torch.Tensor:
        """One optimisation step; returns the (detached) loss. The gradients are dropped before the forward, so
        a step that fails before ``opt.step()`` leaves the trainable state as it was."""
        s = self.s
        opt.zero_grad(set_to_none=True)
        for _, sink in self.low_rank:
            sink.clear()
        sc = self.scaler  # float16 UNet: its loss is scaled, and its gradient unscaled where it leaves the UNet
        if sc is not None:
            sc.finite = None  # nothing left over from a step that ran out of memory
        ctx = context()
        den = self._denoise(mp, x0, noise, sigma, ctx if sc is None else sc.boundary(ctx), y)
        diffusion = diffusion_loss(den, x0, sigma, self.prediction, self.sigma_data)
        keep = preservation_loss(ctx, frozen_ctx, self.instance_rows, s.preservation_weight_start,
                                 s.preservation_weight_rest) if paper else 0.0
        loss = diffusion + keep
        (loss if sc is None else diffusion * sc.scale + keep).backward()
        if sc is None or sc.update():
            self._clip_and_step(opt, params)
        else:
            log.info("training step skipped: the float16 UNet's gradient overflowed; loss scale lowered to %g",
                     sc.scale)
        return loss.detach()

    def _clip_and_step(self, opt, params) -> None:
        """clip_grad_norm_(all trainable parameters, MAX_GRAD_NORM), then AdamW. The low-rank Linears' gradients
        are formed from their factors a few at a time (LOW_RANK_CHUNK bytes), each batch stepped and dropped,
        so the step never holds them all."""
        if not self.low_rank:
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            return
        grads = [p.grad for p in params if p.grad is not None]
        sq = sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=self.device))
        for _, sink in self.low_rank:
            if sink:
                sq = sq + factored_sq_norm(sink)
        coef = (MAX_GRAD_NORM / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_ computes it
        for g in grads:
            g.mul_(coef.to(g.dtype))
        opt.step()
        pending, size = [], 0
        for i, (w, sink) in enumerate(self.low_rank):
            if sink:
                w.grad = factored_grad(sink).mul_(coef).to(w.dtype)
                sink.clear()
                pending.append(w)
                size += w.numel() * w.element_size()
            if pending and (size >= LOW_RANK_CHUNK or i == len(self.low_rank) - 1):
                self.low_rank_opt.step()  # steps exactly the weights that hold a gradient now
                for p in pending:
                    p.grad = None
                pending, size = [], 0

    def run(self, pbar=None, eval_every: int = 0):
        import comfy.model_management as mm

        s = self.s
        gen = torch.Generator().manual_seed(s.seed)
        paper = s.mode == "paper"
        ids = [t[0] for chunks in self.instance_tokens.values() for chunk in chunks for t in chunk
               if isinstance(t[0], int)]
        # Low-rank gradients keep a step's weight gradients as factors (exact, a few % of the memory)
        enc = private_text_encoder(self.clip, self.device, trainable_ids=ids, low_rank_grads=True) if paper else None
        opt = None
        try:
            with torch.no_grad():
                frozen_ctx, pooled = self._encode(enc, self.instance_tokens)
                frozen_templates = self._encode_templates(enc) if paper else None
            y = self._adm(pooled, max(s.batch_size, EVAL_SAMPLES))
            if paper:
                fused = self.device.type in ("cpu", "cuda")
                self.low_rank = [(m.weight, m.lowrank_sink) for m in enc.modules() if hasattr(m, "lowrank_sink")]
                factored = {id(w) for w, _ in self.low_rank}
                self.low_rank_opt = torch.optim.AdamW([w for w, _ in self.low_rank], lr=s.learning_rate,
                                                      weight_decay=WEIGHT_DECAY, fused=fused) if self.low_rank else None
                params = [p for p in enc.parameters() if p.requires_grad and id(p) not in factored]
                opt = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=WEIGHT_DECAY, fused=fused)
                residual = None
            else:  # the frozen outputs above are all fast mode needs
                residual = torch.zeros(len(self.instance_rows), frozen_ctx.shape[-1], device=self.device,
                                       requires_grad=True)
                params = [residual]
                opt = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=0.0)

            def context(amp: bool = True):
                if residual is not None:
                    return add_at_rows(frozen_ctx, self.instance_rows, residual)
                return self._encode(enc, self.instance_tokens, amp)[0]

            losses: list[float] = []
            eval_points: list[tuple[int, float]] = []
            with FrozenUNet(self.model, self.device, self.frozen) as unet:
                mp = unet.mp
                eval_set = self._eval_set()
                with torch.no_grad():
                    eval_points.append((0, self._eval_loss(mp, context(False), y, eval_set)))
                every = max(1, s.steps // PREVIEW_UPDATES)
                for step in range(s.steps):
                    mm.throw_exception_if_processing_interrupted()
                    x0 = latent_batch(self.latents, self.size, s.batch_size, gen)
                    noise = torch.randn(x0.shape, generator=gen).to(self.device)
                    sigma = sample_sigmas(self.sigmas, s.batch_size, gen).to(self.device)
                    for _attempt in range(2):
                        try:
                            loss = self._step(mp, opt, params, context, frozen_ctx, x0, noise, sigma, y, paper)
                            break
                        except torch.OutOfMemoryError as e:
                            if unet.checkpointing:
                                raise Cones2Error(
                                    f"out of {self.device.type.upper()} memory at training step {step + 1}, even "
                                    "with gradient checkpointing; lower the resolution or batch_size, or use mode "
                                    "'fast'") from e
                            oom = str(e).splitlines()[0] if str(e) else "out of memory"
                        # here, outside the except block, its frames (and their activations) are already freed;
                        # drop the failed backward's partial gradients too before the allocator gives memory back
                        opt.zero_grad(set_to_none=True)
                        if self.cuda:
                            torch.cuda.empty_cache()
                        log.warning("out of memory at training step %d (%s); switching on gradient checkpointing "
                                    "of the UNet (slower, much less memory) and redoing the step", step + 1, oom)
                        unet.checkpoint_layers()
                    value = float(loss)
                    if not math.isfinite(value):
                        raise Cones2Error(f"the training loss became {value} at step {step + 1}; lower the "
                                          "learning_rate")
                    losses.append(value)
                    if eval_every and (step + 1) % eval_every == 0 and step + 1 < s.steps:
                        with torch.no_grad():
                            eval_points.append((step + 1, self._eval_loss(mp, context(False), y, eval_set)))
                    if pbar is not None:
                        preview = None
                        if (step + 1) % every == 0 or step + 1 == s.steps:
                            from PIL import Image

                            pic = draw_loss_curve(losses, eval_points, title=f"loss {value:.4g}")
                            preview = ("JPEG", Image.fromarray((pic * 255).astype(np.uint8)), 512)
                        pbar.update_absolute(step + 1, s.steps, preview)
                with torch.no_grad():
                    eval_points.append((s.steps, self._eval_loss(mp, context(False), y, eval_set)))
            with torch.no_grad():
                if residual is not None:
                    delta = residual.detach().float().cpu()
                else:
                    # the optimiser state (two moments per trainable weight) is done with: free it before the
                    # template pass, so that pass reuses its memory instead of adding to the peak
                    opt = params = None
                    self.low_rank, self.low_rank_opt = [], None
                    tuned = self._encode_templates(enc)
                    delta = residual_from_templates(tuned, frozen_templates, self.template_rows)
            return delta, losses, eval_points
        finally:
            enc = opt = None  # drop the private encoder and optimiser state now
            self.low_rank, self.low_rank_opt = [], None
            if self.cuda:
                torch.cuda.empty_cache()


def train_residual(model, clip, vae, images: list[torch.Tensor], subject: str, settings: TrainSettings,
                   pbar=None, eval_every: int = 0) -> tuple[Residual, list[float], list[tuple[int, float]]]:
    """Train a residual (nothing is written). Returns (residual, training losses, [(step, eval loss)]).

    The evaluation loss (fixed crops, noise and sigmas) is measured before the first and after the last step,
    and every ``eval_every`` steps in between when that is > 0.
    """
    import comfy.model_management as mm

    for value, what in ((model, "model"), (clip, "clip"), (vae, "vae")):
        if value is None:
            raise Cones2Error(f"the {what} input is empty: connect the {what.upper()} output of a checkpoint loader")
    family = clip_family(clip)
    subject = (subject or "").strip()
    if not subject:
        raise Cones2Error("the subject is empty; set it to the subject's class word, e.g. 'dog'")
    counts = {k: len(v) for k, v in word_tokens(clip, subject).items()}
    if not all(counts.values()):
        raise Cones2Error(f"the subject {subject!r} has no tokens for this CLIP; use a class word such as 'dog'")
    if len(set(counts.values())) != 1:
        raise Cones2Error(f"the subject {subject!r} tokenises differently for the two SDXL encoders; use a plain word")
    prediction, sigma_data, ms = _prediction(model)
    s = settings.resolved(family, prediction)
    device = mm.get_torch_device()
    t0 = time.time()
    with torch.inference_mode(False), torch.enable_grad():
        latents = encode_latents(vae, model, images, s.resolution)
        trainer = _Trainer(model, clip, family, prediction, sigma_data, ms, s, subject, latents, device)
        delta, losses, eval_points = trainer.run(pbar, eval_every)
    seconds = time.time() - t0
    meta = s.metadata(prediction=prediction, images=len(images), templates=len(trainer.templates),
                      eval_loss_start=repr(eval_points[0][1]), eval_loss_end=repr(eval_points[-1][1]),
                      loss_first=losses[0], loss_last=losses[-1], seconds=round(seconds, 1))
    residual = Residual(subject, family, split_channels(delta, family), metadata=meta).validate()
    log.info("trained a %s residual for %r (%s mode, %d steps, %.1f s): eval loss %.5g -> %.5g",
             FAMILY_NAMES[family], subject, s.mode, s.steps, seconds, eval_points[0][1], eval_points[-1][1])
    return residual, losses, eval_points


def residual_save_path(save_name: str) -> str:
    """``models/cones2_residuals/<save_name>.safetensors``, confined to that folder."""
    name = (save_name or "").strip()
    if name and not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    return resolve_residual_path(default_residual_folder(), name)


MAX_NAME_BYTES = 200  # file systems allow 255; the counter and the temporary file's affixes need the rest


def free_path(path: str) -> str:
    """``path`` when no file is there, else the first free ``<stem>_00001.safetensors``, ``_00002``, ...: an
    existing residual is never replaced (the host's own savers number their files the same way)."""
    if not os.path.lexists(path):
        return path
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.lexists(f"{stem}_{n:05d}{ext}"):
        n += 1
    return f"{stem}_{n:05d}{ext}"


def prepare_destination(save_name: str) -> str:
    """Check, before any training, that the residual can be written: the name stays inside the residuals folder
    and is short enough, its sub-folders exist or can be made, and the folder is writable. Returns the path."""
    path = residual_save_path(save_name)
    name = os.path.basename(path)
    if len(name.encode()) > MAX_NAME_BYTES:
        raise Cones2Error(f"save_name is {len(name.encode())} bytes long as a file name; use at most "
                          f"{MAX_NAME_BYTES} (e.g. 'my_dog')")
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise Cones2Error(f"cannot write residuals into {folder!r} ({e.strerror or e}); pick another save_name or "
                          "make that folder writable") from e
    return path


class Cones2TrainResidual(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Cones2TrainResidual",
            display_name="Cones2 Train Residual",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Learns a Cones 2 residual for one subject from a few (3-5) images of it and saves it to "
                "models/cones2_residuals/<save_name>.safetensors. 'paper' mode fine-tunes a private copy of the "
                "text encoder exactly as the Cones 2 paper (diffusion loss + text-embedding preservation loss, "
                "prompt = the class word alone), then averages the change of the subject's output embedding "
                "over 27 prompt templates. 'fast' mode (our addition) optimises that output-space residual "
                "directly against the same diffusion loss. Your MODEL and CLIP are not changed."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model of an SD1.5, SD2.x or SDXL checkpoint (kept "
                                                "frozen; gradients only flow through it)."),
                io.Clip.Input("clip", tooltip="The matching CLIP; a private copy is fine-tuned, yours is unchanged."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to encode the training images once."),
                io.String.Input("subject", default="dog",
                                tooltip="The subject's class word, e.g. 'dog'. Later prompts use this word; the "
                                        "residual is added at its tokens."),
                io.Int.Input("steps", default=4000, min=1, max=100000,
                             tooltip="Optimisation steps (the paper uses 4000 at batch size 1)."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate; 0 = automatic (paper mode 5e-6 as the paper, "
                                       "fast mode 1e-3)."),
                io.Float.Input("preservation_weight_start", default=1e-2, min=0.0, max=10.0, step=1e-3,
                               tooltip="Paper mode: weight of ||e_0 - e*_0|| (start token keeps its embedding)."),
                io.Float.Input("preservation_weight_rest", default=1e-3, min=0.0, max=10.0, step=1e-4,
                               tooltip="Paper mode: weight of ||e_{1+n:} - e*_{1+n:}|| (tokens after the subject "
                                       "keep their embeddings)."),
                io.Int.Input("resolution", default=0, min=0, max=2048, step=64,
                             tooltip="Training crop size in pixels; 0 = automatic (SD1.5 512, SD2.x-v 768, "
                                     "SDXL 1024). Images are resized so their short side matches, then "
                                     "randomly cropped and flipped."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Crops per step (the paper uses 1)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the crops, noise and timesteps: the same seed gives the same "
                                     "residual."),
                io.String.Input("save_name", default="cones2_subject",
                                tooltip="File name in models/cones2_residuals/ ('.safetensors' is added; sub-folders "
                                        "are made). Written only when training finishes; an existing file is "
                                        "never replaced: a counter is added (name_00001) and the output says "
                                        "which file was written."),
                io.Combo.Input("mode", options=list(MODES), default="paper",
                               tooltip="paper: fine-tune a private text-encoder copy as the Cones 2 paper. fast: "
                                       "optimise the residual directly (our addition; much cheaper)."),
                io.Image.Input("images", optional=True,
                               tooltip="The subject's images (any sizes; RGBA and greyscale are converted)."),
                io.String.Input("image_folder", default="", optional=True,
                                tooltip="Optional folder of images inside ComfyUI's input directory, e.g. "
                                        "'my_dog'; used in addition to 'images'."),
            ],
            outputs=[
                Residuals.Output(display_name="residuals",
                                 tooltip="A chain holding the new residual, for Apply Residuals to Conditioning."),
                io.String.Output(display_name="filename", tooltip="The saved file's name in models/cones2_residuals/."),
                io.Image.Output(display_name="loss_curve",
                                tooltip="Training loss (grey raw, blue smoothed) and evaluation loss (red)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, subject, steps=4000, learning_rate=0.0, preservation_weight_start=1e-2,
                preservation_weight_rest=1e-3, resolution=0, batch_size=1, seed=0, save_name="cones2_subject",
                mode="paper", images=None, image_folder="") -> io.NodeOutput:
        import comfy.utils

        path = prepare_destination(save_name)  # refuse a bad destination before spending time on training
        pictures = collect_images(images, image_folder or "")
        settings = TrainSettings(mode=mode, steps=int(steps), learning_rate=float(learning_rate),
                                 preservation_weight_start=float(preservation_weight_start),
                                 preservation_weight_rest=float(preservation_weight_rest),
                                 resolution=int(resolution), batch_size=int(batch_size), seed=int(seed))
        pbar = comfy.utils.ProgressBar(int(steps))
        residual, losses, eval_points = train_residual(model, clip, vae, pictures, subject, settings, pbar)
        curve = draw_loss_curve(losses, eval_points, title=f"{residual.subject} ({mode}): "
                                f"eval {eval_points[0][1]:.4g} -> {eval_points[-1][1]:.4g}")
        outputs = ([residual.with_strength(1.0)], torch.from_numpy(curve).unsqueeze(0))
        final = free_path(path)
        try:
            save_residual(residual, final)
        except Cones2Error as e:  # the training is not lost: the residual still flows to the next nodes
            message = (f"the residual was trained but could not be written to {final}: {e}. It is still passed on "
                       "through the 'residuals' output; fix the folder and run again to save it")
            log.error("Cones2 Train Residual: %s", message)
            return io.NodeOutput(outputs[0], "", outputs[1], ui={"text": [message]})
        filename = os.path.relpath(final, default_residual_folder())
        note = "" if final == path else f" ({os.path.basename(path)} exists and was kept)"
        log.info("saved residual %s%s", final, note)
        return io.NodeOutput(outputs[0], filename, outputs[1], ui={"text": [f"saved {filename}{note}"]})


NODES = [Cones2TrainResidual]
