"""Loading a compiled ``.pt2`` package: the package loader itself, behind the crash guard (:mod:`.probe`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from serving.engines.aoti.probe import ensure_loadable
from serving.errors import EngineBuildError


class Runner:
    """The package loader itself (``torch._C._aoti.AOTIModelPackageLoader``), as
    ``torch._inductor.aoti_load_package`` builds it, without the Python wrapper.

    Importing that wrapper imports ``torch._dynamo``, a large part of a cache hit's start (see
    docs/benchmarks.md); our inputs and outputs are flat tensor lists, so its pytree handling is not needed.
    The positional arguments follow torch 2.13's ``torch/_inductor/package/package.py``
    (``load_package``) and ``AOTICompiledModel.load_constants``.
    """

    def __init__(self, path: Path, device_index: int) -> None:
        # (path, model_name, run_single_threaded, num_runners, device_index)
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, device_index)

    def get_constant_fqns(self) -> list[str]:
        return list(self.loader.get_constant_fqns())

    def load_constants(self, constants: Mapping[str, torch.Tensor], *, check_full_update: bool,
                       user_managed: bool) -> None:
        # (constants_map, use_inactive, check_full_update, user_managed)
        self.loader.load_constants(dict(constants), False, check_full_update, user_managed)

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        return list(self.loader.boxed_run(list(inputs)))


def load_runner(path: Path, device: torch.device) -> Runner:
    """A runner of the package at ``path`` on ``device``; first asks a child process whether loading crashes here
    (a loader that segfaults must not take the server down)."""
    index = device.index if device.type != "cpu" and device.index is not None else -1
    ensure_loadable(path, device)
    try:
        return Runner(path, index)
    except Exception as e:
        raise EngineBuildError(f"AOTI engine: cannot load the package {path}: {e}") from e


__all__ = ["Runner", "load_runner"]
