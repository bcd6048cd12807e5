"""The publish protocol of the weights folder, as pure functions (no threads, no files).

What a name in the folder is (:func:`classify_name`), which version a file or directory is
(:func:`version_of`), the order of publication (:func:`publish_key`), what a ``MANIFEST.json``
says and whether a directory matches it (:func:`parse_manifest`, :func:`manifest_problems`), and
when an entry is complete enough to be read (:func:`completeness`); on the writer's side, the name
a published version gets (:func:`entry_name`) and the manifest it carries (:func:`render_manifest`).
``docs/publish.md`` states the same rules for users; :mod:`serving.watch` applies them to a real
folder (choosing among complete entries and remembering refused ones is the watcher's own:
:mod:`serving.watch.selection`, :mod:`serving.watch.ledger`) and :mod:`serving.publish.writer`
writes into one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from serving.errors import CheckpointError, PublishError

#: a directory holding this file is a multi-file version verified by sha256
MANIFEST_NAME = "MANIFEST.json"
#: a directory holding this file is a PEFT LoRA adapter
ADAPTER_CONFIG = "adapter_config.json"
#: suffixes of single-file checkpoints (pickles are only read when allowed by the policy)
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
#: names ending like this are writes in progress (and so are hidden names: a leading ".")
TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".incomplete", ".swp", "~")
#: largest MANIFEST.json / adapter_config.json accepted, in bytes
MAX_SMALL_FILE_BYTES = 1 << 20

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ---------------------------------------------------------------- names


def is_temp_name(name: str) -> bool:
    """Hidden names and names of writes in progress; the watcher never looks at them."""
    low = name.lower()
    return not name or name.startswith(".") or low.endswith(TEMP_SUFFIXES)


def classify_name(name: str, *, is_dir: bool, has_adapter_config: bool = False) -> str:
    """``"temp"``, ``"adapter"``, ``"checkpoint"`` or ``"ignored"`` (a file that is no checkpoint).

    Directories are checkpoints (single file, sharded, or with a manifest) unless they hold an
    ``adapter_config.json``. Files count only with a checkpoint suffix; anything else (a README, a
    log) is ignored, not rejected.
    """
    if is_temp_name(name):
        return "temp"
    if is_dir:
        return "adapter" if has_adapter_config else "checkpoint"
    return "checkpoint" if name.lower().endswith(CHECKPOINT_SUFFIXES) else "ignored"


def version_of(name: str, *, is_dir: bool, manifest_version: str | None = None) -> str:
    """The version identity: the manifest's ``version``, else the directory name or the file stem."""
    if manifest_version:
        return manifest_version
    if is_dir:
        return name
    stem, dot, _ = name.rpartition(".")
    return stem if dot and stem else name


def entry_name(version: str | None, source_name: str, *, is_dir: bool) -> str:
    """The name a published version gets in the folder: ``version`` (default: the source's version
    by :func:`version_of`), plus the source's suffix for a file (``v3`` from ``model.safetensors``
    is ``v3.safetensors``; a ``version`` already ending in it is kept as is).

    Raises :class:`PublishError` if the source is a file with no checkpoint suffix, or the name
    would be one the watcher ignores (hidden, temporary) or is not a single path component.
    """
    suffix = ""
    if not is_dir:
        low = source_name.lower()
        suffix = next((source_name[-len(s):] for s in CHECKPOINT_SUFFIXES if low.endswith(s)), "")
        if not suffix:
            raise PublishError(f"{source_name}: not a checkpoint file (expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
                               f", a checkpoint directory or a PEFT adapter directory)")
    base = version if version is not None else version_of(source_name, is_dir=is_dir)
    name = base if is_dir or base.lower().endswith(suffix.lower()) else base + suffix
    problem = None
    if not base or base in (".", "..") or any(c in base for c in "/\\\0"):
        problem = "must be one non-empty name, without '/'"
    elif is_temp_name(name):
        problem = (f"{name!r} is a hidden or temporary name, which the watcher ignores (a leading '.', or one of "
                   f"{', '.join(TEMP_SUFFIXES)} at the end)")
    if problem:
        raise PublishError(f"version {base!r}: {problem}; pick another version name")
    return name


