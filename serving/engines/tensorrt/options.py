"""Options of a TensorRT build and of its refits (from ``BuildSpec.options``)."""

from __future__ import annotations

from dataclasses import dataclass

from serving.errors import ConfigError
from serving.specs import BuildSpec


@dataclass(frozen=True)
class TrtBuildOptions:
    """Settings of a TensorRT build and of its refits (from ``BuildSpec.options``)."""

    weights_validation: bool = True  # Refitter.weights_validation
    max_threads: int = 0  # Refitter.max_threads; 0 keeps TensorRT's default
    optimization_level: int | None = None
    workspace_size: int = 0
    verify_seed: int = 0

    @classmethod
    def from_spec(cls, spec: BuildSpec) -> TrtBuildOptions:
        def num(key: str, default: int | None) -> int | None:
            v = spec.option(key, default)
            if v is None:
                return None
            try:
                return int(str(v))
            except ValueError as e:
                raise ConfigError(f"option {key}={v!r} is not an integer") from e

        validation = str(spec.option("trt_weights_validation", "true")).strip().lower()
        if validation not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"option trt_weights_validation={validation!r}: use true or false")
        max_threads = num("trt_refit_max_threads", 0) or 0
        if max_threads < 0:
            raise ConfigError(f"option trt_refit_max_threads={max_threads} must be >= 0")
        return cls(
            weights_validation=validation in ("true", "1", "yes"),
            max_threads=max_threads,
            optimization_level=num("trt_optimization_level", None),
            workspace_size=num("trt_workspace_size", 0) or 0,
            verify_seed=num("trt_verify_seed", 0) or 0,
        )


__all__ = ["TrtBuildOptions"]
