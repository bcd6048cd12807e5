"""Helpers for the deployment checks: PromQL expressions of the rules and the dashboard,
and a real Prometheus server (Debian's ``prometheus`` binary) on a loopback port.

Used by tests/deploy and by tests/integration/test_prometheus.py (which puts this folder on sys.path).
"""

from __future__ import annotations

import importlib
import json
import math
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from system_tools import on_ci, require_tool  # tests/system_tools.py: skips naming the tool

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_TESTS_DIR = PROMETHEUS_DIR / "tests"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "hotswap.json"
K8S_DIR = DEPLOY / "k8s"
COMPOSE_DIR = DEPLOY / "compose"
SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"

#: the scrape job of Triton, in deploy/prometheus/prometheus.yml and (as the job label) on Kubernetes
TRITON_JOB = "triton-hotswap"

#: Grafana's variables, replaced before a dashboard expression goes to Prometheus (longest first)
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "${model}": ".+",
    "$model": ".+",
}

_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$")


def require_module(name: str) -> Any:
    """Import a module; skips the test when it is missing, but fails it on CI (CI=true)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        msg = f"Python module {name} is not installed (the `test` extra of pyproject.toml)"
        if on_ci():
            pytest.fail(msg + "; CI must install it")
        pytest.skip(msg)


def run_tool(args: list[str], cwd: Path | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output, with a bounded time."""
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


# ---------------------------------------------------------------- expressions


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def rules() -> list[dict[str, Any]]:
    """Every rule of every rule file."""
    out: list[dict[str, Any]] = []
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.extend(group["rules"])
    return out


def rule_expressions() -> list[tuple[str, str]]:
    """(rule name, PromQL) for every recording and alerting rule."""
    return [(r.get("record") or r["alert"], str(r["expr"])) for r in rules()]


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def dashboard_expressions(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(where, raw expression) for every PromQL expression of a Grafana dashboard: panel targets,
    annotation queries and query variables (``label_values(sel, label)`` becomes
    ``count by (label) (sel)``)."""
    dash = json.loads(path.read_text())
    out: list[tuple[str, str]] = []
    for p in _panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((f"panel {p['id']} {p.get('title', '')!r} ref {t.get('refId')}", t["expr"]))
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append((f"annotation {a['name']!r}", a["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        text = q.get("query", "") if isinstance(q, dict) else str(q or "")
        m = _LABEL_VALUES.match(text)
        out.append((f"variable {v['name']!r}", f"count by ({m['label']}) ({m['selector']})" if m else text))
    return out


def substitute(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by values Prometheus accepts."""
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def all_expressions() -> list[tuple[str, str]]:
    """Rule expressions and substituted dashboard expressions, ready for Prometheus."""
    return rule_expressions() + [(w, substitute(e)) for w, e in dashboard_expressions()]


# ---------------------------------------------------------------- a real Prometheus


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_config(target: str, interval: str = "1s") -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the Triton job pointed at ``target`` (host:port), the
    other jobs dropped, fast scrape and rule evaluation, and the rule files by absolute path."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == TRITON_JOB]
    assert jobs, f"deploy/prometheus/prometheus.yml has no {TRITON_JOB!r} job"
    job = dict(jobs[0], static_configs=[{"targets": [target]}], scrape_interval=interval,
               scrape_timeout=interval)
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files()],
        "scrape_configs": [job],
    }


class PrometheusServer:
    """``prometheus`` on 127.0.0.1:<free port> with a given config; always stop() it (or use ``with``)."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.binary = require_tool("prometheus")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config_path}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        try:
            self.wait(lambda: self._get("/-/ready") is not None, timeout, "Prometheus ready")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = r.read().decode()
        except urllib.error.HTTPError as e:  # 400/422: PromQL errors come back as JSON
            body = e.read().decode()
        except OSError:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return body

    def query(self, expr: str) -> dict[str, Any]:
        """The /api/v1/query answer (status, data or errorType/error)."""
        answer = self._get("/api/v1/query", {"query": expr})
        if not isinstance(answer, dict):
            raise AssertionError(f"no JSON answer from Prometheus for {expr!r}: {answer!r}")
        return answer

    def vector(self, expr: str) -> list[dict[str, Any]]:
        """Result of an instant query that must succeed."""
        answer = self.query(expr)
        assert answer.get("status") == "success", f"{expr!r}: {answer}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        answer = self._get("/api/v1/alerts")
        assert isinstance(answer, dict) and answer.get("status") == "success", answer
        result: list[dict[str, Any]] = answer["data"]["alerts"]
        return result

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.log_tail()}")
            time.sleep(0.25)

    def wait_scrapes(self, n: int = 3, timeout: float = 30.0) -> None:
        """Wait until the Triton target has been scraped successfully ``n`` more times."""
        def count() -> float:
            r = self.vector(f'count_over_time(up{{job="{TRITON_JOB}"}}[1h])')
            return float(r[0]["value"][1]) if r else 0.0

        start = count()
        self.wait(lambda: count() >= start + n and self.vector(f'up{{job="{TRITON_JOB}"}} == 1'),
                  timeout, f"{n} scrapes of {TRITON_JOB}")


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    """The finite sample values of an instant-vector result."""
    values = [float(s["value"][1]) for s in result]
    return [v for v in values if math.isfinite(v)]


def evaluate_all(prom: PrometheusServer, expressions: list[tuple[str, str]]) -> dict[str, list[dict[str, Any]]]:
    """Evaluate every expression; fail listing every one Prometheus refused."""
    failures: list[str] = []
    results: dict[str, list[dict[str, Any]]] = {}
    for where, expr in expressions:
        answer = prom.query(expr)
        if answer.get("status") != "success":
            failures.append(f"{where}: {expr!r}: {answer.get('errorType')}: {answer.get('error')}")
        else:
            results[where] = answer["data"]["result"]
    assert not failures, "Prometheus refused:\n" + "\n".join(failures)
    return results
