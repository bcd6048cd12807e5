"""The Inductor engine: weights as graph inputs, refits exact against eager, warm-up, cache without weights.

Compiles are slow on two cores, so the compiled engines are module-scoped fixtures: the transformer
built once (a miss that stores its entry) and once more from that entry (a hit), and one build with
``freezing`` on, which must be refused.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.utils import counters

from serving.cache import EngineCache
from serving.engines.inductor import InductorEngine, compiler, entry, probe_weights
from serving.errors import EngineBuildError, NotReadyError, ValidationError
from serving.examples import TRANSFORMER, example_build_spec
from serving.factory import build_module
from serving.specs import BuildSpec

SPEC = example_build_spec(TRANSFORMER)


def random_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in build_module(TRANSFORMER).state_dict().items()}


def eager(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    module = build_module(TRANSFORMER)
    module.load_state_dict(state)
    with torch.no_grad():
        out: torch.Tensor = module(x)
    return out


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (n, 16), generator=torch.Generator().manual_seed(seed))


def weight_hits(blobs: dict[str, bytes], tensors: dict[str, torch.Tensor], window: int = 32) -> list[str]:
    """Which tensors' raw bytes (a ``window``-byte run from their start) occur in any blob.

    Only tensors whose bytes are distinctive are searched: at least ``window`` bytes, not one repeated value.
    """
    found = []
    for name, t in tensors.items():
        raw = t.detach().contiguous().cpu().numpy().tobytes()
        if len(raw) < window or t.unique().numel() < 4:
            continue
        needle = raw[:window]
        found += [f"{name} in {blob}" for blob, data in blobs.items() if needle in data]
    return found


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> EngineCache:
    return EngineCache(tmp_path_factory.mktemp("inductor-cache"))


@pytest.fixture(scope="module")
def built(cache: EngineCache) -> Iterator[tuple[InductorEngine, list[dict[str, torch.Tensor]]]]:
    """The miss build, and the weights of every real module it made (warm-up weights, then the check's)."""
    made: list[dict[str, torch.Tensor]] = []
    real_make = compiler.make_module

    def recording(spec: BuildSpec, device: torch.device, meta: bool = False) -> torch.nn.Module:
        module = real_make(spec, device, meta)
        if not meta:
            made.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        return module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiler, "make_module", recording)
        engine = InductorEngine.build(SPEC, cache=cache)
    yield engine, made
    engine.close()


@pytest.fixture(scope="module")
def engine(built: tuple[InductorEngine, list[dict[str, torch.Tensor]]]) -> InductorEngine:
    return built[0]


@pytest.fixture(scope="module")
def hit(engine: InductorEngine, cache: EngineCache) -> Iterator[InductorEngine]:
    before = dict(counters["inductor"])
    again = InductorEngine.build(SPEC, cache=cache)
    again.codegen = {k: counters["inductor"][k] - before.get(k, 0)  # type: ignore[attr-defined]
                     for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}
    yield again
    again.close()


# --------------------------------------------------------------------------- refits


@pytest.mark.slow
def test_refit_changes_outputs_exactly_as_eager(engine: InductorEngine) -> None:
    slot = engine.new_slot()
    a, b = random_state(1), random_state(2)
    slot.refit(slot.transfer(a))
    for n in (1, 3, engine.spec.max_batch):
        x = tokens(n, seed=n)
        out_a = slot.run([x])[0]
        torch.testing.assert_close(out_a, eager(a, x))
        slot.refit(slot.transfer(b))
        out_b = slot.run([x])[0]
        torch.testing.assert_close(out_b, eager(b, x))
        assert (out_a - out_b).abs().max() > 1e-2  # the refit reached the compiled code
        slot.refit(slot.transfer(a))


@pytest.mark.slow
def test_a_partial_refit_changes_only_that_tensor(engine: InductorEngine) -> None:
    slot = engine.new_slot()
    a = random_state(3)
    slot.refit(a)
    bias = torch.randn(5)  # head.bias: 5 elements, what Inductor would inline if it were a constant
    slot.refit({"head.bias": bias})
    x = tokens(4, seed=4)
    torch.testing.assert_close(slot.run([x])[0], eager({**a, "head.bias": bias}, x))


@pytest.mark.slow
def test_slots_own_their_weights(engine: InductorEngine) -> None:
    s1, s2 = engine.new_slot(), engine.new_slot()
    a, b = random_state(5), random_state(6)
    s1.refit(a)
    s2.refit(b)
    assert not set(map(torch.Tensor.data_ptr, s1.buffers().values())) & set(
        map(torch.Tensor.data_ptr, s2.buffers().values()))
    x = tokens(2)
    torch.testing.assert_close(s1.run([x])[0], eager(a, x))
    torch.testing.assert_close(s2.run([x])[0], eager(b, x))


