"""Cones 2 residuals and their file format.

A Cones 2 subject is a *residual*: a small tensor added to a text encoder's output embedding at the
token positions of the subject's class word (e.g. "dog"). A residual holds one ``[n_tokens, width]``
tensor per text encoder of its model family, keyed by the host's encoder key (``l``, ``h``, ``g``, and
``t5xxl`` for Flux, whose CLIP-L gives only the pooled output and so has no residual).

Files are ``.safetensors`` with ``cones2.*`` string metadata (format "1"). Reference ``.pt`` files of
the authors' implementation (one SD2.x tensor of 1024 floats) can be imported, but only through
``torch.load(..., weights_only=True)``; anything that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import contextlib
import logging
import math
import ntpath
import os
import pickle
import tempfile
from dataclasses import dataclass, field, replace

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .errors import Cones2Error, short
from .families import FAMILIES, article, by_reference_width, by_widths, family, family_name

log = logging.getLogger("comfyui-cones2")

FORMAT_VERSION = "1"
META_PREFIX = "cones2."
RESERVED_KEYS = frozenset(f"{META_PREFIX}{k}" for k in ("format", "subject", "family", "n_tokens"))
REFERENCE_EXTENSIONS = (".pt", ".pth", ".bin")
ACCEPTED_EXTENSIONS = (".safetensors", *REFERENCE_EXTENSIONS)
_ROOT_HINT = "residual file names must be relative to models/cones2_residuals/"
MAX_RESIDUAL_VALUE = 1e4  # |value| bound: text encoder outputs are O(1..100), residuals smaller


def _quoted(keys) -> str:
    return ", ".join(f"'{k}'" for k in sorted(keys))


def _check_subject(subject: object) -> str:
    if not isinstance(subject, str) or not subject.strip():
        raise Cones2Error(f"the residual's subject word is {short(repr(subject))}; set it to the class word, e.g. 'dog'")
    return subject.strip()


def _normalise_tensor(value: object) -> object:
    """Floating tensors become detached, contiguous float32 on the CPU; anything else is left for validate()."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return value
    ready = value.dtype == torch.float32 and value.device.type == "cpu" and value.is_contiguous()
    if ready and not value.requires_grad:
        return value  # already in shape; residuals are never mutated, so sharing is safe
    return value.detach().to(device="cpu", dtype=torch.float32).contiguous()


@dataclass(frozen=True, eq=False)
class Residual:
    """One subject's residual: a ``[n_tokens, width]`` float32 CPU tensor per text encoder of ``family``.

    ``metadata`` holds extra string info (e.g. training settings); its keys are namespaced with
    ``cones2.`` on construction. ``strength`` scales the residual when it is applied and is not saved.
    ``source`` is the file name the residual was loaded from, if any. Instances are never mutated:
    ``with_strength`` and ``with_subject`` return copies.
    """

    subject: str
    family: str
    tensors: dict[str, torch.Tensor]
    strength: float = 1.0
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, dict) or not isinstance(self.metadata, dict):
            raise Cones2Error("a Residual needs dicts for tensors (encoder key -> tensor) and metadata")
        tensors = {k: _normalise_tensor(v) for k, v in dict(self.tensors).items()}
        metadata = {
            (k if not isinstance(k, str) or k.startswith(META_PREFIX) else META_PREFIX + k): v
            for k, v in dict(self.metadata).items()
        }
        object.__setattr__(self, "tensors", tensors)
        object.__setattr__(self, "metadata", metadata)

    @property
    def n_tokens(self) -> int:
        """Number of token rows (the class word's token count; usually 1)."""
        first = next(iter(self.tensors.values()), None)
        return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim >= 1 else 0

    def with_strength(self, strength: float) -> Residual:
        """A copy with another strength (any finite number; 1.0 applies the residual as trained)."""
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
            raise Cones2Error(f"residual strength must be a finite number, e.g. 1.0; got {strength!r}")
        return replace(self, strength=float(strength))

    def with_subject(self, word: str) -> Residual:
        """A copy bound to another class word (the word whose tokens the residual is added to)."""
        return replace(self, subject=_check_subject(word))

    def validate(self) -> Residual:
        """Check subject, family, tensor keys, shapes and values; raise Cones2Error, else return self."""
        _check_subject(self.subject)
        widths = family(self.family).widths
        label = family_name(self.family)
        label = f"{article(label)} {label}"
        keys = set(self.tensors)
        if keys != set(widths):
            parts = [f"'{k}' ({w})" for k, w in widths.items()]
            need = " and ".join(parts)
            if len(parts) > 2:  # SD3.5
                need = f"the {', '.join(parts[:-1])} and {parts[-1]} tensors"
            else:
                need = f"both {need} tensors" if len(widths) == 2 else f"one {need} tensor"
            if not keys:
                have = "none"
            elif keys < set(widths):
                have = f"only {_quoted(keys)}"
            else:
                have = _quoted(keys)
            raise Cones2Error(f"{label} residual needs {need}; this one has {have}")
        counts = {}
        for key, width in widths.items():
            t = self.tensors[key]
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                kind = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
                raise Cones2Error(
                    f"the '{key}' tensor of {label} residual must be floating point; got {kind}"
                )
            if t.ndim != 2 or t.shape[1] != width:
                raise Cones2Error(
                    f"the '{key}' tensor of {label} residual must have shape [n_tokens, {width}]; got "
                    f"{list(t.shape)}. Is this residual for another model family?"
                )
            if t.shape[0] < 1:
                raise Cones2Error(f"the '{key}' tensor has no token rows; a residual needs at least one")
            if not torch.isfinite(t).all():
                raise Cones2Error(
                    f"the '{key}' tensor contains NaN or infinite values; retrain the subject "
                    "(e.g. with a lower learning rate) or re-export it"
                )
            peak = float(t.abs().max())
            if peak > MAX_RESIDUAL_VALUE:
                raise Cones2Error(
                    f"the '{key}' tensor holds a value of magnitude {peak:.3g}; a residual is a small offset to the "
                    f"text encoder's output (allowed: at most {MAX_RESIDUAL_VALUE:g}; trained ones stay far below). "
                    "The file is corrupt or not a Cones 2 residual"
                )
            counts[key] = int(t.shape[0])
        fam = family(self.family)  # encoders of one row group (SDXL's, SD3.5's CLIP-L and CLIP-G) share their rows;
        for group in fam.groups:  # another group (SD3.5's T5) tokenises the word its own way
            group_counts = {e.key: counts[e.key] for e in group}
            if len(set(group_counts.values())) > 1:
                detail = ", ".join(f"'{k}' has {n}" for k, n in group_counts.items())
                raise Cones2Error(f"the tensors of encoders that share their rows need the same number of token "
                                  f"rows; {detail}")
        for k, v in self.metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise Cones2Error(
                    f"residual metadata must map strings to strings; convert {k!r}: {v!r} to str"
                )
            if k in RESERVED_KEYS:
                raise Cones2Error(f"metadata key {k!r} is reserved; set the Residual's own field instead")
        return self


