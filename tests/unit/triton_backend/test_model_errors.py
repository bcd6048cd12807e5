"""Errors name the model they belong to: with several models in a repository, nobody has to guess which failed.
(Through a real Triton and the ``hotswap serve`` command: tests/integration/test_model_errors.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from eager_config import CONFIG  # tests/unit/triton_backend/eager_config.py

from serving.errors import ConfigError, ModelError
from serving.factory import build_module
from serving.triton.server import seed_weights


def repository(tmp_path: Path, models: dict[str, str]) -> Path:
    repo = tmp_path / "repo"
    for name, factory in models.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name, factory=factory))
    return repo


def test_seeding_names_the_model_whose_factory_cannot_be_imported(tmp_path: Path) -> None:
    repo = repository(tmp_path, {"cnn": "serving.examples.cnn:tiny_cnn", "my_bert": "nosuch.module:build"})
    with pytest.raises(ModelError) as e:
        seed_weights(repo, {"HOTSWAP_WEIGHTS_ROOT": str(tmp_path / "weights")})
    assert str(e.value).startswith("model 'my_bert': model factory 'nosuch.module:build': cannot import "
                                   "'nosuch.module'")
    assert e.value.reason == "config"
    assert (tmp_path / "weights" / "cnn" / "initial.safetensors").is_file()  # the good one was seeded
    assert not list((tmp_path / "weights" / "my_bert").iterdir())


def test_seeding_names_the_model_whose_weights_folder_cannot_be_made(tmp_path: Path) -> None:
    repo = repository(tmp_path, {"cnn": "serving.examples.cnn:tiny_cnn"})
    (tmp_path / "weights").write_text("a file where the weights root should be")
    with pytest.raises(ModelError, match=r"^model 'cnn': weights folder .*cnn: .*; create it"):
        seed_weights(repo, {"HOTSWAP_WEIGHTS_ROOT": str(tmp_path / "weights")})


def test_a_factory_that_raises_is_named_with_its_arguments() -> None:
    with pytest.raises(ConfigError, match=r"model factory 'serving.examples.cnn:tiny_cnn' raised TypeError: .*"
                                          r"\(called with \{'nosuch': 1\}\); fix the factory or its factory_kwargs"):
        build_module("serving.examples.cnn:tiny_cnn", {"nosuch": 1})


def test_hotswap_watch_names_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serving.cli import main

    code = main(["watch", "--factory", "nosuch.module:build", "--name", "my_bert", "--folder", str(tmp_path / "w"),
                 "--cache-dir", str(tmp_path / "cache"), "--exit-after", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("hotswap: error: model 'my_bert': model factory 'nosuch.module:build': cannot import"), err


def test_hotswap_watch_with_its_metrics_port_taken_says_so_and_stops_its_watcher(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from serving.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["watch", "--factory", "serving.examples.cnn:tiny_cnn", "--folder", str(tmp_path / "w"),
                     "--cache-dir", str(tmp_path / "cache"), "--metrics-port", str(port), "--exit-after", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"hotswap: error: --metrics-port {port} on 127.0.0.1: "), err
    assert "choose a free port (0: any)" in err  # and the autouse fixture checks the watcher's threads stopped
