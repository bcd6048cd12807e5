"""Can the TensorRT engine run here? TensorRT, Torch-TensorRT and CUDA versions, and the install hint.

:func:`probe_environment` imports ``tensorrt`` and ``torch_tensorrt`` only to check them (the engine
imports nothing of either at module level); every gap goes into one
:class:`~serving.errors.EngineUnavailableError` that ends with :data:`INSTALL_HINT`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from serving.errors import EngineUnavailableError

#: TensorRT 10.14 added ``SerializationFlag.INCLUDE_REFIT``: without it a refitted engine that is
#: serialized again is no longer refittable, so only a single refit would be possible.
MIN_TENSORRT = (10, 14)
#: first Torch-TensorRT that caches stripped engines and keeps refitted ones refittable (INCLUDE_REFIT)
MIN_TORCH_TENSORRT = (2, 10)

INSTALL_HINT = (
    "Install it inside an NGC Triton container whose TensorRT is >= 10.14 "
    "(nvcr.io/nvidia/tritonserver:<yy.mm>-py3 or -trtllm-python-py3; docs/tensorrt.md lists the pairs) "
    "with: pip install 'trt-hotswap[tensorrt]' (torch-tensorrt must match the container's torch). "
    "Or choose engine 'aoti' or 'eager', which need no TensorRT."
)


def parse_version(text: str) -> tuple[int, ...]:
    """``"10.14.1.48.post1"`` -> ``(10, 14, 1, 48)``; ``"2.13.0+cu130"`` -> ``(2, 13, 0)``."""
    out = []
    for part in text.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def unavailable_message(problems: Sequence[str]) -> str:
    """The one message shown when ``engine: tensorrt`` cannot run here."""
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"engine 'tensorrt' is not available on this machine:\n{lines}\n{INSTALL_HINT}"


@dataclass(frozen=True)
class TrtEnvironment:
    """Versions and GPU an engine is built for (all of it goes into the cache key)."""

    tensorrt: str
    torch_tensorrt: str
    torch: str
    cuda: str
    device_name: str
    compute_capability: str


def probe_environment(device: torch.device) -> TrtEnvironment:
    """Check TensorRT, Torch-TensorRT and CUDA; raise one :class:`EngineUnavailableError` naming every gap."""
    problems: list[str] = []
    trt_version = tt_version = ""
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as e:  # ImportError, or OSError when libnvinfer is missing
        problems.append(f"the TensorRT Python package cannot be imported ({type(e).__name__}: {e})")
        trt = None
    if trt is not None:
        version = getattr(trt, "__version__", None)
        if not isinstance(version, str) or not hasattr(trt, "Refitter"):
            where = [str(p) for p in getattr(trt, "__path__", [])] or [str(getattr(trt, "__file__", "?"))]
            problems.append(f"'import tensorrt' finds only {where}, not the TensorRT runtime (type stubs such "
                            "as tensorrt-stubs install an empty 'tensorrt' package)")
        else:
            trt_version = version
            flags = getattr(trt, "SerializationFlag", None)
            if parse_version(version) < MIN_TENSORRT or not hasattr(flags, "INCLUDE_REFIT"):
                problems.append(f"TensorRT {version} is too old: hotswap needs >= "
                                f"{'.'.join(map(str, MIN_TENSORRT))} (SerializationFlag.INCLUDE_REFIT keeps a "
                                "refitted engine refittable; older TensorRT would allow a single refit)")
    if problems:  # importing torch_tensorrt without TensorRT fails deep inside; only say whether it is there
        if importlib.util.find_spec("torch_tensorrt") is None:
            problems.append("Torch-TensorRT (torch_tensorrt) is not installed")
    else:
        try:
            torch_trt = importlib.import_module("torch_tensorrt")
            tt_version = str(getattr(torch_trt, "__version__", "0"))
        except Exception as e:
            problems.append(f"Torch-TensorRT cannot be imported ({type(e).__name__}: {e})")
        else:
            if parse_version(tt_version) < MIN_TORCH_TENSORRT:
                problems.append(f"Torch-TensorRT {tt_version} is too old: hotswap needs >= "
                                f"{'.'.join(map(str, MIN_TORCH_TENSORRT))}")
    if device.type != "cuda":
        problems.append(f"device {str(device)!r} is not a CUDA device; set device 'cuda' for the tensorrt engine")
    elif not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)")
    if problems:
        raise EngineUnavailableError(unavailable_message(problems))
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return TrtEnvironment(trt_version, tt_version, torch.__version__, str(torch.version.cuda),
                          torch.cuda.get_device_name(index), f"{major}.{minor}")


__all__ = [
    "INSTALL_HINT", "MIN_TENSORRT", "MIN_TORCH_TENSORRT", "TrtEnvironment", "parse_version", "probe_environment",
    "unavailable_message",
]