def family_from_widths(widths: dict[str, int]) -> str:
    """The family key whose encoders match ``widths`` exactly (e.g. ``{"h": 1024}`` -> ``"sd2"``)."""
    found = by_widths(widths)
    if found is not None:
        return found.key
    known = "; ".join(
        f"{f.name}: " + ", ".join(f"'{k}' {w}" for k, w in f.widths.items()) for f in FAMILIES.values()
    )
    got = ", ".join(f"'{k}' {w}" for k, w in sorted(widths.items())) or "no tensors"
    raise Cones2Error(f"tensor widths ({got}) match no supported model family ({known})")


def _extension(path: str | os.PathLike) -> str:
    return os.path.splitext(os.fspath(path))[1].lower()


def save_residual(residual: Residual, path: str | os.PathLike) -> None:
    """Write ``residual`` to a ``.safetensors`` file atomically (temp file, fsync, ``os.replace``).

    On any failure the temp file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    if _extension(path) != ".safetensors":
        raise Cones2Error(
            f"residuals are saved as .safetensors; change the file name {os.path.basename(path)!r}"
        )
    residual.validate()
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise Cones2Error(f"the folder {folder!r} does not exist; create it or save the residual elsewhere")
    metadata = {
        **residual.metadata,
        f"{META_PREFIX}format": FORMAT_VERSION,
        f"{META_PREFIX}subject": residual.subject,
        f"{META_PREFIX}family": residual.family,
        f"{META_PREFIX}n_tokens": str(residual.n_tokens),
    }
    tensors = {k: t.to(torch.float32).contiguous() for k, t in residual.tensors.items()}
    data = st_save(tensors, metadata=metadata)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        raise Cones2Error(f"cannot write a residual into {folder!r} ({e}); pick a writable folder") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise Cones2Error(
                f"could not write residual {path!r} ({e}); check free space and permissions"
            ) from e
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX only)
        with contextlib.suppress(OSError):
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def load_residual(path: str | os.PathLike, subject: str | None = None) -> Residual:
    """Load a residual from ``.safetensors`` or a reference ``.pt``/``.pth``/``.bin`` file.

    ``subject`` overrides the class word stored in the file (or, for reference files, the file stem).
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    ext = _extension(path)
    if ext not in ACCEPTED_EXTENSIONS:
        raise Cones2Error(
            f"{name}: unsupported residual file type; use one of {', '.join(ACCEPTED_EXTENSIONS)}"
        )
    if not os.path.isfile(path):
        raise Cones2Error(f"residual file {name!r} not found; put it in models/cones2_residuals/")
    if subject is not None:
        subject = _check_subject(subject)
    residual = _load_safetensors(path, subject) if ext == ".safetensors" else _load_reference(path, subject)
    try:
        return residual.validate()
    except Cones2Error as e:
        raise Cones2Error(f"{name}: {e}") from e


