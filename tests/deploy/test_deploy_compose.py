"""Compose files: parsed with PyYAML, validated against the Compose specification's JSON schema
(bundled in check-jsonschema), and checked for the services, ports and mounts (no container engine here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import promkit
import pytest
import yaml
from system_tools import require_tool

COMPOSE = promkit.COMPOSE_DIR / "compose.yaml"
COMPOSE_GPU = promkit.COMPOSE_DIR / "compose.gpu.yaml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _binds(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """target -> long-syntax volume entry."""
    return {v["target"]: v for v in service["volumes"]}


def _source(entry: dict[str, Any]) -> Path:
    src = entry["source"]
    if src.startswith("${"):  # ${VAR:-default}
        src = src.split(":-", 1)[1].rstrip("}")
    return (promkit.COMPOSE_DIR / src).resolve()


def test_compose_files_match_the_compose_spec() -> None:
    tool = require_tool("check-jsonschema")
    r = promkit.run_tool([tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE), str(COMPOSE_GPU)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_schema_check_rejects_a_typo(tmp_path: Path, compose: dict[str, Any]) -> None:
    tool = require_tool("check-jsonschema")
    bad = dict(compose, services=dict(compose["services"], triton=dict(compose["services"]["triton"], shm_sise="1gb")))
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(bad))
    r = promkit.run_tool([tool, "--builtin-schema", "vendor.compose-spec", str(path)])
    assert r.returncode != 0 and "shm_sise" in r.stdout + r.stderr


def test_services_and_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"triton", "prometheus", "grafana", "pushgateway"} <= set(services)
    triton = services["triton"]
    assert {"127.0.0.1:8000:8000", "127.0.0.1:8001:8001", "127.0.0.1:8002:8002"} <= set(triton["ports"])
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert triton["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (promkit.COMPOSE_DIR / triton["build"]["context"] / triton["build"]["dockerfile"]).resolve().is_file()
    assert triton["shm_size"], "the Python backend needs more than Docker's 64 MB /dev/shm"


def test_triton_mounts(compose: dict[str, Any]) -> None:
    triton = compose["services"]["triton"]
    binds = _binds(triton)
    models = binds["/models"]
    assert models["type"] == "bind" and models["read_only"] is True
    repo = _source(models)
    assert repo == (promkit.REPO / "model_repository").resolve()
    assert {"tiny_transformer", "tiny_cnn"} <= {p.name for p in repo.iterdir() if (p / "config.pbtxt").exists()}
    weights = binds["/weights"]
    assert weights["type"] == "bind"
    assert not _source(weights).is_relative_to(repo), "the weights folder must be outside the model repository"
    assert binds["/cache"]["type"] == "volume" and binds["/cache"]["source"] in compose["volumes"]
    env = triton["environment"]
    assert env["HOTSWAP_WEIGHTS_ROOT"] == "/weights" and env["HOTSWAP_CACHE_DIR"] == "/cache"


def test_prometheus_and_grafana_mounts_exist(compose: dict[str, Any]) -> None:
    prom = _binds(compose["services"]["prometheus"])
    assert _source(prom["/etc/prometheus/prometheus.yml"]) == promkit.PROMETHEUS_DIR / "prometheus.yml"
    assert _source(prom["/etc/prometheus/rules"]) == promkit.RULES_DIR
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["services"]["prometheus"]["command"]
    for entry in _binds(compose["services"]["grafana"]).values():
        if entry["type"] == "bind":
            assert _source(entry).exists(), entry


def test_prometheus_scrapes_the_compose_services(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((promkit.PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    assert targets[promkit.TRITON_JOB] == ["triton:8002"]
    assert targets["pushgateway"] == ["pushgateway:9091"]
    for target in (t for ts in targets.values() for t in ts):
        host, port = target.split(":")
        published = {p.rsplit(":", 1)[1] for p in compose["services"][host].get("ports", [])}
        assert port in published, f"{target}: service {host} does not listen on {port}"
    # rule_files are relative to the config: rules/ next to it, as mounted in the container
    assert config["rule_files"] == ["rules/*.yml"]


def test_gpu_override(compose: dict[str, Any]) -> None:
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())["services"]["triton"]
    assert gpu["build"]["args"]["HOTSWAP_EXTRAS"] == "tensorrt"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert compose["services"]["triton"]["build"]["args"]["HOTSWAP_EXTRAS"] == ""
