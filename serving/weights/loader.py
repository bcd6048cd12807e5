"""One call from a checkpoint path to validated tensors ready for an engine's refit.

Two steps, which the refit coordinator also calls apart: :func:`open_checkpoint` (detect, read
headers, check names/shapes/dtypes: no tensor data) and :func:`read_checked` (the data). The data
goes either to fresh host tensors (:class:`~serving.weights.checkpoint.SafetensorsFile`, then
:func:`~serving.weights.validate.conform`), or, when a ``device``, destination tensors (``out``) or a
:class:`~serving.weights.fastpath.FastReader` is given, through the fast path straight into destination
tensors on that device (see :mod:`serving.weights.fastpath`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.errors import ValidationError
from serving.specs import WeightSpec
from serving.weights.checkpoint import (
    CheckpointCandidate,
    CheckpointPolicy,
    describe_checkpoint,
    detect_checkpoint,
    read_tensors,
)
from serving.weights.fastpath import FastReader, ReadStats, allocate, read_checkpoint_into
from serving.weights.safetensors_header import TensorMeta
from serving.weights.validate import (
    ValidationPolicy,
    check_metadata,
    conform,
    provided_names,
    strip_names,
    tie_problems,
)


@dataclass(frozen=True)
class LoadedWeights:
    """Validated tensors in the engine's dtypes (on the host, or on the fast path's device)."""

    version: str
    source: Path
    format: str
    #: exactly the engine's weight names, cast to the specs' dtypes
    tensors: Mapping[str, torch.Tensor]
    #: bytes of ``tensors``
    nbytes: int
    #: seconds spent detecting, reading headers and reading tensor data (on the fast path: and
    #: copying it to the device, which overlaps the reads)
    read_s: float
    #: seconds spent checking metadata and conforming tensors
    validate_s: float
    #: checkpoint tensors that were not loaded (declared ``ignored``, or unexpected under "ignore")
    ignored: tuple[str, ...]
    #: the fast path's account of the data read (None on the host path)
    stats: ReadStats | None = None


@dataclass(frozen=True)
class CheckedCheckpoint:
    """A checkpoint whose headers fit the engine; no tensor data read yet."""

    candidate: CheckpointCandidate
    #: where each needed weight lives, keyed by the engine's (spec) name
    metas: Mapping[str, TensorMeta]
    specs: Mapping[str, WeightSpec]
    #: the engine's weights, in spec order (all of them are in the checkpoint)
    needed: tuple[str, ...]
    #: checkpoint tensors that will not be loaded
    ignored: tuple[str, ...]
    #: seconds spent detecting and reading headers
    open_s: float
    #: seconds spent checking the metadata
    check_s: float

    @property
    def version(self) -> str:
        return self.candidate.version

    @property
    def source(self) -> Path:
        return Path(self.candidate.path)

    @property
    def nbytes(self) -> int:
        return sum(self.metas[n].nbytes for n in self.needed)


_DEFAULT_POLICY = CheckpointPolicy()
_DEFAULT_VALIDATION = ValidationPolicy()

#: destination tensors, or a function that returns them; called only once the metadata checked out
Destination = Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]]


def open_checkpoint(path: Path, specs: Mapping[str, WeightSpec], *, policy: CheckpointPolicy = _DEFAULT_POLICY,
                    validation: ValidationPolicy = _DEFAULT_VALIDATION, version: str | None = None,
                    ignored: Collection[str] = (),
                    fixed: Mapping[str, torch.Tensor] | None = None) -> CheckedCheckpoint:
    """Detect, describe (headers only) and check. Raises :class:`ValidationError` with every metadata
    problem, :class:`CheckpointError` for unreadable or hostile files; reads no tensor data, except the
    names of a tie saved more than once and the ``fixed`` tensors the checkpoint carries (tensors an engine
    keeps and cannot refit, e.g. non-persistent buffers): those must hold the engine's values."""
    path = Path(path)
    t0 = time.perf_counter()
    candidate = detect_checkpoint(path, policy, version=version)
    metas = describe_checkpoint(candidate, policy)
    if validation.strip_prefix:  # match by the stripped names; the metas keep the names to read by
        renamed, clashes = strip_names(metas, validation.strip_prefix)
        if clashes:
            raise ValidationError(str(path), clashes)
        metas = {short: metas[name] for short, name in renamed.items()}
    t1 = time.perf_counter()
    problems = check_metadata(specs, metas, validation, str(path), ignored=ignored)
    if problems:
        raise ValidationError(str(path), problems)
    provided = provided_names(specs, metas)
    duplicated = [n for names in provided.values() if len(names) > 1 for n in names]
    if duplicated:  # a tie saved under several names: they must hold the same values
        problems = tie_problems(specs, _read_named(candidate, metas, duplicated, policy))
        if problems:
            raise ValidationError(str(path), problems)
    carried = [n for n in (fixed or {}) if n in metas]
    if carried:
        assert fixed is not None
        problems = fixed_problems(fixed, _read_named(candidate, metas, carried, policy))
        if problems:
            raise ValidationError(str(path), problems)
    t2 = time.perf_counter()
    taken = {names[0] for names in provided.values()}
    return CheckedCheckpoint(
        candidate=candidate, metas={n: metas[names[0]] for n, names in provided.items()}, specs=specs,
        needed=tuple(provided), ignored=tuple(n for n in metas if n not in taken), open_s=t1 - t0,
        check_s=t2 - t1,
    )


