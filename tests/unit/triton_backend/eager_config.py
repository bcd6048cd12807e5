"""The config.pbtxt these tests write: a Python-backend model on the eager engine, 8 floats in (X) and 2 out
(Y), with its name and factory filled in (``CONFIG.format(name=..., factory=...)``)."""

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 4
input [ {{ name: "X", data_type: TYPE_FP32, dims: [ 8 ] }} ]
output [ {{ name: "Y", data_type: TYPE_FP32, dims: [ 2 ] }} ]
parameters {{ key: "model_factory", value: {{ string_value: "{factory}" }} }}
parameters {{ key: "engine", value: {{ string_value: "eager" }} }}
"""
