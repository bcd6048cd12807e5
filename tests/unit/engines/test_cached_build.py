"""The cache-or-compile flow of the compiled engines, with a recipe whose "compile" writes one file (the real
cache underneath): hit, miss, bypass, an entry that does not fit, a cache that cannot be used, a failed store."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from serving.cache import CacheEntry, EngineCache
from serving.engines.cached_build import EntryUnfit, Made, Recipe, cached_build
from serving.errors import CacheError, EngineBuildError
from serving.examples import CNN, example_build_spec
from serving.metrics import prometheus_metrics

PAYLOAD = "payload.bin"


class FileRecipe(Recipe[bytes]):
    """Its engine is the bytes of one file; switches make each step misbehave."""

    kind = "toy"
    label = "toy engine"

    def __init__(self) -> None:
        super().__init__(example_build_spec(CNN))
        self.compiled = 0
        self.unfit_entry = self.unfit_copy = self.copy_fails = self.compile_fails = False
        self.store_fails = ""
        self.seen_at_compile: list[str] = []

    def key_fields(self) -> dict[str, object]:
        return {"engine": self.kind, "factory": self.spec.factory}

    def copy_out(self, entry: CacheEntry, workdir: Path) -> Mapping[str, object]:
        if self.unfit_copy:
            raise EntryUnfit(["the entry lacks a file"])
        target = workdir / ("missing-folder/x" if self.copy_fails else PAYLOAD)
        target.write_bytes(entry.files[PAYLOAD].read_bytes())
        return entry.meta

    def from_entry(self, meta: Mapping[str, object], workdir: Path) -> Made[bytes]:
        if self.unfit_entry:
            raise EntryUnfit(["cached weight 'w' is [3] float32, the module has [2] float32", "another problem"])
        return Made((workdir / PAYLOAD).read_bytes(), note="1 thing from it", kept={"k": "non-persistent buffer"})

    def compile(self, workdir: Path) -> Made[bytes]:
        self.seen_at_compile = sorted(p.name for p in workdir.iterdir())
        if self.compile_fails:
            raise EngineBuildError("toy engine: the compiler failed")
        self.compiled += 1
        (workdir / PAYLOAD).write_bytes(b"code")
        return Made(b"code", note="compiled in 0.0s", kept={"k": "non-persistent buffer"})

    def entry(self, made: Made[bytes], staging: Path) -> tuple[dict[str, Path], dict[str, object]]:
        if self.store_fails:
            raise CacheError(self.store_fails)
        (staging / "extra.txt").write_text("temporary")
        return {PAYLOAD: staging.parent / PAYLOAD, "extra.txt": staging / "extra.txt"}, {"weights": []}


@pytest.fixture
def cache(tmp_path: Path) -> EngineCache:
    return EngineCache(tmp_path / "cache", metrics=prometheus_metrics(CollectorRegistry()))


def test_miss_stores_and_the_next_build_is_a_hit_that_says_what_it_saved(cache: EngineCache) -> None:
    recipe = FileRecipe()
    miss = cached_build(recipe, cache, started=time.perf_counter() - 5.0)
    assert miss.parts == b"code" and miss.info.cache == "miss" and miss.info.key
    assert miss.info.detail == "compiled in 0.0s; kept in the engine, not refitted: 'k' (non-persistent buffer)"
    (entry,) = cache.entries()
    assert set(entry.files) == {PAYLOAD, "extra.txt"}
    assert entry.meta["fields"] == recipe.key_fields() and entry.meta["factory"] == CNN
    assert entry.meta["weights"] == [] and float(entry.meta["build_seconds"]) >= 5.0  # type: ignore[arg-type]
    assert [p.name for p in miss.workdir.iterdir()] == [PAYLOAD]  # the staging folder is gone
    hit = cached_build(recipe, cache, started=time.perf_counter())
    assert hit.info.cache == "hit" and hit.info.key == miss.info.key and hit.parts == b"code"
    assert re.fullmatch(r"loaded from the engine cache \(1 thing from it\); the cold build took [\d.]+s, "
                        r"[\d.]+s saved; kept in the engine, not refitted: 'k' \(non-persistent buffer\)",
                        hit.info.detail), hit.info.detail
    assert recipe.compiled == 1 and hit.workdir != miss.workdir


def test_without_a_cache_it_is_a_bypass_with_a_key() -> None:
    built = cached_build(FileRecipe(), None, started=time.perf_counter())
    assert built.info.cache == "bypass" and built.info.key and built.info.detail.startswith("compiled in")


@pytest.mark.parametrize("where", ["from_entry", "copy_out"])
def test_an_entry_that_does_not_fit_is_dropped_and_rebuilt_from_an_empty_folder(
        cache: EngineCache, where: str, caplog: pytest.LogCaptureFixture) -> None:
    recipe = FileRecipe()
    cached_build(recipe, cache, started=time.perf_counter())
    (first,) = cache.entries()
    setattr(recipe, "unfit_entry" if where == "from_entry" else "unfit_copy", True)
    with caplog.at_level(logging.WARNING):
        again = cached_build(recipe, cache, started=time.perf_counter())
    assert again.info.cache == "miss" and recipe.compiled == 2
    assert recipe.seen_at_compile == []  # what the entry left in the work folder was cleared first
    assert "toy engine: cache entry" in caplog.text and "does not fit this model" in caplog.text
    assert ("another problem" in caplog.text) == (where == "from_entry")
    (entry,) = cache.entries()  # the rebuilt one, not the one that did not fit
    assert entry.key == again.info.key and entry.meta["_cache"] != first.meta["_cache"]


def test_a_cache_that_cannot_be_used_is_logged_and_the_build_goes_on_without_it(cache: EngineCache) -> None:
    recipe = FileRecipe()
    cached_build(recipe, cache, started=time.perf_counter())
    recipe.copy_fails = True
    built = cached_build(recipe, cache, started=time.perf_counter())
    assert built.info.cache == "bypass" and recipe.compiled == 2
    assert built.info.detail.startswith("cache unusable: toy engine: cannot copy the cache entry")
    assert len(cache.entries()) == 1  # the entry is not the culprit: kept


def test_a_failed_store_leaves_a_working_engine_and_says_so(cache: EngineCache) -> None:
    recipe = FileRecipe()
    recipe.store_fails = "the disk is full"
    built = cached_build(recipe, cache, started=time.perf_counter())
    assert built.parts == b"code" and built.info.cache == "miss"
    assert "compiled in 0.0s; not stored: the disk is full; kept in the engine" in built.info.detail
    assert cache.entries() == []


def test_a_failed_compile_removes_the_work_folder(cache: EngineCache, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
    recipe = FileRecipe()
    recipe.compile_fails = True
    with pytest.raises(EngineBuildError, match="the compiler failed"):
        cached_build(recipe, cache, started=time.perf_counter())
    assert list((tmp_path / "tmp").iterdir()) == []
