"""TensorRT engine on a GPU: needs CUDA, TensorRT >= 10.14 and a matching Torch-TensorRT (>= 2.10).

Skipped (with the reason) wherever ``import tensorrt`` gives no TensorRT runtime or there is no
CUDA GPU. Run inside an NGC Triton container (see docs/tensorrt.md):
``pip install -e '.[tensorrt,test]' && python -m pytest -q -ra tests/gpu/test_tensorrt.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from serving.cache import EngineCache
from serving.errors import EngineUnavailableError, NotReadyError
from serving.examples import CNN, TRANSFORMER, example_build_spec
from serving.specs import BuildSpec

T = TypeVar("T")


def _skip_reason() -> str | None:
    from serving.engines.tensorrt import probe_environment

    try:
        probe_environment(torch.device("cuda"))
    except EngineUnavailableError as e:
        return str(e).splitlines()[0] + " " + "; ".join(line.strip() for line in str(e).splitlines()[1:-1])
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def _spec(factory: str, **kwargs: Any) -> BuildSpec:
    base = example_build_spec(factory, device="cuda", max_batch=8)
    return BuildSpec(base.factory, base.inputs, base.outputs, base.max_batch, "cuda", base.dtype,
                     tuple(sorted(kwargs.items())))


BIG_TRANSFORMER = {"d_model": 256, "d_ff": 1024, "n_layers": 4}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trt-cache")


@pytest.fixture(scope="module")
def engines(cache_dir: Path) -> dict[str, Any]:
    from serving.engines.tensorrt import TensorRTEngine

    cache = EngineCache(cache_dir)
    return {name: TensorRTEngine.build(_spec(f, **kw), cache=cache)
            for name, (f, kw) in {"cnn": (CNN, {}), "transformer": (TRANSFORMER, {}),
                                  "big": (TRANSFORMER, BIG_TRANSFORMER)}.items()}


def _eager(spec: BuildSpec, sd: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    from serving.factory import build_module

    m = build_module(spec.factory, spec.kwargs())
    m.load_state_dict(sd)
    return m.cuda().eval()


def _random_state(engine: Any, seed: int) -> dict[str, torch.Tensor]:
    """A random checkpoint for every float tensor the engine reads (host tensors, engine dtypes)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, ws in engine.weight_specs().items():
        if ws.dtype.is_floating_point:
            t = torch.randn(ws.shape, generator=gen) * 0.2
            if name.endswith("running_var"):
                t = t.abs() + 1e-3  # small variances: the BatchNorm eps matters
            out[name] = t.to(ws.dtype)
    return out


def _inputs(spec: BuildSpec, batch: int = 4) -> list[torch.Tensor]:
    from serving.refit import canary_inputs

    return canary_inputs(spec.inputs, batch, seed=7)


def _check(engine: Any, slot: Any, spec: BuildSpec, sd: Mapping[str, torch.Tensor], atol: float = 2e-3) -> None:
    xs = _inputs(spec)
    got = slot.run(xs)[0].float().cpu()
    full = dict(sd)
    ref_module = _eager(spec, {**_missing_buffers(spec), **full})
    with torch.no_grad():
        want = ref_module(*[x.cuda() for x in xs]).float().cpu()
    assert got.abs().sum() > 0, "all-zero output: weights not applied (stripped engine)"
    assert torch.allclose(got, want, atol=atol, rtol=1e-2), f"max diff {(got - want).abs().max():.3g}"


def _missing_buffers(spec: BuildSpec) -> dict[str, torch.Tensor]:
    from serving.factory import build_module

    m = build_module(spec.factory, spec.kwargs())
    return {k: v for k, v in m.state_dict().items() if not v.dtype.is_floating_point}


@pytest.mark.parametrize("name", ["cnn", "transformer", "big"])
def test_engine_is_weight_stripped(engines: dict[str, Any], name: str) -> None:
    from serving.engines.tensorrt import engine_nbytes_fraction

    engine = engines[name]
    frac = engine_nbytes_fraction(engine.serialized_engine, engine.weight_specs())
    print(f"{name}: stripped engine {len(engine.serialized_engine)} bytes = {frac:.3f} of the weights")
    if name == "big":  # tiny models are dominated by kernels and metadata, not weights
        assert frac < 0.25


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_stripped_slot_is_not_ready_before_its_first_refit(engines: dict[str, Any], name: str) -> None:
    slot = engines[name].new_slot()
    with pytest.raises(NotReadyError):
        slot.run(_inputs(_spec(CNN if name == "cnn" else TRANSFORMER)))


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_three_refits_in_a_row_match_eager(engines: dict[str, Any], name: str) -> None:
    engine = engines[name]
    spec = _spec(CNN if name == "cnn" else TRANSFORMER)
    slot = engine.new_slot()
    for seed in (1, 2, 3):
        sd = _random_state(engine, seed)
        slot.refit(slot.transfer(sd))
        _check(engine, slot, spec, sd)
    assert slot.refit_count == 3


