"""Start a real Triton server from the ``nvidia-pytriton`` wheel (binary, libraries, Python stub).

Used by ``hotswap serve`` / ``make serve`` and by the integration tests. The server binds
to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.errors import ConfigError, EngineUnavailableError, for_model

INSTALL_HINT = "pip install 'trt-hotswap[triton]' (it brings nvidia-pytriton, which bundles tritonserver)"


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel keeps the server."""

    binary: Path
    libraries: Path
    python_backend: Path
    stub: Path


def find_triton() -> TritonInstall:
    """Locate tritonserver and the Python-backend stub for the running Python, or say how to install it."""
    import importlib.util

    # find_spec, not import: pytriton's own Python dependencies are not needed to run the server
    loaded = sys.modules.get("pytriton")
    if loaded is not None and getattr(loaded, "__path__", None):
        locations = list(loaded.__path__)
    else:
        spec = importlib.util.find_spec("pytriton")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise EngineUnavailableError(f"Triton is not installed: {INSTALL_HINT}")
    package = Path(locations[0])
    root = package / "tritonserver"
    libs = package.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(root / "bin" / "tritonserver", libs, root / "backends" / "python",
                            root / "python_backend_stubs" / version / "triton_python_backend_stub")
    missing = [str(p) for p in (install.binary, install.libraries, install.python_backend, install.stub)
               if not p.exists()]
    if missing:
        raise EngineUnavailableError(f"the pytriton wheel lacks {missing} for Python {version}: {INSTALL_HINT}")
    return install


def python_library_dirs() -> list[str]:
    """The running interpreter's libpython directory, when it is a shared build.

    The stub links ``libpython3.X.so``; without this it may find the system's copy (say Debian's
    3.11.2) while importing this interpreter's extension modules (say pyenv's 3.11.7), which fails
    with undefined symbols such as ``_PyModule_Add``.
    """
    import sysconfig

    libdir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and Path(libdir).is_dir():
        return [str(libdir)]
    return []


