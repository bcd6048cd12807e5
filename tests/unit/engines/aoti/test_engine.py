"""The weight-stripped AOTInductor engine.

Compiles are slow (tens of seconds on two cores), so every compiled engine is a fixture built once: the
default transformer (the session's build, tests/conftest.py, then loaded once from its cache), the CNN, a
transformer with ~4 MB of weights (payload size) and a CNN whose build must be refused.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import weakref
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from session_engines import CompiledEngine

from serving.cache import EngineCache
from serving.engines.aoti import AOTIEngine, AOTISlot, compiler
from serving.engines.aoti.checks import is_compact, package_problems
from serving.engines.aoti.entry import PACKAGE_FILE
from serving.errors import EngineBuildError, NotReadyError, ValidationError
from serving.examples import CNN, TRANSFORMER, example_build_spec
from serving.factory import build_module
from serving.specs import BuildSpec, WeightSpec

EVENTS = "hotswap_engine_cache_events_total"

Weights = tuple[torch.nn.Module, dict[str, torch.Tensor]]


def random_weights(spec: BuildSpec, seed: int) -> Weights:
    """An eager module with fresh random weights (BatchNorm statistics included) and its state dict."""
    torch.manual_seed(seed)
    module = build_module(spec.factory, spec.kwargs())
    state = {}
    for name, t in module.state_dict().items():
        if not t.is_floating_point():
            state[name] = t.clone()
        elif name.endswith("running_var"):
            state[name] = torch.rand_like(t) + 0.5
        else:
            state[name] = t + 0.2 * torch.randn_like(t)
    module.load_state_dict(state)
    return module, state


def batch(spec: BuildSpec, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    (inp,) = spec.inputs
    if inp.dtype == torch.int64:
        return torch.randint(0, 1000, (n, *inp.shape), generator=g)
    return torch.randn((n, *inp.shape), generator=g)


def assert_matches_eager(engine: AOTIEngine, slot: AOTISlot, module: torch.nn.Module) -> None:
    for n in (1, engine.spec.max_batch):
        x = batch(engine.spec, n, seed=n)
        (out,) = slot.run([x])
        with torch.no_grad():
            torch.testing.assert_close(out, module(x))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tf_cache(aoti_transformer: CompiledEngine) -> tuple[EngineCache, CollectorRegistry]:
    """The cache the session's example-transformer build stored into (tests/conftest.py), and its metrics."""
    return aoti_transformer.cache, aoti_transformer.registry


@pytest.fixture(scope="module")
def tf_engine(aoti_transformer: CompiledEngine) -> AOTIEngine:
    """The default transformer, built once per session (a miss; the integration servers load it from a copy of
    its cache)."""
    assert isinstance(aoti_transformer.engine, AOTIEngine)
    return aoti_transformer.engine


@pytest.fixture(scope="module")
def tf_hit(tf_engine: AOTIEngine, tf_cache: tuple[EngineCache, CollectorRegistry]) -> Iterator[AOTIEngine]:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not export or compile")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.export, "export", forbidden)
        mp.setattr(torch._inductor, "aoti_compile_and_package", forbidden)
        engine = AOTIEngine.build(example_build_spec(TRANSFORMER), cache=tf_cache[0])
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def cnn_engine() -> Iterator[AOTIEngine]:
    engine = AOTIEngine.build(example_build_spec(CNN), cache=None)
    yield engine
    engine.close()


@pytest.fixture
def tf_weights() -> Weights:
    return random_weights(example_build_spec(TRANSFORMER), seed=1)


# --------------------------------------------------------------------------- transformer


