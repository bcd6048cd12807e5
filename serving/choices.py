"""What a served model's settings may be: the choices, defaults and bounds that the settings table
(:mod:`serving.settings`) offers and the modules implementing them check.

A leaf of the import graph: nothing of the project is imported here (nor torch), so the settings
table is read without loading an engine. A module that implements a choice imports it from here;
a config object and the setting that fills it share one :class:`Bounds`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

#: engine kinds (``serving.engines.ENGINES`` names the class of each)
ENGINE_KINDS: tuple[str, ...] = ("eager", "aoti", "inductor", "tensorrt")
#: what the ``engine`` setting accepts: ``auto`` (``serving.engines.select_engine``) or a kind
ENGINE_CHOICES: tuple[str, ...] = ("auto", *ENGINE_KINDS)
#: refit strategies (what each does: ``serving/refit/strategies.py``)
STRATEGIES: tuple[str, ...] = ("double_buffer", "in_place")
#: checks run on new weights before they serve (``serving.refit.canary``)
CANARY_MODES: tuple[str, ...] = ("off", "finite", "reference")
#: how the weights folder is watched (``serving.watch.observer``)
WATCH_MODES: tuple[str, ...] = ("inotify", "polling")
#: how checkpoint bytes reach a CUDA destination (``serving.weights.transfer`` says what each does and
#: picks one per device). ``auto``: KvikIO when it imports and reads here, otherwise the pinned ring;
#: ``kvikio``: KvikIO by name, refused with the fix when it cannot read here; ``pinned``: our ring of
#: pinned buffers. CPU destinations are read by our threads under ``auto`` and ``pinned``.
TRANSFERS: tuple[str, ...] = ("auto", "kvikio", "pinned")
#: the default transfer (``FastPathConfig.transfer``, setting ``weights_transfer``)
TRANSFER = "auto"
#: checkpoint tensors the engine does not have: refused, or ignored (``serving.weights.validate``)
UNEXPECTED_MODES: tuple[str, ...] = ("error", "ignore")
#: which dtype differences between a checkpoint and the engine are cast (``serving.weights.validate``)
CAST_MODES: tuple[str, ...] = ("strict", "same_kind")

#: dtype names (``serving.specs.dtype_from_name`` maps them to torch dtypes)
DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
                                "uint8", "bool")
#: the floating ones, which an engine may run in
FLOAT_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")
#: other spellings of dtype names
DTYPE_ALIASES: Mapping[str, str] = MappingProxyType({
    "fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32",
    "long": "int64", "int": "int32",
})


def dtype_key(name: str) -> str | None:
    """The dtype name ``name`` spells (``"torch.float16"``, ``"fp16"`` -> ``"float16"``); None if none."""
    key = name.removeprefix("torch.").lower()
    key = DTYPE_ALIASES.get(key, key)
    return key if key in DTYPE_NAMES else None


@dataclass(frozen=True)
class Bounds:
    """The range of a number: a lower bound and a step it must be a multiple of (either optional)."""

    minimum: int | float | None = None
    multiple_of: int | None = None

    def problems(self, value: int | float) -> list[str]:
        """What is wrong with ``value`` (empty: nothing), as ``"must be ..."`` phrases."""
        out = []
        if self.minimum is not None and value < self.minimum:
            out.append(f"must be >= {self.minimum}")
        if self.multiple_of is not None and value % self.multiple_of:
            out.append(f"must be a multiple of {self.multiple_of}")
        return out


#: the fast path's reader threads: KvikIO's thread pool or the pinned ring's threads
#: (``FastPathConfig.threads``, setting ``weights_reader_threads``)
READER_THREADS = 8
READER_THREADS_BOUNDS = Bounds(minimum=1)
#: bytes per read call of the pinned ring's threads (``FastPathConfig.read_bytes``, setting ``weights_read_bytes``)
READ_BYTES = 16 << 20
READ_BYTES_BOUNDS = Bounds(minimum=4096, multiple_of=64)
#: bytes per KvikIO task, the unit its threads read (``FastPathConfig.task_bytes``, setting ``weights_task_bytes``)
TASK_BYTES = 4 << 20
TASK_BYTES_BOUNDS = Bounds(minimum=4096, multiple_of=4096)
#: the watcher's quiet time and polling interval (``WeightsWatcher``, settings ``debounce_s``, ``poll_interval_s``)
DEBOUNCE_BOUNDS = Bounds(minimum=0)
POLL_INTERVAL_BOUNDS = Bounds(minimum=0.01)
