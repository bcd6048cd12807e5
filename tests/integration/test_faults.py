"""Faults through a real Triton: a full disk while publishing, a checkpoint cut while it is read, an error in the
watcher's worker, a stub killed in the middle of a refit. Each time the live version keeps serving (outputs equal
to the old version's) and the next good version goes live.

Faults are injected the way a user's ``model.py`` could (``fault_hooks.py``, copied in as the model's ``model.py``):
no production hook exists for them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from processes import pids_where  # tests/processes.py

from serving.cache import EngineCache
from serving.publish import publish
from serving.publish.protocol import is_temp_name
from serving.triton.scrape import scrape, total, weights_versions
from serving.triton.server import TritonProcess, seed_weights

from .conftest import INPUTS, REPOSITORY, infer_versioned, random_checkpoint, reference_output

pytestmark = pytest.mark.integration

HOOKS = Path(__file__).with_name("fault_hooks.py")
#: the tmpfs the weights live on (item: a full disk): room for a few versions of the example CNN
TMPFS_BYTES = 1 << 20
WAIT_S = 60.0


def wait_for(cond: Callable[[], object], what: str, timeout: float = WAIT_S,
             server: TritonProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            log = f"\n{server.log_tail(6000)}" if server is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}{log}")
        time.sleep(0.05)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: int) -> Iterator[str | None]:
    """A tmpfs of ``size`` bytes mounted at ``path`` (unmounted at the end); yields None when mounted, else why
    it cannot be (mounting needs root: CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield "mounting a tmpfs (to fill the disk) needs root"
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        yield f"cannot mount a tmpfs here: {done.stderr.strip()}"
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fault_repository(dest: Path, model: str) -> Path:
    """The example ``model`` with one instance, its ``model.py`` the fault hooks."""
    repo = dest / "repo"
    shutil.copytree(REPOSITORY / model, repo / model)
    config = repo / model / "config.pbtxt"
    config.write_text(config.read_text().replace("count: 2", "count: 1"))
    shutil.copy(HOOKS, repo / model / "1" / "model.py")
    return repo


def stub_pids(repo: Path, model: str) -> list[int]:
    """The Python-backend stubs running ``model`` of ``repo`` (one per instance)."""
    marker = f"{repo / model / '1' / 'model.py'}"
    return pids_where(lambda cmdline: "triton_python_backend_stub" in cmdline and marker in cmdline)


def death(pid: int) -> str | None:
    """How ``pid`` ended, while it is a zombie (Triton does not reap a dead stub at once); None while it runs."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return "gone"
    if fields[0] != "Z":
        return None
    status = int(fields[-1])  # exit_code, as waitpid reports it
    return f"killed by {signal.Signals(status & 0x7F).name}" if status & 0x7F else f"exited with {status >> 8}"


def holds_open(pid: int, path: Path) -> bool:
    """``pid`` has ``path`` open (a descriptor onto it, as /proc shows)."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == str(path):
                return True
    return False


@dataclass
class Served:
    """A Triton serving one example model of a fault repository."""

    server: TritonProcess
    repo: Path
    model: str
    weights: Path
    faults: Path

    def answer(self) -> tuple[np.ndarray, list[str]]:
        return infer_versioned(self.server.http_url, self.model, INPUTS[self.model])

    def assert_serves(self, seed: int, version: str) -> None:
        out, versions = self.answer()
        assert versions == [version] * len(versions), versions
        expected = reference_output(self.model, seed, INPUTS[self.model]).numpy()
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)

    def count(self, name: str, **labels: str) -> float:
        return total(scrape(self.server.metrics_url), name, {"model": self.model, **labels})

    def wait_live(self, version: str) -> None:
        wait_for(lambda: set(weights_versions(scrape(self.server.metrics_url), self.model).values()) == {version},
                 f"{version} live", server=self.server)

    def reached(self, point: str) -> None:
        wait_for((self.faults / f"{point}.entered").exists, f"the stub reaching {point}", server=self.server)

    def release(self, point: str) -> None:
        (self.faults / f"{point}.release").touch()

    def log(self) -> str:
        return self.server.log_tail(1_000_000)


