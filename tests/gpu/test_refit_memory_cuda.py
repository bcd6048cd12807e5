"""On a GPU: a refit that cannot allocate its standby copy (a ballast tensor holds the memory) fails saying so, the live
weights keep serving, and once the memory is free the next version goes live. The double buffer keeps two copies of
the weights on the device; the second one is made at the first refit after startup.

Run on a CUDA machine: ``.venv/bin/python -m pytest -q tests/gpu/test_refit_memory_cuda.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from bench.lib.models import FACTORY, MARKER_STEP, version_of
from serving.engines import build_engine
from serving.metrics import prometheus_metrics
from serving.publish import publish_tensors
from serving.refit import CanaryConfig, RefitCoordinator
from serving.refit.memory import size_text, weights_nbytes
from serving.specs import BuildSpec, TensorSpec
from serving.watch import WeightsWatcher

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

#: float16: 2.1 GB per copy of the weights
WIDTH, LAYERS = 16384, 4
TIMEOUT = 120.0


def layers(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {f"layers.{i}.weight": (torch.randn(WIDTH, WIDTH, generator=g, device="cuda", dtype=torch.float16)
                                   / WIDTH ** 0.5).cpu() for i in range(LAYERS)}


def publish(folder: Path, base: dict[str, torch.Tensor], version: int) -> None:
    """Version k: the same layers, the marker k * MARKER_STEP (what version_of reads back from an output)."""
    marker = torch.full((WIDTH,), version * MARKER_STEP, dtype=torch.float16)
    publish_tensors({**base, "marker": marker}, folder, version=f"v{version}")


def wait_for(cond: object, what: str) -> None:
    import time

    deadline = time.monotonic() + TIMEOUT
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_standby_copy_that_does_not_fit_fails_the_refit_and_the_next_version_that_fits_goes_live(
        tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    base = layers(0)
    publish(folder, base, 1)
    spec = BuildSpec(factory=FACTORY, inputs=(TensorSpec("x", torch.float16, (WIDTH,)),), max_batch=2,
                     device="cuda:0", dtype=torch.float16,
                     factory_kwargs=(("device", "cuda"), ("dtype", "float16"), ("layers", LAYERS), ("width", WIDTH)))
    registry = CollectorRegistry()
    metrics = prometheus_metrics(registry)
    engine = build_engine("eager", spec, metrics=metrics)
    coord = RefitCoordinator(engine, strategy="double_buffer", canary=CanaryConfig("finite"),
                             canary_input_specs=spec.inputs, metrics=metrics)
    watcher = WeightsWatcher(folder, coord, debounce_s=0.05, metrics=metrics)
    ballast: torch.Tensor | None = None
    try:
        assert watcher.install_initial().report is not None and coord.live_version == "v1"
        x = torch.randn(2, WIDTH, device="cuda", dtype=torch.float16)
        before = coord.infer([x])[0].clone()
        assert version_of(before) == 1

        copy = weights_nbytes(engine.weight_specs())
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # what torch keeps cached would otherwise take the standby copy
        free, _ = torch.cuda.mem_get_info()
        ballast = torch.empty(free - copy // 2, dtype=torch.uint8, device="cuda")  # half a copy stays free
        watcher.start()
        publish(folder, base, 2)
        wait_for(lambda: any(r.version == "v2" for r in watcher.history), "the refit to v2")
        [record] = [r for r in watcher.history if r.version == "v2"]
        report = record.report
        assert report.outcome == "failed" and report.reason == "out_of_memory", report
        assert report.message.startswith(f"OutOfMemoryError: cuda:0: out of memory allocating the standby copy of "
                                         f"the weights ({size_text(copy)}): "), report.message
        assert "set refit_strategy=in_place" in report.message
        assert coord.live_version == "v1" and torch.equal(coord.infer([x])[0], before)

        del ballast
        ballast = None
        torch.cuda.empty_cache()
        publish(folder, base, 3)
        wait_for(lambda: coord.live_version == "v3", "v3 live")
        assert version_of(coord.infer([x])[0]) == 3
    finally:
        del ballast
        watcher.stop(timeout=30)
        coord.close()
        engine.close()
