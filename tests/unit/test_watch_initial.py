"""What startup says about every entry of the weights folder, and the load error a model without weights gives."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from watch_helpers import SPEC, Rig, expected, safetensors_bytes, state, write_atomic

from serving.engines.eager import EagerSlot
from serving.errors import NotReadyError
from serving.examples import TRANSFORMER
from serving.metrics import HotswapMetrics
from serving.service import HotswapService
from serving.settings import parse_settings

CORRUPT = b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"
#: written an hour ago: left alone long enough that at startup a bad file is final, not a copy in progress
AN_HOUR_AGO = time.time_ns() - 3600 * 10**9


@pytest.fixture
def failing_refit(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The eager engine's refit raises (the engine's fault, as an out-of-memory would be) for the versions named
    in the list it yields."""
    failing: list[str] = []
    real = EagerSlot.refit

    def refit(self: EagerSlot, weights: Mapping[str, torch.Tensor]) -> None:
        if failing:
            raise RuntimeError("injected: the engine could not take the weights")
        real(self, weights)

    monkeypatch.setattr(EagerSlot, "refit", refit)
    yield failing


def half_written(path: Path) -> Path:
    """A checkpoint being copied in place right now: its header promises more bytes than the file has."""
    data = safetensors_bytes(state(7))
    path.write_bytes(data[: len(data) // 2])
    return path


def test_every_entry_gets_an_outcome(folder: Path, rigs: list[Rig], failing_refit: list[str]) -> None:
    write_atomic(folder / "v1.safetensors", state(1))
    write_atomic(folder / "bad.safetensors", CORRUPT, mtime_ns=AN_HOUR_AGO)
    write_atomic(folder / "v2.safetensors", state(2))
    half_written(folder / "copying.safetensors")
    (folder / "README.md").write_text("notes")
    (folder / ".v3.safetensors.1a2b.tmp").write_bytes(b"a publish in progress")
    rig = Rig(folder, settle_s=60.0)
    rigs.append(rig)

    failing_refit.append("v2")
    initial = rig.watcher.install_initial()
    assert initial.report is None and not rig.coord.ready
    outcomes = {e.name: (e.outcome, e.reason) for e in initial.entries}
    assert outcomes == {
        "v2.safetensors": ("failed", "refit_failed"),  # the newest: the engine failed on it
        "v1.safetensors": ("skipped", "superseded"),  # older ones are not tried after an engine failure
        "bad.safetensors": ("rejected", "corrupt"),
        "copying.safetensors": ("being_written", ""),
        "README.md": ("ignored", ""),
        ".v3.safetensors.1a2b.tmp": ("ignored", ""),
    }
    why = initial.explain()
    assert why.startswith("v2.safetensors: refit failed (RuntimeError: injected: the engine could not take"), why
    assert "bad.safetensors: rejected (corrupt: " in why and "copying.safetensors: still being written" in why
    assert "README.md: ignored (not a checkpoint" in why and "empty" not in why

    failing_refit.clear()
    again = Rig(folder, settle_s=60.0)
    rigs.append(again)
    initial = again.watcher.install_initial()
    assert initial.report is not None and initial.report.version == "v2"
    installed, skipped = initial.of("v2.safetensors"), initial.of("v1.safetensors")
    assert installed is not None and installed.outcome == "installed" and installed.report is initial.report
    assert skipped is not None and skipped.outcome == "skipped"
    torch.testing.assert_close(again.output(), expected(2), rtol=0, atol=0)


def test_a_missing_or_empty_folder_says_so(tmp_path: Path, rigs: list[Rig]) -> None:
    missing = Rig(tmp_path / "nope")
    rigs.append(missing)
    assert missing.watcher.install_initial().explain() == "the folder does not exist"
    (tmp_path / "empty").mkdir()
    empty = Rig(tmp_path / "empty")
    rigs.append(empty)
    assert empty.watcher.install_initial().explain() == "it is empty"


def service(folder: Path, tmp_path: Path) -> HotswapService:
    settings = parse_settings({"model_factory": TRANSFORMER, "engine": "eager", "canary": "off",
                               "weights_dir": str(folder), "engine_cache_dir": str(tmp_path / "cache")},
                              model_name="my_bert")
    return HotswapService(settings, SPEC.inputs, SPEC.outputs, SPEC.max_batch, HotswapMetrics())


def load_error(folder: Path, tmp_path: Path) -> str:
    svc = service(folder, tmp_path)
    with pytest.raises(NotReadyError) as err:
        svc.start()
    assert svc.watcher is None and svc.engine is None  # nothing left running
    return str(err.value)


def test_the_load_error_says_what_happened_to_each_file(folder: Path, tmp_path: Path,
                                                        failing_refit: list[str]) -> None:
    assert "(it is empty)" in load_error(folder, tmp_path)

    write_atomic(folder / "initial.safetensors", state(1))
    failing_refit.append("initial")
    message = load_error(folder, tmp_path)
    assert message.startswith(f"model 'my_bert' has no valid weights in {folder} (initial.safetensors: refit "
                              "failed (RuntimeError: injected: the engine could not take the weights"), message
    assert "empty" not in message

    failing_refit.clear()
    (folder / "initial.safetensors").unlink()
    write_atomic(folder / "broken.safetensors", CORRUPT, mtime_ns=AN_HOUR_AGO)
    half_written(folder / "copying.safetensors")
    message = load_error(folder, tmp_path)
    assert "broken.safetensors: rejected (corrupt: " in message, message
    assert "copying.safetensors: still being written" in message and "empty" not in message


def test_a_model_that_loads_keeps_the_account(folder: Path, tmp_path: Path) -> None:
    write_atomic(folder / "v1.safetensors", state(1))
    write_atomic(folder / "broken.safetensors", CORRUPT, mtime_ns=AN_HOUR_AGO)
    svc = service(folder, tmp_path)
    try:
        report = svc.start()
        assert report is not None and report.version == "v1"
        assert {e.name: e.outcome for e in svc.initial_entries} == {"v1.safetensors": "installed",
                                                                  "broken.safetensors": "rejected"}
    finally:
        svc.close()
