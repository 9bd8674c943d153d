"""The model families Cones 2 supports: one frozen record per family, read by everything else.

Adding a family means one record here, its architecture's entry in the registry (``nodes/architectures/``: an
existing one when its attention is reached the same way) and its test bed (``harness/beds.py``); docs/porting.md
walks the steps. The residual file format, the word finder, the conditioning maths, the error messages and the
shared per-family tests all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import Cones2Error

# The kinds of tokenizer a family's encoders can have: "clip_bpe" (CLIP's BPE, end-of-word marks, start/end tokens),
# "sentencepiece" (T5, no start token), "byte_bpe" (a GPT-style byte-level BPE without end-of-word marks, as an
# LLM's: a word is one token sequence after a space and another at the start or after a bracket, " dog" / "dog",
# so its rows are found by what the tokens spell, at word boundaries).
TOKENIZERS = ("clip_bpe", "sentencepiece", "byte_bpe")


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
    tokenizer: str = "clip_bpe"  # one of TOKENIZERS
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
    clip_loader: str = "its checkpoint"  # how users get its CLIP (the nodes' tooltips say it)

    @property
    def width(self) -> int:
        """Channels of the whole conditioning (the UNet's context_dim; SD3.5's 4096, its CLIP rows zero-padded)."""
        return max(e.offset + e.width for e in self.encoders)

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

_WAN_PAPER = ("paper mode fine-tunes the whole text encoder, which on Wan is umT5-XXL (5.7 B parameters: about 68 GB "
              "for its float32 weights and AdamW's two moments, before any activation, besides the 14 B or 5 B video "
              "model), more than a consumer GPU holds; set mode to 'fast', which optimises the residual at the "
              "subject's umT5 rows directly against Wan's own flow-matching loss")

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
           paper_refusal=_T5_PAPER.format(name="Flux"), clip_loader="DualCLIPLoader, type flux: CLIP-L + T5-XXL"),
    # Wan 2.1 / 2.2 (video): the umT5-XXL rows are the whole context (row 0 = the first word, no start token,
    # padded to 512 rows); its blocks' cross-attention reads them (nodes/architectures/wan.py). 2.2's two experts
    # and 2.2 5B (WAN22_T2V) subclass WAN21_T2V, as do its I2V, VACE, camera variants. Training crop 256: frames
    # are trained as still images (one latent frame each, docs/wan.md).
    Family("wan", "Wan", (Encoder("umt5xxl", "umT5-XXL", 0, 4096, tokenizer="sentencepiece"),), "wan",
           ("WAN21_T2V",), ("flow",), 256, chunk=None,
           paper_refusal=_WAN_PAPER, clip_loader="CLIPLoader, type wan: umT5-XXL"),
    # SD3 / SD3.5 (comfy/text_encoders/sd3_clip.py): CLIP-L and CLIP-G side by side in channels 0..2047 of their
    # 77-row chunks (zero-padded to 4096), then the T5-XXL rows stacked after them along the tokens (row group 1,
    # no start token). The pooled vector is CLIP-L's and CLIP-G's (2048), left as the host makes it. A CLIP
    # loaded without one of the encoders gives only the present ones' rows (nodes/encoding.py follows it).
    # Training crop 512 as Flux's, for the same reason (docs/sd3.md).
    Family("sd3", "SD3.5", (_CLIP_L, Encoder("g", "CLIP-G", 768, 1280),
                            Encoder("t5xxl", "T5-XXL", 0, 4096, group=1, tokenizer="sentencepiece")),
           "sd3", ("SD3",), ("flow",), 512, paper_refusal=_T5_PAPER.format(name="SD3.5"),
           clip_loader="its checkpoint, or TripleCLIPLoader"),
    # Qwen-Image: the rows of Qwen2.5-VL-7B's last hidden state after the chat template's prefix, which the host
    # drops (comfy/text_encoders/qwen_image.py, encode_token_weights: up to the second <|im_start|> and its
    # "user\n", 34 tokens of the plain template); the template's tail (<|im_end|>\n<|im_start|>assistant\n, 5
    # tokens) stays in the conditioning. One joint-attention sequence [text, image] like Flux's; no pooled vector,
    # no distilled guidance (real CFG). Training crop 512 as Flux (native 1328).
    Family("qwen_image", "Qwen-Image", (Encoder("qwen25_7b", "Qwen2.5-VL-7B", 0, 3584, tokenizer="byte_bpe",
                                                skip_rows=34),), "qwen_image", ("QwenImage",), ("flow",), 512,
           chunk=None,
           paper_refusal=("paper mode fine-tunes the whole text encoder, which on Qwen-Image is Qwen2.5-VL-7B (7.6 B "
                          "parameters in its language model: about 91 GB for their float32 weights and AdamW's two "
                          "moments, before any activation, besides the 20 B-parameter diffusion model); set mode to "
                          "'fast', which optimises the residual at the subject's rows of the LLM's output directly "
                          "against Qwen-Image's own flow-matching loss"),
           clip_loader="CLIPLoader, type qwen_image: Qwen2.5-VL-7B"),
    # Chroma (Flux-derived, docs/chroma.md): T5-XXL alone (the host's CLIPLoader type chroma: tokenizer key
    # "t5xxl", no pooled CLIP, no padding), real CFG (no distilled guidance input), Flux's joint attention with its
    # own modulation. Its T5 rows are 4096 wide like Flux's: a residual file without cones2.family metadata cannot
    # tell the two apart (by_widths refuses to guess).
    Family("chroma", "Chroma", (Encoder("t5xxl", "T5-XXL", 0, 4096, tokenizer="sentencepiece"),), "chroma",
           ("Chroma",), ("flow",), 512, chunk=None, paper_refusal=_T5_PAPER.format(name="Chroma"),
           clip_loader="CLIPLoader, type chroma: T5-XXL"),
)}


def names(last: str = " or ") -> str:
    """The supported families' names as a sentence lists them: 'SD1.5, SD2.x, SDXL, Flux or Wan'."""
    all_names = [f.name for f in FAMILIES.values()]
    return ", ".join(all_names[:-1]) + last + all_names[-1] if len(all_names) > 1 else "".join(all_names)


