"""Content identity of the weights the watcher installs."""

from __future__ import annotations

import hashlib


def merged_hash(base_hash: str | None, adapter_hash: str | None, scale: float) -> str | None:
    """Content hash of base weights with an adapter merged at ``scale`` (None if either is unknown)."""
    if base_hash is None or adapter_hash is None:
        return None
    return hashlib.sha256(f"{base_hash}|lora:{adapter_hash}|scale:{scale!r}".encode()).hexdigest()
