"""The stripped-engine cache: key strictness, atomic stores, corruption, LRU eviction, processes."""

from __future__ import annotations

import dataclasses
import importlib
import json
import multiprocessing
import os
import sys
from pathlib import Path

import filelock
import pytest
import torch
from prometheus_client import CollectorRegistry

import serving.cache as cache_mod
from serving.cache import (
    CacheEntry,
    EngineCache,
    cache_key,
    cache_key_fields,
    graph_fingerprint,
)
from serving.errors import CacheError
from serving.examples import CNN, TRANSFORMER, example_build_spec
from serving.factory import build_module
from serving.metrics import prometheus_metrics
from serving.specs import TensorSpec

EVENTS = "hotswap_engine_cache_events_total"


def _count(registry: CollectorRegistry, event: str) -> float:
    return registry.get_sample_value(EVENTS, {"event": event}) or 0.0


def _payload(tmp_path: Path, name: str, size: int = 1000, fill: int = 7) -> Path:
    p = tmp_path / name
    p.write_bytes(bytes([fill]) * size)
    return p


def _key(n: int) -> str:
    return cache_key({"n": n})


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def cache(tmp_path: Path, registry: CollectorRegistry) -> EngineCache:
    return EngineCache(tmp_path / "cache", metrics=prometheus_metrics(registry))


# --------------------------------------------------------------------------- key


def _fields(**overrides: object) -> dict[str, object]:
    spec = example_build_spec(TRANSFORMER)
    args: dict[str, object] = dict(engine="aoti", graph="g" * 64, spec=spec, build_flags={"a": 1},
                                   device=torch.device("cpu"), extra=None)
    args.update(overrides)
    return cache_key_fields(**args)  # type: ignore[arg-type]


def test_key_is_canonical_and_deterministic() -> None:
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key(_fields()) == cache_key(_fields())
    assert len(cache_key(_fields())) == 64
    with pytest.raises(CacheError, match="JSON"):
        cache_key({"a": object()})


@pytest.mark.parametrize("change", [
    "input_shape", "input_dtype", "input_name", "max_batch", "dtype", "engine", "build_flags", "graph", "extra",
])
def test_key_changes_with_each_spec_field(change: str) -> None:
    spec = example_build_spec(TRANSFORMER)
    tokens = spec.inputs[0]
    new: dict[str, object] = {
        "input_shape": {"spec": dataclasses.replace(spec, inputs=(TensorSpec("TOKENS", torch.int64, (32,)),))},
        "input_dtype": {"spec": dataclasses.replace(spec, inputs=(dataclasses.replace(tokens, dtype=torch.int32),))},
        "input_name": {"spec": dataclasses.replace(spec, inputs=(dataclasses.replace(tokens, name="IDS"),))},
        "max_batch": {"spec": dataclasses.replace(spec, max_batch=16)},
        "dtype": {"spec": dataclasses.replace(spec, dtype=torch.float16)},
        "engine": {"engine": "tensorrt"},
        "build_flags": {"build_flags": {"a": 2}},
        "graph": {"graph": "h" * 64},
        "extra": {"extra": {"host": "other"}},
    }[change]  # type: ignore[assignment]
    assert cache_key(_fields(**new)) != cache_key(_fields())  # type: ignore[arg-type]


def test_key_changes_with_torch_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = cache_key(_fields())
    monkeypatch.setattr(torch, "__version__", "99.0.0")
    assert cache_key(_fields()) != before


def test_key_changes_with_schema_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = cache_key(_fields())
    monkeypatch.setattr(cache_mod, "CACHE_SCHEMA_VERSION", cache_mod.CACHE_SCHEMA_VERSION + 1)
    assert cache_key(_fields()) != before


