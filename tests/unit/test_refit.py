"""The refit coordinator on the eager engine: atomic swaps, rollback, canary, outcomes, stages.

Every guarantee is checked for both strategies and, where it applies, for each weight source: a
weight set in memory (``install``), a checkpoint read on the host, and the fast path that streams a
checkpoint into the slots' tensors (``refit_from_path``). The fast path's own memory rules are in
test_refit_fastpath.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import save_file

from serving.engines import build_engine
from serving.engines.base import Engine, WeightSlot
from serving.errors import CanaryError, CheckpointError, NotReadyError, RefitError, ValidationError
from serving.examples import CNN, TRANSFORMER, example_build_spec
from serving.factory import build_module
from serving.metrics import STAGES, prometheus_metrics
from serving.refit import CanaryConfig, RefitCoordinator, RefitReport, StagedWeights, check_canary
from serving.refit.report import Refused, RolledBack, StageTimer, verdict
from serving.refit.slots import Slots
from serving.specs import BuildSpec
from serving.weights.fastpath import FastPathConfig
from serving.weights.random_state import random_state_dict

SPEC = example_build_spec(TRANSFORMER)
X = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
SMALL = FastPathConfig(threads=3, buffers=2, buffer_bytes=1 << 20, read_bytes=8192)

STRATEGIES = ["double_buffer", "in_place"]
SOURCES = ["memory", "host", "fast"]  # install(StagedWeights), refit_from_path on the host path, the fast path
FILES = ["host", "fast"]


def random_state(seed: int, factory: str = TRANSFORMER) -> dict[str, torch.Tensor]:
    return random_state_dict(build_module(factory), seed)


def expected(state: dict[str, torch.Tensor], factory: str = TRANSFORMER, x: torch.Tensor = X) -> torch.Tensor:
    module = build_module(factory)
    module.load_state_dict(state)
    with torch.inference_mode():
        return module(x)


def staged(seed: int) -> StagedWeights:
    return StagedWeights(f"v{seed}", random_state(seed), f"seed{seed}")


def serves(coord: RefitCoordinator, state: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(coord.infer([X])[0], expected(state), rtol=0, atol=0)


class Rig:
    """Coordinators for one weight source, and a way to offer them a weight set through it."""

    def __init__(self, source: str, folder: Path) -> None:
        self.source, self.folder = source, folder
        self.made: list[RefitCoordinator] = []

    def coordinator(self, strategy: str = "double_buffer", engine: Engine | None = None,
                    **kw: object) -> RefitCoordinator:
        if self.source == "fast":
            kw = {"fast_path": True, "fast_path_config": SMALL, **kw}
        elif self.source == "host":
            kw = {"fast_path": False, **kw}
        coord = RefitCoordinator(engine or build_engine("eager", SPEC), strategy=strategy, **kw)  # type: ignore[arg-type]
        self.made.append(coord)
        return coord

    def offer(self, coord: RefitCoordinator, version: str, state: dict[str, torch.Tensor],
              content_hash: str | None = None) -> RefitReport:
        if self.source == "memory":
            return coord.install(StagedWeights(version, state, f"seed-{version}", content_hash))
        path = self.folder / f"{version}.safetensors"
        if not path.exists():
            save_file(state, str(path))
        return coord.refit_from_path(path, content_hash=content_hash)


@pytest.fixture(params=SOURCES)
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(request.param, tmp_path)
    yield r
    for coord in r.made:  # the fast path's reader threads live until the coordinator is closed
        coord.close()


@pytest.fixture(params=FILES)
def file_rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(request.param, tmp_path)
    yield r
    for coord in r.made:
        coord.close()


def coordinator(strategy: str = "double_buffer", **kw: object) -> RefitCoordinator:
    return RefitCoordinator(build_engine("eager", SPEC), strategy=strategy, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ swaps and rollback


#: the stages a refit into serving slots records, by strategy and weight source (canary off)
SWAP_STAGES = {
    ("double_buffer", "memory"): {"drain", "transfer", "refit", "swap", "pause", "total"},
    ("in_place", "memory"): {"transfer", "drain", "refit", "swap", "pause", "total"},
    ("double_buffer", "host"): {"read", "validate", "drain", "transfer", "refit", "swap", "pause", "total"},
    ("in_place", "host"): {"read", "validate", "transfer", "drain", "refit", "swap", "pause", "total"},
    ("double_buffer", "fast"): {"read", "validate", "drain", "transfer", "refit", "swap", "pause", "total"},
    ("in_place", "fast"): {"read", "validate", "prescan", "drain", "transfer", "refit", "swap", "pause", "total"},
}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_install_switches_outputs_from_a_to_b_and_rollback_restores_a(rig: Rig, strategy: str) -> None:
    coord = rig.coordinator(strategy)
    a, b = random_state(1), random_state(2)
    assert not coord.ready
    report = rig.offer(coord, "v1", a)
    assert report.outcome == "success" and report.version == "v1"
    serves(coord, a)
    report = rig.offer(coord, "v2", b)
    assert report.outcome == "success" and report.previous_version == "v1"
    assert set(report.stages) >= {"transfer", "refit", "swap", "total"}
    assert set(report.stages) == SWAP_STAGES[strategy, rig.source]
    if rig.source == "fast":
        assert report.detail["bytes"] > 0
    serves(coord, b)
    back = coord.rollback()
    assert back.outcome == "success" and coord.live_version == "v1"
    serves(coord, a)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stages_mean_the_same_on_every_path(rig: Rig, strategy: str) -> None:
    """Only names of metrics.STAGES; the pause is the swap (double buffer) or covers drain + swap (in place)."""
    coord = rig.coordinator(strategy)
    first = rig.offer(coord, "v1", random_state(1))
    if strategy == "in_place":  # nothing served yet: nothing to hold
        assert not {"drain", "swap", "pause"} & set(first.stages)
    stages = rig.offer(coord, "v2", random_state(2)).stages
    assert set(stages) <= set(STAGES)
    if strategy == "double_buffer":
        assert stages["pause"] == stages["swap"]
    else:
        assert stages["pause"] >= stages["drain"] + stages["swap"] + stages["refit"]
    assert stages["total"] >= sum(v for k, v in stages.items() if k not in ("total", "pause"))


@pytest.mark.parametrize("source", SOURCES)
def test_double_buffer_rollback_is_a_pointer_switch(tmp_path: Path, source: str) -> None:
    rig = Rig(source, tmp_path)
    coord = rig.coordinator("double_buffer")
    rig.offer(coord, "v1", random_state(1))
    rig.offer(coord, "v2", random_state(2))
    assert coord.rollback().tensors_refitted == 0  # the standby slot still held v1
    coord.close()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_partial_change_refits_only_changed_tensors(strategy: str) -> None:
    coord = coordinator(strategy)
    a = staged(1)
    coord.install(a)
    coord.install(a)  # every slot holds a
    tensors = dict(a.tensors)
    tensors["head.bias"] = torch.ones_like(tensors["head.bias"])
    report = coord.install(StagedWeights("v1-bias", tensors))
    assert report.tensors_refitted == 1
    torch.testing.assert_close(coord.infer([X])[0], expected(tensors), rtol=0, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_incomplete_weight_set_is_rejected_and_old_weights_serve(strategy: str) -> None:
    registry = CollectorRegistry()
    coord = coordinator(strategy, metrics=prometheus_metrics(registry))
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


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_content_is_a_noop(rig: Rig, strategy: str) -> None:
    coord = rig.coordinator(strategy)
    a = random_state(1)
    rig.offer(coord, "v1", a, content_hash="abc")
    report = rig.offer(coord, "v1-again", a, content_hash="abc")
    assert report.outcome == "noop" and coord.live_version == "v1"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_not_ready_before_first_install(strategy: str) -> None:
    with pytest.raises(NotReadyError):
        coordinator(strategy).infer([X])


# ------------------------------------------------------------------ failures keep the old weights serving


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
    """The eager engine whose slots fall over on demand."""

    kind = "flaky"

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner.device, inner.build_info)
        self.inner = inner
        self.fail = [0]

    @classmethod
    def build(cls, spec: BuildSpec, *, cache: object = None, metrics: object = None) -> _FlakyEngine:
        return cls(build_engine("eager", spec))

    def weight_specs(self):  # type: ignore[no-untyped-def]
        return self.inner.weight_specs()

    def new_slot(self) -> WeightSlot:
        return _BrokenSlot(self.inner.new_slot(), self.fail)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_failure_mid_refit_leaves_previous_weights_serving(rig: Rig, strategy: str) -> None:
    engine = _FlakyEngine.build(SPEC)
    coord = rig.coordinator(strategy, engine)
    a = random_state(1)
    rig.offer(coord, "v1", a)
    rig.offer(coord, "v3", random_state(3))  # both slots exist and hold something
    rig.offer(coord, "v1", a)
    engine.fail[0] = 1
    report = rig.offer(coord, "v2", random_state(2))
    assert report.outcome == "failed" and "fell over" in report.message  # the engine's fault, not the file's
    assert coord.live_version == "v1"
    serves(coord, a)
    # and the next good refit works in full (the half-refitted slot is reloaded completely)
    b = random_state(2)
    assert rig.offer(coord, "v2", b).outcome == "success"
    serves(coord, b)


def test_in_place_stops_serving_when_even_the_restore_fails(rig: Rig) -> None:
    """Serving garbage is worse than not serving: a half-refitted slot is never run."""
    engine = _FlakyEngine.build(SPEC)
    coord = rig.coordinator("in_place", engine)
    rig.offer(coord, "v1", random_state(1))
    engine.fail[0] = 2  # the refit and the restore both fail
    report = rig.offer(coord, "v2", random_state(2))
    assert report.outcome == "failed" and "restoring the last good weights failed" in report.message
    assert not coord.ready and coord.live is None
    with pytest.raises(NotReadyError):
        coord.infer([X])


@pytest.mark.parametrize("strategy", STRATEGIES)
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


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_canary_failure_keeps_the_old_weights_serving(rig: Rig, strategy: str) -> None:
    """All-zero weights pass every file check and fail the canary: never served (double buffer), or
    written into the live slot and then restored (in place)."""
    coord = rig.coordinator(strategy, canary=CanaryConfig("finite"), canary_input_specs=SPEC.inputs)
    a = random_state(1)
    assert rig.offer(coord, "a", a).outcome == "success"
    zeros = {k: torch.zeros_like(v) for k, v in random_state(2).items()}
    report = rig.offer(coord, "zeros", zeros)
    assert report.outcome == ("rolled_back" if strategy == "in_place" else "rejected") and report.reason == "canary"
    assert coord.live_version == "a"
    serves(coord, a)
    b = random_state(3)
    assert rig.offer(coord, "b", b).outcome == "success"
    serves(coord, b)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_checkpoint_is_rejected_and_the_old_weights_keep_serving(file_rig: Rig, strategy: str) -> None:
    coord = file_rig.coordinator(strategy)
    a = random_state(1)
    file_rig.offer(coord, "a", a)
    file_rig.offer(coord, "a2", random_state(5))
    file_rig.offer(coord, "a", a)
    bad = random_state(2)
    bad["head.weight"][1, 2] = float("nan")
    report = file_rig.offer(coord, "bad", bad)
    assert report.outcome == "rejected" and report.reason == "invalid"
    assert "'head.weight'" in report.message and "NaN" in report.message
    assert coord.live_version == "a"
    serves(coord, a)
    good = random_state(3)
    assert file_rig.offer(coord, "good", good).outcome == "success"
    serves(coord, good)


def test_check_canary_finds_zeros_nans_and_mismatch() -> None:
    cfg = CanaryConfig("reference")
    check_canary([torch.ones(2, 3)], [torch.ones(2, 3)], cfg, "v")
    with pytest.raises(Exception, match="all zeros"):
        check_canary([torch.zeros(2, 3)], None, cfg, "v")
    with pytest.raises(Exception, match="NaN"):
        check_canary([torch.tensor([float("inf")])], None, cfg, "v")
    with pytest.raises(Exception, match="max abs diff"):
        check_canary([torch.ones(2, 3)], [torch.ones(2, 3) * 1.1], cfg, "v")


# ------------------------------------------------------------------ no response from mixed weights


def test_mixed_weights_give_an_output_of_no_version() -> None:
    """The concurrency test below detects torn reads: a half-and-half set matches neither version."""
    a, b = random_state(1), random_state(2)
    mixed = {k: (a[k] if i % 2 else b[k]) for i, k in enumerate(a)}
    out = expected(mixed)
    for s in (a, b):
        assert not torch.allclose(out, expected(s), atol=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_concurrent_inference_during_many_refits_never_sees_mixed_weights(rig: Rig, strategy: str) -> None:
    coord = rig.coordinator(strategy)
    versions = [random_state(i) for i in range(6)]
    outputs = [expected(v) for v in versions]
    rig.offer(coord, "v0", versions[0])
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
            i = round_ % len(versions)
            report = rig.offer(coord, f"v{i}", versions[i])
            assert report.outcome in ("success", "noop"), report
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert not errors, errors[:3]
    assert sum(c > 0 for c in counts) >= 2, counts  # readers really saw several versions


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_on_cnn_with_batchnorm_buffers(file_rig: Rig, strategy: str) -> None:
    engine = build_engine("eager", example_build_spec(CNN))
    coord = file_rig.coordinator(strategy, engine)
    state = random_state(5, CNN)
    report = file_rig.offer(coord, "cnn", state)
    assert report.outcome == "success", report
    assert report.version == "cnn"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(coord.infer([x])[0], expected(state, CNN, x))


# ------------------------------------------------------------------ the parts


def test_slots_give_requests_the_active_slot_and_its_version_and_hold_them() -> None:
    coord = coordinator("in_place")
    slots: Slots = coord._slots
    with pytest.raises(NotReadyError):
        with slots.acquire():
            pass
    coord.install(staged(1))
    with slots.acquire() as lease:
        assert lease.slot is coord.active_slot and lease.version == "v1"
    slots.hold(lease.slot)
    got: list[list[torch.Tensor]] = []
    t = threading.Thread(target=lambda: got.append(coord.infer([X])), name="held")
    t.start()
    t.join(timeout=0.3)
    assert t.is_alive() and not got  # held
    slots.release()
    t.join(timeout=10)
    assert len(got) == 1


VERDICTS: list[tuple[Callable[[], BaseException], tuple[str, str]]] = [
    (lambda: Refused(ValidationError("f", ["NaN"])), ("rejected", "invalid")),
    (lambda: Refused(CheckpointError("f: gone", reason="changed_during_read")), ("rejected", "changed_during_read")),
    (lambda: Refused(CanaryError("zeros")), ("rejected", "canary")),
    (lambda: RolledBack(Refused(CanaryError("zeros"))), ("rolled_back", "canary")),
    (lambda: RolledBack(Refused(ValidationError("f", ["Inf"]))), ("rolled_back", "invalid")),
    (lambda: RolledBack(RuntimeError("device fell over")), ("failed", "refit_failed")),
    (lambda: RuntimeError("device fell over"), ("failed", "refit_failed")),
    (lambda: RefitError("TensorRT refit refused"), ("failed", "refit_failed")),
    (lambda: ValidationError("refit of AOTI engine", ["shape"]), ("failed", "invalid")),
]


@pytest.mark.parametrize(("error", "outcome"), VERDICTS)
def test_one_mapping_from_what_went_wrong_to_outcome_and_reason(
        error: Callable[[], BaseException], outcome: tuple[str, str]) -> None:
    """Refused weights are rejected (rolled back once written into the live slot); the rest is the engine's."""
    v = verdict(error())
    assert (v.outcome, v.reason) == outcome


def test_stage_names_come_from_the_table() -> None:
    timer = StageTimer()
    for name in STAGES:
        timer.add(name, 0.0)
    with pytest.raises(ValueError, match="not in serving.metrics.STAGES"):
        timer.add("hold", 0.1)
