"""tests/deploy: the deployment files checked with the real tools (promtool, prometheus, kubectl
kustomize, kubernetes-validate, check-jsonschema, hadolint). A missing tool skips its tests locally
and fails them on CI (CI=true)."""

from __future__ import annotations

import sys
from pathlib import Path

# promkit is imported by plain name here and from tests/integration/test_prometheus.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