def read_checked(checked: CheckedCheckpoint, *, policy: CheckpointPolicy = _DEFAULT_POLICY,
                 validation: ValidationPolicy = _DEFAULT_VALIDATION, device: torch.device | str | None = None,
                 out: Destination | None = None, reader: FastReader | None = None) -> LoadedWeights:
    """Read the data of a checked checkpoint.

    Without ``device``, ``out`` and ``reader``: fresh host tensors (the host path). Otherwise the
    fast path: into ``out`` (called first if it is a function), or into tensors allocated on
    ``device``; ``reader`` keeps its pinned pool between calls (a temporary one is used if None).
    """
    specs = checked.specs
    source = str(checked.source)
    if device is None and out is None and reader is None:
        t0 = time.perf_counter()
        raw = _read_needed(checked, policy)
        t1 = time.perf_counter()
        tensors = conform(specs, raw, validation, source)
        t2 = time.perf_counter()
        return _loaded(checked, tensors, read_s=t1 - t0, validate_s=t2 - t1)

    dest = out() if callable(out) else out
    if dest is None:
        dest = allocate(specs, device if device is not None else "cpu", checked.needed)
    if checked.candidate.format not in ("safetensors", "sharded"):  # a torch pickle: no offsets to stream
        t0 = time.perf_counter()
        raw = _read_needed(checked, policy)
        t1 = time.perf_counter()
        conformed = conform(specs, raw, validation, source)
        with torch.no_grad():
            for name, t in conformed.items():
                dest[name].copy_(t)
        t2 = time.perf_counter()
        return _loaded(checked, {n: dest[n] for n in checked.needed}, read_s=t1 - t0 + (t2 - t1) / 2,
                       validate_s=(t2 - t1) / 2)
    own = reader is None
    active = reader or FastReader()
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            stats = read_checkpoint_into(checked.candidate, checked.metas, specs, checked.needed, dest,
                                         reader=active, check_finite=validation.check_finite)
        t1 = time.perf_counter()
    finally:
        if own:
            active.close()
    return _loaded(checked, {n: dest[n] for n in checked.needed}, read_s=t1 - t0 - stats.finish_s,
                   validate_s=stats.finish_s, stats=stats)


def fixed_problems(fixed: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    """Checkpoint tensors that an engine keeps (and cannot refit) whose values differ from the engine's."""
    problems = []
    for name, t in found.items():
        want = fixed[name]
        if t.shape != want.shape or t.dtype != want.dtype or not torch.equal(t, want.to(t.device)):
            problems.append(
                f"tensor {name!r}: the engine keeps this tensor from the model's code (a non-persistent buffer or "
                f"a traced constant: {want.dtype} {list(want.shape)}) and cannot refit it, but the checkpoint holds "
                f"a different value ({t.dtype} {list(t.shape)}); remove it from the checkpoint, or make it a "
                "persistent buffer of the model so that it is a weight")
    return problems


def _read_named(candidate: CheckpointCandidate, metas: Mapping[str, TensorMeta], names: Collection[str],
                policy: CheckpointPolicy) -> dict[str, torch.Tensor]:
    """Tensors keyed by ``names``, read under the names they were saved as (``metas[n].name``: a tied weight
    saved under another name, a name with a stripped prefix)."""
    stored = {n: metas[n].name for n in names}
    raw = read_tensors(candidate, list(stored.values()), policy)
    return {n: raw[s] for n, s in stored.items()}


def _read_needed(checked: CheckedCheckpoint, policy: CheckpointPolicy) -> dict[str, torch.Tensor]:
    """The needed tensors, keyed by the engine's names."""
    return _read_named(checked.candidate, checked.metas, checked.needed, policy)


def _loaded(checked: CheckedCheckpoint, tensors: Mapping[str, torch.Tensor], *, read_s: float,
            validate_s: float, stats: ReadStats | None = None) -> LoadedWeights:
    return LoadedWeights(
        version=checked.version,
        source=checked.source,
        format=checked.candidate.format,
        tensors=tensors,
        nbytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        read_s=checked.open_s + read_s,
        validate_s=checked.check_s + validate_s,
        ignored=checked.ignored,
        stats=stats,
    )


def load_weights(path: Path, specs: Mapping[str, WeightSpec], *, policy: CheckpointPolicy = _DEFAULT_POLICY,
                 validation: ValidationPolicy = _DEFAULT_VALIDATION, version: str | None = None,
                 ignored: Collection[str] = (), device: torch.device | str | None = None,
                 out: Destination | None = None, reader: FastReader | None = None,
                 fixed: Mapping[str, torch.Tensor] | None = None) -> LoadedWeights:
    """Detect, describe (headers only), check, read only the needed tensors, conform.

    Metadata problems (missing/unexpected names, shapes, dtypes) raise :class:`ValidationError`
    before any tensor data is read. Raises :class:`CheckpointError` for unreadable or hostile files.
    With ``device``/``out``/``reader`` the data takes the fast path (see :func:`read_checked`).
    """
    checked = open_checkpoint(path, specs, policy=policy, validation=validation, version=version,
                              ignored=ignored, fixed=fixed)
    return read_checked(checked, policy=policy, validation=validation, device=device, out=out, reader=reader)
