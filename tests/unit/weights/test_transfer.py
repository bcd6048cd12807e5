"""The fast path's settings and the choice of transfer (pure)."""

from __future__ import annotations

import pytest
import torch

from serving.choices import TRANSFERS
from serving.errors import ConfigError
from serving.weights.transfer import FastPathConfig, KvikIOStatus, needs_kvikio, resolve_transfer

WORKS = KvikIOStatus(True, "a test read matched", "26.10.0", gds=False, gds_reason="compat mode: no GDS here")
WITH_GDS = KvikIOStatus(True, "a test read matched", "26.10.0", gds=True, gds_reason="cuFile with GDS")
MISSING = KvikIOStatus(False, "kvikio does not import (ModuleNotFoundError: No module named 'kvikio')")
CUDA = torch.device("cuda", 0)


def test_config_is_checked_all_at_once() -> None:
    assert TRANSFERS == ("auto", "kvikio", "pinned")
    with pytest.raises(ConfigError, match=r"transfer='dma'.*threads=0.*task_bytes=5000"):
        FastPathConfig(transfer="dma", threads=0, task_bytes=5000)


@pytest.mark.parametrize(("setting", "device", "status", "kind", "reason"), [
    ("auto", CUDA, WORKS, "kvikio", "auto: KvikIO imports and reads here; KvikIO 26.10.0, GDS not used "
                                    "(compat mode: no GDS here)"),
    ("auto", CUDA, MISSING, "pinned", "auto: KvikIO cannot read here (kvikio does not import "
                                      "(ModuleNotFoundError: No module named 'kvikio')); the pinned ring instead"),
    ("kvikio", CUDA, WITH_GDS, "kvikio", "weights_transfer is 'kvikio'; KvikIO 26.10.0, GDS used (cuFile with GDS)"),
    ("pinned", CUDA, None, "pinned", "weights_transfer is 'pinned'"),
    ("auto", "cpu", None, "cpu", "cpu destinations: the reader threads read straight into them "
                                 "(weights_transfer is 'auto')"),
    ("pinned", "cpu", None, "cpu", "cpu destinations: the reader threads read straight into them "
                                   "(weights_transfer is 'pinned')"),
    ("kvikio", "cpu", WORKS, "kvikio", "weights_transfer is 'kvikio'; KvikIO 26.10.0, GDS not used "
                                       "(compat mode: no GDS here)"),
])
def test_resolution(setting: str, device: torch.device | str, status: KvikIOStatus | None, kind: str,
                    reason: str) -> None:
    assert needs_kvikio(setting, device) == (status is not None)
    choice = resolve_transfer(setting, device, status)
    assert (choice.kind, choice.reason) == (kind, reason)
    assert choice.gds == (kind == "kvikio" and status is not None and status.gds)


@pytest.mark.parametrize("device", [CUDA, "cpu"])
def test_kvikio_by_name_never_falls_back_silently(device: torch.device | str) -> None:
    with pytest.raises(ConfigError) as e:
        resolve_transfer("kvikio", device, MISSING)
    text = str(e.value)
    assert "weights_transfer 'kvikio': KvikIO cannot read here: kvikio does not import" in text
    assert "trt-hotswap[gpu-cu13]" in text and "set weights_transfer to 'auto' or 'pinned'" in text


def test_unknown_setting_and_missing_status() -> None:
    with pytest.raises(ConfigError, match="expected one of auto, kvikio, pinned"):
        resolve_transfer("dma", CUDA, WORKS)
    with pytest.raises(ValueError, match="needs KvikIO's status"):
        resolve_transfer("auto", CUDA, None)