@pytest.mark.slow
def test_build_is_a_miss_and_stores_a_stripped_package(tf_engine: AOTIEngine,
                                                       tf_cache: tuple[EngineCache, CollectorRegistry]) -> None:
    cache, registry = tf_cache
    info = tf_engine.build_info
    assert info.cache == "miss" and info.key and info.seconds > 0
    (entry,) = cache.entries()
    assert entry.key == info.key and set(entry.files) == {PACKAGE_FILE}
    assert package_problems(entry.files[PACKAGE_FILE]) == []
    raw = entry.meta["weights"]
    assert isinstance(raw, list)
    stored = {d["name"]: WeightSpec.from_json(d) for d in raw}
    assert stored == dict(tf_engine.weight_specs())
    assert registry.get_sample_value(EVENTS, {"event": "store"}) == 1


@pytest.mark.slow
def test_weight_specs_are_the_whole_state_dict(tf_engine: AOTIEngine) -> None:
    module = build_module(TRANSFORMER)
    specs = tf_engine.weight_specs()
    assert set(specs) == set(module.state_dict())
    assert specs["head.bias"] == WeightSpec("head.bias", (5,), torch.float32)  # small: the inlining trap
    assert tf_engine.ignored_names == frozenset()


@pytest.mark.slow
def test_outputs_match_eager_after_refit(tf_engine: AOTIEngine,
                                         tf_weights: Weights) -> None:
    module, state = tf_weights
    slot = tf_engine.new_slot()
    slot.refit(slot.transfer(state))
    assert_matches_eager(tf_engine, slot, module)


@pytest.mark.slow
def test_second_refit_switches_every_tensor(tf_engine: AOTIEngine,
                                            tf_weights: Weights) -> None:
    spec = tf_engine.spec
    module1, state1 = tf_weights
    module2, state2 = random_weights(spec, seed=2)
    slot = tf_engine.new_slot()
    slot.refit(slot.transfer(state1))
    x = batch(spec, 4)
    (before,) = slot.run([x])
    slot.refit(slot.transfer(state2))
    (after,) = slot.run([x])
    assert not torch.allclose(before, after)
    assert_matches_eager(tf_engine, slot, module2)
    # a partial refit of the 5-element head.bias alone (inlined into the code without the fix)
    bias = state2["head.bias"] + torch.tensor([1.0, -2.0, 3.0, 0.5, 0.25])
    slot.refit({"head.bias": bias})
    (shifted,) = slot.run([x])
    torch.testing.assert_close(shifted - after, (bias - state2["head.bias"]).expand_as(after))
    module2.load_state_dict({**state2, "head.bias": bias})
    assert_matches_eager(tf_engine, slot, module2)


@pytest.mark.slow
def test_transfer_does_not_copy_and_refit_copies(tf_engine: AOTIEngine, tf_weights: Weights) -> None:
    module, state = tf_weights
    slot = tf_engine.new_slot()
    moved = slot.transfer(state)
    assert all(moved[n].data_ptr() == state[n].data_ptr() for n in state)  # already on cpu/float32
    slot.refit(moved)
    x = batch(tf_engine.spec, 2)
    (before,) = slot.run([x])
    with torch.no_grad():
        moved["head.bias"].add_(1.0)  # the runner holds its own copy: the caller's tensors are free
    (after,) = slot.run([x])
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.slow
def test_refit_neither_keeps_nor_leaks_the_callers_tensors(tf_engine: AOTIEngine, tf_weights: Weights) -> None:
    """load_constants(user_managed=True) leaks every tensor it gets (torch 2.13): the slot must not use it."""
    module, state = tf_weights
    slot = tf_engine.new_slot()
    mine = {k: v.clone() for k, v in state.items()}
    refs = {k: weakref.ref(v) for k, v in mine.items()}
    slot.refit(mine)
    slot.refit({"head.weight": mine["head.weight"].clone()})  # partial: the runner keeps the rest
    del mine
    gc.collect()
    assert [k for k, r in refs.items() if r() is not None] == []
    assert_matches_eager(tf_engine, slot, module)


