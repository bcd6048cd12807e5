"""TensorRT build and refit options read from a spec's options."""

from __future__ import annotations

import pytest

from serving.engines.tensorrt import TrtBuildOptions
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
