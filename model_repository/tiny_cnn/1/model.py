"""Triton Python-backend entry point: everything lives in the installed `serving` package."""

from serving.triton.model import TritonPythonModel

__all__ = ["TritonPythonModel"]
