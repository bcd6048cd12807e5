"""Resolve a model factory named by import path (``package.module:function``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from serving.errors import ConfigError


def resolve_factory(path: str) -> Callable[..., torch.nn.Module]:
    """Import ``package.module:function`` and return the callable."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"model factory {path!r} is not of the form 'package.module:function' "
            "(e.g. 'serving.examples.transformer:tiny_transformer')"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"model factory {path!r}: cannot import {module_name!r}: {e}") from e
    fn = module
    for part in attr.split("."):
        try:
            fn = getattr(fn, part)
        except AttributeError as e:
            raise ConfigError(f"model factory {path!r}: {module_name!r} has no {attr!r}") from e
    if not callable(fn):
        raise ConfigError(f"model factory {path!r} is not callable")
    return fn  # type: ignore[return-value]


def build_module(path: str, kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
    """Call the factory and check it returned a module in eval mode."""
    module = resolve_factory(path)(**(kwargs or {}))
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"model factory {path!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module.eval()
