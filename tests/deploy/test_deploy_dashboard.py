"""Grafana dashboard and provisioning: structure, the panels the issue asks for, and every PromQL
expression parsed by promtool (Grafana itself cannot run here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import promkit
import pytest
import yaml
from system_tools import require_tool

GRAFANA = promkit.DEPLOY / "grafana"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(promkit.DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "hotswap" and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], int] = {}
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"panel {p['id']} leaves the 24-column grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap at {(x, y)}"
                cells[(x, y)] = p["id"]
    for p in _panels(dashboard):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["includeAll"] and variables["model"]["allValue"] == ".+"


def test_dashboard_has_the_required_panels(dashboard: dict[str, Any]) -> None:
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in _panels(dashboard)}
    kinds = {p["title"]: p["type"] for p in _panels(dashboard)}

    def find(*needles: str) -> list[str]:
        return [t for t, e in exprs.items() if all(n in e for n in needles)]

    live = find("hotswap_weights_info")
    assert any(kinds[t] == "table" for t in live), "live weights version per instance must be a table"
    assert find("p50_1h") and find("p99_1h"), "refit latency p50 and p99 by stage"
    assert all("stage" in exprs[t] or "p50_1h" in exprs[t] or "p99_1h" in exprs[t] for t in find("refit_duration"))
    assert find("hotswap_refits_total", "outcome", "reason"), "refits by outcome and reason"
    assert find("hotswap_engine_cache"), "cache hits"
    assert find("since_last_refit_success") or find("hotswap_last_refit_success_timestamp_seconds")
    assert find("nv_inference_request_success"), "Triton request rate"
    assert find("nv_inference_request_duration_us"), "Triton request latency"
    names = {a["name"] for a in dashboard["annotations"]["list"]}
    assert "Weight swaps" in names, "swaps must show as annotations over the traffic panels"


def test_dashboard_expressions_parse_with_promtool(tmp_path: Path) -> None:
    """Each expression (Grafana variables substituted) as a recording rule through promtool check rules."""
    promtool = require_tool("promtool")
    exprs = promkit.dashboard_expressions()
    assert len(exprs) >= 15
    rules = []
    for i, (where, raw) in enumerate(exprs):
        expr = promkit.substitute(raw)
        assert "$" not in expr, f"{where}: unsubstituted Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:expr_{i}:check", "expr": expr})
    path = tmp_path / "dashboard-exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = promkit.run_tool([promtool, "check", "rules", str(path)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rejects_a_broken_expression(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"record": "a:b:c", "expr": "sum by (model (rate(hotswap_refits_total[5m]))"}]}]}))
    assert promkit.run_tool([promtool, "check", "rules", str(path)]).returncode != 0


def test_grafana_provisioning_matches_compose() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "hotswap.yml").read_text())
    (provider,) = prov["providers"]
    compose = yaml.safe_load((promkit.COMPOSE_DIR / "compose.yaml").read_text())
    grafana_mounts = {m["target"]: m["source"] for m in compose["services"]["grafana"]["volumes"]
                      if m["type"] == "bind"}
    assert grafana_mounts[provider["options"]["path"]] == "../grafana/dashboards"
    assert grafana_mounts["/etc/grafana/provisioning"] == "../grafana/provisioning"
    assert "prometheus" in compose["services"] and "9090" in compose["services"]["prometheus"]["ports"][0]
