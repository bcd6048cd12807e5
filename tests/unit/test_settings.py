from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from serving.errors import ConfigError
from serving.settings import BY_NAME, FIELD_TYPES, PARAMETERS, SETTINGS, ServingSettings, parse_settings

FACTORY = "serving.examples.cnn:tiny_cnn"


def test_defaults_and_env_expansion(tmp_path: Path) -> None:
    env = {"HOTSWAP_WEIGHTS_ROOT": str(tmp_path / "w"), "HOTSWAP_CACHE_DIR": str(tmp_path / "c"), "X": "7"}
    s = parse_settings({"model_factory": FACTORY, "factory_kwargs": '{"width": ${X}}'}, model_name="m", env=env)
    assert s.weights_dir == tmp_path / "w" / "m"
    assert s.engine_cache_dir == tmp_path / "c"
    assert s.engine == "auto" and s.canary == "reference" and s.refit_strategy == "double_buffer"
    assert not s.cuda_graphs
    assert dict(s.factory_kwargs) == {"width": 7}
    assert s.dtype == "float32" and not s.allow_pickle
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


def test_choices_are_the_ones_the_implementing_modules_accept() -> None:
    from serving import choices
    from serving.engines import ENGINES
    from serving.refit.canary import CanaryConfig
    from serving.refit.strategies import strategy_named
    from serving.settings import BY_NAME
    from serving.weights.fastpath import FastPathConfig
    from serving.weights.validate import ValidationPolicy

    assert BY_NAME["engine"].choices == choices.ENGINE_CHOICES == ("auto", *ENGINES)
    assert BY_NAME["refit_strategy"].choices == choices.STRATEGIES
    assert [strategy_named(s).name for s in choices.STRATEGIES] == list(choices.STRATEGIES)
    assert BY_NAME["canary"].choices == choices.CANARY_MODES
    assert [CanaryConfig(m).mode for m in choices.CANARY_MODES] == list(choices.CANARY_MODES)
    assert BY_NAME["watch_mode"].choices == choices.WATCH_MODES
    assert BY_NAME["weights_transfer"].choices == choices.TRANSFERS
    assert [FastPathConfig(transfer=t).transfer for t in choices.TRANSFERS] == list(choices.TRANSFERS)
    assert BY_NAME["unexpected_tensors"].choices == choices.UNEXPECTED_MODES
    assert BY_NAME["dtype_cast"].choices == choices.CAST_MODES
    for unexpected, cast in zip(choices.UNEXPECTED_MODES, choices.CAST_MODES, strict=True):
        ValidationPolicy(unexpected=unexpected, cast=cast)
    with pytest.raises(ConfigError, match="refit_strategy 'yolo'"):
        strategy_named("yolo")


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
    from serving.service import fast_path_config_for
    from serving.weights.fastpath import FastPathConfig

    base = {"model_factory": FACTORY, "weights_dir": str(tmp_path)}
    s = parse_settings(base, model_name="m", env={})
    default = FastPathConfig()  # the table's defaults are the reader's
    assert (s.weights_transfer, s.weights_reader_threads, s.weights_read_bytes, s.weights_task_bytes) == \
        (default.transfer, default.threads, default.read_bytes, default.task_bytes) == ("auto", 8, 16 << 20, 4 << 20)
    s = parse_settings({**base, "weights_transfer": "kvikio", "weights_reader_threads": "4",
                        "weights_read_bytes": str(64 << 20), "weights_task_bytes": str(1 << 20)}, model_name="m",
                       env={})
    assert (s.weights_transfer, s.weights_reader_threads, s.weights_read_bytes, s.weights_task_bytes) == \
        ("kvikio", 4, 64 << 20, 1 << 20)
    assert fast_path_config_for(s) == FastPathConfig(transfer="kvikio", threads=4, read_bytes=64 << 20,
                                                     task_bytes=1 << 20)
    with pytest.raises(ConfigError) as e:
        parse_settings({**base, "weights_transfer": "dma", "weights_reader_threads": "0",
                        "weights_read_bytes": "5000", "weights_task_bytes": "6000"}, model_name="m", env={})
    for needle in ("weights_transfer: expected one of auto, kvikio, pinned", "weights_reader_threads: must be >= 1",
                   "weights_read_bytes: must be a multiple of 64", "weights_task_bytes: must be a multiple of 4096"):
        assert needle in str(e.value), needle
    with pytest.raises(ConfigError, match="weights_task_bytes: must be >= 4096"):
        parse_settings({**base, "weights_task_bytes": "0"}, model_name="m", env={})