def publish_key(published_ns: int, name: str) -> tuple[int, str]:
    """Sort key of "publish time": when the entry arrived, ties broken by name (later name = newer)."""
    return (published_ns, name)


# ---------------------------------------------------------------- manifests


def tree_hash(files: Iterable[tuple[str, str]]) -> str:
    """Content hash of a multi-file version from ``(relative path, sha256)`` pairs (order-free)."""
    h = hashlib.sha256()
    for rel, digest in sorted(files):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ManifestEntry:
    """One file a manifest lists: its path relative to the directory, sha256, and size if given."""

    path: str
    sha256: str
    size: int | None = None


@dataclass(frozen=True)
class Manifest:
    """A parsed ``MANIFEST.json``."""

    files: tuple[ManifestEntry, ...]
    version: str | None = None

    def content_hash(self) -> str:
        return tree_hash((f.path, f.sha256) for f in self.files)


def _bad_manifest(source: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{source}: invalid {MANIFEST_NAME}: {what}; expected "
        '{"version": "v3", "files": {"model.safetensors": "<sha256 hex>", ...}} (or "files": '
        '[{"path": ..., "sha256": ..., "size": ...}])', reason="manifest_invalid")


def _escapes(rel: str) -> bool:
    p = PurePosixPath(rel)
    return p.is_absolute() or "\\" in rel or ".." in p.parts or rel.startswith("~") or not rel.strip()


def parse_manifest(raw: bytes, source: str) -> Manifest:
    """Parse a manifest: ``files`` as ``{path: sha256}`` or ``[{"path", "sha256", "size"?}]``.

    Raises :class:`CheckpointError` (``reason="manifest_invalid"``) listing every problem.
    """
    if len(raw) > MAX_SMALL_FILE_BYTES:
        raise _bad_manifest(source, f"{len(raw)} bytes, larger than {MAX_SMALL_FILE_BYTES}")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise _bad_manifest(source, f"not JSON ({e})") from e
    if not isinstance(doc, dict):
        raise _bad_manifest(source, f"a JSON {type(doc).__name__}, not an object")
    version = doc.get("version")
    problems: list[str] = []
    if version is not None and (not isinstance(version, str) or not version.strip()):
        problems.append(f"'version' must be a non-empty string, found {version!r}")
    files = doc.get("files")
    pairs: list[tuple[object, object, object]] = []
    if isinstance(files, dict):
        pairs = [(k, v, None) for k, v in files.items()]
    elif isinstance(files, list):
        for item in files:
            if not isinstance(item, dict):
                problems.append(f"'files' entry {item!r} is not an object")
                continue
            pairs.append((item.get("path"), item.get("sha256"), item.get("size")))
    else:
        problems.append("'files' is missing (an object {path: sha256} or a list of {path, sha256, size})")
    entries: list[ManifestEntry] = []
    seen: set[str] = set()
    for path, digest, size in pairs:
        if not isinstance(path, str) or _escapes(path):
            problems.append(f"file path {path!r} must be a relative path inside the directory")
            continue
        path = str(PurePosixPath(path))
        if path == MANIFEST_NAME:
            problems.append(f"the manifest cannot list itself ({path!r})")
            continue
        if path in seen:
            problems.append(f"file {path!r} is listed twice")
            continue
        seen.add(path)
        if not isinstance(digest, str) or not _SHA256.match(digest.lower()):
            problems.append(f"file {path!r}: sha256 must be 64 hex digits, found {digest!r}")
            continue
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            problems.append(f"file {path!r}: size must be a non-negative integer, found {size!r}")
            continue
        entries.append(ManifestEntry(path, digest.lower(), size))
    if not entries and not problems:
        problems.append("'files' lists no file")
    if problems:
        raise _bad_manifest(source, "; ".join(problems))
    return Manifest(tuple(sorted(entries, key=lambda e: e.path)), version)


