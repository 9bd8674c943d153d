"""The model families Cones 2 supports: one frozen record per family, read by everything else.

Adding a family means one record here, its architecture's entry in the registry (``nodes/architectures/``: an
existing one when its attention is reached the same way) and its test bed (``harness/beds.py``); docs/porting.md
walks the steps. The residual file format, the word finder, the conditioning maths, the error messages and the
shared per-family tests all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import Cones2Error

TOKENIZERS = ("clip_bpe", "sentencepiece")  # the kinds of tokenizer a family's encoders can have


@dataclass(frozen=True)
class Encoder:
    """One text encoder's part of a family's conditioning tensor ``[B, rows, channels]``.

    Channels: the encoder's output sits in channels ``offset .. offset + width`` (SDXL: CLIP-L 0..767 and CLIP-G
    768..2047, side by side). Rows: encoders of one ``group`` share their rows (side by side in channels); groups
    follow one another along the token axis, in order, each as long as its tokenised prompt (a family whose
    context stacks a CLIP part and a T5 part has two groups). Within its group, an encoder's token ``i`` is row
    ``i - skip_rows`` (the host drops that many leading rows, e.g. a chat template's prefix)."""

    key: str  # the host tokenizer's key: "l", "h", "g", "t5xxl"
    name: str  # what users call it
    offset: int  # first channel
    width: int  # channels
    group: int = 0  # row group (see above)
    tokenizer: str = "clip_bpe"  # "clip_bpe": byte-level BPE with start/end tokens; "sentencepiece": T5, no start
    skip_rows: int = 0  # leading token rows the host drops before the encoder's output

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer kind {self.tokenizer!r}; one of {TOKENIZERS}")


@dataclass(frozen=True)
class Family:
    key: str  # as residual files name it (metadata cones2.family)
    name: str  # as users name it
    encoders: tuple[Encoder, ...]
    architecture: str  # its entry in the registry of architectures (nodes/architectures/): "unet", "flux"
    model_configs: tuple[str, ...]  # the host's model configs (comfy.supported_models classes, or subclasses) it is
    predictions: tuple[str, ...]  # what its models may predict: "eps", "v" (UNets), "flow" (flow matching)
    resolution: int  # default training crop of its eps-prediction (and flow) models
    v_resolution: int | None = None  # ... and of its v-prediction models (SD2.x 768-v)
    # Tokens per encoder chunk: long prompts and ConditioningConcat align to it. None: one chunk of any length
    # (T5: the prompt's tokens, then padding up to the tokenizer's min_length, 256 for Flux by default).
    chunk: int | None = 77
    # Tokenizer keys of encoders that give only the pooled output, not conditioning rows (Flux's CLIP-L).
    pooled_only: tuple[str, ...] = ()
    reference_width: int | None = None  # the width of the reference implementation's .pt residuals read as it
    distilled_guidance: bool = False  # the model takes a distilled guidance value (Flux; FluxGuidance sets it)
    paper_refusal: str = ""  # why paper mode (fine-tuning the text encoder) is refused on this family, if it is

    @property
    def width(self) -> int:
        """Channels of the whole conditioning (the UNet's context_dim)."""
        return sum(e.width for e in self.encoders)

    @property
    def conditioning_keys(self) -> tuple[str, ...]:
        """The tokenizer keys whose outputs form the conditioning rows (where words and residuals sit)."""
        return tuple(e.key for e in self.encoders)

    @property
    def tokenizer_keys(self) -> frozenset[str]:
        """Every key the host's tokenizer gives for this family (``conditioning_keys`` plus ``pooled_only``)."""
        return frozenset(self.conditioning_keys) | frozenset(self.pooled_only)

    @property
    def widths(self) -> dict[str, int]:
        return {e.key: e.width for e in self.encoders}

    @property
    def groups(self) -> tuple[tuple[Encoder, ...], ...]:
        """The encoders by row group, in row order (see Encoder)."""
        return tuple(tuple(e for e in self.encoders if e.group == g) for g in sorted({e.group for e in self.encoders}))

    def encoder(self, key: str) -> Encoder:
        return next(e for e in self.encoders if e.key == key)

    def default_resolution(self, prediction: str) -> int:
        """Training resolution when the node's input is 0: the family's native size (Flux: 512, see its record)."""
        return self.v_resolution if prediction == "v" and self.v_resolution else self.resolution

    def describe(self) -> str:
        """'SDXL (CLIP-L 768 + CLIP-G 1280)'"""
        return f"{self.name} (" + " + ".join(f"{e.name} {e.width}" for e in self.encoders) + ")"


_CLIP_L = Encoder("l", "CLIP-L", 0, 768)
_T5_PAPER = ("paper mode fine-tunes the whole text encoder, which on {name} is T5-XXL (4.7 B parameters: about 57 GB "
             "for its float32 weights and AdamW's two moments, before any activation, besides the diffusion "
             "model); set mode to 'fast', which optimises the residual at the subject's T5 rows directly against "
             "{name}'s own flow-matching loss")

FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family("sd1", "SD1.5", (_CLIP_L,), "unet", ("SD15",), ("eps", "v"), 512, reference_width=768),
    Family("sd2", "SD2.x", (Encoder("h", "OpenCLIP-H", 0, 1024),), "unet", ("SD20",), ("eps", "v"), 512,
           v_resolution=768, reference_width=1024),
    Family("sdxl", "SDXL", (_CLIP_L, Encoder("g", "CLIP-G", 768, 1280)), "unet", ("SDXL",), ("eps", "v"), 1024),
    # Flux: the T5-XXL rows are the whole context (the joint attention's text part, row 0 = the first word, no
    # start token); CLIP-L ("l") only gives the pooled vector. Training crop 512, not its native 1024: 1024 image
    # tokens + the text's 256 instead of 4096 + 256, 3.4x fewer per step (docs/flux.md).
    Family("flux", "Flux", (Encoder("t5xxl", "T5-XXL", 0, 4096, tokenizer="sentencepiece"),), "flux", ("Flux",),
           ("flow",), 512, chunk=None, pooled_only=("l",), distilled_guidance=True,
           paper_refusal=_T5_PAPER.format(name="Flux")),
    # Chroma (Flux-derived, docs/chroma.md): T5-XXL alone (the host's CLIPLoader type chroma: tokenizer key
    # "t5xxl", no pooled CLIP, no padding), real CFG (no distilled guidance input), Flux's joint attention with its
    # own modulation. Its T5 rows are 4096 wide like Flux's: a residual file without cones2.family metadata cannot
    # tell the two apart (by_widths / residual.family_from_widths refuse to guess).
    Family("chroma", "Chroma", (Encoder("t5xxl", "T5-XXL", 0, 4096, tokenizer="sentencepiece"),), "chroma",
           ("Chroma",), ("flow",), 512, chunk=None, paper_refusal=_T5_PAPER.format(name="Chroma")),
)}


