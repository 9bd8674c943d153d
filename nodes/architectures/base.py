"""The contract every model architecture of the pack fulfils, and the machinery they share.

An architecture is one entry of the registry (``nodes/architectures/__init__.py``), named by the family records
(``cones2_core/families.py``: ``Family.architecture``). Its module defines one ``Architecture`` subclass and
supplies what is genuinely its own:

* ``patch(model, specs)``: the attention patches of Layout Guidance on a clone (the UNet's ``attn2`` replace
  patches; nothing for a model whose attention is reached per call through ``transformer_options``);
* ``per_call(specs, transformer_options, x, context)``: the per-model-call step of the APPLY_MODEL wrapper (the
  joint attention's image grid and override), or None;
* ``frozen_model``: the ``FrozenModel`` subclass Train Residual runs the model through (which layers are
  checkpointed).

What every architecture shares is here: telling a model's family from the host's model config (``model_family``),
installing guidance on a clone (``Architecture.install``), the prediction type from the host's model sampling, the
training inputs from the host's own ``extra_conds``, the frozen model's loading and checkpointing, the training
attention, and the skeleton of a guided attention call (``GuidedAttention``).
"""

from __future__ import annotations

import functools

import torch

from ...cones2_core.errors import Cones2Error
from ...cones2_core.families import FAMILIES, Family
from ...cones2_core.gradients import OutOfPlaceAdds
from ..guidance import CALL_KEY, GuidanceSpec, add_wrappers, merge_prompts, specs_of, subject_tokens
from ..recording import find_recording

# ---- which family a model is --------------------------------------------------------------------------------


def model_family(model_patcher) -> Family | None:
    """The family whose host model configs (``Family.model_configs``, matched with isinstance, so fine-tunes with
    their own config class count) include this model's; None for a model of no supported family."""
    import comfy.supported_models

    config = getattr(getattr(model_patcher, "model", None), "model_config", None)
    if config is None:
        return None
    for fam in FAMILIES.values():
        classes = tuple(getattr(comfy.supported_models, name) for name in fam.model_configs
                        if hasattr(comfy.supported_models, name))
        if classes and isinstance(config, classes):
            return fam
    return None


def describe_model(model_patcher) -> str:
    """'SD3 (model config SD3)' for messages about a model of no supported family."""
    config = getattr(getattr(model_patcher, "model", None), "model_config", None)
    return f"a {type(config).__name__} model" if config is not None else f"a {type(model_patcher).__name__}"


def supported_names() -> str:
    return ", ".join(f.name for f in FAMILIES.values())


# ---- the contract ------------------------------------------------------------------------------------------


