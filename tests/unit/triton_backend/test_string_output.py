"""The version output under numpy 2: a warning naming the fix (Triton 2.51's stub sends it as zero bytes)."""

from __future__ import annotations

from serving.triton.model import string_output_warning


def test_numpy_1_is_quiet() -> None:
    assert string_output_warning("1.26.4") == ""


def test_numpy_2_warns_with_the_fix() -> None:
    warning = string_output_warning("2.1.3")
    assert "numpy 2.1.3" in warning and "HOTSWAP_WEIGHTS_VERSION" in warning
    assert "numpy<2" in warning and "remove the output" in warning