def family(key: str) -> Family:
    """The family named ``key``, or an error listing the supported ones."""
    if key not in FAMILIES:
        choices = ", ".join(f"'{f.key}' ({f.name})" for f in FAMILIES.values())
        raise Cones2Error(f"unknown model family {key!r}; use one of {choices}")
    return FAMILIES[key]


def family_name(key: str | None, default: str | None = None) -> str:
    """A family's display name ('SD1.5'); ``default`` (else the key itself) for an unknown one."""
    f = FAMILIES.get(key)
    return f.name if f else (default if default is not None else repr(key))


def by_encoder_keys(keys) -> Family | None:
    """The family whose tokenizer keys are exactly ``keys`` (as the host's tokenizer names them, pooled-only
    encoders included: {"l", "t5xxl"} is Flux, {"l"} SD1.5)."""
    keys = frozenset(keys)
    return next((f for f in FAMILIES.values() if f.tokenizer_keys == keys), None)


def families_by_widths(widths: dict[str, int]) -> tuple[Family, ...]:
    """Every family whose encoders have exactly these widths (Flux and Chroma share {"t5xxl": 4096})."""
    return tuple(f for f in FAMILIES.values() if f.widths == dict(widths))


def by_widths(widths: dict[str, int]) -> Family | None:
    """The one family whose encoders have exactly these widths ({"h": 1024} -> SD2.x); None when no family or
    several have them (families_by_widths lists those)."""
    found = families_by_widths(widths)
    return found[0] if len(found) == 1 else None


def by_context_width(width: int) -> Family | None:
    """The one family whose whole conditioning is ``width`` channels wide; None for none or several (4096: Flux
    and Chroma)."""
    found = [f for f in FAMILIES.values() if f.width == width]
    return found[0] if len(found) == 1 else None


def article(name: str) -> str:
    """'an' before a family name read letter by letter ('an SD1.5', 'an SDXL'), else 'a' ('a Flux')."""
    return "an" if name[:2].isupper() or name[:1] in "AEIOU" else "a"


def by_reference_width(width: int) -> Family | None:
    """The family a reference ``.pt`` residual of this width belongs to."""
    return next((f for f in FAMILIES.values() if f.reference_width == width), None)