@pytest.mark.slow
def test_views_into_larger_storages_are_compacted(tf_engine: AOTIEngine, tf_weights: Weights) -> None:
    """The runner copies whole storages: a view would overrun its blob (heap corruption, seen)."""
    module, state = tf_weights
    fused = torch.cat([state["head.bias"], torch.randn(1000)])
    view = fused[:5]
    assert not is_compact(view) and is_compact(state["head.bias"])
    slot = tf_engine.new_slot()
    with pytest.raises(ValidationError, match="'head.bias': not contiguous or a view"):
        slot.refit({**state, "head.bias": view})
    moved = slot.transfer({**state, "head.bias": view})
    assert is_compact(moved["head.bias"]) and moved["head.bias"].data_ptr() != view.data_ptr()
    slot.refit(moved)
    assert_matches_eager(tf_engine, slot, module)


@pytest.mark.slow
def test_slots_are_independent(tf_engine: AOTIEngine,
                               tf_weights: Weights) -> None:
    module1, state1 = tf_weights
    module2, state2 = random_weights(tf_engine.spec, seed=3)
    a, b = tf_engine.new_slot(), tf_engine.new_slot()
    a.refit(a.transfer(state1))
    b.refit(b.transfer(state2))
    assert_matches_eager(tf_engine, a, module1)
    assert_matches_eager(tf_engine, b, module2)


@pytest.mark.slow
def test_run_before_refit_is_not_ready(tf_engine: AOTIEngine,
                                       tf_weights: Weights) -> None:
    slot = tf_engine.new_slot()
    with pytest.raises(NotReadyError, match="no weights yet"):
        slot.run([batch(tf_engine.spec, 1)])
    _, state = tf_weights
    partial = {k: v for k, v in state.items() if k != "head.bias"}
    with pytest.raises(ValidationError, match="missing 1: 'head.bias'"):
        slot.refit(partial)
    with pytest.raises(NotReadyError):
        slot.run([batch(tf_engine.spec, 1)])


@pytest.mark.slow
def test_bad_weights_are_refused_with_every_problem(tf_engine: AOTIEngine,
                                                    tf_weights: Weights) -> None:
    _, state = tf_weights
    bad = dict(state)
    bad["head.bias"] = torch.zeros(7)
    bad["head.weight"] = state["head.weight"].double()
    bad["ln_f.weight"] = torch.zeros(128)[::2]
    bad["extra.weight"] = torch.zeros(1)
    slot = tf_engine.new_slot()
    with pytest.raises(ValidationError) as err:
        slot.refit(bad)
    text = str(err.value)
    assert len(err.value.problems) == 4
    for expected in ("'head.bias': shape (7,), expected (5,)", "'head.weight': dtype float64, expected float32",
                     "'ln_f.weight': not contiguous", "'extra.weight': not a weight"):
        assert expected in text
    # transfer fixes what it can (dtype, layout), then the refit goes through
    fixed = slot.transfer({**state, "head.weight": bad["head.weight"], "ln_f.weight": bad["ln_f.weight"]})
    assert fixed["head.weight"].dtype == torch.float32 and fixed["ln_f.weight"].is_contiguous()
    slot.refit(fixed)


@pytest.mark.slow
def test_inputs_are_checked(tf_engine: AOTIEngine,
                            tf_weights: Weights) -> None:
    slot = tf_engine.new_slot()
    slot.refit(slot.transfer(tf_weights[1]))
    with pytest.raises(ValueError, match="batch size 9 outside 1..8"):
        slot.run([batch(tf_engine.spec, 9)])
    with pytest.raises(ValueError, match="input TOKENS: int32"):
        slot.run([batch(tf_engine.spec, 2).int()])
    with pytest.raises(ValueError, match="2 input"):
        slot.run([batch(tf_engine.spec, 2)] * 2)


# --------------------------------------------------------------------------- cache hit


