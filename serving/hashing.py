"""The one plain file digest: sha256 of a file's bytes, read in chunks (manifests, cache entries)."""

from __future__ import annotations

import hashlib
from pathlib import Path

#: bytes read per call; large enough that the digest, not the calls, costs the time
READ_BYTES = 4 << 20


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_BYTES):
            h.update(chunk)
    return h.hexdigest()
