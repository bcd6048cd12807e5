"""The parts of the TensorRT build that run without TensorRT."""

from __future__ import annotations

import torch

from serving.engines.export import export
from serving.engines.tensorrt.build import graph_reads
from serving.examples import CNN, example_build_spec
from serving.examples.cnn import tiny_cnn


def test_graph_reads_excludes_unused_state() -> None:
    spec = example_build_spec(CNN, device="cpu", max_batch=4)
    m = tiny_cnn().eval()
    reads = graph_reads(export(m, spec, torch.device("cpu")))
    assert "bn1.running_var" in reads and "conv1.weight" in reads and "head.bias" in reads
    assert "bn1.num_batches_tracked" not in reads
