"""Engines compiled once per test session and shared by the tests that can share them (fixtures in
tests/conftest.py). A compile costs tens of seconds on two cores; a second build of the same model in the same
session is a cache hit, never another compile."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from serving.cache import EngineCache
from serving.engines import Engine, build_engine
from serving.examples import TRANSFORMER, example_build_spec
from serving.metrics import prometheus_metrics


@dataclass(frozen=True)
class CompiledEngine:
    """An engine built once per session, the cache its build stored the stripped engine in, and that cache's
    metrics registry (its ``hotswap_engine_cache_events_total``)."""

    engine: Engine
    cache: EngineCache
    registry: CollectorRegistry


def compile_aoti_transformer(cache_dir: Path) -> CompiledEngine:
    """The example transformer on the AOTInductor engine, built into an empty cache at ``cache_dir``: a miss
    that stores the weight-stripped package (the cache then holds that one entry)."""
    registry = CollectorRegistry()
    cache = EngineCache(cache_dir, metrics=prometheus_metrics(registry))
    return CompiledEngine(build_engine("aoti", example_build_spec(TRANSFORMER), cache=cache), cache, registry)