def prepare_backends(install: TritonInstall, dest: Path) -> Path:
    """A backend directory with the Python backend and the stub of the running Python."""
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for f in install.python_backend.iterdir():
        if f.is_file():
            shutil.copy2(f, python / f.name)
    shutil.copy2(install.stub, python / install.stub.name)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """config.pbtxt as the JSON dict Triton hands the Python backend."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    path = model_dir / "config.pbtxt"
    try:
        msg = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as e:
        raise ConfigError(f"{path}: cannot parse: {e}") from e
    config: dict[str, Any] = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    config.setdefault("name", model_dir.name)
    return config


def models_in(repository: Path) -> list[Path]:
    return sorted(p for p in repository.iterdir() if (p / "config.pbtxt").is_file())


def seed_weights(repository: Path, env: Mapping[str, str]) -> list[tuple[str, Path, bool]]:
    """Create each model's weights folder; write a random initial checkpoint where it is empty.

    Returns (model, folder, seeded) per model. Never touches a folder that already has files.
    """
    from serving.factory import add_search_paths, build_module, model_code_dirs
    from serving.settings import parse_settings
    from serving.weights.random_state import random_state_dict
    from serving.weights.writer import write_safetensors

    out = []
    for model_dir in models_in(repository):
        with for_model(model_dir.name):
            config = read_model_config(model_dir)
            params = {k: str(v.get("string_value", "")) for k, v in config.get("parameters", {}).items()}
            settings = parse_settings(params, model_name=model_dir.name, model_repository=repository, env=env)
            folder = settings.weights_dir
            try:
                folder.mkdir(parents=True, exist_ok=True)
                seeded = not any(p for p in folder.iterdir() if not p.name.startswith("."))
            except OSError as e:
                raise ConfigError(f"weights folder {folder}: {e}; create it (writable by the server's user) or "
                                  "set HOTSWAP_WEIGHTS_ROOT / weights_dir") from e
            if seeded:
                add_search_paths(*model_code_dirs(model_dir))  # as Triton imports it: the model's own code first
                module = build_module(settings.model_factory, dict(settings.factory_kwargs))
                write_safetensors(random_state_dict(module, seed=0), folder / "initial.safetensors",
                                  {"seed": "0", "factory": settings.model_factory})
        out.append((model_dir.name, folder, seeded))
    return out


class ModelLoadError(RuntimeError):
    """Triton failed to load one or more models; ``failed`` holds ``"name: reason"`` per model."""

    def __init__(self, failed: Sequence[str]) -> None:
        super().__init__("model(s) failed to load:\n" + "\n".join(f"  {f}" for f in failed))
        self.failed = list(failed)


class TritonProcess:
    """A tritonserver child process on loopback ports."""

    def __init__(self, repository: Path, *, work_dir: Path, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None,
                 env: Mapping[str, str] | None = None, log_path: Path | None = None,
                 model_control_mode: str = "none", extra_args: Sequence[str] = ()) -> None:
        self.repository = repository.resolve()
        self.work_dir = work_dir
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.env = dict(os.environ if env is None else env)
        self.log_path = log_path or work_dir / "tritonserver.log"
        self.model_control_mode = model_control_mode
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tmp_dir(self) -> Path:
        return self.work_dir / "tmp"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self, install: TritonInstall) -> list[str]:
        backends = prepare_backends(install, self.work_dir / "backends")
        return [
            str(install.binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
            "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
            f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}", f"--model-control-mode={self.model_control_mode}",
            "--exit-on-error=false",
            "--allow-cpu-metrics=true", "--metrics-interval-ms=1000", *self.extra_args,
        ]

    def process_env(self, install: TritonInstall) -> dict[str, str]:
        env = dict(self.env)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*python_library_dirs(), str(install.libraries),
                                                               env.get("LD_LIBRARY_PATH")]))
        # the stub imports packages from the first python on PATH: make that this interpreter's venv
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("PYTHONUNBUFFERED", "1")
        # the stubs' temporary files (e.g. AOTInductor's extracted packages) go where stop() removes them
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(self.tmp_dir)
        # without a UTF-8 locale the stub's embedded Python decodes text (compiler output) as ASCII
        env.setdefault("PYTHONUTF8", "1")
        if "UTF-8" not in env.get("LC_ALL", env.get("LANG", "")).upper().replace("UTF8", "UTF-8"):
            env["LC_ALL"] = "C.UTF-8"
        return env

    def start(self, *, foreground: bool = False) -> None:
        install = find_triton()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cmd = self.command(install)
        env = self.process_env(install)
        # a session of its own either way: signals reach it only through stop(), which ends the whole group
        if foreground:
            self.proc = subprocess.Popen(cmd, env=env, start_new_session=True)
            return
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=timeout) as r:
                return int(r.status), r.read()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read()
        except (urllib.error.URLError, OSError):
            return 0, b""

    def model_ready(self, model: str) -> bool:
        return self._get(f"/v2/models/{model}/ready")[0] == 200

    def repository_index(self) -> list[dict[str, Any]]:
        try:
            req = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}",
                                         method="POST")
            with urllib.request.urlopen(req, timeout=5) as r:
                result: list[dict[str, Any]] = json.loads(r.read())
                return result
        except (urllib.error.URLError, OSError, ValueError):
            return []

    def failed_models(self, models: Sequence[str]) -> list[str]:
        """``"name: Triton's reason"`` for each of ``models`` that Triton failed to load."""
        return [f"{m.get('name')}: {m.get('reason') or 'failed to load'}" for m in self.repository_index()
                if m.get("name") in models and m.get("state") == "UNAVAILABLE"]

    def wait_ready(self, models: Sequence[str], timeout: float = 300.0) -> None:
        """Wait until the server is live and every model is ready; raise at once, with Triton's reason,
        when the server exits or a model fails to load, and with the log tail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._get("/v2/health/live")[0] == 200:
                if all(self.model_ready(m) for m in models):
                    return
                failed = self.failed_models(models)
                if failed:
                    raise ModelLoadError(failed)
            time.sleep(0.5)
        waiting = [m for m in models if not self.model_ready(m)]
        raise TimeoutError(f"tritonserver not ready after {timeout}s: model(s) {waiting} not ready (of "
                           f"{list(models)}); index: {self.repository_index()}\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait (Triton unloads models, each finalize stops its threads), SIGKILL if it hangs; then
        make sure no process of its group (the Python stubs) is left, and remove its temporary files."""
        try:
            if self.proc is None or self.proc.poll() is not None:
                return None if self.proc is None else self.proc.returncode
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise
        finally:
            if self.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # stubs that outlived their server
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
