from __future__ import annotations

import pytest
import torch

from serving.engines import build_engine
from serving.errors import ConfigError, NotReadyError, ValidationError
from serving.examples import CNN, TRANSFORMER, example_build_spec
from serving.factory import build_module
from serving.weights.random_state import random_state_dict


@pytest.mark.parametrize("factory", [TRANSFORMER, CNN])
def test_eager_slot_matches_module_with_same_weights(factory: str) -> None:
    spec = example_build_spec(factory)
    engine = build_engine("eager", spec)
    reference = build_module(factory)
    state = random_state_dict(reference, seed=1)
    reference.load_state_dict(state)
    slot = engine.new_slot()
    slot.refit(slot.transfer(state))
    x = (torch.randint(0, 1000, (3, 16)) if factory == TRANSFORMER else torch.randn(3, 3, 32, 32))
    (out,) = slot.run([x])
    with torch.inference_mode():
        expected = reference(x)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(out, expected)
    assert set(engine.weight_specs()) == set(state)


def test_eager_slot_refuses_to_run_or_partially_load_before_first_refit() -> None:
    engine = build_engine("eager", example_build_spec(CNN))
    slot = engine.new_slot()
    with pytest.raises(NotReadyError):
        slot.run([torch.zeros(1, 3, 32, 32)])
    with pytest.raises(ValidationError, match="every weight"):
        slot.refit({"head.bias": torch.zeros(10)})


def test_unknown_engine_and_bad_factory_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown engine"):
        build_engine("onnx", example_build_spec(CNN))
    with pytest.raises(ConfigError, match="package.module:function"):
        build_module("not_a_path")
    with pytest.raises(ConfigError, match="cannot import"):
        build_module("no_such_module_xyz:f")
