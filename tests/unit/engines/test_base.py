"""What every engine shares: the device a build asks for, refused with the engine's name."""

from __future__ import annotations

import pytest
import torch

from serving.engines import build_engine
from serving.errors import EngineBuildError, EngineUnavailableError
from serving.examples import TRANSFORMER, example_build_spec


@pytest.mark.parametrize(("kind", "name"), [("aoti", "AOTI engine"), ("inductor", "Inductor engine")])
def test_a_build_names_a_bad_device_and_cuda_without_cuda(kind: str, name: str) -> None:
    with pytest.raises(EngineBuildError, match=rf"^{name}: invalid device 'nope'"):
        build_engine(kind, example_build_spec(TRANSFORMER, device="nope"))
    if torch.cuda.is_available():
        return
    with pytest.raises(EngineUnavailableError, match=rf"^{name}: device 'cuda' asked for, but this torch has no "
                       r"usable CUDA .*install a CUDA build of torch or use device 'cpu'"):
        build_engine(kind, example_build_spec(TRANSFORMER, device="cuda"))
