"""Finding, describing and reading checkpoints, treating every file as untrusted.

Accepted formats:

* ``safetensors``: a single ``.safetensors`` file, or a directory holding ``model.safetensors``
  (or exactly one non-hidden ``*.safetensors`` file);
* ``sharded``: a directory with a Hugging Face ``model.safetensors.index.json``
  (``{"metadata": ..., "weight_map": {tensor: shard file}}``) and its shards;
* ``torch``: a ``.pt``/``.pth``/``.bin`` pickle, only with ``CheckpointPolicy(allow_pickle=True)``, and
  then only through ``torch.load(weights_only=True)`` (a pickle that carries code is refused unexecuted).

:func:`detect_checkpoint` resolves symlinks, checks the files against the policy (root, size) and
records a fingerprint of every file (size, mtime, inode). :func:`describe_checkpoint` reads headers only;
:func:`read_tensors` reads only the tensors asked for, into tensors of their own (through a descriptor,
never a mapping), and fails with ``reason="changed_during_read"`` when a file differs from its fingerprint
before or after, or is truncated while it is read.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from serving.errors import CheckpointError, ValidationError, reading
from serving.weights.safetensors_header import TensorMeta, read_header, read_open_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")

ACCEPTED = (
    "accepted formats: a .safetensors file; a directory with model.safetensors.index.json and its shards, "
    "or with model.safetensors (or exactly one .safetensors file); a .pt/.pth/.bin torch pickle only "
    "with CheckpointPolicy(allow_pickle=True)"
)


@dataclass(frozen=True)
class CheckpointPolicy:
    """What checkpoints the server accepts."""

    #: .pt/.pth/.bin pickles are refused unless enabled (and even then loaded with weights_only=True)
    allow_pickle: bool = False
    #: cap on the total size of the checkpoint's files, in bytes
    max_bytes: int = 64 << 30
    #: when set, every file (after resolving symlinks) must be inside this directory
    root: Path | None = None


@dataclass(frozen=True)
class FileStat:
    """What identifies a file's content cheaply: compared before and after reading."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    device: int


@dataclass(frozen=True)
class CheckpointCandidate:
    """A checkpoint found on disk, not read yet."""

    #: the file or directory as given
    path: Path
    #: defaults to the name of the (symlink-resolved) file without suffix, or of the directory
    version: str
    #: "safetensors" | "sharded" | "torch"
    format: str
    #: the data files, symlinks resolved (for "sharded": the shards, without the index)
    files: tuple[Path, ...]
    #: fingerprints taken when the checkpoint was detected (data files, then the index if any)
    stats: tuple[FileStat, ...] = ()
    #: for "sharded": tensor name -> shard file (resolved)
    weight_map: tuple[tuple[str, Path], ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.stats if Path(s.path) in self.files)


# ---------------------------------------------------------------- detection


