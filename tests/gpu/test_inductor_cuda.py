"""The Inductor engine on a CUDA device: exact refits, no recompiles, cache hits, CUDA graphs per slot."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from serving.cache import EngineCache
from serving.engines import select_engine
from serving.engines.inductor import InductorEngine, InductorSlot, graph_buckets
from serving.examples import TRANSFORMER, example_build_spec
from serving.factory import build_module
from serving.specs import BuildSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

KWARGS = (("d_model", 256), ("d_ff", 1024), ("n_layers", 2))


def spec(cuda_graphs: bool = False) -> BuildSpec:
    base = example_build_spec(TRANSFORMER, device="cuda")
    return BuildSpec(base.factory, base.inputs, base.outputs, max_batch=8, device="cuda",
                     factory_kwargs=KWARGS, options=(("cuda_graphs", True),) if cuda_graphs else ())


def state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in build_module(TRANSFORMER, dict(KWARGS)).state_dict().items()}


def eager(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    module = build_module(TRANSFORMER, dict(KWARGS)).cuda()
    module.load_state_dict(weights)
    with torch.no_grad():
        out: torch.Tensor = module(x.cuda())
    return out


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (n, 16), generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> EngineCache:
    return EngineCache(tmp_path_factory.mktemp("inductor-cuda-cache"))


@pytest.fixture(scope="module")
def engine(cache: EngineCache) -> Iterator[InductorEngine]:
    e = InductorEngine.build(spec(), cache=cache)
    yield e
    e.close()


@pytest.fixture(scope="module")
def graphs_engine() -> Iterator[InductorEngine]:
    e = InductorEngine.build(spec(cuda_graphs=True), cache=None)
    yield e
    e.close()


def test_refits_are_exact_against_eager(engine: InductorEngine) -> None:
    assert engine.build_info.cache == "miss"
    slot = engine.new_slot()
    for seed in (1, 2, 1):
        w = state(seed)
        slot.refit(slot.transfer(w))
        for n in (1, 3, 8):
            torch.testing.assert_close(slot.run([tokens(n, n)])[0], eager(w, tokens(n, n)), atol=1e-4, rtol=1e-4)


def test_no_recompile_over_every_batch(engine: InductorEngine) -> None:
    slots = [engine.new_slot(), engine.new_slot()]
    for s in slots:
        s.refit(s.transfer(state(3)))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in range(1, 9):
            for s in slots:
                s.run([tokens(n)])


def test_cache_hit_generates_no_code(engine: InductorEngine, cache: EngineCache) -> None:
    before = dict(counters["inductor"])
    hit = InductorEngine.build(spec(), cache=cache)
    try:
        assert hit.build_info.cache == "hit" and "s saved" in hit.build_info.detail
        assert counters["inductor"]["fxgraph_cache_miss"] == before.get("fxgraph_cache_miss", 0)
        slot = hit.new_slot()
        w = state(4)
        slot.refit(slot.transfer(w))
        torch.testing.assert_close(slot.run([tokens(5)])[0], eager(w, tokens(5)), atol=1e-4, rtol=1e-4)
    finally:
        hit.close()


def test_cuda_graphs_replay_the_slots_own_refitted_storage(graphs_engine: InductorEngine) -> None:
    a, b = graphs_engine.new_slot(), graphs_engine.new_slot()
    assert isinstance(a, InductorSlot) and a._graphs is not None and a._graphs.buckets == graph_buckets(8)
    ptrs = {k: v.data_ptr() for k, v in a.buffers().items()}
    wa, wb = state(5), state(6)
    a.refit(a.transfer(wa))
    b.refit(b.transfer(wb))
    for n in (1, 3, 8):  # 3 is padded to the bucket of 4
        torch.testing.assert_close(a.run([tokens(n, n)])[0], eager(wa, tokens(n, n)), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b.run([tokens(n, n)])[0], eager(wb, tokens(n, n)), atol=1e-4, rtol=1e-4)
    a.refit(a.transfer(wb))  # a refit lands in the captured storage: the graphs see it
    assert {k: v.data_ptr() for k, v in a.buffers().items()} == ptrs
    torch.testing.assert_close(a.run([tokens(3)])[0], eager(wb, tokens(3)), atol=1e-4, rtol=1e-4)


def test_cuda_graph_swaps_under_load_are_never_torn(graphs_engine: InductorEngine) -> None:
    from serving.refit import CanaryConfig, RefitCoordinator, StagedWeights

    coord = RefitCoordinator(graphs_engine, strategy="double_buffer", canary=CanaryConfig("reference"),
                             canary_input_specs=graphs_engine.spec.inputs,
                             reference_factory=lambda: build_module(TRANSFORMER, dict(KWARGS)).cuda())
    x = tokens(4, seed=9)
    weights = [state(10 + i) for i in range(3)]
    expected = [eager(w, x) for w in weights]
    assert coord.install(StagedWeights("v0", weights[0])).outcome == "success"
    stop, problems = threading.Event(), []

    def reader() -> None:
        while not stop.is_set():
            out = coord.infer([x])[0]
            match = [i for i, e in enumerate(expected) if torch.allclose(out, e, atol=1e-4, rtol=1e-4)]
            if len(match) != 1:
                problems.append(f"output matched {match}")
                return

    threads = [threading.Thread(target=reader, name=f"cuda-reader-{i}") for i in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(12):
            assert coord.install(StagedWeights(f"v{i % 3}", weights[i % 3])).outcome in ("success", "noop")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        coord.close()
    assert not problems, problems[:3]


def test_auto_without_tensorrt_picks_inductor_here() -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        choice = select_engine("auto", "cuda:0")
        assert choice.kind == "inductor" and "TensorRT cannot run here" in choice.reason
    else:
        pytest.skip("TensorRT is installed here")


def test_cuda_graphs_setting_on_cpu_is_refused(tmp_path: Path) -> None:
    from serving.errors import ConfigError
    from serving.settings import parse_settings

    with pytest.raises(ConfigError, match="needs a GPU instance"):
        parse_settings({"model_factory": TRANSFORMER, "engine": "inductor", "cuda_graphs": "true",
                        "weights_dir": str(tmp_path)}, model_name="m", device="cpu", env={})
