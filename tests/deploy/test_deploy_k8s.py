"""Kubernetes manifests: rendered with the real kustomize (`kubectl kustomize`), core kinds validated
offline against the Kubernetes JSON schemas bundled in kubernetes-validate, the Prometheus Operator
kinds against the CRD schema subsets in tests/deploy/schemas, and the deployment rules checked."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import promkit
import pytest
import yaml
from system_tools import require_tool

OVERLAYS = {
    "base": promkit.K8S_DIR / "base",
    "gpu": promkit.K8S_DIR / "overlays" / "gpu",
    "gpu-object-store": promkit.K8S_DIR / "overlays" / "gpu-object-store",
}
#: oldest and newest Kubernetes releases validated against
K8S_VERSIONS = ("1.29.0", "1.37.0")
CRD_SCHEMAS = {
    "ServiceMonitor": promkit.SCHEMAS_DIR / "servicemonitor.monitoring.coreos.com-v1.json",
    "PrometheusRule": promkit.SCHEMAS_DIR / "prometheusrule.monitoring.coreos.com-v1.json",
}
SYNC_SCRIPT = promkit.K8S_DIR / "components" / "object-store-sync" / "sync.sh"


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = require_tool("kubectl")
    r = promkit.run_tool([kubectl, "kustomize", str(path)])
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(path) for name, path in OVERLAYS.items()}


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _triton(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "triton"]
    return c


def _volumes(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}


def _mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container["volumeMounts"]}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_kinds_validate_against_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]],
                                                        version: str) -> None:
    kubernetes_validate = promkit.require_module("kubernetes_validate")
    problems = []
    count = 0
    for name, docs in rendered.items():
        for doc in docs:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue
            count += 1
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {e.message}")
    assert count >= 18
    assert not problems, "\n".join(problems)


def test_kubernetes_schemas_reject_a_typo(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kubernetes_validate = promkit.require_module("kubernetes_validate")
    deployment = copy.deepcopy(_by_kind(rendered["base"], "Deployment")[0])
    _triton(deployment)["readinesProbe"] = _triton(deployment).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_operator_kinds_validate_against_crd_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    seen = set()
    for docs in rendered.values():
        for doc in docs:
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                schema = json.loads(CRD_SCHEMAS[doc["kind"]].read_text())
                jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
                seen.add(doc["kind"])
    assert seen == set(CRD_SCHEMAS)


def test_crd_schemas_reject_a_typo(rendered: dict[str, list[dict[str, Any]]]) -> None:
    sm = copy.deepcopy(_by_kind(rendered["base"], "ServiceMonitor")[0])
    sm["spec"]["endpoints"][0]["metricRelabellings"] = sm["spec"]["endpoints"][0].pop("metricRelabelings")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(sm, json.loads(CRD_SCHEMAS["ServiceMonitor"].read_text()))
    rule = copy.deepcopy(_by_kind(rendered["base"], "PrometheusRule")[0])
    rule["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, json.loads(CRD_SCHEMAS["PrometheusRule"].read_text()))


def test_deployments_follow_the_serving_rules(rendered: dict[str, list[dict[str, Any]]]) -> None:
    models = {p.name for p in (promkit.REPO / "model_repository").iterdir() if (p / "config.pbtxt").exists()}
    for name, docs in rendered.items():
        deployments = _by_kind(docs, "Deployment")
        assert {d["metadata"]["name"] for d in deployments} == {"triton-hotswap", "triton-hotswap-canary"}
        for d in deployments:
            where = f"{name}/{d['metadata']['name']}"
            c = _triton(d)
            ready = c["readinessProbe"]["httpGet"]["path"]
            assert ready.startswith("/v2/models/") and ready.endswith("/ready"), where
            assert ready.split("/")[3] in models, f"{where}: readiness on unknown model {ready}"
            assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
            assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 300
            assert "--model-control-mode=none" in c["args"] and not any("poll" in a for a in c["args"])
            env = {e["name"]: e["value"] for e in c["env"]}
            mounts = _mounts(c)
            volumes = _volumes(d)
            assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory", where
            assert env["HOTSWAP_WEIGHTS_ROOT"] in mounts and env["HOTSWAP_CACHE_DIR"] in mounts
            assert env["HOTSWAP_WATCH_MODE"] == "polling", f"{where}: network storage needs the polling watcher"
            weights = volumes[mounts[env["HOTSWAP_WEIGHTS_ROOT"]]["name"]]
            if name == "gpu-object-store":
                assert "emptyDir" in weights and "persistentVolumeClaim" not in weights
            else:
                (pvc,) = _by_kind(docs, "PersistentVolumeClaim")
                assert weights["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
                assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
            track = d["spec"]["template"]["metadata"]["labels"]["track"]
            assert mounts[env["HOTSWAP_WEIGHTS_ROOT"]]["subPath"] == track, f"{where}: weights folder of its track"
            pod = d["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
            if name.startswith("gpu"):
                assert gpus == 1 and c["image"].endswith(":26.03"), where
                assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
            else:
                assert gpus is None and c["image"].endswith(":24.10-cpu"), where


def test_canary_differs_from_the_fleet_only_where_intended() -> None:
    stable = yaml.safe_load((OVERLAYS["base"] / "deployment.yaml").read_text())
    canary = yaml.safe_load((OVERLAYS["base"] / "deployment-canary.yaml").read_text())
    assert stable["spec"]["replicas"] >= 2 and canary["spec"]["replicas"] == 1

    def normalized(d: dict[str, Any], track: str) -> str:
        text = json.dumps(d["spec"]["template"], sort_keys=True)
        return text.replace(f'"track": "{track}"', '"track": "T"').replace(f'"subPath": "{track}"', '"subPath": "T"')

    assert normalized(stable, "stable") == normalized(canary, "canary")


def test_service_and_servicemonitor_select_the_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["base"]
    (svc,) = _by_kind(docs, "Service")
    (sm,) = _by_kind(docs, "ServiceMonitor")
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    for d in _by_kind(docs, "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert set(sm["spec"]["podTargetLabels"]) <= set(labels)
        container_ports = {p["name"] for p in _triton(d)["ports"]}
        assert set(ports) <= container_ports
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == promkit.TRITON_JOB, "job label used by the alerts"
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] != "Namespace"} == {"hotswap"}


def test_object_store_component(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["gpu-object-store"]
    assert not _by_kind(docs, "PersistentVolumeClaim")
    configmaps = {c["metadata"]["name"]: c for c in _by_kind(docs, "ConfigMap")}
    for d in _by_kind(docs, "Deployment"):
        pod = d["spec"]["template"]["spec"]
        sidecars = [c for c in pod["containers"] if c["name"] == "weights-sync"]
        inits = [c for c in pod.get("initContainers", []) if c["name"] == "weights-sync-init"]
        assert sidecars and inits
        script = _volumes(d)["weights-sync"]["configMap"]["name"]
        assert configmaps[script]["data"]["sync.sh"] == SYNC_SCRIPT.read_text()
        for c in sidecars + inits:
            assert _mounts(c)["/weights"]["name"] == _mounts(_triton(d))["/weights"]["name"]


def _run_sync(tmp_path: Path, bucket: Path) -> subprocess.CompletedProcess[str]:
    """sync.sh once, with an `aws` stub that copies a local folder (the "bucket") into staging."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    aws = bin_dir / "aws"
    aws.write_text('#!/bin/sh\n# aws s3 sync SRC DST [flags]\nmkdir -p "$4" && cp -Rp "$3"/. "$4"/\n')
    aws.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOTSWAP_WEIGHTS_URL=str(bucket),
               HOTSWAP_SYNC_ONCE="1", HOTSWAP_SYNC_STAGING=str(tmp_path / "staging"),
               HOTSWAP_SYNC_WEIGHTS=str(tmp_path / "weights"))
    return subprocess.run(["/bin/sh", str(SYNC_SCRIPT)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def test_sync_script_publishes_complete_files_only(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    (bucket / "stable" / "tiny_cnn").mkdir(parents=True)
    (bucket / "canary" / "tiny_cnn").mkdir(parents=True)
    (bucket / "stable" / "tiny_cnn" / "v1.safetensors").write_bytes(b"one")
    (bucket / "canary" / "tiny_cnn" / "v2.safetensors").write_bytes(b"two")
    r = _run_sync(tmp_path, bucket)
    assert r.returncode == 0, r.stderr
    weights = tmp_path / "weights"
    assert (weights / "stable" / "tiny_cnn" / "v1.safetensors").read_bytes() == b"one"
    assert (weights / "canary" / "tiny_cnn" / "v2.safetensors").read_bytes() == b"two"
    assert [p.name for p in (weights / "stable" / "tiny_cnn").iterdir()] == ["v1.safetensors"]
    assert [p.name for p in (weights / "canary" / "tiny_cnn").iterdir()] == ["v2.safetensors"]
    assert list((weights / ".sync-tmp").iterdir()) == []
    # a second run publishes nothing new; a re-uploaded (newer) file is published again
    assert "published" not in _run_sync(tmp_path, bucket).stdout
    newer = bucket / "stable" / "tiny_cnn" / "v1.safetensors"
    newer.write_bytes(b"one again")
    os.utime(newer, (newer.stat().st_atime + 60, newer.stat().st_mtime + 60))
    r = _run_sync(tmp_path, bucket)
    assert r.returncode == 0 and "published stable/tiny_cnn/v1.safetensors" in r.stdout
    assert (weights / "stable" / "tiny_cnn" / "v1.safetensors").read_bytes() == b"one again"


def test_sync_script_fails_once_mode_when_the_store_fails(tmp_path: Path) -> None:
    r = _run_sync(tmp_path, tmp_path / "no-such-bucket")
    assert r.returncode == 1 and "failed" in r.stderr
