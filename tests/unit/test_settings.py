from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.errors import ConfigError
from serving.settings import PARAMETERS, parse_settings

FACTORY = "serving.examples.cnn:tiny_cnn"


def test_defaults_and_env_expansion(tmp_path: Path) -> None:
    env = {"HOTSWAP_WEIGHTS_ROOT": str(tmp_path / "w"), "HOTSWAP_CACHE_DIR": str(tmp_path / "c"), "X": "7"}
    s = parse_settings({"model_factory": FACTORY, "factory_kwargs": '{"width": ${X}}'}, model_name="m", env=env)
    assert s.weights_dir == tmp_path / "w" / "m"
    assert s.engine_cache_dir == tmp_path / "c"
    assert s.engine == "auto" and s.canary == "reference" and s.refit_strategy == "double_buffer"
    assert not s.cuda_graphs
    assert dict(s.factory_kwargs) == {"width": 7}
    assert s.dtype == torch.float32 and not s.allow_pickle
    gpu = parse_settings({"model_factory": FACTORY, "weights_dir": str(tmp_path)}, model_name="m",
                         device="cuda:1", env={})
    assert gpu.engine == "auto"


def test_cuda_graphs_only_for_inductor_on_a_gpu(tmp_path: Path) -> None:
    base = {"model_factory": FACTORY, "weights_dir": str(tmp_path)}
    s = parse_settings({**base, "engine": "inductor", "cuda_graphs": "true"}, model_name="m", device="cuda:0", env={})
    assert s.engine == "inductor" and s.cuda_graphs
    with pytest.raises(ConfigError) as e:
        parse_settings({**base, "engine": "aoti", "cuda_graphs": "true"}, model_name="m", device="cpu", env={})
    assert "engine 'inductor' only" in str(e.value) and "needs a GPU instance" in str(e.value)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        parse_settings({"model_factory": "nocolon", "engine": "onnx", "refit_strategy": "yolo",
                        "allow_pickle": "maybe", "max_file_bytes": "-3", "bogus": "1",
                        "weights_dir": "relative/dir", "dtype": "int64"}, model_name="m", env={})
    msg = str(e.value)
    for needle in ("model_factory", "engine", "refit_strategy", "allow_pickle", "max_file_bytes",
                   "unknown parameter", "absolute", "floating dtype"):
        assert needle in msg, needle


def test_weights_dir_inside_model_repository_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "m").mkdir(parents=True)
    with pytest.raises(ConfigError, match="inside the model repository"):
        parse_settings({"model_factory": FACTORY, "weights_dir": str(repo / "m" / "weights")},
                       model_name="m", model_repository=repo, env={})
    parse_settings({"model_factory": FACTORY, "weights_dir": str(tmp_path / "weights")},
                   model_name="m", model_repository=repo, env={})


def test_env_default_syntax(tmp_path: Path) -> None:
    params = {"model_factory": FACTORY, "weights_dir": str(tmp_path), "watch_mode": "${HOTSWAP_WATCH_MODE:-inotify}"}
    assert parse_settings(params, model_name="m", env={}).watch_mode == "inotify"
    assert parse_settings(params, model_name="m", env={"HOTSWAP_WATCH_MODE": "polling"}).watch_mode == "polling"


def test_missing_env_var_and_missing_weights_dir_are_named() -> None:
    with pytest.raises(ConfigError, match=r"\$NOPE is not set"):
        parse_settings({"model_factory": FACTORY, "weights_dir": "/x/${NOPE}"}, model_name="m", env={})
    with pytest.raises(ConfigError, match="HOTSWAP_WEIGHTS_ROOT"):
        parse_settings({"model_factory": FACTORY}, model_name="m", env={})


def test_every_parameter_is_documented() -> None:
    assert all(PARAMETERS.values())


