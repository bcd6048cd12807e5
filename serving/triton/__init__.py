"""Triton integration. ``serving.triton.model`` is the only module importing triton_python_backend_utils."""
