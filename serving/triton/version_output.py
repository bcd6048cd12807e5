"""The weights version on each response, in the two forms a model can declare. Pure (numpy only).

* :data:`VERSION_OUTPUT` (``TYPE_STRING``, dims ``[1]``): the version as a string. The Python stub sends
  strings by serializing a numpy object array; Triton 2.51's stub does that with the numpy 1 ABI, and under
  numpy 2 it sends every numpy-built output as zero bytes (clients cannot decode them).
* :data:`VERSION_UTF8_OUTPUT` (``TYPE_UINT8``, dims ``[width]``): the version's UTF-8 bytes, zero-padded to
  ``width``. It is a plain tensor, sent through DLPack like the model's own outputs, so it arrives intact
  under numpy 1 and numpy 2 alike. Read it with :func:`decode_utf8`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

VERSION_OUTPUT = "HOTSWAP_WEIGHTS_VERSION"
VERSION_UTF8_OUTPUT = "HOTSWAP_WEIGHTS_VERSION_UTF8"
#: allowed widths of :data:`VERSION_UTF8_OUTPUT` (bytes per row)
MIN_UTF8_WIDTH = 8
MAX_UTF8_WIDTH = 4096


def encode_utf8(version: str, width: int) -> tuple[bytes, bool]:
    """``version`` as UTF-8, zero-padded to ``width`` bytes, and whether it had to be cut.

    A version longer than ``width`` is cut on a character boundary (never half a character).
    """
    raw = version.encode("utf-8")
    cut = len(raw) > width
    if cut:
        raw = raw[:width].decode("utf-8", "ignore").encode("utf-8")
    return raw.ljust(width, b"\0"), cut


def decode_utf8(row: Iterable[int] | bytes | np.ndarray) -> str:
    """The version one row of :data:`VERSION_UTF8_OUTPUT` carries (what a client does with the output)."""
    data = row if isinstance(row, bytes) else np.asarray(row, dtype=np.uint8).tobytes()
    return data.rstrip(b"\0").decode("utf-8")


def string_output_problem(numpy_version: str, *, utf8_declared: bool) -> str:
    """'' when the stub can send :data:`VERSION_OUTPUT` under this numpy, else what happens and the fix.

    A round trip inside the stub does not show the fault (``as_numpy`` gives back the array it was built
    from), so this goes by the numpy version the stub runs with.
    """
    if int(numpy_version.split(".")[0]) < 2:
        return ""
    head = (f"numpy {numpy_version}: Triton 2.51's Python stub (built for numpy 1) sends the {VERSION_OUTPUT} "
            "output as zero bytes, which clients cannot decode")
    if utf8_declared:
        return (f"{head}; it is left out of responses, and the version travels in {VERSION_UTF8_OUTPUT} "
                "(UTF-8 bytes, sent through DLPack)")
    return (f"{head}. Declare {{ name: \"{VERSION_UTF8_OUTPUT}\", data_type: TYPE_UINT8, dims: [ 64 ] }} "
            "instead (UTF-8 bytes, sent through DLPack, read with serving.triton.version_output.decode_utf8), "
            "or install numpy<2 where the stub runs")
