"""The one exception family of hotswap.

Every error names what went wrong, where (file, tensor) and, where there is one, the fix.
Validation errors collect every problem before raising, as safetensors'
``load_model(strict=True)`` does, so a user fixes a checkpoint in one pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence


class HotswapError(Exception):
    """Base class of every error hotswap raises on purpose."""

    #: short machine-readable reason, used as the ``reason`` label of metrics
    reason: str = "error"


class ConfigError(HotswapError):
    """A setting (config.pbtxt parameter, CLI flag, factory path) is invalid."""

    reason = "config"


class EngineUnavailableError(HotswapError):
    """An engine cannot run here (e.g. TensorRT not installed); says what to install."""

    reason = "engine_unavailable"


class EngineBuildError(HotswapError):
    """Building or loading an engine failed, or the engine would bake weights in."""

    reason = "build"


class CacheError(HotswapError):
    """The stripped-engine cache could not be used (never raised for a plain miss)."""

    reason = "cache"


class CheckpointError(HotswapError):
    """A checkpoint file cannot be read: corrupt, truncated, hostile, too large, refused format."""

    reason = "unreadable"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


@contextlib.contextmanager
def reading(source: object, *, gone: str = "deleted while reading", gone_reason: str = "changed_during_read",
            action: str = "cannot read", os_name: bool = True) -> Iterator[None]:
    """Turn OS errors while reading ``source`` into :class:`CheckpointError` with the reasons the
    watcher counts: ``gone_reason`` for a vanished file, ``unreadable`` for the rest (``action`` says
    what failed). The message names the file the OS named (a shard, say), else ``source``; with
    ``os_name=False`` always ``source`` (a path as the user gave it, not where its symlinks lead)."""
    try:
        yield
    except FileNotFoundError as e:
        raise CheckpointError(f"{_named(e, source, os_name)}: {gone}", reason=gone_reason) from e
    except PermissionError as e:
        raise CheckpointError(f"{_named(e, source, os_name)}: permission denied; make it readable by the "
                              "server's user", reason="unreadable") from e
    except OSError as e:
        raise CheckpointError(f"{source}: {action}: {e}", reason="unreadable") from e


def _named(e: OSError, source: object, os_name: bool) -> object:
    return (e.filename or source) if os_name else source


class PublishError(HotswapError):
    """A version cannot be published into a weights folder (bad source, bad name, copy failed);
    nothing visible was left in the folder."""

    reason = "publish"


class ValidationError(HotswapError):
    """A checkpoint does not fit the engine. Carries every problem found, not only the first."""

    reason = "invalid"

    def __init__(self, source: str, problems: Sequence[str], *, reason: str | None = None) -> None:
        self.source = source
        self.problems = tuple(problems)
        if reason is not None:
            self.reason = reason
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s) with the weights:\n{lines}")


class CanaryError(HotswapError):
    """The engine's output after a refit did not match the reference: the refit was rolled back."""

    reason = "canary"


class RefitError(HotswapError):
    """Staging or swapping weights failed; the previous weights are still serving."""

    reason = "refit_failed"


class OutOfMemoryError(RefitError):
    """The device (or the host) could not allocate what a refit needs; the previous weights are still serving."""

    reason = "out_of_memory"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation the device or the host refused: torch's ``OutOfMemoryError`` (a full
    device), the ``RuntimeError`` of its CPU allocator ("can't allocate memory": the OS refused), ``MemoryError``.
    Such an error is never the user's input and is never reworded as one."""
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or (isinstance(error, RuntimeError) and "can't allocate memory" in str(error)))


class NotReadyError(HotswapError):
    """Inference was asked of an engine that has no weights installed yet."""

    reason = "not_ready"


class ModelError(HotswapError):
    """An error of one served model, naming it (``model 'my_bert': <the error>``): with several models in a
    repository, the user must not have to guess which one failed. Keeps the error's ``reason``."""

    def __init__(self, model: str, error: HotswapError) -> None:
        super().__init__(f"model {model!r}: {error}")
        self.model = model
        self.error = error
        self.reason = error.reason


@contextlib.contextmanager
def for_model(model: str) -> Iterator[None]:
    """Name ``model`` in any :class:`HotswapError` raised in the block (once: a message that already starts
    with ``model '<name>'`` is left as it is)."""
    try:
        yield
    except HotswapError as e:
        if isinstance(e, ModelError) or str(e).startswith(f"model {model!r}"):
            raise
        raise ModelError(model, e) from e
