"""Which of several complete entries the watcher installs: the newest valid base checkpoint, then the
newest valid LoRA adapter published after it (``docs/publish.md``, "the newest wins").

Pure: :func:`select_versions` orders :class:`Candidate` entries by their publish key
(:func:`serving.publish.protocol.publish_key`) and calls back to install them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """An entry that is complete and may be installed."""

    name: str
    kind: str  # "checkpoint" | "adapter"
    key: tuple[int, str]  # publish_key


@dataclass(frozen=True)
class Selection:
    """What :func:`select_versions` did: the installed base and adapter, what it tried and skipped."""

    base: Candidate | None
    adapter: Candidate | None
    attempted: tuple[Candidate, ...]
    skipped: tuple[Candidate, ...]
    #: an attempt stopped the selection (an engine failure: older versions must not be tried)
    stopped: bool = False


def newest_first(candidates: Iterable[Candidate]) -> list[Candidate]:
    return sorted(candidates, key=lambda c: c.key, reverse=True)


def select_versions(candidates: Sequence[Candidate], attempt: Callable[[Candidate], str],
                    *, adapters_enabled: bool = True) -> Selection:
    """Install the newest valid base checkpoint, then the newest valid adapter newer than it.

    ``attempt`` installs one candidate and returns ``"ok"`` (installed or already live),
    ``"rejected"`` (try the next older one) or ``"stop"`` (give up on this batch). Bases are tried
    newest first; when one is installed, only adapters published after it are considered (a base
    published later than an adapter removes it). When no base is installed, every adapter is
    considered (it applies to the base already live). Everything not tried is "skipped".
    """
    bases = newest_first(c for c in candidates if c.kind == "checkpoint")
    adapters = newest_first(c for c in candidates if c.kind == "adapter") if adapters_enabled else []
    attempted: list[Candidate] = []

    def first_installed(group: Sequence[Candidate]) -> tuple[Candidate | None, bool]:
        """Try newest first until one installs; (installed, whether to stop the batch)."""
        for c in group:
            attempted.append(c)
            result = attempt(c)
            if result in ("ok", "stop"):
                return (c if result == "ok" else None), result == "stop"
        return None, False

    installed_base, stopped = first_installed(bases)
    installed_adapter: Candidate | None = None
    if not stopped:
        eligible = [a for a in adapters if installed_base is None or a.key > installed_base.key]
        installed_adapter, stopped = first_installed(eligible)
    tried = {c.name for c in attempted}
    skipped = tuple(c for c in candidates if c.name not in tried and (c.kind == "checkpoint" or adapters_enabled))
    return Selection(installed_base, installed_adapter, tuple(attempted), skipped, stopped)
