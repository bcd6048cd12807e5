"""What the watcher did with each entry of the folder it looked at: the account a model gives when it
cannot load (``model 'x' has no valid weights in ... (initial.safetensors: refit failed (...))``).

Pure: :class:`EntryOutcome` per top-level name, :class:`InitialInstall` for the whole folder at startup,
and how both read in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.refit import RefitReport

#: why a name that is no checkpoint is ignored (not rejected)
NOT_A_CHECKPOINT = ("not a checkpoint: expected a .safetensors file, a checkpoint directory or a PEFT adapter "
                    "directory")
#: why a temporary name is ignored
TEMPORARY = "a hidden or temporary name: ignored until it is renamed into place"

#: what can happen to an entry, in the order an account lists them
OUTCOMES = ("installed", "failed", "rejected", "being_written", "skipped", "ignored")

#: a message longer than this is cut in the one-line account (the log and the ledger keep it whole)
_MESSAGE_CHARS = 300
#: entries named in the one-line account; the rest are counted
_LISTED = 20


def _short(message: str) -> str:
    text = " ".join(message.split())
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + " ..."


@dataclass(frozen=True)
class EntryOutcome:
    """What happened to one top-level name: installed (or already live), rejected (the file's fault: the
    reason and the message), failed (the engine's or the watcher's fault), still being written (left to the
    worker), skipped (not tried: a newer entry was installed, or an older one must not be after a failure),
    or ignored (not a checkpoint, a temporary name)."""

    name: str
    outcome: str
    reason: str = ""
    message: str = ""
    report: RefitReport | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r}: one of {OUTCOMES}")

    def describe(self) -> str:
        """``name: what happened (why)``."""
        if self.outcome == "installed":
            version = self.report.version if self.report is not None else None
            return f"{self.name}: installed" + (f" as {version}" if version else "")
        if self.outcome == "rejected":
            return f"{self.name}: rejected ({self.reason}: {_short(self.message)})"
        if self.outcome == "failed":
            return f"{self.name}: refit failed ({_short(self.message)})"
        if self.outcome == "being_written":
            return f"{self.name}: still being written ({_short(self.message)})"
        return f"{self.name}: {self.outcome} ({_short(self.message)})"


def rejected(name: str, reason: str, message: str, report: RefitReport | None = None) -> EntryOutcome:
    return EntryOutcome(name, "rejected", reason, message, report)


def being_written(name: str) -> EntryOutcome:
    return EntryOutcome(name, "being_written", "", "it changed while being looked at; it is installed once complete")


def ignored(name: str, message: str) -> EntryOutcome:
    return EntryOutcome(name, "ignored", "", message)


@dataclass(frozen=True)
class InitialInstall:
    """What :meth:`~serving.watch.WeightsWatcher.install_initial` did: the live weights' report (None when
    nothing was installed) and one outcome per top-level name of the folder."""

    folder: str
    report: RefitReport | None
    entries: tuple[EntryOutcome, ...] = ()
    #: the folder does not exist
    missing: bool = False

    def of(self, name: str) -> EntryOutcome | None:
        return next((e for e in self.entries if e.name == name), None)

    def explain(self) -> str:
        """Every entry and what happened to it, in one line (most telling first): never "empty" when the
        folder holds files."""
        if self.missing:
            return "the folder does not exist"
        if not self.entries:
            return "it is empty"
        ranked = sorted(self.entries, key=lambda e: (OUTCOMES.index(e.outcome), e.name))
        text = "; ".join(e.describe() for e in ranked[:_LISTED])
        if len(ranked) > _LISTED:
            text += f"; and {len(ranked) - _LISTED} more"
        return text
