"""Render deploy/prometheus/rules/*.yml as the Prometheus Operator's PrometheusRule for deploy/k8s/base.

The rule files are the single source; the PrometheusRule is generated so the two never drift
(tests/deploy checks that the committed manifest equals this script's output).

    python deploy/prometheus/render_prometheusrule.py --write   # regenerate the manifest
    python deploy/prometheus/render_prometheusrule.py --check   # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES_DIR = HERE / "rules"
MANIFEST = HERE.parent / "k8s" / "base" / "prometheusrule.yaml"

HEADER = (
    "# GENERATED from deploy/prometheus/rules/*.yml by deploy/prometheus/render_prometheusrule.py;\n"
    "# edit the rule files and run `python deploy/prometheus/render_prometheusrule.py --write`.\n"
    "# Your Prometheus' ruleSelector must match these labels (kube-prometheus-stack selects\n"
    "# `release: <helm release>` by default: add that label in an overlay).\n"
)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings (PromQL) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def rule_groups(rules_dir: Path = RULES_DIR) -> list[dict[str, Any]]:
    """Every group of every rule file, in file-name order."""
    groups: list[dict[str, Any]] = []
    for path in sorted(rules_dir.glob("*.yml")):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    return groups


def render(rules_dir: Path = RULES_DIR) -> str:
    """The PrometheusRule manifest as YAML text."""
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "triton-hotswap",
            "labels": {"app.kubernetes.io/name": "triton-hotswap", "app.kubernetes.io/part-of": "hotswap"},
        },
        "spec": {"groups": rule_groups(rules_dir)},
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1 << 16, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {MANIFEST.name}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 if {MANIFEST.name} is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        MANIFEST.write_text(text)
    elif args.check:
        if not MANIFEST.exists() or MANIFEST.read_text() != text:
            print(f"{MANIFEST} is stale: run python deploy/prometheus/render_prometheusrule.py --write",
                  file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
