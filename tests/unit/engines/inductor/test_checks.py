"""The Inductor engine's checks: batch sizes and CUDA-graph buckets, the probe weights of the refit check, the
``cuda_graphs`` option."""

from __future__ import annotations

import pytest
import torch

from serving.engines.inductor.checks import bucket_for, cuda_graphs_of, graph_buckets, probe_weights, warmup_batches
from serving.errors import ConfigError
from serving.examples import TRANSFORMER, example_build_spec
from serving.specs import BuildSpec


def test_batches_and_buckets() -> None:
    assert warmup_batches(8) == (1, 2, 8)
    assert warmup_batches(1) == (1,)
    assert graph_buckets(8) == (1, 2, 4, 8)
    assert graph_buckets(6) == (1, 2, 4, 6)
    assert graph_buckets(1) == (1,)
    assert [bucket_for(n, (1, 2, 4, 6)) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]
    with pytest.raises(ValueError):
        bucket_for(7, (1, 2, 4, 6))


def test_probe_weights_change_every_floating_tensor() -> None:
    state = {"ones": torch.ones(4), "zeros": torch.zeros(4), "w": torch.randn(3, 3), "scalar": torch.tensor(2.0),
             "count": torch.tensor(7)}
    probe = probe_weights(state, seed=0)
    for name in ("ones", "zeros", "w", "scalar"):
        assert not torch.equal(probe[name], state[name]), name
    assert (probe["ones"] > 0).all() and (probe["zeros"] > 0).all()
    assert torch.equal(probe["count"], state["count"])
    torch.testing.assert_close(probe_weights(state, seed=0), probe)


def test_cuda_graphs_need_cuda() -> None:
    spec = example_build_spec(TRANSFORMER)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        cuda_graphs_of(BuildSpec(TRANSFORMER, spec.inputs, options=(("cuda_graphs", True),)))
