"""``hotswap serve`` with two models, one whose factory cannot be imported: the error names that one, whether it
fails while its weights folder is seeded (before Triton starts) or in Triton's initialize."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving.triton.server import free_port

from .conftest import REPOSITORY

pytestmark = pytest.mark.integration

BAD = "my_bert"
IMPORT_ERROR = f"model '{BAD}': model factory 'nosuch.module:build': cannot import 'nosuch.module'"


def two_models(tmp_path: Path) -> Path:
    """The example CNN (one instance) as ``cnn``, and a copy of it whose factory does not exist."""
    repo = tmp_path / "repo"
    for name in ("cnn", BAD):
        shutil.copytree(REPOSITORY / "tiny_cnn", repo / name)
        config = repo / name / "config.pbtxt"
        text = config.read_text().replace('name: "tiny_cnn"', f'name: "{name}"').replace("count: 2", "count: 1")
        if name == BAD:
            text = text.replace("serving.examples.cnn:tiny_cnn", "nosuch.module:build")
        config.write_text(text)
    return repo


def serve(tmp_path: Path, repo: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
    env.update({k: str(free_port()) for k in ("TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT")})
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--model-repository", str(repo), "--weights-root",
           str(tmp_path / "weights"), "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "run"),
           "--ready-timeout", "180"]
    return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)


def test_seeding_names_the_model_whose_factory_cannot_be_imported(tmp_path: Path) -> None:
    done = serve(tmp_path, two_models(tmp_path))
    assert done.returncode == 2, done.stdout[-3000:]
    assert f"hotswap: error: {IMPORT_ERROR}" in done.stdout, done.stdout[-3000:]
    assert "model 'cnn'" not in done.stdout


def test_triton_s_initialize_names_the_model_whose_factory_cannot_be_imported(tmp_path: Path) -> None:
    # a weights folder that has a checkpoint is not seeded, so the factory is first imported in Triton's stub
    folder = tmp_path / "weights" / BAD
    folder.mkdir(parents=True)
    shutil.copy(REPOSITORY / "tiny_cnn" / "config.pbtxt", folder / "v1.safetensors")  # never read
    done = serve(tmp_path, two_models(tmp_path))
    assert done.returncode == 1, done.stdout[-3000:]
    start = done.stdout.index("hotswap serve: a model failed to load")
    reason = done.stdout[start:done.stdout.index("\n\n", start)]  # the failure, not the server's log after it
    failed = [line.strip() for line in reason.splitlines()[1:] if line.startswith("  ") and ": " in line]
    assert failed and failed[0].startswith(f"{BAD}: ") and IMPORT_ERROR in failed[0], reason
    assert not any(line.startswith("cnn: ") for line in failed), reason