def resolutions() -> str:
    """Train Residual's automatic crop per family: 'SD1.5 512, SD2.x-v 768, ...'."""
    parts = []
    for f in FAMILIES.values():
        parts.append(f"{f.name} {f.resolution}")
        if f.v_resolution:
            parts.append(f"{f.name}-v {f.v_resolution}")
    return ", ".join(parts)


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


def by_widths(widths: dict[str, int]) -> Family | None:
    """The family whose encoders have exactly these widths ({"h": 1024} -> SD2.x); None for none. Two families
    with the same widths (the tensors alone cannot tell them apart) are an error saying to name the family."""
    found = [f for f in FAMILIES.values() if f.widths == dict(widths)]
    if len(found) > 1:
        names = " or ".join(f"{f.name} ('{f.key}')" for f in found)
        raise Cones2Error(f"tensors of these widths could be {names}: the residual must name its family (the "
                          "metadata 'cones2.family' of a .safetensors file); save it again with that key set")
    return found[0] if found else None


def by_context_width(width: int) -> Family | None:
    """The family whose whole conditioning is ``width`` channels wide; None for none, an error when several are
    (Flux, SD3.5 and Wan all read 4096-wide text: the width alone cannot tell them apart)."""
    found = [f for f in FAMILIES.values() if f.width == width]
    if len(found) > 1:
        raise Cones2Error(f"a {width}-wide conditioning could be " + " or ".join(f.name for f in found)
                          + ": tell the family by the CLIP's encoders or the model's config instead")
    return found[0] if found else None


def article(name: str) -> str:
    """'an' before a family name read letter by letter ('an SD1.5', 'an SDXL'), else 'a' ('a Flux')."""
    return "an" if name[:2].isupper() or name[:1] in "AEIOU" else "a"


def by_reference_width(width: int) -> Family | None:
    """The family a reference ``.pt`` residual of this width belongs to."""
    return next((f for f in FAMILIES.values() if f.reference_width == width), None)
