"""The version on responses: the UTF-8 bytes form (sent through DLPack) and when the string form cannot be sent."""

from __future__ import annotations

import numpy as np
import pytest

from serving.triton.version_output import (
    VERSION_OUTPUT,
    VERSION_UTF8_OUTPUT,
    decode_utf8,
    encode_utf8,
    string_output_problem,
)


@pytest.mark.parametrize("version", ["v7", "initial", "model-2026-12-04T10:00:00", "ß-ünïcode-版本", ""])
def test_utf8_round_trip(version: str) -> None:
    data, cut = encode_utf8(version, 64)
    assert len(data) == 64 and not cut
    assert decode_utf8(data) == version
    assert decode_utf8(np.frombuffer(data, dtype=np.uint8)) == version  # a row as the client gets it


def test_a_long_version_is_cut_on_a_character_boundary() -> None:
    data, cut = encode_utf8("ab版本", 4)  # 'ab' then a 3-byte character that does not fit whole
    assert cut and data == b"ab\0\0" and decode_utf8(data) == "ab"
    data, cut = encode_utf8("abcdefgh", 8)
    assert not cut and decode_utf8(data) == "abcdefgh"


def test_numpy_1_sends_the_string() -> None:
    assert string_output_problem("1.26.4", utf8_declared=False) == ""
    assert string_output_problem("1.26.4", utf8_declared=True) == ""


def test_numpy_2_without_the_utf8_output_names_the_fix() -> None:
    problem = string_output_problem("2.1.3", utf8_declared=False)
    assert "numpy 2.1.3" in problem and VERSION_OUTPUT in problem and "zero bytes" in problem
    assert VERSION_UTF8_OUTPUT in problem and "TYPE_UINT8" in problem and "numpy<2" in problem


def test_numpy_2_with_the_utf8_output_leaves_the_string_out() -> None:
    problem = string_output_problem("2.0.0", utf8_declared=True)
    assert "left out of responses" in problem and VERSION_UTF8_OUTPUT in problem