def _load_safetensors(path: str, subject: str | None) -> Residual:
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise Cones2Error(
            f"{name} is corrupt or not a safetensors file ({e}); re-save or re-download it"
        ) from e
    version = metadata.get(f"{META_PREFIX}format")
    if version is None:
        raise Cones2Error(
            f"{name} is not a Cones 2 residual file (it has no 'cones2.format' metadata); "
            "pick a residual saved by the Cones 2 nodes"
        )
    if version != FORMAT_VERSION:
        raise Cones2Error(
            f"{name} uses Cones 2 residual format {version!r}, but this version reads format "
            f"{FORMAT_VERSION!r}; update comfyui-cones2"
        )
    family = metadata.get(f"{META_PREFIX}family") or family_from_widths(
        {k: int(t.shape[-1]) for k, t in tensors.items() if t.ndim}
    )
    stored_subject = metadata.get(f"{META_PREFIX}subject", "")
    if subject is None and not stored_subject.strip():
        raise Cones2Error(f"{name} names no subject word; pass the class word (e.g. 'dog') explicitly")
    extra = {k: v for k, v in metadata.items() if k not in RESERVED_KEYS}
    residual = Residual(subject or stored_subject, family, tensors, metadata=extra, source=name)
    n_tokens = metadata.get(f"{META_PREFIX}n_tokens")
    if n_tokens is not None and tensors and n_tokens != str(residual.n_tokens):
        raise Cones2Error(
            f"{name} is corrupt: its metadata says {n_tokens} tokens but its tensors have "
            f"{residual.n_tokens}; re-save the residual"
        )
    return residual


def _load_reference(path: str, subject: str | None) -> Residual:
    name = os.path.basename(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise Cones2Error(
            f"refused to load {name}: it needs unpickling of arbitrary Python objects, which can run code "
            "(or it is not a torch tensor file); convert it to safetensors on a machine you trust and "
            "load the .safetensors file instead"
        ) from e
    except Exception as e:
        raise Cones2Error(f"{name} is corrupt or not a torch tensor file ({e}); re-download it") from e
    if isinstance(obj, dict):
        values = list(obj.values())
        if len(values) != 1 or not isinstance(values[0], torch.Tensor):
            raise Cones2Error(
                f"{name} holds a dict with keys {_quoted(map(str, obj))}; a reference residual file must hold "
                "one tensor (or a dict with exactly one tensor)"
            )
        obj = values[0]
    if not isinstance(obj, torch.Tensor) or not obj.is_floating_point():
        kind = f"a {obj.dtype} tensor" if isinstance(obj, torch.Tensor) else f"a {type(obj).__name__}"
        raise Cones2Error(
            f"{name} holds {kind}; a reference residual file must hold one floating-point tensor"
        )
    tensor = obj.unsqueeze(0) if obj.ndim == 1 else obj
    width = int(tensor.shape[-1]) if tensor.ndim else 0
    fam = by_reference_width(width) if tensor.ndim == 2 else None
    if fam is None:
        raise Cones2Error(
            f"{name} holds a tensor of shape {list(obj.shape)}; reference residuals must be [1024] or "
            "[n_tokens, 1024] (SD2.x) or [n_tokens, 768] (SD1.5)"
        )
    stem = os.path.splitext(name)[0]
    log.info("imported reference residual %s as an %s residual", name, fam.name)
    return Residual(
        subject or stem,
        fam.key,
        {fam.encoders[0].key: tensor},
        metadata={f"{META_PREFIX}imported_from": "reference-pt"},
        source=name,
    )


def resolve_residual_path(root: str, name: str) -> str:
    """Join a user-given residual file ``name`` onto ``root``, refusing anything that could leave ``root``."""
    if not isinstance(name, str) or not name.strip():
        raise Cones2Error(f"{_ROOT_HINT}; got an empty name. Give a file name such as 'dog.safetensors'")
    if "\x00" in name:
        raise Cones2Error(f"{_ROOT_HINT}; the name {name!r} contains a NUL byte")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ntpath.splitdrive(name)[0]:
        raise Cones2Error(f"{_ROOT_HINT}; {name!r} is an absolute path. Give e.g. 'dog.safetensors'")
    if ".." in name.replace("\\", "/").split("/"):
        raise Cones2Error(f"{_ROOT_HINT}; {name!r} uses '..' to climb out of that folder")
    joined = os.path.join(root, name)
    real_root = os.path.realpath(root)
    real = os.path.realpath(joined)
    if real == real_root:
        raise Cones2Error(f"{_ROOT_HINT}; {name!r} names the folder itself, not a file in it")
    if os.path.commonpath([real_root, real]) != real_root:
        raise Cones2Error(
            f"{_ROOT_HINT}; {name!r} resolves to {real!r}, outside that folder (via a symlink?)"
        )
    return joined
