"""TensorRT build and refit options read from a spec's options."""

from __future__ import annotations

import dataclasses

import pytest

from serving.engines.tensorrt import OPTIONS, TrtBuildOptions
from serving.errors import ConfigError
from serving.specs import BuildSpec


def test_options_from_spec() -> None:
    spec = BuildSpec("m:f", (), options=(("trt_weights_validation", "false"), ("trt_refit_max_threads", "4")))
    opts = TrtBuildOptions.from_spec(spec)
    assert opts.weights_validation is False and opts.max_threads == 4
    assert TrtBuildOptions.from_spec(BuildSpec("m:f", ())).weights_validation is True
    with pytest.raises(ConfigError, match="trt_refit_max_threads"):
        TrtBuildOptions.from_spec(BuildSpec("m:f", (), options=(("trt_refit_max_threads", "many"),)))
    with pytest.raises(ConfigError, match="trt_weights_validation"):
        TrtBuildOptions.from_spec(BuildSpec("m:f", (), options=(("trt_weights_validation", "maybe"),)))


def test_every_field_is_an_option_with_its_default_and_doc() -> None:
    assert [o.name for o in OPTIONS] == [f.name for f in dataclasses.fields(TrtBuildOptions)]
    assert [o.key for o in OPTIONS] == ["trt_weights_validation", "trt_refit_max_threads", "trt_optimization_level",
                                        "trt_workspace_size", "trt_verify_seed"]
    defaults = TrtBuildOptions()
    for o in OPTIONS:
        assert o.default == getattr(defaults, o.name) and o.doc
    assert TrtBuildOptions.from_spec(BuildSpec("m:f", ())) == defaults


def test_options_parse_by_their_kind() -> None:
    spec = BuildSpec("m:f", (), options=(("trt_weights_validation", " No "), ("trt_optimization_level", "5"),
                                         ("trt_workspace_size", 1 << 30), ("trt_verify_seed", "7")))
    assert TrtBuildOptions.from_spec(spec) == TrtBuildOptions(weights_validation=False, optimization_level=5,
                                                              workspace_size=1 << 30, verify_seed=7)


def test_every_bad_option_is_reported_at_once() -> None:
    spec = BuildSpec("m:f", (), options=(("trt_weights_validation", "maybe"), ("trt_refit_max_threads", "-1"),
                                         ("trt_workspace_size", "1GB")))
    with pytest.raises(ConfigError) as info:
        TrtBuildOptions.from_spec(spec)
    assert str(info.value) == ("option trt_weights_validation='maybe': use true or false; "
                               "option trt_refit_max_threads=-1 must be >= 0; "
                               "option trt_workspace_size='1GB' is not an integer")
