"""A torchvision ResNet on the GPU, the way its users save it: ``save_file(model.state_dict())``, published
with ``cp -a`` into a watched folder; served outputs equal torchvision's own model with the same weights.

torchvision from PyPI is a CUDA build (it does not import with the CPU-only torch of CI), so this runs on
a GPU machine whose torchvision matches its torch.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import save_file

from serving.engines import build_engine
from serving.metrics import prometheus_metrics
from serving.refit import RefitCoordinator
from serving.refit.canary import CanaryConfig
from serving.specs import BuildSpec, TensorSpec
from serving.watch import WeightsWatcher

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
torchvision = pytest.importorskip("torchvision")

SPEC = BuildSpec(factory="serving.examples.vision:torchvision_model", inputs=(TensorSpec("IMAGE", torch.float32,
                                                                                        (3, 224, 224)),),
                 max_batch=4, device="cuda", factory_kwargs=(("name", "resnet18"),))


def _saved(path: Path, seed: int) -> tuple[Path, torch.nn.Module]:
    """A user's checkpoint: torchvision's resnet18, trained a little (here: perturbed), saved as a state dict."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.01)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


@pytest.fixture(autouse=True)
def full_fp32() -> Iterator[None]:
    """cuDNN's TF32 (its default) rounds eager and compiled convolutions differently; off for the whole test
    (build included: TorchDynamo guards on the flag, so changing it later would compile other code)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def _wait_live(coord: RefitCoordinator, watcher: WeightsWatcher, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while coord.live_version != version:
        assert time.monotonic() < deadline, f"{version} not live: rejected {dict(watcher.rejected)}"
        time.sleep(0.02)


@pytest.mark.parametrize("engine_kind", ["eager", "inductor"])
def test_torchvision_resnet_serves_copied_checkpoints_like_torchvision(engine_kind: str, tmp_path: Path) -> None:
    engine = build_engine(engine_kind, SPEC)
    coord = RefitCoordinator(engine, metrics=prometheus_metrics(CollectorRegistry()),
                             canary=CanaryConfig("finite"), canary_input_specs=SPEC.inputs)
    folder = tmp_path / "weights"
    folder.mkdir()
    watcher = WeightsWatcher(folder, coord, debounce_s=0.05)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    try:
        watcher.start()
        outputs = []
        for i in (1, 2):
            src, model = _saved(tmp_path / f"v{i}.safetensors", i)
            subprocess.run(["cp", "-a", str(src), str(folder / src.name)], check=True)
            _wait_live(coord, watcher, f"v{i}")
            (out,) = coord.infer([x.cuda()])
            with torch.inference_mode():
                expected = model.cuda()(x.cuda())
            torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-3)
            outputs.append(out)
        assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)
        assert watcher.rejected == {}
    finally:
        watcher.stop(timeout=10)
        coord.close()
        engine.close()
