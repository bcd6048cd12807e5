from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.errors import ConfigError
from serving.triton.batching import split_batches
from serving.triton.model_config import parse_model_io
from serving.triton.server import read_model_config

REPO = Path(__file__).resolve().parents[3] / "model_repository"


def test_example_configs_parse() -> None:
    io = parse_model_io(read_model_config(REPO / "tiny_transformer"))
    assert io.max_batch == 8
    assert io.inputs[0].name == "TOKENS" and io.inputs[0].dtype == torch.int64 and io.inputs[0].shape == (16,)
    assert io.outputs[0].shape == (5,)
    assert io.parameters["engine"] == "aoti"
    cnn = parse_model_io(read_model_config(REPO / "tiny_cnn"))
    assert cnn.inputs[0].shape == (3, 32, 32) and cnn.parameters["engine"] == "eager"


def test_bad_config_names_every_problem() -> None:
    with pytest.raises(ConfigError) as e:
        parse_model_io({"name": "m", "max_batch_size": 0,
                        "input": [{"name": "A", "data_type": "TYPE_STRING", "dims": [3]},
                                  {"name": "B", "data_type": "TYPE_FP32", "dims": [-1]}]})
    msg = str(e.value)
    assert "max_batch_size" in msg and "TYPE_STRING" in msg and "fixed" in msg and "no output" in msg


@pytest.mark.parametrize(("sizes", "max_batch", "groups"), [
    ([1, 1, 1], 8, [[0, 1, 2]]),
    ([4, 4, 1], 8, [[0, 1], [2]]),
    ([8, 8], 8, [[0], [1]]),
    ([3, 6, 2], 8, [[0], [1, 2]]),
    ([], 8, []),
])
def test_split_batches(sizes: list[int], max_batch: int, groups: list[list[int]]) -> None:
    assert split_batches(sizes, max_batch) == groups


def test_the_examples_declare_both_version_outputs() -> None:
    for model in ("tiny_transformer", "tiny_cnn"):
        io = parse_model_io(read_model_config(REPO / model))
        assert io.version_output and io.version_utf8_width == 64
        assert [o.name for o in io.outputs] == ["LOGITS"]  # neither version output is the engine's


def _config(*outputs: dict[str, object]) -> dict[str, object]:
    return {"name": "m", "max_batch_size": 4, "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [3]}],
            "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [2]}, *outputs]}


@pytest.mark.parametrize("decl", [
    {"name": "HOTSWAP_WEIGHTS_VERSION_UTF8", "data_type": "TYPE_STRING", "dims": [64]},
    {"name": "HOTSWAP_WEIGHTS_VERSION_UTF8", "data_type": "TYPE_UINT8", "dims": [4]},
    {"name": "HOTSWAP_WEIGHTS_VERSION_UTF8", "data_type": "TYPE_UINT8", "dims": [8, 8]},
    {"name": "HOTSWAP_WEIGHTS_VERSION", "data_type": "TYPE_UINT8", "dims": [1]},
])
def test_a_version_output_declared_otherwise_is_refused_with_the_form_to_use(decl: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as e:
        parse_model_io(_config(decl))
    assert str(decl["name"]) in str(e.value) and "declare it as data_type" in str(e.value)


def test_the_utf8_output_alone() -> None:
    io = parse_model_io(_config({"name": "HOTSWAP_WEIGHTS_VERSION_UTF8", "data_type": "TYPE_UINT8", "dims": [16]}))
    assert not io.version_output and io.version_utf8_width == 16 and [o.name for o in io.outputs] == ["Y"]
