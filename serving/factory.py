"""Resolve a model factory named by import path (``package.module:function``)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from serving.errors import ConfigError, is_out_of_memory


def model_code_dirs(model_dir: Path) -> list[Path]:
    """Where a Triton model's own code lives: its folder (beside config.pbtxt) and each version folder
    holding a model.py (Triton's Python backend puts that one on sys.path)."""
    return [model_dir, *sorted(p.parent for p in model_dir.glob("*/model.py"))]


def add_search_paths(*dirs: str | Path) -> None:
    """Make modules in ``dirs`` importable as factories (first on sys.path, once each)."""
    for d in reversed(dirs):
        text = str(Path(d).resolve())
        if Path(text).is_dir() and text not in sys.path:
            sys.path.insert(0, text)


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
        raise ConfigError(f"model factory {path!r}: cannot import {module_name!r}: {e}; put the module next to "
                          "the model's model.py (or in its model folder), or install it in the server's Python "
                          "environment") from e
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
    factory = resolve_factory(path)
    try:
        module = factory(**(kwargs or {}))
    except Exception as e:  # the user's code: say whose, and with which arguments
        if is_out_of_memory(e):
            raise
        raise ConfigError(f"model factory {path!r} raised {type(e).__name__}: {e} (called with "
                          f"{dict(kwargs or {})}); fix the factory or its factory_kwargs") from e
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"model factory {path!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module.eval()