def start(repo: Path, model: str, work: Path, weights_root: Path, cache: Path, faults: Path,
          extra_args: tuple[str, ...] = ()) -> Served:
    env = dict(os.environ, HOTSWAP_WEIGHTS_ROOT=str(weights_root), HOTSWAP_CACHE_DIR=str(cache),
               FAULT_INJECTION_DIR=str(faults))
    faults.mkdir(parents=True, exist_ok=True)
    seed_weights(repo, env)
    server = TritonProcess(repo, work_dir=work, env=env, extra_args=extra_args)
    server.start()
    try:
        server.wait_ready([model], timeout=900)
    except BaseException:
        server.stop()
        raise
    return Served(server, repo, model, weights_root / model, faults)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, str | None]]:
    """The example CNN (eager), its weights on a small tmpfs where one can be mounted; and why not, if not."""
    work = tmp_path_factory.mktemp("faults")
    with small_tmpfs(work / "tmpfs", TMPFS_BYTES) as no_tmpfs:
        served = start(fault_repository(work, "tiny_cnn"), "tiny_cnn", work / "run", work / "tmpfs",
                       work / "cache", work / "faults")
        try:
            yield served, no_tmpfs
        finally:
            served.server.stop()


# ---------------------------------------------------------------- a full disk


def test_a_publish_that_fills_the_disk_fails_cleanly_and_serving_goes_on(cnn: tuple[Served, str | None],
                                                                         tmp_path: Path) -> None:
    served, no_tmpfs = cnn
    if no_tmpfs:
        pytest.skip(no_tmpfs)
    before = served.answer()
    listing = sorted(os.listdir(served.weights))
    rejected = served.count("hotswap_refits_total", outcome="rejected")
    src = random_checkpoint("tiny_cnn", 71, tmp_path / "v71.safetensors")
    size = src.stat().st_size
    filler = served.weights.parent / "filler"  # beside the weights folder, on the same file system
    st = os.statvfs(served.weights)
    with open(filler, "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize - size // 2))  # leaves half a checkpoint free
    try:
        cmd = [sys.executable, "-m", "serving.cli", "publish", str(src), "--to", str(served.weights)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done
        assert done.stderr.startswith(f"hotswap: error: publishing v71.safetensors into {served.weights}: no space "
                                      f"left on the device (ENOSPC) (the version has {size} bytes, "), done.stderr
        assert "nothing was published and the partial copy was removed. Free space" in done.stderr
        assert sorted(os.listdir(served.weights)) == listing  # no new entry, not even a hidden temporary one
        assert served.answer()[1] == before[1]
        np.testing.assert_array_equal(served.answer()[0], before[0])
        assert served.count("hotswap_refits_total", outcome="rejected") == rejected
    finally:
        filler.unlink()
    publish(src, served.weights)
    served.wait_live("v71")
    served.assert_serves(71, "v71")


# ---------------------------------------------------------------- a checkpoint cut while it is read


@pytest.mark.parametrize(("cut", "seed"), [("truncate", 81), ("delete", 83)])
def test_a_checkpoint_cut_while_it_is_read_is_rejected_and_serving_goes_on(cnn: tuple[Served, str | None],
                                                                           tmp_path: Path, cut: str, seed: int) -> None:
    """The stub stops after reading the checkpoint's first tensor (fault_hooks.py); the test truncates or deletes
    the file it holds open, then lets it read on. Truncated: the short read is refused. Deleted: the descriptor
    still reads the whole old content, but the publish protocol withdraws a version deleted before it goes live
    (docs/publish.md), so it is refused when the read ends and finds the path gone."""
    served, _ = cnn
    before = served.answer()
    refused = served.count("hotswap_refits_total", outcome="rejected", reason="changed_during_read")
    name = f"cut-{cut}.safetensors"
    path = publish(random_checkpoint("tiny_cnn", seed, tmp_path / name), served.weights)
    point = f"read-{name}"
    served.reached(point)
    [stub] = stub_pids(served.repo, served.model)
    assert holds_open(stub, path), "the stub must hold the checkpoint open, half read"
    if cut == "truncate":
        os.truncate(path, path.stat().st_size // 2)
        assert holds_open(stub, path)  # so the cut happened in the middle of the read
        says = "truncated while it was being read"
    else:
        path.unlink()
        says = "deleted while it was being read"
    served.release(point)
    wait_for(lambda: served.count("hotswap_refits_total", outcome="rejected", reason="changed_during_read")
             == refused + 1 or death(stub), "the rejection", server=served.server)
    assert not death(stub), f"the stub reading the cut checkpoint died: {death(stub)}"
    assert f"refit cut-{cut} -> rejected (changed_during_read)" in served.log() and says in served.log()
    after = served.answer()
    assert after[1] == before[1]
    np.testing.assert_array_equal(after[0], before[0])
    publish(random_checkpoint("tiny_cnn", seed + 1, tmp_path / f"after-{cut}.safetensors"), served.weights)
    served.wait_live(f"after-{cut}")
    served.assert_serves(seed + 1, f"after-{cut}")


# ---------------------------------------------------------------- an error in the watcher's worker


def test_an_unexpected_error_in_the_worker_is_logged_counted_and_the_next_publish_goes_live(
        cnn: tuple[Served, str | None], tmp_path: Path) -> None:
    served, _ = cnn
    before = served.answer()
    errors = served.count("hotswap_watcher_errors_total")
    publish(random_checkpoint("tiny_cnn", 91, tmp_path / "boom.safetensors"), served.weights)
    wait_for(lambda: served.count("hotswap_watcher_errors_total") == errors + 1, "the error counted on /metrics")
    log = served.log()
    assert "weights watcher: unexpected error; the watcher keeps running" in log, log[-3000:]
    assert "Traceback" in log and "RuntimeError: injected fault: the worker failed while installing boom" in log
    after = served.answer()
    assert after[1] == before[1]
    np.testing.assert_array_equal(after[0], before[0])
    publish(random_checkpoint("tiny_cnn", 92, tmp_path / "v92.safetensors"), served.weights)
    served.wait_live("v92")
    served.assert_serves(92, "v92")


# ---------------------------------------------------------------- a stub killed in the middle of a refit


def test_a_stub_killed_in_the_middle_of_a_refit_serves_the_newest_version_once_restarted(
        tmp_path: Path, engine_cache_dir: Path) -> None:
    """The AOTI example (the engine comes from the stripped-engine cache, shared with the other tests). The stub is
    killed while its refit to slow-1 waits (fault_hooks.py). Triton 2.51 does not restart it: the model stays
    READY while every request fails ("Stub process ... is not healthy"), so the operator restarts the server; it
    then serves slow-1 (the newest valid version), its engine a verified cache hit, nothing half-written left."""
    model = "tiny_transformer"
    repo = fault_repository(tmp_path, model)
    weights, faults = tmp_path / "weights", tmp_path / "faults"
    # with a dead stub Triton waits out its exit timeout on SIGTERM (30 s by default), then exits anyway
    first = start(repo, model, tmp_path / "run1", weights, engine_cache_dir, faults, ("--exit-timeout-secs=3",))
    try:
        [stub] = stub_pids(repo, model)
        publish(random_checkpoint(model, 111, tmp_path / "slow-1.safetensors"), first.weights)
        first.reached("refit-slow-1")
        os.kill(stub, signal.SIGKILL)
        wait_for(lambda: stub not in stub_pids(repo, model), "the stub gone")  # (a zombie until Triton reaps it)
        # Triton 2.51: no new stub, the model (and the server) still ready, every request refused and counted
        failed = {"model": model, "reason": "BACKEND"}  # (the parser names Triton's counter with _total)
        failures = total(scrape(first.server.metrics_url), "nv_inference_request_failure_total", failed)
        with pytest.raises(Exception, match="Stub process 'tiny_transformer_0_0' is not healthy"):
            first.answer()
        assert first.server.model_ready(model) and not stub_pids(repo, model)
        with urllib.request.urlopen(f"http://{first.server.http_url}/v2/health/ready", timeout=5) as r:
            assert r.status == 200
        wait_for(lambda: total(scrape(first.server.metrics_url), "nv_inference_request_failure_total", failed)
                 == failures + 1, "the failed request counted")
        assert first.server.log_tail(100_000).count("TRITONBACKEND_ModelInstanceInitialize") == 1
    finally:
        first.server.stop()
    assert "Exit timeout expired" in first.log()
    second = start(repo, model, tmp_path / "run2", weights, engine_cache_dir, faults)
    try:
        second.assert_serves(111, "slow-1")
        log = second.log()
        assert "cache hit" in log and "cache miss" not in log, log[-3000:]
        assert "refit slow-1 -> success" in log
    finally:
        second.server.stop()
    cache = EngineCache(engine_cache_dir)
    entries = cache.entries()
    assert entries and all(cache.load(e.key, lambda entry: entry) is not None for e in entries)  # sha256 verified
    assert not [p.name for p in engine_cache_dir.iterdir() if p.name.startswith(".tmp-")]
    assert not [p.name for p in weights.joinpath(model).iterdir() if is_temp_name(p.name)]