def test_key_changes_with_device_and_gpu_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    cap = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["value"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    cpu = cache_key(_fields())
    cuda = _fields(device=torch.device("cuda"))
    assert cuda["device"] == {"type": "cuda", "arch": "sm_90", "name": "NVIDIA H100", "cuda": torch.version.cuda}
    cap["value"] = (8, 0)
    ampere = cache_key(_fields(device=torch.device("cuda")))
    assert len({cpu, cache_key(cuda), ampere}) == 3
    # the device index is not part of the key: same architecture, same engine
    cap["value"] = (9, 0)
    assert cache_key(_fields(device=torch.device("cuda", 1))) == cache_key(cuda)


def _module(factory: str, seed: int = 0, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_module(factory, dict(kwargs))


def test_fingerprint_ignores_weight_values() -> None:
    a, b = _module(TRANSFORMER, seed=0), _module(TRANSFORMER, seed=1)
    assert not torch.equal(a.state_dict()["head.bias"], b.state_dict()["head.bias"])
    assert graph_fingerprint(a, TRANSFORMER, {}) == graph_fingerprint(b, TRANSFORMER, {})
    spec = example_build_spec(TRANSFORMER)
    fa = _fields(graph=graph_fingerprint(a, TRANSFORMER, {}), spec=spec)
    fb = _fields(graph=graph_fingerprint(b, TRANSFORMER, {}), spec=spec)
    assert cache_key(fa) == cache_key(fb)


def test_fingerprint_changes_with_hyperparameters() -> None:
    base = graph_fingerprint(_module(TRANSFORMER), TRANSFORMER, {})
    # a factory kwarg (changes shapes and kwargs)
    assert graph_fingerprint(_module(TRANSFORMER, d_ff=64), TRANSFORMER, {"d_ff": 64}) != base
    # same kwargs recorded, different module: repr/state specs still tell them apart
    assert graph_fingerprint(_module(TRANSFORMER, n_heads=2), TRANSFORMER, {}) != base
    # a hyperparameter that is no kwarg and changes no shape: BatchNorm eps (seen through repr)
    cnn = _module(CNN)
    before = graph_fingerprint(cnn, CNN, {})
    cnn.bn1.eps = 1e-5  # type: ignore[union-attr]
    assert graph_fingerprint(cnn, CNN, {}) != before
    # dtype of the state
    assert graph_fingerprint(_module(CNN).half(), CNN, {}) != before
    assert graph_fingerprint(_module(CNN), "other.module:tiny_cnn", {}) != before


def test_fingerprint_hashes_module_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "fp_models_x"
    pkg.mkdir()
    src = pkg / "__init__.py"
    src.write_text("import torch\n\nclass M(torch.nn.Module):\n    def forward(self, x):\n        return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("fp_models_x")
    try:
        m = mod.M()
        before = graph_fingerprint(m, "fp_models_x:M", {})
        assert graph_fingerprint(m, "fp_models_x:M", {}) == before
        src.write_text(src.read_text().replace("x + 1", "x + 2"))
        assert graph_fingerprint(m, "fp_models_x:M", {}) != before
    finally:
        sys.modules.pop("fp_models_x", None)


# --------------------------------------------------------------------------- store / load


def test_store_then_load_verifies_and_counts(cache: EngineCache, registry: CollectorRegistry,
                                             tmp_path: Path) -> None:
    key = _key(1)
    assert cache.load(key, lambda e: pytest.fail("loader called on a miss")) is None
    entry = cache.store(key, {"engine.bin": _payload(tmp_path, "a")}, {"weights": [1, 2], "note": "x"})
    assert entry.key == key and entry.files["engine.bin"].read_bytes() == bytes([7]) * 1000
    meta = json.loads((entry.path / "meta.json").read_text())
    assert meta["weights"] == [1, 2]
    assert meta["_cache"]["files"]["engine.bin"]["size"] == 1000
    assert len(meta["_cache"]["files"]["engine.bin"]["sha256"]) == 64
    seen: list[CacheEntry] = []

    def loader(e: CacheEntry) -> str:
        seen.append(e)
        return "loaded"

    assert cache.load(key, loader) == "loaded"
    assert seen[0].meta["note"] == "x" and seen[0].size == entry.size
    assert (_count(registry, "miss"), _count(registry, "store"), _count(registry, "hit")) == (1, 1, 1)
    assert [e.key for e in cache.entries()] == [key]


def test_loader_runs_under_the_lock(cache: EngineCache, tmp_path: Path) -> None:
    key = _key(1)
    cache.store(key, {"f": _payload(tmp_path, "a")}, {})
    other = filelock.FileLock(str(cache.root / ".lock"), timeout=0)

    def loader(entry: CacheEntry) -> bool:
        with pytest.raises(filelock.Timeout):
            other.acquire()
        return True

    assert cache.load(key, loader) is True
    other.acquire()  # free again once load returned
    other.release()


def test_lock_timeout_is_a_clear_cache_error(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "c", lock_timeout=0.1)
    holder = filelock.FileLock(str(tmp_path / "c" / ".lock"))
    holder.acquire()
    try:
        with pytest.raises(CacheError, match=r"could not take the lock .*\.lock within 0.1s"):
            cache.load(_key(1), lambda e: None)
    finally:
        holder.release()


def test_store_refuses_bad_input(cache: EngineCache, tmp_path: Path) -> None:
    f = _payload(tmp_path, "a")
    with pytest.raises(CacheError, match="invalid key"):
        cache.store("../escape", {"f": f}, {})
    with pytest.raises(CacheError, match="not a plain file name"):
        cache.store(_key(1), {"sub/f": f}, {})
    with pytest.raises(CacheError, match="reserved"):
        cache.store(_key(1), {"meta.json": f}, {})
    with pytest.raises(CacheError, match="reserved"):
        cache.store(_key(1), {"f": f}, {"_cache": 1})
    with pytest.raises(CacheError, match="does not exist"):
        cache.store(_key(1), {"f": tmp_path / "nope"}, {})
    with pytest.raises(CacheError, match="not plain JSON"):
        cache.store(_key(1), {"f": f}, {"t": torch.zeros(1)})
    assert cache.entries() == []
    assert [p.name for p in cache.root.iterdir()] == [".lock"]


def test_second_store_of_same_key_keeps_the_first(cache: EngineCache, tmp_path: Path) -> None:
    key = _key(1)
    first = cache.store(key, {"f": _payload(tmp_path, "a", fill=1)}, {"who": "first"})
    second = cache.store(key, {"f": _payload(tmp_path, "b", fill=2)}, {"who": "second"})
    assert second.meta["who"] == "first" and second.path == first.path
    assert (first.path / "f").read_bytes() == bytes([1]) * 1000


# --------------------------------------------------------------------------- atomicity


def _crash_before_rename(root: str, key: str, payload: str) -> None:
    """A writer that dies (no cleanup, no exception handling) right before publishing."""
    os.rename = lambda *a, **k: os._exit(3)  # type: ignore[assignment]  # only in this child process
    EngineCache(root).store(key, {"f": Path(payload)}, {"x": 1})


def test_crashed_writer_leaves_no_entry_and_is_cleaned(cache: EngineCache, registry: CollectorRegistry,
                                                      tmp_path: Path) -> None:
    key = _key(1)
    payload = _payload(tmp_path, "a")
    proc = multiprocessing.get_context("fork").Process(
        target=_crash_before_rename, args=(str(cache.root), key, str(payload)))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 3
    leftovers = [p for p in cache.root.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "meta.json").exists()  # complete, yet unpublished
    assert cache.entries() == []
    assert cache.load(key, lambda e: pytest.fail("loaded a crashed writer's files")) is None
    assert _count(registry, "miss") == 1
    # the lock died with the writer; the next store cleans the leftovers up and succeeds
    entry = cache.store(key, {"f": payload}, {"x": 2})
    assert not leftovers[0].exists()
    assert cache.load(key, lambda e: e.meta["x"]) == 2
    assert entry.key == key


def test_failed_rename_cleans_up(cache: EngineCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod.os, "rename", fail)
    with pytest.raises(CacheError, match="No space left"):
        cache.store(_key(1), {"f": _payload(tmp_path, "a")}, {})
    monkeypatch.undo()
    assert [p.name for p in cache.root.iterdir()] == [".lock"]


# --------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_file", "bad_meta", "wrong_key_in_meta"])
def test_corrupt_entry_is_a_miss_and_removed(cache: EngineCache, registry: CollectorRegistry,
                                             tmp_path: Path, damage: str) -> None:
    key = _key(1)
    entry = cache.store(key, {"f": _payload(tmp_path, "a")}, {})
    f = entry.path / "f"
    if damage == "flip_byte":
        data = bytearray(f.read_bytes())
        data[500] ^= 0x01
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-1])
    elif damage == "delete_file":
        f.unlink()
    elif damage == "bad_meta":
        (entry.path / "meta.json").write_text("{not json")
    else:
        meta = json.loads((entry.path / "meta.json").read_text())
        meta["_cache"]["key"] = _key(2)
        (entry.path / "meta.json").write_text(json.dumps(meta))
    called: list[CacheEntry] = []
    assert cache.load(key, called.append) is None
    assert called == []
    assert not entry.path.exists()
    assert _count(registry, "corrupt") == 1 and _count(registry, "miss") == 1 and _count(registry, "hit") == 0
    # the caller rebuilds and stores again
    cache.store(key, {"f": _payload(tmp_path, "b")}, {})
    assert cache.load(key, lambda e: True) is True


# --------------------------------------------------------------------------- eviction


def _three_entries(cache: EngineCache, tmp_path: Path, touch_first: bool) -> list[str]:
    keys = [_key(i) for i in range(3)]
    first = cache.store(keys[0], {"f": _payload(tmp_path, "a")}, {})
    cache.max_bytes = int(first.size * 2.5)  # room for two entries
    cache.store(keys[1], {"f": _payload(tmp_path, "b")}, {})
    if touch_first:
        assert cache.load(keys[0], lambda e: True)
    cache.store(keys[2], {"f": _payload(tmp_path, "c")}, {})
    return keys


def test_eviction_drops_least_recently_created_when_unused(cache: EngineCache, registry: CollectorRegistry,
                                                           tmp_path: Path) -> None:
    keys = _three_entries(cache, tmp_path, touch_first=False)
    assert {e.key for e in cache.entries()} == {keys[1], keys[2]}
    assert _count(registry, "evict") == 1


def test_eviction_is_by_last_use_not_creation(cache: EngineCache, registry: CollectorRegistry,
                                              tmp_path: Path) -> None:
    keys = _three_entries(cache, tmp_path, touch_first=True)
    assert [e.key for e in cache.entries()] == [keys[0], keys[2]]  # least recently used first
    assert _count(registry, "evict") == 1
    assert sum(e.size for e in cache.entries()) <= cache.max_bytes


def test_eviction_never_drops_the_entry_just_stored(cache: EngineCache, registry: CollectorRegistry,
                                                    tmp_path: Path) -> None:
    cache.max_bytes = 10
    cache.store(_key(0), {"f": _payload(tmp_path, "a")}, {})
    cache.store(_key(1), {"f": _payload(tmp_path, "b")}, {})
    assert [e.key for e in cache.entries()] == [_key(1)]
    assert _count(registry, "evict") == 1


# --------------------------------------------------------------------------- processes


def _store_same_key(root: str, key: str, payload: str, barrier: object, fill: int) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    for _ in range(20):
        entry = EngineCache(root).store(key, {"f": Path(payload)}, {"fill": fill})
        assert entry.files["f"].stat().st_size == 1000
    os._exit(0)


def test_processes_storing_the_same_key_both_succeed(cache: EngineCache, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    key = _key(1)
    procs = [
        ctx.Process(target=_store_same_key,
                    args=(str(cache.root), key, str(_payload(tmp_path, f"p{i}", fill=i)), barrier, i))
        for i in (1, 2, 3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    fill = cache.load(key, lambda e: (int(str(e.meta["fill"])), e.files["f"].read_bytes()))
    assert fill is not None
    assert fill[1] == bytes([fill[0]]) * 1000  # one writer's complete entry, verified
    assert [e.key for e in cache.entries()] == [key]
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".tmp-")]