@pytest.mark.slow
def test_every_batch_size_runs_without_recompiling(engine: InductorEngine) -> None:
    """The warm-up compiled every graph: batch 1..max on two slots, inference tensors included."""
    slots = [engine.new_slot(), engine.new_slot()]
    for s in slots:
        s.refit(random_state(7))
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in range(1, engine.spec.max_batch + 1):
            for s in slots:
                s.run([tokens(n)])
            with torch.inference_mode():
                x = tokens(n)
            slots[0].run([x])
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
def test_bad_weights_and_inputs_are_refused(engine: InductorEngine) -> None:
    slot = engine.new_slot()
    with pytest.raises(NotReadyError):
        slot.run([tokens(1)])
    a = random_state(8)
    a.pop("head.bias")
    bad = {**a, "head.weight": torch.zeros(3, 3), "extra": torch.zeros(1)}
    with pytest.raises(ValidationError) as e:
        slot.refit(bad)
    msg = str(e.value)
    assert "head.weight" in msg and "extra" in msg and "head.bias" in msg
    with pytest.raises(NotReadyError):
        slot.run([tokens(1)])  # nothing was installed
    slot.refit(random_state(8))
    with pytest.raises(ValueError, match="outside 1..8"):
        slot.run([tokens(9)])
    with pytest.raises(ValueError, match="expected int64"):
        slot.run([torch.zeros(2, 16)])


@pytest.mark.slow
def test_coordinator_swaps_are_exact(engine: InductorEngine) -> None:
    from serving.refit import CanaryConfig, RefitCoordinator, StagedWeights

    coord = RefitCoordinator(engine, strategy="double_buffer", canary=CanaryConfig("reference"),
                             canary_input_specs=SPEC.inputs, reference_factory=lambda: build_module(TRANSFORMER))
    try:
        x = tokens(3, seed=9)
        for i, seed in enumerate((10, 11, 10)):
            state = random_state(seed)
            assert coord.install(StagedWeights(f"v{i}", state)).outcome == "success"
            torch.testing.assert_close(coord.infer([x])[0], eager(state, x))
    finally:
        coord.close()


# --------------------------------------------------------------------------- cache


@pytest.mark.slow
def test_miss_stores_compiler_artifacts_without_weights(
        built: tuple[InductorEngine, list[dict[str, torch.Tensor]]], cache: EngineCache) -> None:
    engine, made = built
    assert engine.build_info.cache == "miss"
    (stored,) = cache.entries()
    assert set(stored.files) == {entry.ARTIFACTS_FILE, entry.KERNELS_FILE}
    assert stored.meta["kernel_files"] and stored.meta["build_seconds"]
    blobs = dict(entry.artifact_bytes(stored))
    warmup = made[0]  # the warm-up module's weights; the build's refit check then installed the probe's
    probe = probe_weights(warmup, seed=1)
    searched = {**{f"warm-up {k}": v for k, v in warmup.items()}, **{f"probe {k}": v for k, v in probe.items()}}
    assert len([t for t in searched.values() if t.numel() >= 8]) > 20
    assert weight_hits(blobs, searched) == []
    # the search does find weights that are there
    planted = {entry.ARTIFACTS_FILE: blobs[entry.ARTIFACTS_FILE] + warmup["blocks.0.fc1.weight"].numpy().tobytes()}
    assert weight_hits(planted, searched) == ["warm-up blocks.0.fc1.weight in artifacts.bin"]


@pytest.mark.slow
def test_hit_skips_codegen_and_says_what_it_saved(hit: InductorEngine, engine: InductorEngine) -> None:
    info = hit.build_info
    assert info.cache == "hit" and info.key == engine.build_info.key
    assert "loaded from the engine cache" in info.detail and "s saved" in info.detail
    assert hit.codegen == {"fxgraph_cache_hit": 2, "fxgraph_cache_miss": 0}  # type: ignore[attr-defined]
    slot = hit.new_slot()
    a = random_state(12)
    slot.refit(a)
    x = tokens(5)
    torch.testing.assert_close(slot.run([x])[0], eager(a, x))


@pytest.mark.slow
def test_entry_weight_list_must_match_the_module(engine: InductorEngine, cache: EngineCache) -> None:
    """A key collision (the weight list differs) is never served."""
    (stored,) = cache.entries()
    assert entry.entry_problems(stored.meta, {}) != []
    assert entry.entry_problems(stored.meta, engine.weight_specs()) == []


# --------------------------------------------------------------------------- baked-in weights are refused


@pytest.mark.slow
def test_freezing_bakes_weights_in_and_the_build_refuses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(compiler.INDUCTOR_OPTIONS, "freezing", True)
    with pytest.raises(EngineBuildError) as e:
        InductorEngine.build(example_build_spec(TRANSFORMER, max_batch=2), cache=None)
    msg = str(e.value)
    assert "does not follow a refit" in msg and "differs from eager" in msg and "freezing" in msg
