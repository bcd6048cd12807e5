"""The coordinator's fast path on the CPU: checkpoints streamed straight into the slots' tensors.

What holds for every weight source (swaps, rollback, NaN files, the canary, concurrency) is tested in
test_refit.py, parametrized over the sources; here: which memory the fast path writes, and restores from.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from weights.fake_kvikio import FakeKvikIO

from serving.engines import build_engine
from serving.engines.base import Engine
from serving.examples import TRANSFORMER, example_build_spec
from serving.factory import build_module
from serving.refit import CanaryConfig, RefitCoordinator, StagedWeights
from serving.refit.coordinator import fast_path_default
from serving.refit.strategies import strategy_named
from serving.weights import fastpath
from serving.weights.fastpath import FastPathConfig
from serving.weights.random_state import random_state_dict

SPEC = example_build_spec(TRANSFORMER)
X = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
SMALL = FastPathConfig(threads=3, buffers=2, buffer_bytes=1 << 20, read_bytes=8192)


def state(seed: int) -> dict[str, torch.Tensor]:
    return random_state_dict(build_module(TRANSFORMER), seed)


def expected(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    module = build_module(TRANSFORMER)
    module.load_state_dict(sd)
    with torch.inference_mode():
        return module(X)


def write(tmp: Path, name: str, sd: dict[str, torch.Tensor]) -> Path:
    path = tmp / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


_OPEN: list[RefitCoordinator] = []


@pytest.fixture(autouse=True)
def _close_coordinators() -> Iterator[None]:
    """The fast path's reader threads live until the coordinator is closed."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def coordinator(strategy: str, engine: Engine | None = None, **kw: object) -> RefitCoordinator:
    coord = RefitCoordinator(engine or build_engine("eager", SPEC), strategy=strategy,  # type: ignore[arg-type]
                             fast_path=True, fast_path_config=SMALL, **kw)
    _OPEN.append(coord)
    return coord


def ptrs(tensors: object) -> set[int]:
    return {t.data_ptr() for t in tensors.values() if t.numel()}  # type: ignore[attr-defined]


