"""parse_header / read_header: valid files, and every way a header can lie."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from serving.errors import CheckpointError
from serving.weights.safetensors_header import SAFETENSORS_DTYPES, TensorMeta, parse_header, read_header

from .helpers import raw_safetensors, save, tiny_state_dict


def _parse(blob: bytes, **kwargs: Any) -> dict[str, TensorMeta]:
    return parse_header(blob, len(blob), "ckpt.safetensors", **kwargs)


def _corrupt(blob: bytes, *needles: str, **kwargs: Any) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        _parse(blob, **kwargs)
    err = info.value
    assert err.reason == "corrupt"
    assert "ckpt.safetensors" in str(err)
    for needle in needles:
        assert needle in str(err), str(err)
    return err


def test_valid_file_matches_the_safetensors_library(tmp_path: Path) -> None:
    sd = tiny_state_dict()
    path = save(tmp_path / "m.safetensors", sd, metadata={"format": "pt", "step": "7"})
    metas = read_header(path)
    assert set(metas) == set(sd)
    with safe_open(str(path), framework="pt") as f:
        for name, meta in metas.items():
            t = f.get_tensor(name)
            assert meta.name == name
            assert meta.dtype == t.dtype == sd[name].dtype
            assert meta.shape == tuple(t.shape)
            assert meta.nbytes == t.numel() * t.element_size()
            assert meta.file == str(path)
    # the data section is covered exactly: offsets tile [0, total)
    spans = sorted((m.start, m.end) for m in metas.values())
    assert spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert 8 + header_len + spans[-1][1] == path.stat().st_size


def test_every_common_dtype_round_trips(tmp_path: Path) -> None:
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]
    tensors = {str(dt): torch.zeros(3, 2).to(dt) for dt in dtypes}
    metas = read_header(save(tmp_path / "d.safetensors", tensors))
    assert {name: m.dtype for name, m in metas.items()} == {str(dt): dt for dt in dtypes}
    assert {"F16", "BF16", "F32", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3",
            "F8_E5M2"} <= set(SAFETENSORS_DTYPES)


def test_scalar_and_empty_tensors_and_metadata_only(tmp_path: Path) -> None:
    metas = read_header(save(tmp_path / "s.safetensors", {"s": torch.tensor(2.0), "e": torch.zeros(0, 4)}))
    assert metas["s"].shape == () and metas["s"].nbytes == 4
    assert metas["e"].shape == (0, 4) and metas["e"].nbytes == 0
    assert _parse(raw_safetensors({"__metadata__": {"a": "b"}})) == {}


def test_header_padding_is_accepted() -> None:
    blob = raw_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, pad=5)
    assert _parse(blob)["w"].shape == (2,)


def test_truncated_data_names_the_tensor(tmp_path: Path) -> None:
    path = save(tmp_path / "t.safetensors", {"a": torch.ones(4), "b": torch.ones(16)})
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    assert info.value.reason == "corrupt"
    assert "'b'" in str(info.value) and "beyond the end" in str(info.value) and str(path) in str(info.value)


def test_truncated_inside_the_header(tmp_path: Path) -> None:
    path = save(tmp_path / "t.safetensors", {"a": torch.ones(4)})
    os.truncate(path, 20)
    with pytest.raises(CheckpointError, match="larger than the file") as info:
        read_header(path)
    assert info.value.reason == "corrupt"


def test_shorter_than_the_length_field(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="shorter than the 8-byte") as info:
        read_header(path)
    assert info.value.reason == "corrupt"


def test_header_length_larger_than_the_file() -> None:
    blob = struct.pack("<Q", 10_000) + b'{"a": 1}'
    _corrupt(blob, "header length 10000", "larger than the file")


def test_header_length_over_the_cap() -> None:
    blob = raw_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    _corrupt(blob, "exceeds the cap", max_header_bytes=16)
    _corrupt(struct.pack("<Q", 0) + b"x", "header length is 0")


def test_prefix_shorter_than_the_header() -> None:
    blob = raw_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(CheckpointError, match="header truncated"):
        parse_header(blob[:20], len(blob), "ckpt.safetensors")


@pytest.mark.parametrize("text", [b"\xff\xfe\x00garbage", b"{not json", b'["a", 1]', b"   {}", b"null"])
def test_json_garbage(text: bytes) -> None:
    _corrupt(struct.pack("<Q", len(text)) + text)


def test_entry_not_an_object() -> None:
    text = b'{"w": [1, 2]}'
    _corrupt(struct.pack("<Q", len(text)) + text, "'w'", "expected an object")


def test_empty_object_is_a_valid_empty_file() -> None:
    blob = struct.pack("<Q", 2) + b"{}"
    assert _parse(blob) == {}


def test_duplicate_tensor_names() -> None:
    text = (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
    _corrupt(struct.pack("<Q", len(text)) + text + b"\0" * 8, "duplicate key 'w'")


def test_overlapping_offsets() -> None:
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    _corrupt(raw_safetensors(header, b"\0" * 24), "'b'", "overlap", "'a'")


def test_offsets_beyond_the_file() -> None:
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    _corrupt(raw_safetensors(header, b"\0" * 20), "'b'", "beyond the end")


def test_offsets_disagree_with_shape_and_dtype() -> None:
    header = {"a": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 24]}}
    _corrupt(raw_safetensors(header, b"\0" * 24), "'a'", "span 24 bytes", "needs 12")


def test_trailing_bytes_after_the_last_tensor() -> None:
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    _corrupt(raw_safetensors(header, b"\0" * 20), "4 trailing byte(s)")


def test_gap_between_tensors() -> None:
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
    _corrupt(raw_safetensors(header, b"\0" * 12), "'b'", "unaccounted")


def test_unknown_dtype() -> None:
    header = {"w": {"dtype": "F7", "shape": [4], "data_offsets": [0, 16]}}
    _corrupt(raw_safetensors(header, b"\0" * 16), "'w'", "unknown dtype 'F7'")


@pytest.mark.parametrize("shape", [[-1, 4], [2.0, 2], [True], "4", None])
def test_bad_shape(shape: object) -> None:
    header = {"w": {"dtype": "U8", "shape": shape, "data_offsets": [0, 4]}}
    _corrupt(raw_safetensors(header, b"\0" * 4), "'w'", "'shape'")


@pytest.mark.parametrize("offsets", [[4, 0], [0], [0, 4, 8], ["0", "4"], [-4, 0], None])
def test_bad_offsets(offsets: object) -> None:
    header = {"w": {"dtype": "U8", "shape": [4], "data_offsets": offsets}}
    _corrupt(raw_safetensors(header, b"\0" * 4), "'w'", "'data_offsets'")


def test_bad_metadata() -> None:
    header = {"__metadata__": {"step": 7}, "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    _corrupt(raw_safetensors(header, b"\0"), "__metadata__")


def test_every_bad_tensor_is_reported_at_once() -> None:
    header = {"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 12]},
              "c": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}
    _corrupt(raw_safetensors(header, b"\0" * 16), "'a'", "'b'")


def test_parser_refuses_what_the_library_refuses(tmp_path: Path) -> None:
    """Cross-check: a lying header that safetensors itself rejects is rejected here too."""
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    path = tmp_path / "lie.safetensors"
    path.write_bytes(raw_safetensors(header, b"\0" * 24))
    with pytest.raises(Exception):  # noqa: B017 - the library's own error type
        with safe_open(str(path), framework="pt") as f:
            f.get_tensor("b")
    with pytest.raises(CheckpointError):
        read_header(path)