@pytest.mark.slow
def test_second_build_is_a_hit_without_export(tf_engine: AOTIEngine, tf_hit: AOTIEngine,
                                              tf_cache: tuple[EngineCache, CollectorRegistry],
                                              tf_weights: Weights) -> None:
    _, registry = tf_cache
    assert tf_hit.build_info.cache == "hit"
    assert tf_hit.build_info.key == tf_engine.build_info.key
    assert dict(tf_hit.weight_specs()) == dict(tf_engine.weight_specs())
    assert tf_hit.ignored_names == tf_engine.ignored_names
    assert registry.get_sample_value(EVENTS, {"event": "hit"}) == 1
    module, state = tf_weights
    x = batch(tf_engine.spec, 8)
    outs = []
    for engine in (tf_engine, tf_hit):
        slot = engine.new_slot()
        slot.refit(slot.transfer(state))
        outs.append(slot.run([x])[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(outs[1], module(x))


@pytest.mark.slow
def test_hit_that_does_not_fit_the_model_is_dropped(tf_engine: AOTIEngine,
                                                    tf_cache: tuple[EngineCache, CollectorRegistry],
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry whose weight list disagrees with the module is never served: removed, then rebuilt."""
    root = tmp_path / "copy"
    shutil.copytree(tf_cache[0].root, root)
    meta_path = root / str(tf_engine.build_info.key) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["weights"] = [w for w in meta["weights"] if w["name"] != "head.bias"]
    meta_path.write_text(json.dumps(meta))
    cache = EngineCache(root)

    def no_export(*args: object, **kwargs: object) -> None:
        raise RuntimeError("export reached")

    monkeypatch.setattr(torch.export, "export", no_export)
    with pytest.raises(EngineBuildError, match="export reached"):
        AOTIEngine.build(example_build_spec(TRANSFORMER), cache=cache)
    assert cache.entries() == []


# --------------------------------------------------------------------------- CNN


@pytest.mark.slow
def test_cnn_without_cache_is_a_bypass_and_ignores_num_batches_tracked(cnn_engine: AOTIEngine) -> None:
    assert cnn_engine.build_info.cache == "bypass"
    assert cnn_engine.ignored_names == frozenset({"bn1.num_batches_tracked", "bn2.num_batches_tracked"})
    module = build_module(CNN)
    assert set(cnn_engine.weight_specs()) == set(module.state_dict()) - cnn_engine.ignored_names


@pytest.mark.slow
def test_cnn_outputs_match_eager_after_each_refit(cnn_engine: AOTIEngine) -> None:
    spec = cnn_engine.spec
    slot = cnn_engine.new_slot()
    for seed in (1, 2):
        module, state = random_weights(spec, seed)
        slot.refit(slot.transfer(state))  # the checkpoint's num_batches_tracked is accepted and dropped
        assert_matches_eager(cnn_engine, slot, module)


# --------------------------------------------------------------------------- stripped, refused


@pytest.mark.slow
def test_payload_is_a_small_fraction_of_the_weights(tmp_path_factory: pytest.TempPathFactory) -> None:
    spec = dataclasses.replace(example_build_spec(TRANSFORMER), factory_kwargs=(("vocab", 16000),))
    cache = EngineCache(tmp_path_factory.mktemp("aoti-big"))
    engine = AOTIEngine.build(spec, cache=cache)
    try:
        weight_bytes = sum(s.nbytes for s in engine.weight_specs().values())
        assert 4_000_000 < weight_bytes < 5_000_000
        (entry,) = cache.entries()
        assert entry.size < weight_bytes / 5, (entry.size, weight_bytes)
        with zipfile.ZipFile(entry.files[PACKAGE_FILE]) as z:
            assert not [n for n in z.namelist() if "weights" in n or "constants" in n]
        module, state = random_weights(spec, seed=4)
        slot = engine.new_slot()
        slot.refit(slot.transfer(state))
        x = batch(spec, 3)
        with torch.no_grad():
            torch.testing.assert_close(slot.run([x])[0], module(x))
    finally:
        engine.close()


@pytest.mark.slow
def test_baked_in_small_tensor_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without always_keep_tensor_constants Inductor inlines a 5-element head.bias: refuse the engine."""
    configs = {k: v for k, v in compiler.INDUCTOR_CONFIGS.items() if k != "always_keep_tensor_constants"}
    monkeypatch.setattr(compiler, "INDUCTOR_CONFIGS", configs)
    spec = dataclasses.replace(example_build_spec(CNN), factory_kwargs=(("n_classes", 5),))
    cache = EngineCache(tmp_path / "cache")
    with pytest.raises(EngineBuildError) as err:
        AOTIEngine.build(spec, cache=cache)
    assert "'head.bias'" in str(err.value) and "baked" in str(err.value)
    assert "'head.weight'" not in str(err.value)
    assert cache.entries() == []  # nothing stored


# --------------------------------------------------------------------------- under the coordinator


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["double_buffer", "in_place"])
def test_coordinator_on_aoti_never_serves_mixed_weights_and_rolls_back(tf_engine: AOTIEngine, strategy: str) -> None:
    """Readers run while another thread refits many times: every output is exactly one version's."""
    import threading

    from serving.refit import CanaryConfig, RefitCoordinator, StagedWeights

    spec = example_build_spec(TRANSFORMER)
    coord = RefitCoordinator(tf_engine, strategy=strategy, canary=CanaryConfig("reference"),
                             canary_input_specs=spec.inputs,
                             reference_factory=lambda: build_module(spec.factory))
    x = batch(spec, 2, seed=99)
    versions, expected = [], []
    for i in range(4):
        module, state = random_weights(spec, seed=10 + i)
        tensors = {k: v for k, v in state.items() if k in tf_engine.weight_specs()}
        versions.append(StagedWeights(f"v{i}", tensors))
        with torch.no_grad():
            expected.append(module(x))
    assert coord.install(versions[0]).outcome == "success"
    stop = threading.Event()
    problems: list[str] = []
    seen: set[int] = set()

    def reader() -> None:
        while not stop.is_set():
            out = coord.infer([x])[0]
            match = [i for i, e in enumerate(expected) if torch.allclose(out, e, atol=1e-5, rtol=1e-5)]
            if len(match) != 1:
                problems.append(f"output matched {match}")
                return
            seen.add(match[0])

    threads = [threading.Thread(target=reader, name=f"aoti-reader-{i}") for i in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(12):
            report = coord.install(versions[i % len(versions)])
            assert report.outcome in ("success", "noop"), report
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not problems, problems[:3]
    assert len(seen) >= 2
    live = int(coord.live_version[1:])  # type: ignore[index]
    assert coord.rollback().outcome == "success"
    assert coord.live_version != f"v{live}"
    coord.close()


@pytest.mark.slow
def test_default_cpu_refit_from_a_file_writes_into_the_registered_buffers(
        tf_engine: AOTIEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Double-buffered on the CPU, a checkpoint file is read straight into the standby slot's registered buffers:
    the slot's refit is handed its own buffers (nothing to copy), and the outputs are the new version's."""
    from safetensors.torch import save_file

    from serving.refit import RefitCoordinator

    handed: list[bool] = []  # per refit: every tensor the slot was handed is its own buffer
    real_refit = AOTISlot.refit

    def refit(self: AOTISlot, weights: dict[str, torch.Tensor]) -> None:
        own = self.buffers()
        handed.append(all(t.data_ptr() == own[n].data_ptr() for n, t in weights.items() if t.numel()))
        real_refit(self, weights)

    monkeypatch.setattr(AOTISlot, "refit", refit)
    coord = RefitCoordinator(tf_engine)
    try:
        for i in range(4):
            module, state = random_weights(tf_engine.spec, seed=30 + i)
            path = tmp_path / f"v{i}.safetensors"
            save_file({k: v for k, v in state.items() if k in tf_engine.weight_specs()}, str(path))
            assert coord.refit_from_path(path).outcome == "success"
            slot = coord.active_slot
            assert isinstance(slot, AOTISlot)
            assert_matches_eager(tf_engine, slot, module)
        assert handed == [True] * 4
    finally:
        coord.close()