def test_include_refit_round_trip_stays_refittable(engines: dict[str, Any]) -> None:
    engine = engines["cnn"]
    spec = _spec(CNN)
    slot = engine.new_slot()
    sd1 = _random_state(engine, 11)
    slot.refit(slot.transfer(sd1))
    data = slot.serialize_refittable()  # EXCLUDE_WEIGHTS cleared, INCLUDE_REFIT set
    clone = engine.slot_from_serialized(data, has_weights=True)
    _check(engine, clone, spec, sd1)  # serves its weights at once
    for seed in (12, 13):  # and is still refittable, repeatedly
        sd = _random_state(engine, seed)
        clone.refit(clone.transfer(sd))
        _check(engine, clone, spec, sd)


def test_cache_hit_skips_the_build(engines: dict[str, Any], cache_dir: Path) -> None:
    from serving.engines.tensorrt import TensorRTEngine

    cold = engines["transformer"].build_info
    t0 = time.perf_counter()
    warm = TensorRTEngine.build(_spec(TRANSFORMER), cache=EngineCache(cache_dir))
    print(f"startup: cold build {cold.seconds:.2f}s ({cold.cache}), from cache "
          f"{time.perf_counter() - t0:.2f}s ({warm.build_info.cache})")
    assert cold.cache == "miss" and warm.build_info.cache == "hit"
    assert warm.build_info.key == cold.key
    slot = warm.new_slot()
    sd = _random_state(warm, 5)
    slot.refit(slot.transfer(sd))
    _check(warm, slot, _spec(TRANSFORMER), sd)


def test_lora_refit_touches_only_adapter_targets(engines: dict[str, Any]) -> None:
    from serving.refit import RefitCoordinator, StagedWeights

    engine = engines["transformer"]
    spec = _spec(TRANSFORMER)
    coord = RefitCoordinator(engine, strategy="in_place")
    base = _random_state(engine, 21)
    assert coord.install(StagedWeights("v1", base)).ok
    targets = [k for k in base if k.endswith(("q_proj.weight", "v_proj.weight"))]
    lora = dict(base)
    for k in targets:
        a, b = torch.randn(4, base[k].shape[1]) * 0.1, torch.randn(base[k].shape[0], 4) * 0.1
        lora[k] = base[k] + b @ a
    report = coord.install(StagedWeights("v1+lora", lora))
    assert report.ok and report.tensors_refitted == len(targets)
    assert coord.active_slot is not None
    _check(engine, coord.active_slot, spec, lora)


def test_refit_while_serving_under_the_coordinator(engines: dict[str, Any]) -> None:
    from serving.refit import RefitCoordinator, StagedWeights

    engine = engines["cnn"]
    spec = _spec(CNN)
    coord = RefitCoordinator(engine, strategy="double_buffer")
    versions = {f"v{i}": _random_state(engine, 100 + i) for i in range(4)}
    assert coord.install(StagedWeights("v0", versions["v0"])).ok
    xs = _inputs(spec)
    expected = {}
    for v, sd in versions.items():
        m = _eager(spec, {**_missing_buffers(spec), **sd})
        with torch.no_grad():
            expected[v] = m(*[x.cuda() for x in xs]).float().cpu()
    errors: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            out = coord.infer(xs)[0].float().cpu()
            if not any(torch.allclose(out, e, atol=2e-3, rtol=1e-2) for e in expected.values()):
                errors.append("an output matched no installed version (torn weights?)")

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for v in ("v1", "v2", "v3"):
            assert coord.install(StagedWeights(v, versions[v])).ok
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert errors == []
    assert torch.allclose(coord.infer(xs)[0].float().cpu(), expected["v3"], atol=2e-3, rtol=1e-2)
