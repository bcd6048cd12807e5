"""Triton model repositories serving the benchmark MLP through hotswap, and finding ``tritonserver``."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

from bench.lib.models import FACTORY

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 8
dynamic_batching {{ max_queue_delay_microseconds: 500 }}
input [ {{ name: "X", data_type: TYPE_FP32, dims: [ {width} ] }} ]
output [ {{ name: "Y", data_type: TYPE_FP32, dims: [ {width} ] }}{version_output} ]
instance_group [ {{ count: 1, kind: {kind}{gpus} }} ]
parameters {{ key: "model_factory", value: {{ string_value: "{factory}" }} }}
parameters {{ key: "factory_kwargs", value: {{ string_value: "{kwargs}" }} }}
parameters {{ key: "engine", value: {{ string_value: "{engine}" }} }}
parameters {{ key: "refit_strategy", value: {{ string_value: "{strategy}" }} }}
parameters {{ key: "canary", value: {{ string_value: "finite" }} }}
parameters {{ key: "cuda_graphs", value: {{ string_value: "{cuda_graphs}" }} }}
"""
PARAM = 'parameters {{ key: "{key}", value: {{ string_value: "{value}" }} }}\n'
VERSION_OUTPUT_DECL = ',\n         { name: "HOTSWAP_WEIGHTS_VERSION", data_type: TYPE_STRING, dims: [ 1 ] }'
#: the version as UTF-8 bytes (serving.triton.version_output): it survives a stub running numpy 2
VERSION_UTF8_DECL = ',\n         { name: "HOTSWAP_WEIGHTS_VERSION_UTF8", data_type: TYPE_UINT8, dims: [ 64 ] }'

MODEL_PY = '"""Triton entry point."""\n\nfrom serving.triton.model import TritonPythonModel\n\n' \
           '__all__ = ["TritonPythonModel"]\n'

#: the same, but the CUDA stream is synchronized before the responses go back: outputs handed to Triton
#: with from_dlpack are read by Triton as soon as execute returns, whether or not the kernels finished
MODEL_PY_SYNC = '''"""Triton entry point (synchronizes CUDA before returning responses)."""

import torch

from serving.triton.model import TritonPythonModel as _Model


class TritonPythonModel(_Model):
    def execute(self, requests):  # type: ignore[no-untyped-def]
        responses = super().execute(requests)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return responses
'''

#: outputs copied to host memory before they are handed to Triton (no DLPack of CUDA memory)
MODEL_PY_CPU_OUT = '''"""Triton entry point (returns outputs from host memory)."""

from serving.triton.model import TritonPythonModel as _Model


class TritonPythonModel(_Model):
    def _output(self, name, tensor):  # type: ignore[no-untyped-def]
        return super()._output(name, tensor.detach().cpu())
'''


def make_repository(root: Path, width: int, layers: int, strategies: list[str], kind: str,
                    sync: bool = False, cpu_outputs: bool = False, engine: str = "eager",
                    cuda_graphs: bool = False, version_output: bool = True, variant: str = "",
                    params: dict[str, str] | None = None, version_utf8: bool = False) -> list[str]:
    """One model per strategy (``variant`` names them apart; ``params``: more config.pbtxt parameters).
    ``version_output`` declares ``HOTSWAP_WEIGHTS_VERSION`` (a string), ``version_utf8``
    ``HOTSWAP_WEIGHTS_VERSION_UTF8`` (bytes)."""
    kwargs = json.dumps({"width": width, "layers": layers, "device": "cuda" if kind == "KIND_GPU" else "cpu",
                         "dtype": "float32"}).replace('"', '\\"')
    gpus = ", gpus: [ 0 ]" if kind == "KIND_GPU" else ""
    code = MODEL_PY_CPU_OUT if cpu_outputs else MODEL_PY_SYNC if sync else MODEL_PY
    names = []
    for strategy in strategies:
        name = f"mlp_{engine}_{strategy}" + (f"_{variant}" if variant else "")
        (root / name / "1").mkdir(parents=True)
        config = CONFIG.format(name=name, width=width, kind=kind, gpus=gpus, factory=FACTORY, kwargs=kwargs,
                               strategy=strategy, engine=engine, cuda_graphs=str(cuda_graphs).lower(),
                               version_output=(VERSION_OUTPUT_DECL if version_output else "")
                               + (VERSION_UTF8_DECL if version_utf8 else ""))
        config += "".join(PARAM.format(key=k, value=v) for k, v in (params or {}).items())
        (root / name / "config.pbtxt").write_text(config)
        (root / name / "1" / "model.py").write_text(code)
        names.append(name)
    return names


def ensure_pytriton_findable() -> None:
    """``find_triton`` only needs the package's folder; on a machine without pytriton's client-side
    dependencies (pyzmq, sh) ``import pytriton`` fails, so stand in a module that only knows its file."""
    try:
        import pytriton  # noqa: F401
    except ImportError:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or spec.origin is None:
            raise
        stub = types.ModuleType("pytriton")
        stub.__file__ = spec.origin
        stub.__spec__ = spec
        stub.__path__ = list(spec.submodule_search_locations or [os.path.dirname(spec.origin)])
        sys.modules["pytriton"] = stub
