"""The AOTInductor load probe: a loader that crashes a child process makes ``aoti`` unavailable, never the server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from serving.engines.aoti import probe as aoti_probe
from serving.errors import EngineUnavailableError

SEGFAULT = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"


@pytest.fixture(autouse=True)
def fresh_verdicts() -> Iterator[None]:
    aoti_probe.forget_verdicts()
    yield
    aoti_probe.forget_verdicts()


def test_a_child_killed_by_a_signal_refuses_aoti_and_suggests_inductor(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailableError) as e:
        aoti_probe.ensure_loadable(tmp_path / "model.pt2", torch.device("cpu"), code=SEGFAULT)
    msg = str(e.value)
    assert "engine 'aoti' cannot run" in msg and "crashed with SIGSEGV" in msg and "'inductor'" in msg
    # the verdict is kept for the process: the real loader is not asked again
    with pytest.raises(EngineUnavailableError, match="SIGSEGV"):
        aoti_probe.ensure_loadable(tmp_path / "model.pt2", torch.device("cpu"), code="pass")


def test_a_loader_that_works_passes_and_is_asked_once(tmp_path: Path) -> None:
    aoti_probe.ensure_loadable(tmp_path / "model.pt2", torch.device("cpu"), code="pass")
    aoti_probe.ensure_loadable(tmp_path / "model.pt2", torch.device("cpu"), code=SEGFAULT)  # not run again


def test_the_aoti_engine_probes_before_it_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.engines.aoti import runner

    monkeypatch.setitem(aoti_probe.LOADERS, aoti_probe.ENGINE_LOADER, SEGFAULT)
    loaded: list[Path] = []
    monkeypatch.setattr(runner, "Runner", lambda path, index: loaded.append(path))
    with pytest.raises(EngineUnavailableError, match="SIGSEGV"):
        runner.load_runner(tmp_path / "model.pt2", torch.device("cpu"))
    assert loaded == []  # never loaded in this process


def test_results_describe_how_the_child_ended() -> None:
    r = aoti_probe.ProbeResult("v", -11, 0.1, "")
    assert r.signal == "SIGSEGV" and not r.ok and "crashed with SIGSEGV" in r.describe()
    assert "exit code 1" in aoti_probe.ProbeResult("v", 1, 0.1, "Traceback\nRuntimeError: boom").describe()
    assert "RuntimeError: boom" in aoti_probe.ProbeResult("v", 1, 0.1, "Traceback\nRuntimeError: boom").describe()
    assert "timed out" in aoti_probe.ProbeResult("v", None, 300, "").describe()
    assert aoti_probe.ProbeResult("v", 0, 0.1, "").ok
