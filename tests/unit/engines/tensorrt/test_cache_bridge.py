"""The stricter cache key and the bridge between Torch-TensorRT's engine cache and ours (the real cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from serving.cache import EngineCache
from serving.engines.tensorrt import (
    CacheBridge,
    TrtBuildOptions,
    TrtEnvironment,
    read_trt_entry,
    trt_cache_key,
    trt_entry_files,
    trt_key_fields,
)
from serving.engines.tensorrt import mapping as tm
from serving.errors import CacheError, EngineBuildError
from serving.examples import CNN, example_build_spec
from serving.metrics import prometheus_metrics
from serving.specs import WeightSpec

ENV = TrtEnvironment("10.14.1.48", "2.10.0", "2.10.0", "13.0", "NVIDIA H100 80GB HBM3", "9.0")


def test_cache_key_is_stricter_than_the_graph_hash() -> None:
    spec = example_build_spec(CNN, device="cuda")
    opts = TrtBuildOptions()
    base = trt_cache_key(trt_key_fields("abc", ENV, spec, opts))
    assert base == trt_cache_key(trt_key_fields("abc", ENV, spec, opts)) and base.startswith("trt-")
    variants = [
        trt_key_fields("abd", ENV, spec, opts),
        trt_key_fields("abc", TrtEnvironment("10.15.1.29", *list(vars(ENV).values())[1:]), spec, opts),
        trt_key_fields("abc", TrtEnvironment("10.14.1.48", "2.11.0", "2.10.0", "13.0", ENV.device_name, "9.0"),
                         spec, opts),
        trt_key_fields("abc", TrtEnvironment("10.14.1.48", "2.10.0", "2.10.1", "13.0", ENV.device_name, "9.0"),
                         spec, opts),
        trt_key_fields("abc", TrtEnvironment("10.14.1.48", "2.10.0", "2.10.0", "13.0", "NVIDIA L4", "8.9"),
                         spec, opts),
        trt_key_fields("abc", ENV, example_build_spec(CNN, device="cuda", max_batch=4), opts),
        {**trt_key_fields("abc", ENV, spec, opts), "schema": 999},
    ]
    assert len({base, *(trt_cache_key(v) for v in variants)}) == len(variants) + 1


def _events(registry: CollectorRegistry, event: str) -> float:
    return registry.get_sample_value("hotswap_engine_cache_events_total", {"event": event}) or 0.0


def _tiny_map() -> tuple[tm.WeightMap, dict[str, torch.Tensor]]:
    rec = tm.WeightRecord("w CONSTANT", (2,), torch.float32, tm.Source("w"))
    lit = tm.WeightRecord("k CONSTANT", (1,), torch.float32, tm.Literal("lit0"))
    return (tm.WeightMap((rec, lit), {"w": WeightSpec("w", (2,), torch.float32)}, (), ("lit0",)),
            {"lit0": torch.tensor([0.5])})


def test_cache_bridge_miss_store_hit_and_corrupt(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = prometheus_metrics(registry)
    cache = EngineCache(tmp_path, metrics=metrics)  # the real cache: it counts its own events
    spec = example_build_spec(CNN, device="cuda")

    def fields(h: str) -> dict[str, object]:
        return trt_key_fields(h, ENV, spec, TrtBuildOptions())

    bridge = CacheBridge(cache, fields, metrics)
    assert bridge.load("h1") is None and bridge.load("h1") is None  # Torch-TensorRT asks twice on a miss
    assert _events(registry, "miss") == 1
    bridge.save("h1", b"engine-blob")
    wm, lits = _tiny_map()
    key = bridge.commit(wm, lits)
    assert key == trt_cache_key(fields("h1")) and _events(registry, "store") == 1
    assert [e.key for e in cache.entries()] == [key]

    again = CacheBridge(cache, fields, metrics)
    assert again.load("h1") == b"engine-blob"
    assert again.hit is not None
    _, entry = again.hit
    assert entry.weight_map == wm and torch.equal(entry.literals["lit0"], lits["lit0"])
    assert _events(registry, "hit") == 1

    (tmp_path / key / "torch_trt_blob.bin").write_bytes(b"engine-blub")  # corrupted on disk
    third = CacheBridge(cache, fields, metrics)
    assert third.load("h1") is None and third.hit is None
    assert _events(registry, "corrupt") == 1
    assert cache.entries() == []  # removed, to be rebuilt


def test_read_trt_entry_names_the_file(tmp_path: Path) -> None:
    wm, lits = _tiny_map()
    for name, data in trt_entry_files(b"x", wm, lits, {"a": 1}).items():
        (tmp_path / name).write_bytes(data)
    assert read_trt_entry(tmp_path).blob == b"x"
    (tmp_path / "weight_map.json").write_text("{not json")
    with pytest.raises(CacheError, match=r"unreadable"):
        read_trt_entry(tmp_path)


def test_commit_without_a_staged_engine_is_a_build_error() -> None:
    bridge = CacheBridge(None, lambda h: {"h": h}, prometheus_metrics(CollectorRegistry()))
    with pytest.raises(EngineBuildError, match="save was never called"):
        bridge.commit(*_tiny_map())
