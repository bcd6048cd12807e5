"""One call from a checkpoint path to validated host tensors ready for an engine's refit."""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.errors import ValidationError
from serving.specs import WeightSpec
from serving.weights.checkpoint import CheckpointPolicy, describe_checkpoint, detect_checkpoint, read_tensors
from serving.weights.validate import ValidationPolicy, check_metadata, conform


@dataclass(frozen=True)
class LoadedWeights:
    """Validated CPU tensors in the engine's dtypes, and where they came from."""

    version: str
    source: Path
    format: str
    #: exactly the engine's weight names, cast to the specs' dtypes
    tensors: Mapping[str, torch.Tensor]
    #: bytes of ``tensors``
    nbytes: int
    #: seconds spent detecting, reading headers and reading tensor data
    read_s: float
    #: seconds spent checking metadata and conforming tensors
    validate_s: float
    #: checkpoint tensors that were not loaded (declared ``ignored``, or unexpected under "ignore")
    ignored: tuple[str, ...]


_DEFAULT_POLICY = CheckpointPolicy()
_DEFAULT_VALIDATION = ValidationPolicy()


def load_weights(path: Path, specs: Mapping[str, WeightSpec], *, policy: CheckpointPolicy = _DEFAULT_POLICY,
                 validation: ValidationPolicy = _DEFAULT_VALIDATION, version: str | None = None,
                 ignored: Collection[str] = ()) -> LoadedWeights:
    """Detect, describe (headers only), check, read only the needed tensors, conform.

    Metadata problems (missing/unexpected names, shapes, dtypes) raise :class:`ValidationError`
    before any tensor data is read. Raises :class:`CheckpointError` for unreadable or hostile files.
    """
    path = Path(path)
    t0 = time.perf_counter()
    candidate = detect_checkpoint(path, policy, version=version)
    metas = describe_checkpoint(candidate, policy)
    t1 = time.perf_counter()
    source = str(path)
    problems = check_metadata(specs, metas, validation, source, ignored=ignored)
    if problems:
        raise ValidationError(source, problems)
    t2 = time.perf_counter()
    needed = [name for name in specs if name in metas]
    raw = read_tensors(candidate, needed, policy)
    t3 = time.perf_counter()
    tensors = conform(specs, raw, validation, source)
    t4 = time.perf_counter()
    return LoadedWeights(
        version=candidate.version,
        source=path,
        format=candidate.format,
        tensors=tensors,
        nbytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        read_s=(t1 - t0) + (t3 - t2),
        validate_s=(t2 - t1) + (t4 - t3),
        ignored=tuple(name for name in metas if name not in specs),
    )
