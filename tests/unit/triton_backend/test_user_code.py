"""A factory module placed with the model (next to model.py, or in the model folder) imports in every
``hotswap`` step, as it does in Triton."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from eager_config import CONFIG  # tests/unit/triton_backend/eager_config.py

from serving.triton.server import seed_weights

FACTORY = '''import torch


def make():
    return torch.nn.Linear(8, 2)
'''


@pytest.mark.parametrize("where", ["next_to_model_py", "model_folder"])
def test_seeding_imports_the_model_s_own_factory(tmp_path: Path, where: str) -> None:
    module = f"user_factory_{where}"
    repo = tmp_path / "repo"
    model = repo / "m"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text("from serving.triton.model import TritonPythonModel\n")
    (model / "config.pbtxt").write_text(CONFIG.format(name="m", factory=f"{module}:make"))
    ((model / "1") if where == "next_to_model_py" else model).joinpath(f"{module}.py").write_text(FACTORY)
    try:
        [(name, folder, seeded)] = seed_weights(repo, {"HOTSWAP_WEIGHTS_ROOT": str(tmp_path / "weights")})
        assert (name, seeded) == ("m", True) and (folder / "initial.safetensors").is_file()
    finally:
        sys.modules.pop(module, None)