def test_engine_options_are_parameters_and_reach_the_build_spec(tmp_path: Path) -> None:
    from serving.engines.tensorrt.options import TrtBuildOptions
    from serving.service import build_spec_for

    s = parse_settings({"model_factory": FACTORY, "weights_dir": str(tmp_path), "trt_workspace_size": "1024",
                        "trt_weights_validation": "false"}, model_name="m", env={})
    assert dict(s.engine_options) == {"trt_workspace_size": "1024", "trt_weights_validation": "false"}
    options = TrtBuildOptions.from_spec(build_spec_for(s, (), (), 4))
    assert options.workspace_size == 1024 and options.weights_validation is False


def test_choices_come_from_the_modules_that_implement_them() -> None:
    from serving.engines import ENGINE_CHOICES, ENGINES
    from serving.refit import CANARY_MODES, STRATEGIES
    from serving.settings import BY_NAME
    from serving.watch import WATCH_MODES

    assert BY_NAME["engine"].choices == ENGINE_CHOICES == ("auto", *ENGINES)
    assert BY_NAME["refit_strategy"].choices == STRATEGIES
    assert BY_NAME["canary"].choices == CANARY_MODES
    assert BY_NAME["watch_mode"].choices == WATCH_MODES


def test_watch_flags_are_the_table_s_and_parse_like_config() -> None:
    from serving.cli import _setting_flags, build_parser
    from serving.settings import SETTINGS

    argv = ["watch", "--factory", FACTORY, "--folder", "/w", "--strategy", "in_place", "--debounce", "0.5",
            "--allow-pickle", "--mode", "polling"]
    args = build_parser().parse_args(argv)
    assert _setting_flags(args) == {"refit_strategy": "in_place", "debounce_s": "0.5", "allow_pickle": "true",
                                    "watch_mode": "polling"}
    help_text = build_parser()._subparsers._group_actions[0].choices["watch"].format_help()  # type: ignore[union-attr]
    for s in SETTINGS:
        if s.flag and s.name not in ("model_factory", "factory_kwargs", "weights_dir", "engine_cache_dir"):
            assert s.flag in help_text, s.name
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--engine", "onnx"])


def test_strip_prefix_is_a_comma_separated_list() -> None:
    from serving.settings import parse_settings

    params = {"model_factory": "serving.examples.cnn:tiny_cnn", "weights_dir": "/w", "strip_prefix": "module., model."}
    assert parse_settings(params, model_name="m", env={}).strip_prefix == ("module.", "model.")
    del params["strip_prefix"]
    assert parse_settings(params, model_name="m", env={}).strip_prefix == ()


def test_weights_pipeline_settings_reach_the_reader(tmp_path: Path) -> None:
    from serving.settings import BY_NAME
    from serving.weights.fastpath import TRANSFERS, FastPathConfig

    assert BY_NAME["weights_transfer"].choices == TRANSFERS
    base = {"model_factory": FACTORY, "weights_dir": str(tmp_path)}
    s = parse_settings(base, model_name="m", env={})
    default = FastPathConfig()  # the table's defaults are the reader's
    assert (s.weights_transfer, s.weights_reader_threads, s.weights_read_bytes) == \
        (default.transfer, default.threads, default.read_bytes)
    s = parse_settings({**base, "weights_transfer": "kvikio", "weights_reader_threads": "4",
                        "weights_read_bytes": str(64 << 20)}, model_name="m", env={})
    assert (s.weights_transfer, s.weights_reader_threads, s.weights_read_bytes) == ("kvikio", 4, 64 << 20)
    with pytest.raises(ConfigError) as e:
        parse_settings({**base, "weights_transfer": "dma", "weights_reader_threads": "0",
                        "weights_read_bytes": "5000"}, model_name="m", env={})
    for needle in ("weights_transfer: expected one of auto, kvikio, pinned", "weights_reader_threads: must be >= 1",
                   "weights_read_bytes: must be a multiple of 64"):
        assert needle in str(e.value), needle
