"""deploy/Dockerfile cannot be built here (no container engine): hadolint lints it, static checks hold
it to the deployment rules, its install step runs under bash with a stub python3, and its TensorRT
check (deploy/docker/check_tensorrt.py) runs for real."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import promkit
import pytest
import yaml
from packaging.requirements import Requirement
from system_tools import require_tool

DOCKERFILE = promkit.DEPLOY / "Dockerfile"
CHECK_TRT = promkit.DEPLOY / "docker" / "check_tensorrt.py"

#: (Triton container release, image flavour) -> its TensorRT release (Triton's compatibility.md, release notes,
#: Frameworks Support Matrix; deploy/README.md, docs/tensorrt.md)
TRITON_TENSORRT = {
    **{(f"26.0{m}", "trtllm-python-py3"): "10.14.1" for m in range(3, 8)},
    ("24.10", "py3"): "10.5.0",
}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) as Docker reads them: comment lines dropped (also inside continuations),
    a backslash-newline removed so continued lines join into one."""
    out: list[tuple[str, str]] = []
    buf: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if line.rstrip().endswith("\\"):
            buf.append(line.rstrip()[:-1])
            continue
        buf.append(line)
        keyword, _, args = "".join(buf).strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = []
    return out


@pytest.fixture(scope="module")
def parsed() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def _args(parsed: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for kw, a in parsed:
        if kw == "ARG":
            name, _, default = a.partition("=")
            out[name] = default
    return out


def test_hadolint() -> None:
    hadolint = require_tool("hadolint")
    r = promkit.run_tool([hadolint, "--no-color", str(DOCKERFILE)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    hadolint = require_tool("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nCMD tritonserver\n")
    r = promkit.run_tool([hadolint, "--no-color", str(bad)])
    assert r.returncode != 0 and "DL3006" in r.stdout  # untagged base image


def test_base_image_and_tensorrt_pin(parsed: list[tuple[str, str]]) -> None:
    args = _args(parsed)
    froms = [a for kw, a in parsed if kw == "FROM"]
    assert froms == ["nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-${TRITON_IMAGE_SUFFIX}"]
    assert re.fullmatch(r"\d\d\.\d\d", args["TRITON_VERSION"])
    assert TRITON_TENSORRT[args["TRITON_VERSION"], args["TRITON_IMAGE_SUFFIX"]] == args["TENSORRT_VERSION"], (
        "TENSORRT_VERSION must be the TensorRT of the base image (deploy/README.md says how to find it)")
    gpu = yaml.safe_load((promkit.COMPOSE_DIR / "compose.gpu.yaml").read_text())["services"]["triton"]
    for name in ("TRITON_VERSION", "TRITON_IMAGE_SUFFIX", "TENSORRT_VERSION"):
        assert gpu["build"]["args"][name] == args[name], f"compose.gpu.yaml {name} vs the Dockerfile's default"
    cpu = yaml.safe_load((promkit.COMPOSE_DIR / "compose.yaml").read_text())["services"]["triton"]
    assert (cpu["build"]["args"]["TRITON_VERSION"], cpu["build"]["args"]["TRITON_IMAGE_SUFFIX"]) in TRITON_TENSORRT


def test_pyproject_admits_the_pinned_tensorrt(parsed: list[tuple[str, str]]) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pinned = _args(parsed)["TENSORRT_VERSION"]
    extras = tomllib.loads((promkit.REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    reqs = [Requirement(r) for r in extras["tensorrt"] if Requirement(r).name == "tensorrt"]
    assert reqs and all(r.specifier.contains(pinned) for r in reqs), f"{[str(r) for r in reqs]} vs {pinned}"


def test_triton_command(parsed: list[tuple[str, str]]) -> None:
    (cmd,) = [a for kw, a in parsed if kw == "CMD"]
    flags = yaml.safe_load(cmd)  # the exec form is a JSON (so YAML) list
    assert flags[0] == "tritonserver"
    assert "--model-repository=/models" in flags
    modes = [f for f in flags if f.startswith("--model-control-mode=")]
    assert modes in (["--model-control-mode=none"], ["--model-control-mode=explicit"]), modes
    assert not any("poll" in f for f in flags), "poll mode reloads models under a refit"
    assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(flags)
    deployment = yaml.safe_load((promkit.K8S_DIR / "base" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == flags, "the Kubernetes args must repeat the image's command"


def test_image_layout(parsed: list[tuple[str, str]]) -> None:
    env = " ".join(a for kw, a in parsed if kw == "ENV")
    assert "HOTSWAP_WEIGHTS_ROOT=/weights" in env and "HOTSWAP_CACHE_DIR=/cache" in env
    (expose,) = [a for kw, a in parsed if kw == "EXPOSE"]
    assert expose.split() == ["8000", "8001", "8002"]
    (user,) = [a for kw, a in parsed if kw == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root user (Kubernetes runAsNonRoot)"
    args = _args(parsed)
    for kw, a in parsed:
        if kw == "COPY":
            *sources, _dest = a.split()
            for src in sources:
                src = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], src)
                assert (promkit.REPO / src).exists(), f"COPY source {src} is not in the repository"


def _install_block(parsed: list[tuple[str, str]]) -> str:
    (block,) = [a for kw, a in parsed if kw == "RUN" and "pip install" in a]
    return block


def _shell(parsed: list[tuple[str, str]]) -> list[str]:
    (shell,) = [a for kw, a in parsed if kw == "SHELL"]
    return list(yaml.safe_load(shell))


@pytest.mark.parametrize(("extras", "torch_index", "expect_spec", "expect_constraint"), [
    ("tensorrt", "", ".[tensorrt]", "tensorrt==10.14.1.*"),
    ("", "https://download.pytorch.org/whl/cpu", ".", ""),
])
def test_install_step_runs_under_the_image_shell(parsed: list[tuple[str, str]], tmp_path: Path, extras: str,
                                                 torch_index: str, expect_spec: str, expect_constraint: str) -> None:
    """The RUN that installs the package, executed by the Dockerfile's SHELL with python3 stubbed."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    log = tmp_path / "calls.log"
    stub = stub_dir / "python3"
    stub.write_text(
        "#!/bin/sh\n"
        f'echo "python3 $*" >> "{log}"\n'
        'prev=""; for a in "$@"; do\n'
        f'  if [ "$prev" = "--constraint" ]; then echo "constraint: $(cat "$a")" >> "{log}"; fi; prev="$a"\n'
        "done\n")
    stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{stub_dir}:{os.environ['PATH']}", HOTSWAP_EXTRAS=extras,
               TORCH_INDEX_URL=torch_index, TENSORRT_VERSION=_args(parsed)["TENSORRT_VERSION"])
    shell = _shell(parsed)
    r = subprocess.run([*shell, _install_block(parsed)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = log.read_text().splitlines()
    installs = [c for c in calls if c.startswith("python3 -m pip install --constraint")]
    assert installs == [f"python3 -m pip install --constraint constraints.txt {expect_spec}"], calls
    assert f"constraint: {expect_constraint}".rstrip() in [c.rstrip() for c in calls]
    assert ("python3 check_tensorrt.py" in calls) == bool(extras)
    assert any(c.startswith("python3 -m pip install --index-url") for c in calls) == bool(torch_index)
    assert not (tmp_path / "constraints.txt").exists()


def _check_trt(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHECK_TRT), *args], capture_output=True, text=True, timeout=60,
                          check=False, env=env if env is not None else {k: v for k, v in os.environ.items()
                                                                         if k != "TRT_VERSION"})


def test_check_tensorrt_accepts_the_matching_wheel(tmp_path: Path) -> None:
    # the default build: 26.03-trtllm-python-py3 ships 10.14.1.48, pip takes the wheel 10.14.1.48.post1
    (tmp_path / "libnvinfer.so.10.14.1").touch()
    (tmp_path / "libnvinfer.so.10").touch()
    r = _check_trt("--lib-dir", str(tmp_path), "--installed", "10.14.1.48.post1")
    assert r.returncode == 0, r.stderr
    assert "matches the base image's TensorRT 10.14.1" in r.stdout


def test_check_tensorrt_rejects_another_release(tmp_path: Path) -> None:
    (tmp_path / "libnvinfer.so.10.14.1").touch()
    r = _check_trt("--lib-dir", str(tmp_path), "--installed", "10.15.1.29")
    assert r.returncode == 1
    assert "tensorrt wheel 10.15.1.29 does not match" in r.stderr and "TENSORRT_VERSION=10.14.1" in r.stderr


def test_check_tensorrt_reads_trt_version_and_reports_a_missing_tensorrt(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRT_VERSION"}
    r = _check_trt("--lib-dir", str(tmp_path), "--installed", "10.14.1.48", env=dict(env, TRT_VERSION="10.14.1.48"))
    assert r.returncode == 0, r.stderr
    r = _check_trt("--lib-dir", str(tmp_path), "--installed", "10.14.1.48", env=env)
    assert r.returncode == 1 and "found no TensorRT in the base image" in r.stderr