def render_manifest(files: Iterable[ManifestEntry], version: str | None = None) -> bytes:
    """The ``MANIFEST.json`` for ``files`` (the list form, sizes included) that :func:`parse_manifest`
    reads back as the same :class:`Manifest`."""
    doc: dict[str, object] = {} if version is None else {"version": version}
    doc["files"] = [{"path": f.path, "sha256": f.sha256, **({} if f.size is None else {"size": f.size})}
                    for f in sorted(files, key=lambda f: f.path)]
    return (json.dumps(doc, indent=1) + "\n").encode()


@dataclass(frozen=True)
class FoundFile:
    """What is on disk for a manifest entry: size, and sha256 once computed (None: not hashed)."""

    size: int
    sha256: str | None = None


def manifest_problems(manifest: Manifest, found: Mapping[str, FoundFile],
                      others: Iterable[str] = ()) -> list[str]:
    """Every difference between a manifest and the directory (empty: the directory is complete).

    ``found`` maps listed paths that exist to what was found; ``others`` are regular files in the
    directory that the manifest does not list (apart from hidden/temp names and the manifest).
    """
    problems: list[str] = []
    for entry in manifest.files:
        got = found.get(entry.path)
        if got is None:
            problems.append(f"{entry.path}: listed in {MANIFEST_NAME} but missing")
        elif entry.size is not None and got.size != entry.size:
            problems.append(f"{entry.path}: {got.size} bytes, the manifest says {entry.size}")
        elif got.sha256 is not None and got.sha256 != entry.sha256:
            problems.append(f"{entry.path}: sha256 {got.sha256[:12]}..., the manifest says {entry.sha256[:12]}...")
    problems += [f"{rel}: in the directory but not listed in {MANIFEST_NAME}" for rel in sorted(others)]
    return problems


# ---------------------------------------------------------------- completeness


#: loader reasons that may only mean "still being written" (anything else is final at once)
MAYBE_INCOMPLETE = frozenset({"corrupt", "empty", "not_found", "changed_during_read", "manifest_mismatch",
                              "manifest_invalid", "unsupported"})


@dataclass(frozen=True)
class Observation:
    """What the watcher knows about an entry when deciding whether to read it."""

    #: the entry arrived by a rename (atomic publish) rather than being written in place
    renamed_in: bool = False
    #: a writer closed the file after writing (inotify ``IN_CLOSE_WRITE``; files only)
    closed: bool = False
    #: the fingerprint (sizes, mtimes) did not change across one debounce interval
    stable: bool = False
    #: seconds since the newest mtime in the entry (how long it has been left alone)
    age_s: float = 0.0
    #: the cheap completeness check: None if headers / the manifest agree with the files, else
    #: ``(reason, message)``
    problem: tuple[str, str] | None = None


@dataclass(frozen=True)
class Decision:
    """``ready`` (read it: valid, or its rejection is final), or ``wait`` until ``recheck_in_s``."""

    action: str  # "ready" | "wait"
    recheck_in_s: float = 0.0
    #: for "ready" with a problem: the rejection to record without reading (manifest mismatch)
    problem: tuple[str, str] | None = None


def completeness(obs: Observation, *, debounce_s: float, settle_s: float) -> Decision:
    """Whether an entry is complete: the publish protocol's rules in one place.

    * Renamed in, or closed by its writer: complete now; any problem is final.
    * Otherwise the fingerprint must be stable over a debounce interval; then it is complete if
      its headers (or its manifest) agree with the files. If they do not, it may still be copying:
      wait until nothing changed for ``settle_s``, then the problem is final.
    """
    final_now = obs.renamed_in or obs.closed
    if not final_now and not obs.stable:
        return Decision("wait", max(debounce_s, 0.01))
    if obs.problem is None:
        return Decision("ready")
    reason, _ = obs.problem
    if final_now or reason not in MAYBE_INCOMPLETE or obs.age_s >= settle_s:
        return Decision("ready", problem=obs.problem)
    return Decision("wait", max(settle_s - obs.age_s, debounce_s, 0.01))
