"""The export helper every engine builds with: the module, example inputs, ``torch.export`` with a dynamic batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from serving.cache import graph_fingerprint
from serving.engines.export import EXAMPLE_BATCH, batch_dims, example_inputs, export, make_module
from serving.errors import EngineBuildError
from serving.examples import CNN, TRANSFORMER, example_build_spec
from serving.specs import BuildSpec, TensorSpec


@pytest.mark.parametrize("factory", [TRANSFORMER, CNN])
def test_meta_module_has_the_same_fingerprint(factory: str) -> None:
    """A cache lookup builds the module on the meta device (no weight init): same key as a real build."""
    spec = dataclasses.replace(example_build_spec(factory), dtype=torch.float16)
    meta = make_module(spec, torch.device("cpu"), meta=True)
    real = make_module(spec, torch.device("cpu"), meta=False)
    assert all(t.is_meta for t in meta.state_dict().values())
    assert not any(t.is_meta for t in real.state_dict().values())
    assert graph_fingerprint(meta, factory, {}) == graph_fingerprint(real, factory, {})


def test_module_is_in_eval_mode_in_the_spec_dtype() -> None:
    spec = dataclasses.replace(example_build_spec(CNN), dtype=torch.bfloat16)
    module = make_module(spec, torch.device("cpu"))
    assert not module.training
    state = module.state_dict()
    assert state["conv1.weight"].dtype == torch.bfloat16 and state["bn1.running_var"].dtype == torch.bfloat16
    assert state["bn1.num_batches_tracked"].dtype == torch.int64  # only floating tensors are cast


def test_example_inputs_are_zeros_of_each_input() -> None:
    spec = example_build_spec(TRANSFORMER, max_batch=8)
    (tokens,) = example_inputs(spec, torch.device("cpu"))
    assert tokens.shape == (EXAMPLE_BATCH, 16) and tokens.dtype == torch.int64 and not tokens.any()
    (one,) = example_inputs(example_build_spec(CNN, max_batch=1), torch.device("cpu"))
    assert one.shape == (1, 3, 32, 32)
    assert example_inputs(spec, torch.device("cpu"), 5)[0].shape == (5, 16)


def test_export_has_a_dynamic_batch_up_to_max_batch() -> None:
    spec = example_build_spec(CNN, max_batch=4)
    module = make_module(spec, torch.device("cpu"))
    ep = export(module, spec, torch.device("cpu"))
    run = ep.module()
    for n in (1, 3, 4):
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(run(x), module(x))
    with pytest.raises(Exception, match=r"size\(\)\[0\] <= 4"):
        run(torch.randn(5, 3, 32, 32))  # outside [1, max_batch]


def test_batch_of_one_is_not_dynamic() -> None:
    assert batch_dims(example_build_spec(CNN, max_batch=1)) is None
    dims = batch_dims(example_build_spec(CNN, max_batch=4))
    assert dims is not None and len(dims) == 1 and set(dims[0]) == {0}


class Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
            return x
        return -x


def test_export_failure_is_a_build_error_naming_the_factory() -> None:
    spec = BuildSpec("my.models:branchy", (TensorSpec("X", torch.float32, (3,)),), max_batch=4)
    with pytest.raises(EngineBuildError, match=r"torch.export of my.models:branchy failed \(\w+"):
        export(Branchy(), spec, torch.device("cpu"))
