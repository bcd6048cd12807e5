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


def test_refit_with_the_slots_own_tensors_assigns_nothing_and_serves_what_they_hold() -> None:
    """The fast path writes new weights into the module's own tensors (``buffers()``) and refits with them: the
    module keeps its parameters as they are. A caller's tensors are still assigned (not copied)."""
    engine = build_engine("eager", example_build_spec(TRANSFORMER))
    slot = engine.new_slot()
    reference = build_module(TRANSFORMER)
    a = random_state_dict(reference, seed=1)
    slot.refit(slot.transfer(a))
    assert all(slot.buffers()[k].data_ptr() == v.data_ptr() for k, v in a.items() if v.numel())
    params = dict(slot.module.named_parameters())
    b = random_state_dict(reference, seed=2)
    own = dict(slot.buffers())
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(b[name])  # what the fast path does
    slot.refit(own)
    assert all(p is params[n] for n, p in slot.module.named_parameters())
    reference.load_state_dict(b)
    x = torch.randint(0, 1000, (3, 16))
    (out,) = slot.run([x])
    with torch.inference_mode():
        torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
