"""The ``model.py`` of the fault tests' model repositories (copied there; never imported by the tests).

Triton's stub puts the model's directory on ``sys.path`` and runs this file, as it runs a user's own
``model.py``: it wraps three of hotswap's functions, then re-exports the product's ``TritonPythonModel``.
Each fault fires once per name (a marker file in ``$FAULT_INJECTION_DIR`` says it did, across stub
restarts), and the test steers it through files in that folder:

* ``boom.safetensors``: the watcher's worker raises an unexpected error while installing it;
* ``cut-*.safetensors``: reading the checkpoint stops after its first tensor until the test writes
  ``read-<name>.release`` (the file is open and half read: the test truncates or deletes it meanwhile);
* versions named ``slow-*``: the refit stops before the engine's slot takes the new weights until
  ``refit-<version>.release`` appears (the test kills the stub meanwhile).

Reaching a stop point writes ``<point>.entered``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from serving.refit.slots import Slots
from serving.triton.model import TritonPythonModel
from serving.watch.install import Installer
from serving.weights.checkpoint import SafetensorsFile

FAULTS = Path(os.environ["FAULT_INJECTION_DIR"])
#: the longest a stop point waits for the test
HOLD_S = 120.0


def once(point: str) -> bool:
    """True the first time ``point`` is reached, in any process."""
    try:
        os.close(os.open(FAULTS / f"{point}.entered", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def hold(point: str) -> None:
    deadline = time.monotonic() + HOLD_S
    while not (FAULTS / f"{point}.release").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


_install = Installer.install


def install(self: Installer, entries: list[Any], *, runtime: bool) -> Any:
    if any(e.name == "boom.safetensors" for e in entries) and once("boom"):
        raise RuntimeError("injected fault: the worker failed while installing boom.safetensors")
    return _install(self, entries, runtime=runtime)


_get_tensor = SafetensorsFile.get_tensor


def get_tensor(self: SafetensorsFile, name: str) -> torch.Tensor:
    tensor = _get_tensor(self, name)
    base = Path(self.file).name
    if base.startswith("cut-") and once(f"read-{base}"):
        hold(f"read-{base}")
    return tensor


_refit = Slots.refit


def refit(self: Slots, slot: Any, tensors: Mapping[str, torch.Tensor], staged: Any) -> Any:
    if staged.version.startswith("slow-") and once(f"refit-{staged.version}"):
        hold(f"refit-{staged.version}")
    return _refit(self, slot, tensors, staged)


Installer.install = install  # type: ignore[method-assign]
SafetensorsFile.get_tensor = get_tensor  # type: ignore[method-assign]
Slots.refit = refit  # type: ignore[method-assign]

__all__ = ["TritonPythonModel"]