def _file_stat(path: Path) -> FileStat:
    st = os.stat(path)
    return FileStat(str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _resolve(path: Path, policy: CheckpointPolicy, what: str) -> Path:
    """Resolve symlinks, check existence and the policy root."""
    try:
        with reading(f"{what} {path}", gone="does not exist (or is a dangling symlink)", gone_reason="not_found",
                     action="cannot resolve", os_name=False):
            resolved = path.resolve(strict=True)
    except RuntimeError as e:  # a symlink loop (pathlib raises RuntimeError for ELOOP)
        raise CheckpointError(f"{what} {path}: cannot resolve: {e}", reason="unreadable") from e
    if policy.root is not None:
        root = policy.root.resolve()
        if not resolved.is_relative_to(root):
            shown = f"{path} -> {resolved}" if resolved != path.absolute() else str(path)
            raise CheckpointError(f"{what} {shown}: outside the allowed root {root}; move it under the root "
                                  f"or change CheckpointPolicy.root", reason="outside_root")
    return resolved


def _check_file(path: Path, shown: str) -> FileStat:
    """A regular, non-empty, readable file; returns its fingerprint."""
    with reading(shown, gone="does not exist", gone_reason="not_found", action="cannot stat", os_name=False):
        st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{shown}: not a regular file; {ACCEPTED}", reason="unsupported")
    if st.st_size == 0:
        raise CheckpointError(f"{shown}: empty file (0 bytes): still being written, or a failed save?",
                              reason="empty")
    with reading(shown, gone="does not exist", gone_reason="not_found", action="cannot open", os_name=False), \
            open(path, "rb"):
        pass
    return FileStat(str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _check_size(stats: Iterable[FileStat], policy: CheckpointPolicy, source: Path) -> None:
    total = sum(s.size for s in stats)
    if total > policy.max_bytes:
        raise CheckpointError(f"{source}: checkpoint is {total} bytes, over the cap of {policy.max_bytes}; "
                              f"raise CheckpointPolicy.max_bytes if this is expected", reason="too_large")


def _escapes(name: str) -> bool:
    """Whether a shard name (as written in the index) could point outside the directory.

    Checked on the name itself: a shard that is a *symlink* inside the directory may point elsewhere
    (the Hugging Face cache links snapshots to blobs); policy.root governs where that may be.
    """
    p = PurePosixPath(name)
    return p.is_absolute() or "\\" in name or ".." in p.parts or name.startswith("~")


def _detect_sharded(given: Path, directory: Path, policy: CheckpointPolicy,
                    version: str) -> CheckpointCandidate:
    """``given``: the directory as named by the caller; ``directory``: the same, symlinks resolved."""
    index = given / INDEX_NAME
    index_real = _resolve(directory / INDEX_NAME, policy, "index")
    index_stat = _check_file(index_real, str(index))
    if index_stat.size > 64 << 20:
        raise CheckpointError(f"{index}: index file is {index_stat.size} bytes; refusing to parse it",
                              reason="corrupt")
    with reading(index, os_name=False):
        raw = index_real.read_bytes()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{index}: not a valid JSON index: {e}", reason="corrupt") from e
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: expected {{\"metadata\": ..., \"weight_map\": {{tensor: file}}}} "
                              f"with at least one tensor", reason="corrupt")
    bad_names = sorted({repr(f) for f in weight_map.values() if not isinstance(f, str) or not f}
                       | {repr(t) for t in weight_map if not t})
    if bad_names:
        raise CheckpointError(f"{index}: weight_map needs non-empty tensor names and shard file names, found "
                              f"{', '.join(bad_names)}", reason="corrupt")
    escaping = sorted({f for f in weight_map.values() if _escapes(f)})
    if escaping:
        raise CheckpointError(f"{index}: shard(s) {', '.join(map(repr, escaping))} point outside the "
                              f"checkpoint directory; shards must be plain relative paths inside it",
                              reason="outside_root")
    not_st = sorted({f for f in weight_map.values() if not f.endswith(".safetensors")})
    if not_st:
        raise CheckpointError(f"{index}: shard(s) {', '.join(map(repr, not_st))} are not .safetensors files; "
                              f"{ACCEPTED}", reason="unsupported")

    shards: dict[str, Path] = {}
    stats: list[FileStat] = []
    for name in dict.fromkeys(weight_map.values()):  # unique, in index order
        shown = str(given / name)
        if not (directory / name).exists() and not (directory / name).is_symlink():
            raise CheckpointError(f"{shown}: shard named by {INDEX_NAME} does not exist "
                                  f"(checkpoint incomplete or still being copied?)", reason="not_found")
        real = _resolve(directory / name, policy, "shard")
        stats.append(_check_file(real, shown))
        shards[name] = real
    _check_size(stats, policy, given)
    files = tuple(shards.values())
    return CheckpointCandidate(
        path=given, version=version, format="sharded", files=files,
        stats=(*stats, index_stat),
        weight_map=tuple((str(t), shards[f]) for t, f in weight_map.items()),
    )


def detect_checkpoint(path: Path, policy: CheckpointPolicy, *,
                      version: str | None = None) -> CheckpointCandidate:
    """Work out what ``path`` holds and check it against ``policy``; reads no tensor data."""
    path = Path(path)
    real = _resolve(path, policy, "checkpoint")

    if real.is_dir():
        name = version or real.name
        with reading(path, action="cannot list the directory", os_name=False):
            entries = sorted(os.listdir(real))
        has_index = INDEX_NAME in entries
        has_single = SINGLE_NAME in entries
        if has_index and has_single:
            raise CheckpointError(f"{path}: holds both {INDEX_NAME} and {SINGLE_NAME}; which one is the "
                                  f"checkpoint is ambiguous: remove one", reason="unsupported")
        if has_index:
            return _detect_sharded(path, real, policy, name)
        # hidden files are a publisher's temporaries (write to ".name", then rename): never candidates
        candidates = [SINGLE_NAME] if has_single else [
            e for e in entries if e.endswith(".safetensors") and not e.startswith(".")]
        if len(candidates) == 1:
            file_real = _resolve(real / candidates[0], policy, "checkpoint")
            st = _check_file(file_real, str(path / candidates[0]))
            _check_size([st], policy, path)
            return CheckpointCandidate(path, name, "safetensors", (file_real,), (st,))
        found = f"found {len(candidates)} .safetensors files without an index" if candidates else \
            "found no checkpoint in it"
        raise CheckpointError(f"{path}: {found}; {ACCEPTED}", reason="unsupported")

    suffix = real.suffix.lower()
    name = version or real.stem
    if suffix == ".safetensors":
        fmt = "safetensors"
    elif suffix in PICKLE_SUFFIXES:
        if not policy.allow_pickle:
            raise CheckpointError(f"{path}: torch pickle checkpoints are refused (unpickling can run code); "
                                  f"convert it to safetensors (safetensors.torch.save_file(state_dict, ...)) "
                                  f"or set CheckpointPolicy(allow_pickle=True)", reason="unsupported")
        fmt = "torch"
    else:
        raise CheckpointError(f"{path}: unknown checkpoint type {suffix or '(no suffix)'!r}; {ACCEPTED}",
                              reason="unsupported")
    st = _check_file(real, str(path))
    _check_size([st], policy, path)
    return CheckpointCandidate(path, name, fmt, (real,), (st,))


# ---------------------------------------------------------------- fingerprints


def _verify_unchanged(c: CheckpointCandidate, baseline: tuple[FileStat, ...], when: str) -> None:
    for before in baseline:
        with reading(before.path, gone=f"deleted {when}; a version deleted before it goes live is not installed",
                     action=f"cannot stat {when}", os_name=False):
            now = _file_stat(Path(before.path))
        if now != before:
            raise CheckpointError(
                f"{before.path}: changed {when} (size {before.size} -> {now.size}, mtime_ns "
                f"{before.mtime_ns} -> {now.mtime_ns}, inode {before.inode} -> {now.inode}); write "
                f"checkpoints elsewhere and rename them into place, then retry", reason="changed_during_read")


def _baseline(c: CheckpointCandidate) -> tuple[FileStat, ...]:
    if c.stats:
        return c.stats
    with reading(c.path, action="cannot stat"):
        return tuple(_file_stat(f) for f in c.files)


# ---------------------------------------------------------------- torch pickles


def _weights_only_detail(e: Exception) -> str:
    """The useful line of torch's weights_only refusal (without its advice to disable the check)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip().splitlines()[0]
        text = text.split(" Please use", 1)[0]
    return text.strip()[:300]


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` restricted to tensors and plain containers; never runs code from the file."""
    try:
        with reading(file):
            # read, never mapped: a mapped file truncated while it is read would fault the process
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=False)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{file}: not a valid torch checkpoint: {e}", reason="corrupt") from e
        raise CheckpointError(f"{file}: refused: the pickle references code or objects other than tensors "
                              f"and plain containers ({_weights_only_detail(e)}); nothing from it was "
                              f"executed. Re-save it as a plain state dict, or better convert it to "
                              f"safetensors", reason="unsafe_pickle") from e
    except Exception as e:  # torch raises RuntimeError/EOFError/ValueError/... for a damaged file
        raise CheckpointError(f"{file}: cannot load as a torch checkpoint: {type(e).__name__}: {e}",
                              reason="corrupt") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, expected a state dict "
                              f"{{name: tensor}}; save model.state_dict()", reason="corrupt")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{file}: expected a flat state dict {{name: tensor}}, found non-tensor "
                              f"entries {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                              f"save model.state_dict() alone", reason="corrupt")
    return dict(obj)


def _torch_meta(name: str, t: torch.Tensor, file: Path) -> TensorMeta:
    return TensorMeta(name, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size(), str(file))


# ---------------------------------------------------------------- describe / read


def describe_checkpoint(c: CheckpointCandidate, policy: CheckpointPolicy) -> dict[str, TensorMeta]:
    """Every tensor's name, dtype, shape and location, from the headers only (no tensor data read).

    For a sharded checkpoint the index and the shard headers must agree: every indexed tensor is in
    its shard, and no shard holds a tensor the index does not map to it.
    """
    if c.format == "torch":
        if not policy.allow_pickle:
            raise CheckpointError(f"{c.path}: torch pickles are refused by the policy", reason="unsupported")
        (file,) = c.files
        metas = {k: _torch_meta(k, t, file) for k, t in _torch_load(file).items()}
    elif c.format == "safetensors":
        (file,) = c.files
        metas = read_header(file)
    elif c.format == "sharded":
        metas = {}
        problems: list[str] = []
        mapped = dict(c.weight_map)
        for file in c.files:
            for name, meta in read_header(file).items():
                if name in metas:
                    problems.append(f"tensor {name!r} is in both {metas[name].file} and {file}")
                elif mapped.get(name) != file:
                    where = f"maps it to {mapped[name].name}" if name in mapped else "does not list it"
                    problems.append(f"tensor {name!r} is in shard {file.name} but the index {where}")
                metas.setdefault(name, meta)
        problems += [f"tensor {name!r}: the index maps it to {file.name}, which does not hold it"
                     for name, file in c.weight_map if name not in metas]
        if problems:
            raise CheckpointError(f"{c.path}: {INDEX_NAME} and the shards disagree (mixed versions or a "
                                  f"partial copy?): " + "; ".join(problems), reason="corrupt")
    else:
        raise CheckpointError(f"{c.path}: unknown format {c.format!r}; {ACCEPTED}", reason="unsupported")
    if c.stats:
        _verify_unchanged(c, c.stats, "since it was detected")
    return metas


def _locate(c: CheckpointCandidate, names: list[str]) -> dict[Path, list[str]]:
    """Group the wanted names by the file that holds them."""
    if c.format == "sharded":
        mapped = dict(c.weight_map)
        missing = [n for n in names if n not in mapped]
        if missing:
            raise ValidationError(str(c.path), [f"tensor {n!r}: not in the checkpoint" for n in missing])
        groups: dict[Path, list[str]] = {}
        for n in names:
            groups.setdefault(mapped[n], []).append(n)
        return groups
    (file,) = c.files
    return {file: names}


class SafetensorsFile:
    """A safetensors file open for reading: its header, checked as
    :func:`~serving.weights.safetensors_header.parse_header` does, then any tensor read from the file straight
    into a tensor of its own (``with SafetensorsFile(path) as f: f.get_tensor(name)``).

    Not ``safetensors.safe_open``: every ``get_tensor`` of safetensors 0.8 keeps about 70 bytes that are never
    freed, a leak that grows with every checkpoint a long-running server reads (the soak in
    docs/benchmarks.md). Nothing stays mapped either, so a later write to the file can neither change nor (by
    truncation) fault the weights handed out.
    """

    def __init__(self, file: Path) -> None:
        self.file = file
        self._f = open(file, "rb")  # noqa: SIM115 - closed by __exit__ or right below
        try:
            self.metas, self._data_start = read_open_header(self._f, str(file))
        except BaseException:
            self._f.close()
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def keys(self) -> list[str]:
        return list(self.metas)

    def get_tensor(self, name: str) -> torch.Tensor:
        meta = self.metas[name]
        tensor = torch.empty(meta.shape, dtype=meta.dtype)
        nbytes = meta.end - meta.start
        if nbytes:
            self._f.seek(self._data_start + meta.start)
            got = self._f.readinto(tensor.view(-1).view(torch.uint8).numpy().data)
            if got != nbytes:
                raise CheckpointError(f"{self.file}: tensor {name!r}: {got} of its {nbytes} bytes could be read: the "
                                      "file was truncated while it was being read; publish checkpoints by renaming "
                                      "them into place (`hotswap publish`), then retry", reason="changed_during_read")
        return tensor if sys.byteorder == "little" else from_little_endian(tensor)


def _read_safetensors(file: Path, names: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    with reading(file), SafetensorsFile(file) as f:  # read, never mapped: a truncation must not fault the process
        available = set(f.keys())
        missing = [n for n in names if n not in available]
        if missing:
            raise ValidationError(str(file), [f"tensor {n!r}: not in the file" for n in missing])
        for n in names:
            out[n] = f.get_tensor(n)
    return out


def from_little_endian(t: torch.Tensor) -> torch.Tensor:
    """A tensor read from safetensors' little-endian bytes, in a big-endian machine's byte order. Pure."""
    if t.element_size() == 1:
        return t
    raw = t.view(-1).view(torch.uint8).view(-1, t.element_size()).flip(1).contiguous()
    return raw.view(t.dtype).view(t.shape)


def read_tensors(c: CheckpointCandidate, names: Iterable[str],
                 policy: CheckpointPolicy) -> dict[str, torch.Tensor]:
    """Read only the named tensors, as CPU tensors owning their memory.

    Raises :class:`ValidationError` for names the checkpoint does not hold, and
    :class:`CheckpointError` (``reason="changed_during_read"``) when a file was deleted or rewritten
    since detection or during the read.
    """
    wanted = list(dict.fromkeys(names))
    baseline = _baseline(c)
    _verify_unchanged(c, baseline, "since it was detected")
    out: dict[str, torch.Tensor] = {}
    if c.format == "torch":
        if not policy.allow_pickle:
            raise CheckpointError(f"{c.path}: torch pickles are refused by the policy", reason="unsupported")
        (file,) = c.files
        loaded = _torch_load(file)
        missing = [n for n in wanted if n not in loaded]
        if missing:
            raise ValidationError(str(file), [f"tensor {n!r}: not in the file" for n in missing])
        out = {n: loaded[n].clone() for n in wanted}  # each its own memory (a pickle's may share a storage)
    elif c.format in ("safetensors", "sharded"):
        for file, group in _locate(c, wanted).items():
            out.update(_read_safetensors(file, group))
    else:
        raise CheckpointError(f"{c.path}: unknown format {c.format!r}; {ACCEPTED}", reason="unsupported")
    _verify_unchanged(c, baseline, "while it was being read")
    return {n: out[n] for n in wanted}