class Architecture:
    """One model architecture: how Layout Guidance patches it and how Train Residual runs it. Subclasses set
    ``key`` (the family records' ``architecture``), ``attention`` (what is guided, for messages) and
    ``frozen_model``, and override ``patch`` / ``per_call`` / ``check_model`` where they need to."""

    key: str = ""
    attention: str = ""  # "cross-attention", "joint attention"
    frozen_model: type[FrozenModel]

    def families(self) -> list[Family]:
        return [f for f in FAMILIES.values() if f.architecture == self.key]

    def handles(self, model_patcher) -> bool:
        """Whether the model is of one of this architecture's families (table-driven: ``model_family``)."""
        fam = model_family(model_patcher)
        return fam is not None and fam.architecture == self.key

    # -- guidance

    def check_model(self, model_patcher) -> None:
        """Refuse a model of this architecture's families that the patch cannot guide (a variant's layout)."""

    def patch(self, model_patcher, specs: list[GuidanceSpec]) -> None:
        """Install the attention patches for ``specs`` on the clone ``model_patcher`` (default: none, the
        attention is reached per call by ``per_call``)."""

    def per_call(self, model_patcher):
        """The APPLY_MODEL wrapper's per-call step for this clone, ``f(specs, transformer_options, x=, context=)``
        returning transformer_options, or None."""
        return None

    def install(self, model_patcher, spec: GuidanceSpec):
        """A clone of ``model_patcher`` with the guidance of ``spec`` and of earlier Layout Guidance nodes (a prompt
        both guide gets the subjects of both: ``merge_prompts``)."""
        self.check_model(model_patcher)
        earlier, spec = merge_prompts(specs_of(model_patcher), spec)
        specs = earlier + [spec]
        m = model_patcher.clone()
        self.patch(m, specs)
        add_wrappers(m, specs, per_call=self.per_call(m))
        return m

    # -- training

    def model_latent(self, x):
        """A training batch of still latents [B, C, h, w] as the model takes it (a video model: with a frame
        axis); ``from_model_latent`` undoes it on the model's output."""
        return x

    def from_model_latent(self, x):
        return x

    def prediction_type(self, model, family: Family) -> tuple[str, float, object]:
        """(``"eps"``, ``"v"`` or ``"flow"``, sigma_data, the model_sampling object) of the host's model, which must
        be one ``family`` predicts; an error saying what to connect otherwise."""
        import comfy.model_sampling as ms_mod

        ms = model.get_model_object("model_sampling")
        kind = None
        if isinstance(ms, ms_mod.CONST):
            kind = "flow"
        elif isinstance(ms, ms_mod.EPS) and not isinstance(ms, ms_mod.EDM | ms_mod.X0):
            kind = "v" if isinstance(ms, ms_mod.V_PREDICTION) else "eps"
        if kind not in family.predictions:
            if family.predictions == ("flow",):
                raise Cones2Error(f"this model ({type(model.model).__name__}, sampling {type(ms).__name__}) is not "
                                  f"a {family.name} flow-matching model; connect the MODEL of a {family.name} "
                                  "loader (Load Diffusion Model)")
            raise Cones2Error(f"this model's sampling ({type(ms).__name__}) is neither eps- nor v-prediction; Cones 2 "
                              f"training supports {supported_names()} checkpoints")
        return kind, (1.0 if kind == "flow" else float(getattr(ms, "sigma_data", 1.0))), ms

    def training_conds(self, model, pooled, settings, batch: int, device) -> dict[str, torch.Tensor]:
        """The model's extra inputs for training, ``batch`` rows each, as the host builds them for sampling
        (``model_base.*.extra_conds``): SDXL's ``y`` (pooled text + the size embeddings of a ``resolution``
        square crop), Flux's ``y`` (pooled CLIP-L) and ``guidance``; nothing for SD1.5/SD2.x. The text context is
        the trainer's own and is not taken from here."""
        import comfy.conds

        size = settings.resolution
        kwargs = {"device": device, "noise": torch.zeros(1, 1, max(1, size // 8), max(1, size // 8), device=device),
                  "width": size, "height": size, "crop_w": 0, "crop_h": 0, "target_width": size,
                  "target_height": size}
        # None for a family without a pooled encoder (Chroma), as its sampling conditioning carries it
        kwargs["pooled_output"] = None if pooled is None else pooled.float()
        if settings.guidance is not None:
            kwargs["guidance"] = float(settings.guidance)
        out = {}
        for name, cond in model.model.extra_conds(**kwargs).items():
            if name in ("c_crossattn", "c_concat") or not isinstance(cond, comfy.conds.CONDRegular):
                continue
            out[name] = cond.process_cond(batch_size=batch, device=device).cond
        return out


# ---- the guided attention call, shared by cross-attention and joint attention ---------------------------------


OVERRIDE_KEY = "optimized_attention_override"  # the host's key (comfy/ldm/modules/attention.py wrap_attn)


def with_override(transformer_options: dict, override_type, grid_key: str, grid) -> dict:
    """One model call's transformer_options with this call's ``grid`` under ``grid_key`` and an ``override_type``
    (an attention override taking ``inner=``) around any override another pack set first (ours is kept)."""
    other = transformer_options.get(OVERRIDE_KEY)
    override = other if isinstance(other, override_type) else override_type(inner=other)
    return {**transformer_options, grid_key: grid, OVERRIDE_KEY: override}


def host_attention(func, inner, args, kwargs):
    """(the host's attention as an override calls it: ``func``, or another pack's ``inner`` override around it; the
    call's heads, by position or keyword (SD3.5's MMDiT and Wan pass ``heads=``), None when it has none)."""
    base = func if inner is None else functools.partial(inner, func)
    return base, (args[3] if len(args) > 3 else kwargs.get("heads"))


def active_groups(transformer_options) -> list:
    """The GuidedRows of this model call that guide or record (nodes/guidance.py puts them under CALL_KEY)."""
    return [g for g in (transformer_options or {}).get(CALL_KEY) or ()
            if g.spec.guidance_weight != 0 or g.spec.record]


def subject_token_lists(g) -> list[list[int]]:
    """The context rows of each subject of the group ``g`` in this call."""
    return [subject_tokens(s, g.offsets) for s in g.subjects]


def record_maps(g, h: int, w: int, mass_of, frames: int | None = None) -> None:
    """Add one call's attention mass of the subjects of ``g`` on its ``h`` x ``w`` grid to its node's recording,
    when that node records and a sampling run is being recorded: ``mass_of(token lists)`` -> [subjects, h * w]
    (called only then); of a video of ``frames`` latent frames, [subjects, frames * h * w]."""
    if not g.spec.record:
        return
    rec = find_recording(g.spec.uid)
    if rec is not None:
        rec.add(h, w, mass_of(subject_token_lists(g)), g.subjects, g.window, frames=frames)


def guided_call(groups, batch: int, whole, attend, whole_always: bool = False):
    """One attention call with some rows guided: the skeleton both patches follow.

    ``whole()``: the block's own output over the whole batch (the very call an unguided model makes), run when a
    row is left unbiased or ``whole`` is needed anyway, so unbiased rows (the uncond pass, other prompts,
    guidance_weight 0) stay bit-identical; when every row is biased it is skipped, unless ``whole_always`` (another
    pack's patch inside ours, which expects the whole batch). ``attend(g)``: the guided
    output of the rows of the group ``g`` (its maps recorded), or None where ``g`` only records (weight 0). The
    guided rows are written over a copy of the whole output."""
    biased = sum(len(g.rows) for g in groups if g.spec.guidance_weight != 0)
    out = whole() if biased < batch or whole_always else None
    written = False
    for g in groups:
        res = attend(g)
        if res is None:
            continue
        rows = g.tensors(res.device)[0]
        if out is None:
            out = res.new_empty((batch, *res.shape[1:]))
        elif not written:
            out = out.clone()
        written = True
        out[rows] = res.to(out.dtype)
    return out


# ---- training: the frozen model and its attention ------------------------------------------------------------


def sdpa_attention(func, q, k, v, heads, *args, **kwargs):
    """Training uses torch's scaled_dot_product_attention (fast forward and backward) whatever attention the
    host picked for sampling (on CPU it picks sub-quadratic attention, whose backward is slow)."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(q, k, v, heads, *args, **kwargs)  # kwargs carry the wrapper's re-entry flag


class FrozenModel:
    """A clone of the user's ModelPatcher, loaded through the host's memory management, as a context manager.

    Its forward must run under ``frozen`` (a GradientFreeWeights mode), which hands every op gradient-free
    aliases of the weights, so backward reaches the context only and nothing is copied. ``checkpoint_layers()``
    switches on gradient checkpointing of ``layers()``: their forwards are wrapped until exit, then restored.

    Subclasses name their ``layers()`` and loading policy: ``full_load_on_gpu`` (partly loaded weights are
    streamed as per-op copies, which autograd would keep for backward), ``checkpoint_from_start``, and
    ``out_of_place_adds`` for layers that add their residuals in place into tensors saved for backward."""

    full_load_on_gpu = True
    checkpoint_from_start = False
    out_of_place_adds = False

    def __init__(self, model, device: torch.device, frozen: torch.overrides.TorchFunctionMode):
        self.model, self.device, self.frozen = model, device, frozen
        self.mp = None
        self.checkpointing = False
        self._patched: list = []

    def __enter__(self) -> FrozenModel:
        import comfy.model_management as mm

        self.mp = self.model.clone()
        mm.load_models_gpu([self.mp], force_full_load=self.full_load_on_gpu and self.device.type != "cpu")
        if self.checkpoint_from_start:
            self.checkpoint_layers()
        return self

    def layers(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def checkpoint_layers(self) -> None:
        if self.checkpointing:
            return
        for layer in self.layers():
            self._patched.append((layer, layer.__dict__.get("forward")))
            layer.forward = self._checkpointed(layer.forward)
        self.checkpointing = True

    def _checkpointed(self, bound):
        frozen = self.frozen
        if self.out_of_place_adds:
            inner = bound

            def bound(*args, **kwargs):  # their training forwards (and recomputations) add out of place
                with OutOfPlaceAdds():
                    return inner(*args, **kwargs)

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
