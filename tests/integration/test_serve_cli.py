"""``hotswap serve`` as an operator runs it: a failed model ends it with Triton's reason, SIGTERM leaves nothing."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import pids_where  # tests/processes.py

from serving.triton.server import free_port

from .conftest import REPOSITORY

pytestmark = pytest.mark.integration


def serve(tmp_path: Path, repo: Path) -> tuple[subprocess.Popen[str], dict[str, int]]:
    ports = {"TRITON_HTTP_PORT": free_port(), "TRITON_GRPC_PORT": free_port(), "TRITON_METRICS_PORT": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
    env.update({k: str(v) for k, v in ports.items()})
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--model-repository", str(repo), "--weights-root",
           str(tmp_path / "weights"), "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "run"),
           "--ready-timeout", "300"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, ports


def cnn_repository(tmp_path: Path) -> Path:
    """The example CNN alone, one instance (quick to start: eager, no compile)."""
    repo = tmp_path / "repo"
    shutil.copytree(REPOSITORY / "tiny_cnn", repo / "tiny_cnn")
    config = repo / "tiny_cnn" / "config.pbtxt"
    config.write_text(config.read_text().replace("count: 2", "count: 1"))
    return repo


def servers_under(root: Path) -> list[int]:
    """Processes (tritonserver and its Python stubs) whose command line points into ``root``."""
    return pids_where(lambda cmdline: str(root) in cmdline
                      and ("tritonserver" in cmdline or "triton_python_backend_stub" in cmdline))


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_a_model_triton_fails_to_load_ends_serve_promptly_with_its_reason(tmp_path: Path) -> None:
    repo = cnn_repository(tmp_path)
    folder = tmp_path / "weights" / "tiny_cnn"
    folder.mkdir(parents=True)
    (folder / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")  # nothing valid
    t0 = time.monotonic()
    proc, _ = serve(tmp_path, repo)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, out[-3000:]
    assert time.monotonic() - t0 < 120
    assert "hotswap serve: a model failed to load" in out and "tiny_cnn:" in out and "broken" in out, out[-3000:]
    assert not servers_under(tmp_path)


def test_sigterm_stops_triton_and_every_stub_and_frees_the_ports(tmp_path: Path) -> None:
    proc, ports = serve(tmp_path, cnn_repository(tmp_path))
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        seen.append(line)
        if "Triton is serving tiny_cnn" in line or time.monotonic() > deadline:
            break
    assert any("Triton is serving tiny_cnn" in s for s in seen), "".join(seen)[-3000:]
    banner = "".join(seen)
    assert "tiny_transformer" not in banner  # built from the repository served, not the example's
    assert len(servers_under(tmp_path)) >= 2, "tritonserver and its stub are running"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=90)
    deadline = time.monotonic() + 30
    while (servers_under(tmp_path) or not all(map(port_free, ports.values()))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not servers_under(tmp_path)
    assert all(port_free(p) for p in ports.values())
    assert not (tmp_path / "run" / "tmp").exists()