def test_importing_the_settings_loads_neither_torch_nor_an_engine() -> None:
    code = ("import serving.settings, sys; loaded = [m for m in sys.modules if m == 'torch' or "
            "m.startswith(('serving.engines', 'serving.refit', 'serving.watch', 'serving.weights'))]; "
            "assert not loaded, loaded; print(len(serving.settings.SETTINGS))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len(SETTINGS)


def test_the_settings_dataclass_is_the_table() -> None:
    """One field per row, in the table's order and of its kind's type, between the instance's own fields."""
    rows = [s for s in SETTINGS if s.engine is None]
    fields = dataclasses.fields(ServingSettings)
    assert [f.name for f in fields] == ["model_name", "device", *(s.name for s in rows), "engine_options"]
    by_field = {f.name: f.type for f in fields}
    for s in rows:
        assert by_field[s.name] == FIELD_TYPES[s.kind], s.name


def test_the_table_s_defaults_are_those_of_the_objects_it_configures() -> None:
    from serving.cache import EngineCache
    from serving.engines.tensorrt.options import OPTIONS
    from serving.refit.canary import CanaryConfig
    from serving.watch import WeightsWatcher
    from serving.weights import CheckpointPolicy, ValidationPolicy

    def default(name: str) -> object:
        s = BY_NAME[name]
        assert s.default is not None, name
        errors: list[str] = []
        value = s.parse(s.default, errors)
        assert not errors
        return value

    watcher = inspect.signature(WeightsWatcher).parameters
    assert (default("watch_mode"), default("poll_interval_s"), default("debounce_s"), default("lora_scale")) == \
        tuple(watcher[k].default for k in ("mode", "poll_interval_s", "debounce_s", "lora_scale"))
    assert default("engine_cache_max_bytes") == inspect.signature(EngineCache).parameters["max_bytes"].default
    assert (default("canary_atol"), default("canary_rtol")) == (CanaryConfig.atol, CanaryConfig.rtol)
    assert (default("max_file_bytes"), default("allow_pickle")) == (CheckpointPolicy.max_bytes,
                                                                    CheckpointPolicy.allow_pickle)
    policy = ValidationPolicy()
    assert (default("unexpected_tensors"), default("dtype_cast"), default("strip_prefix")) == \
        (policy.unexpected, policy.cast, policy.strip_prefix)
    for o in OPTIONS:  # the TensorRT options' rows, as the README shows them
        row = BY_NAME[o.key]
        assert row.engine == "tensorrt" and row.kind == o.kind and row.doc == o.doc and row.minimum == o.minimum
        assert row.default == (None if o.default is None else str(o.default).lower()), o.key


@pytest.mark.parametrize(("name", "raw", "value"), [
    ("allow_pickle", " Yes", True), ("allow_pickle", "off", False), ("allow_pickle", "", False),
    ("max_file_bytes", "1024", 1024), ("debounce_s", "0.5", 0.5), ("engine", "eager", "eager"),
    ("factory_kwargs", '{"b": 1, "a": [2]}', (("a", [2]), ("b", 1))), ("dtype", "torch.bf16", "bfloat16"),
    ("dtype", "half", "float16"), ("strip_prefix", " module., ,model.", ("module.", "model.")),
    ("weights_dir", "~/w", Path("~/w").expanduser()), ("model_factory", "m:f", "m:f"),
])
def test_each_row_parses_its_kind(name: str, raw: str, value: object) -> None:
    errors: list[str] = []
    assert BY_NAME[name].parse(raw, errors) == value
    assert errors == []


@pytest.mark.parametrize(("name", "raw", "problems"), [
    ("allow_pickle", "maybe", ["allow_pickle: expected true or false, found 'maybe'"]),
    ("max_file_bytes", "1.5", ["max_file_bytes: expected a whole number, found '1.5'"]),
    ("max_file_bytes", "0", ["max_file_bytes: must be >= 1, found '0'"]),
    ("debounce_s", "soon", ["debounce_s: expected a number, found 'soon'"]),
    ("weights_read_bytes", "100", ["weights_read_bytes: must be >= 4096, found '100'",
                                   "weights_read_bytes: must be a multiple of 64, found '100'"]),
    ("engine", "onnx", ["engine: expected one of auto, eager, aoti, inductor, tensorrt; found 'onnx'"]),
    ("dtype", "int64", ["dtype: must be a floating dtype, found 'int64'"]),
    ("dtype", "float8", ["dtype: unknown dtype 'float8'; expected one of ['bfloat16', 'bool', 'float16', "
                         "'float32', 'float64', 'int16', 'int32', 'int64', 'int8', 'uint8']"]),
    ("model_factory", "nocolon", ["model_factory: required, of the form 'package.module:function' "
                                  "(found 'nocolon')"]),
    ("weights_dir", "rel/dir", ["weights_dir: must be an absolute path, found 'rel/dir'"]),
])
def test_each_row_names_what_is_wrong(name: str, raw: str, problems: list[str]) -> None:
    errors: list[str] = []
    assert BY_NAME[name].parse(raw, errors) is None
    assert errors == problems


def test_blank_values_mean_the_default_only_where_the_row_says_so(tmp_path: Path) -> None:
    base = {"model_factory": FACTORY, "weights_dir": str(tmp_path)}
    s = parse_settings({**base, "engine": "", "canary": "", "factory_kwargs": "", "engine_cache_dir": ""},
                       model_name="m", env={"HOTSWAP_CACHE_DIR": str(tmp_path / "c")})
    assert (s.engine, s.canary, s.factory_kwargs, s.engine_cache_dir) == ("auto", "reference", (), tmp_path / "c")
    assert parse_settings({**base, "engine": "eager"}, model_name="m", env={}).canary == "finite"
    with pytest.raises(ConfigError, match="refit_strategy: expected one of"):
        parse_settings({**base, "refit_strategy": ""}, model_name="m", env={})
