"""The refit coordinator on the eager engine: atomic swaps, rollback, canary, strategies."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import save_file

from serving.engines import build_engine
from serving.engines.base import Engine, WeightSlot
from serving.examples import CNN, TRANSFORMER, example_build_spec
from serving.factory import build_module
from serving.metrics import prometheus_metrics
from serving.refit import CanaryConfig, RefitCoordinator, StagedWeights, check_canary
from serving.weights.random_state import random_state_dict

SPEC = example_build_spec(TRANSFORMER)
X = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))


def random_state(seed: int, factory: str = TRANSFORMER) -> dict[str, torch.Tensor]:
    return random_state_dict(build_module(factory), seed)


def expected(state: dict[str, torch.Tensor], factory: str = TRANSFORMER, x: torch.Tensor = X) -> torch.Tensor:
    module = build_module(factory)
    module.load_state_dict(state)
    with torch.inference_mode():
        return module(x)


def staged(seed: int) -> StagedWeights:
    return StagedWeights(f"v{seed}", random_state(seed), f"seed{seed}")


def coordinator(strategy: str = "double_buffer", **kw: object) -> RefitCoordinator:
    return RefitCoordinator(build_engine("eager", SPEC), strategy=strategy, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", ["double_buffer", "in_place"])
def test_install_switches_outputs_from_a_to_b_and_rollback_restores_a(strategy: str) -> None:
    coord = coordinator(strategy)
    a, b = staged(1), staged(2)
    assert not coord.ready
    report = coord.install(a)
    assert report.outcome == "success" and report.version == "v1"
    torch.testing.assert_close(coord.infer([X])[0], expected(dict(a.tensors)), rtol=0, atol=0)
    report = coord.install(b)
    assert report.outcome == "success" and report.previous_version == "v1"
    assert set(report.stages) >= {"transfer", "refit", "swap", "total"}
    torch.testing.assert_close(coord.infer([X])[0], expected(dict(b.tensors)), rtol=0, atol=0)
    back = coord.rollback()
    assert back.outcome == "success" and coord.live_version == "v1"
    torch.testing.assert_close(coord.infer([X])[0], expected(dict(a.tensors)), rtol=0, atol=0)


def test_double_buffer_rollback_is_a_pointer_switch() -> None:
    coord = coordinator()
    coord.install(staged(1))
    coord.install(staged(2))
    assert coord.rollback().tensors_refitted == 0  # the standby slot still held v1


def test_partial_change_refits_only_changed_tensors() -> None:
    coord = coordinator("in_place")
    a = staged(1)
    coord.install(a)
    tensors = dict(a.tensors)
    tensors["head.bias"] = torch.ones_like(tensors["head.bias"])
    report = coord.install(StagedWeights("v1-bias", tensors))
    assert report.tensors_refitted == 1
    torch.testing.assert_close(coord.infer([X])[0], expected(tensors), rtol=0, atol=0)


def test_incomplete_weight_set_is_rejected_and_old_weights_serve() -> None:
    registry = CollectorRegistry()
    coord = coordinator(metrics=prometheus_metrics(registry))
    a = staged(1)
    coord.install(a)
    bad = dict(staged(2).tensors)
    del bad["head.weight"]
    report = coord.install(StagedWeights("broken", bad))
    assert report.outcome == "rejected" and "head.weight" in report.message
    assert coord.live_version == "v1"
    torch.testing.assert_close(coord.infer([X])[0], expected(dict(a.tensors)), rtol=0, atol=0)
    assert registry.get_sample_value("hotswap_refits_total", {"outcome": "rejected", "reason": "refit_failed"}) == 1
    assert registry.get_sample_value("hotswap_weights_info", {"version": "v1"}) == 1


def test_same_content_is_a_noop() -> None:
    coord = coordinator()
    a = staged(1)
    coord.install(StagedWeights("v1", a.tensors, content_hash="abc"))
    report = coord.install(StagedWeights("v1-again", a.tensors, content_hash="abc"))
    assert report.outcome == "noop" and coord.live_version == "v1"


def test_not_ready_before_first_install() -> None:
    from serving.errors import NotReadyError

    with pytest.raises(NotReadyError):
        coordinator().infer([X])


class _BrokenSlot(WeightSlot):
    """A slot whose next ``fail[0]`` refits fail half way (some tensors set when it raises)."""

    def __init__(self, inner: WeightSlot, fail: list[int]) -> None:
        self.inner, self.fail = inner, fail

    def transfer(self, weights):  # type: ignore[no-untyped-def]
        return self.inner.transfer(weights)

    def refit(self, weights):  # type: ignore[no-untyped-def]
        if self.fail[0] > 0:
            self.fail[0] -= 1
            half = dict(list(weights.items())[: len(weights) // 2])
            self.inner.refit(half)
            raise RuntimeError("device fell over mid-refit")
        self.inner.refit(weights)

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.inner.run(inputs)


class _FlakyEngine(Engine):
    kind = "flaky"

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner.device, inner.build_info)
        self.inner = inner
        self.fail = [0]

    def weight_specs(self):  # type: ignore[no-untyped-def]
        return self.inner.weight_specs()

    def new_slot(self) -> WeightSlot:
        return _BrokenSlot(self.inner.new_slot(), self.fail)


@pytest.mark.parametrize("strategy", ["double_buffer", "in_place"])
def test_failure_mid_refit_leaves_previous_weights_serving(strategy: str) -> None:
    engine = _FlakyEngine(build_engine("eager", SPEC))
    coord = RefitCoordinator(engine, strategy=strategy)
    a = staged(1)
    coord.install(a)
    coord.install(staged(3))  # both slots exist and hold something
    coord.install(a)
    engine.fail[0] = 1
    report = coord.install(staged(2))
    assert report.outcome == "failed" and "fell over" in report.message
    assert coord.live_version == "v1"
    torch.testing.assert_close(coord.infer([X])[0], expected(dict(a.tensors)), rtol=0, atol=0)
    # and the next good refit works in full (the half-refitted slot is reloaded completely)
    b = staged(2)
    assert coord.install(b).outcome == "success"
    torch.testing.assert_close(coord.infer([X])[0], expected(dict(b.tensors)), rtol=0, atol=0)


def test_in_place_stops_serving_when_even_the_restore_fails() -> None:
    """Serving garbage is worse than not serving: a half-refitted slot is never run."""
    from serving.errors import NotReadyError

    engine = _FlakyEngine(build_engine("eager", SPEC))
    coord = RefitCoordinator(engine, strategy="in_place")
    coord.install(staged(1))
    engine.fail[0] = 2  # the refit and the restore both fail
    report = coord.install(staged(2))
    assert report.outcome == "failed" and "restoring the last good weights failed" in report.message
    assert not coord.ready
    with pytest.raises(NotReadyError):
        coord.infer([X])


@pytest.mark.parametrize("strategy", ["double_buffer", "in_place"])
def test_canary_reference_mismatch_keeps_old_weights(strategy: str) -> None:
    engine = build_engine("eager", SPEC)
    calls = {"n": 0}

    def reference() -> torch.nn.Module:
        calls["n"] += 1
        return build_module(TRANSFORMER, {"n_classes": 5})

    coord = RefitCoordinator(engine, strategy=strategy, canary=CanaryConfig("reference", atol=1e-5, rtol=1e-5),
                             canary_input_specs=SPEC.inputs, reference_factory=reference)
    a = staged(1)
    assert coord.install(a).outcome == "success"
    # NaN weights pass through install (validation is the loader's job) and must be caught by the canary
    nan = dict(staged(2).tensors)
    nan["head.bias"] = torch.full_like(nan["head.bias"], float("nan"))
    report = coord.install(StagedWeights("v2-nan", nan))
    assert report.outcome == ("rolled_back" if strategy == "in_place" else "rejected")
    assert report.reason == "canary"
    assert coord.live_version == "v1"
    torch.testing.assert_close(coord.infer([X])[0], expected(dict(a.tensors)), rtol=0, atol=0)
    assert calls["n"] == 1  # reference module built once, reused


def test_check_canary_finds_zeros_nans_and_mismatch() -> None:
    cfg = CanaryConfig("reference")
    check_canary([torch.ones(2, 3)], [torch.ones(2, 3)], cfg, "v")
    with pytest.raises(Exception, match="all zeros"):
        check_canary([torch.zeros(2, 3)], None, cfg, "v")
    with pytest.raises(Exception, match="NaN"):
        check_canary([torch.tensor([float("inf")])], None, cfg, "v")
    with pytest.raises(Exception, match="max abs diff"):
        check_canary([torch.ones(2, 3)], [torch.ones(2, 3) * 1.1], cfg, "v")


def test_mixed_weights_give_an_output_of_no_version() -> None:
    """The concurrency test below detects torn reads: a half-and-half set matches neither version."""
    a, b = random_state(1), random_state(2)
    mixed = {k: (a[k] if i % 2 else b[k]) for i, k in enumerate(a)}
    out = expected(mixed)
    for s in (a, b):
        assert not torch.allclose(out, expected(s), atol=1e-4)


@pytest.mark.parametrize("strategy", ["double_buffer", "in_place"])
def test_concurrent_inference_during_many_refits_never_sees_mixed_weights(strategy: str) -> None:
    coord = coordinator(strategy)
    versions = [staged(i) for i in range(6)]
    outputs = [expected(dict(v.tensors)) for v in versions]
    coord.install(versions[0])
    stop = threading.Event()
    errors: list[str] = []
    counts = [0] * len(versions)

    def reader() -> None:
        while not stop.is_set():
            out = coord.infer([X])[0]
            match = [i for i, ref in enumerate(outputs) if torch.equal(out, ref)]
            if len(match) != 1:
                errors.append(f"output matched versions {match}")
                return
            counts[match[0]] += 1

    threads = [threading.Thread(target=reader, name=f"reader-{i}") for i in range(3)]
    for t in threads:
        t.start()
    try:
        for round_ in range(30):
            report = coord.install(versions[round_ % len(versions)])
            assert report.outcome in ("success", "noop"), report
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert not errors, errors[:3]
    assert sum(c > 0 for c in counts) >= 2, counts  # readers really saw several versions


def test_in_place_on_cnn_with_batchnorm_buffers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = build_engine("eager", example_build_spec(CNN))
    coord = RefitCoordinator(engine, strategy="in_place")
    state = random_state(5, CNN)
    path = tmp_path / "cnn.safetensors"
    save_file(state, str(path))
    report = coord.refit_from_path(path)
    assert report.outcome == "success", report
    assert report.version == "cnn"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(coord.infer([x])[0], expected(state, CNN, x))