def assert_serves(coord: RefitCoordinator, sd: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(coord.infer([X])[0], expected(sd), rtol=0, atol=0)


def test_fast_path_by_default_on_the_cpu_when_double_buffered_and_not_in_place() -> None:
    """On the CPU a double-buffered refit reads straight into the standby slot's tensors; in place, the new
    weights are staged in host memory first (see fast_path_default)."""
    engine = build_engine("eager", SPEC)
    assert RefitCoordinator(engine).fast_path
    assert RefitCoordinator(engine, strategy="double_buffer").fast_path
    assert not RefitCoordinator(engine, strategy="in_place").fast_path
    assert not RefitCoordinator(engine, fast_path=False).fast_path
    assert coordinator("in_place").fast_path
    assert fast_path_default(torch.device("cuda"), strategy_named("in_place"))


def test_the_default_cpu_refit_writes_into_the_standby_slots_own_tensors(tmp_path: Path) -> None:
    """Nothing allocated per refit: the slot runs with the tensors it had, now holding the new weights."""
    coord = RefitCoordinator(build_engine("eager", SPEC))
    _OPEN.append(coord)
    for seed in (1, 2):
        assert coord.refit_from_path(write(tmp_path, f"v{seed}", state(seed))).outcome == "success"
    standby = coord._slots.standby
    assert standby is not None
    before = ptrs(standby.buffers())
    sd = state(3)
    report = coord.refit_from_path(write(tmp_path, "v3", sd))
    assert report.outcome == "success" and report.detail.get("bytes", 0) > 0  # the fast path reports its bytes
    assert coord.active_slot is standby and ptrs(standby.buffers()) == before
    assert_serves(coord, sd)


def test_double_buffer_reuses_the_standby_tensors_and_never_the_live_ones(tmp_path: Path) -> None:
    coord = coordinator("double_buffer")
    lives = []
    for seed in (1, 2, 3, 4):
        sd = state(seed)
        assert coord.refit_from_path(write(tmp_path, f"v{seed}", sd)).outcome == "success"
        assert coord.live is not None
        lives.append(ptrs(coord.live.tensors))
        assert_serves(coord, sd)
    assert lives[0] == lives[2] and lives[1] == lives[3]  # two sets of tensors, alternating
    assert not lives[0] & lives[1]
    # the previous version (resident in the standby slot) is in memory, not only on file
    assert coord.previous is not None and ptrs(coord.previous.tensors) == lives[2]


@pytest.mark.parametrize("strategy", ["double_buffer", "in_place"])
def test_first_install_writes_into_the_eager_modules_own_tensors(tmp_path: Path, strategy: str) -> None:
    engine = build_engine("eager", SPEC)
    made: list[set[int]] = []
    original = engine.new_slot

    def new_slot():  # type: ignore[no-untyped-def]
        slot = original()
        made.append(ptrs(slot.module.state_dict()))
        return slot

    engine.new_slot = new_slot  # type: ignore[method-assign]
    coord = coordinator(strategy, engine)
    sd = state(1)
    assert coord.refit_from_path(write(tmp_path, "v1", sd)).outcome == "success"
    assert coord.live is not None and ptrs(coord.live.tensors) == made[0]  # no second copy was made
    assert_serves(coord, sd)


def test_in_place_keeps_one_copy_and_remembers_the_previous_version_as_a_file(tmp_path: Path) -> None:
    coord = coordinator("in_place")
    a, b = state(1), state(2)
    coord.refit_from_path(write(tmp_path, "a", a))
    assert coord.live is not None
    first = ptrs(coord.live.tensors)
    coord.refit_from_path(write(tmp_path, "b", b))
    assert ptrs(coord.live.tensors) == first  # written into the live tensors
    assert coord.previous is None  # nothing of a is kept in memory
    assert coord.rollback().outcome == "success"  # re-read from a's file
    assert coord.live_version == "a" and ptrs(coord.live.tensors) == first
    assert_serves(coord, a)


def test_in_place_without_prescan_restores_the_live_weights_from_their_file(tmp_path: Path) -> None:
    coord = coordinator("in_place", in_place_prescan=False)
    a = state(1)
    coord.refit_from_path(write(tmp_path, "a", a))
    bad = state(2)
    bad["head.bias"][0] = float("inf")
    report = coord.refit_from_path(write(tmp_path, "bad", bad))
    assert report.outcome == "rolled_back" and report.reason == "invalid"
    assert coord.live_version == "a"
    assert_serves(coord, a)


def test_in_place_stops_serving_when_the_live_file_is_gone_and_the_canary_fails(tmp_path: Path) -> None:
    from serving.errors import NotReadyError

    coord = coordinator("in_place", canary=CanaryConfig("finite"), canary_input_specs=SPEC.inputs)
    a_path = write(tmp_path, "a", state(1))
    coord.refit_from_path(a_path)
    a_path.unlink()
    report = coord.refit_from_path(write(tmp_path, "zeros", {k: torch.zeros_like(v) for k, v in state(2).items()}))
    assert report.outcome == "failed" and "restoring the last good weights" in report.message
    with pytest.raises(NotReadyError):
        coord.infer([X])


def test_weights_installed_from_memory_are_never_overwritten(tmp_path: Path) -> None:
    """A host install (what the watcher does for a LoRA merge) shares tensors; the fast path must not
    write into anything the live slot reads."""
    coord = coordinator("double_buffer")
    a = state(1)
    coord.refit_from_path(write(tmp_path, "a", a))
    assert coord.live is not None
    merged = dict(coord.live.tensors)
    merged["head.bias"] = torch.ones_like(merged["head.bias"])
    assert coord.install(StagedWeights("a+lora", merged)).outcome == "success"
    assert_serves(coord, {k: v.clone() for k, v in merged.items()})
    live_before = {k: v.clone() for k, v in coord.live.tensors.items()}
    b = state(2)
    assert coord.refit_from_path(write(tmp_path, "b", b)).outcome == "success"
    assert_serves(coord, b)
    back = coord.rollback()  # to the merged weights, still intact in the other slot
    assert back.outcome == "success" and coord.live_version == "a+lora"
    assert_serves(coord, live_before)


def test_in_place_with_merged_live_weights_takes_the_host_path(tmp_path: Path) -> None:
    coord = coordinator("in_place")
    coord.refit_from_path(write(tmp_path, "a", state(1)))
    assert coord.live is not None
    merged = dict(coord.live.tensors)
    merged["head.bias"] = torch.ones_like(merged["head.bias"])
    assert coord.install(StagedWeights("a+lora", merged)).outcome == "success"
    bad = state(2)
    bad["head.bias"][0] = float("nan")
    assert coord.refit_from_path(write(tmp_path, "bad", bad)).outcome == "rejected"
    assert_serves(coord, merged)
    b = state(3)
    assert coord.refit_from_path(write(tmp_path, "b", b)).outcome == "success"
    assert_serves(coord, b)




@pytest.mark.parametrize("strategy", ["double_buffer", "in_place"])
def test_refits_through_kvikio(tmp_path: Path, strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """weights_transfer: kvikio (a fake of the library on the CPU): outputs go from A to B, and back."""
    fake = FakeKvikIO()
    monkeypatch.setattr(fastpath, "load_kvikio", lambda: (fake, "imported"))
    config = FastPathConfig(threads=3, buffers=2, buffer_bytes=1 << 20, task_bytes=8192, transfer="kvikio")
    coord = RefitCoordinator(build_engine("eager", SPEC), strategy=strategy, fast_path=True, fast_path_config=config)
    _OPEN.append(coord)
    a, b = state(1), state(2)
    for sd, name in ((a, "a"), (b, "b")):
        report = coord.refit_from_path(write(tmp_path, name, sd))
        assert report.outcome == "success", report.message
        assert_serves(coord, sd)
    assert len({c[0] for c in fake.calls}) == 2  # both files went through KvikIO
    assert coord.rollback().outcome == "success"
    assert_serves(coord, a)
    coord.close()
    assert fake.live_threads() == 0
