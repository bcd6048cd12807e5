"""Prometheus config and rules: promtool check config / check rules / test rules, rule coverage, and
the generated PrometheusRule and ServiceMonitor staying in step with the Compose files."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import promkit
import yaml
from system_tools import require_tool

from serving.metrics import DEFINITIONS

#: Triton 2.51 (24.10) request metrics (docs: user_guide/metrics.md, "Inference Request Metrics")
TRITON_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
}
#: announced by the publisher through the Pushgateway (deploy/README.md, "Publishing")
PUBLISHER_METRICS = {"hotswap_published_weights_info"}


def _render_module() -> ModuleType:
    path = promkit.PROMETHEUS_DIR / "render_prometheusrule.py"
    spec = importlib.util.spec_from_file_location("render_prometheusrule", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unit_tests() -> list[dict]:
    tests: list[dict] = []
    for path in sorted(promkit.RULE_TESTS_DIR.glob("*.yml")):
        tests.extend(yaml.safe_load(path.read_text())["tests"])
    return tests


def test_promtool_check_config() -> None:
    promtool = require_tool("promtool")
    r = promkit.run_tool([promtool, "check", "config", str(promkit.PROMETHEUS_DIR / "prometheus.yml")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(promkit.rule_files())} rule files found" in r.stdout + r.stderr


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    files = promkit.rule_files()
    assert len(files) >= 2
    r = promkit.run_tool([promtool, "check", "rules", *map(str, files)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_unit_tests_fire_the_alerts() -> None:
    promtool = require_tool("promtool")
    files = sorted(promkit.RULE_TESTS_DIR.glob("*.yml"))
    assert files
    r = promkit.run_tool([promtool, "test", "rules", *map(str, files)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """A wrong expectation makes promtool fail (the suite above is not vacuous)."""
    promtool = require_tool("promtool")
    src = promkit.RULE_TESTS_DIR / "hotswap-rules.test.yml"
    doc = yaml.safe_load(src.read_text())
    doc["rule_files"] = [str((src.parent / f).resolve()) for f in doc["rule_files"]]
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            if case["exp_alerts"]:
                case["exp_alerts"] = []  # claim that a firing alert stays quiet
    bad = tmp_path / "bad.test.yml"
    bad.write_text(yaml.safe_dump(doc))
    r = promkit.run_tool([promtool, "test", "rules", str(bad)])
    assert r.returncode != 0
    assert "FAILED" in r.stdout + r.stderr


def test_every_alert_fires_and_stays_quiet_in_a_unit_test() -> None:
    alerts = {r["alert"] for r in promkit.rules() if "alert" in r}
    assert {"HotswapRefitFailed", "HotswapRefitRejected", "HotswapFleetVersionSkew",
            "HotswapPublishedVersionNotLive", "HotswapRefitLatencyHigh"} <= alerts
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in _unit_tests():
        for case in test.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    assert alerts - fired == set(), f"alerts never fired by a unit test: {sorted(alerts - fired)}"
    assert alerts - quiet == set(), f"alerts without a must-stay-quiet case: {sorted(alerts - quiet)}"
    assert fired | quiet <= alerts, f"tests name unknown alerts: {sorted((fired | quiet) - alerts)}"


def test_every_recording_rule_is_pinned_by_a_unit_test() -> None:
    records = {r["record"] for r in promkit.rules() if "record" in r}
    pinned = {case["expr"] for test in _unit_tests() for case in test.get("promql_expr_test", [])
              if case.get("exp_samples")}
    assert records - pinned == set(), f"recording rules without a promql_expr_test: {sorted(records - pinned)}"


def test_rules_and_dashboard_use_only_exported_metrics() -> None:
    """Every hotswap_*/nv_* name is one serving/metrics.py or Triton exports (or the publisher's),
    and every level:metric:op name is a recording rule."""
    exported = set()
    for d in DEFINITIONS:
        exported.add(d.name)
        if d.kind == "histogram":
            exported |= {f"{d.name}_bucket", f"{d.name}_sum", f"{d.name}_count"}
    known = exported | TRITON_METRICS | PUBLISHER_METRICS
    records = {r["record"] for r in promkit.rules() if "record" in r}
    problems = []
    recorded = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")
    for where, expr in promkit.rule_expressions() + promkit.dashboard_expressions():
        for name in recorded.findall(expr):
            if name not in records:
                problems.append(f"{where}: {name} is not a recording rule")
        for name in re.findall(r"\b(?:hotswap|nv)_[a-z0-9_]+\b", recorded.sub(" ", expr)):
            if name not in known:
                problems.append(f"{where}: unknown metric {name}")
    assert not problems, "\n".join(problems)


def test_prometheusrule_manifest_is_generated_from_the_rule_files() -> None:
    render = _render_module()
    manifest = promkit.K8S_DIR / "base" / "prometheusrule.yaml"
    assert manifest.read_text() == render.render(), (
        "deploy/k8s/base/prometheusrule.yaml is stale: python deploy/prometheus/render_prometheusrule.py --write")
    groups = yaml.safe_load(manifest.read_text())["spec"]["groups"]
    from_files = [g for p in promkit.rule_files() for g in yaml.safe_load(p.read_text())["groups"]]
    assert groups == from_files


def test_servicemonitor_relabels_like_the_compose_prometheus() -> None:
    config = yaml.safe_load((promkit.PROMETHEUS_DIR / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == promkit.TRITON_JOB)
    sm = yaml.safe_load((promkit.K8S_DIR / "base" / "servicemonitor.yaml").read_text())
    keys = {"source_labels": "sourceLabels", "target_label": "targetLabel", "regex": "regex",
            "action": "action", "replacement": "replacement", "separator": "separator"}
    compose = [{keys[k]: v for k, v in c.items()} for c in job["metric_relabel_configs"]]
    for c in compose:
        c.setdefault("action", "replace")
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["metricRelabelings"] == compose
    # the rules rely on these names
    assert any(c.get("targetLabel") == "model_instance" for c in compose)
    assert sm["spec"]["podTargetLabels"] == ["track"]
