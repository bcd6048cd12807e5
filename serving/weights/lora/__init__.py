"""LoRA adapters in PEFT format: parse them, check them against the base weights, merge them.

A PEFT adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``. Keys
are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (Linear and Conv2d; an adapter
name may follow ``lora_A``, as in ``.lora_A.default.weight``) and
``base_model.model.<module>.lora_embedding_A`` / ``_B`` (Embedding). Other keys naming a base weight
(``bias="all"``/``"lora_only"`` biases, ``modules_to_save``) replace that weight whole.

Merging follows PEFT's ``merge()``: ``W = W0 + s * B @ A`` with ``s = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``), ``r`` and ``lora_alpha`` per module from
``rank_pattern`` / ``alpha_pattern`` (first key ``k`` in order with ``re.match(rf"(.*\\.)?({k})$",
module)``), else the defaults. The delta is transposed for base weights stored ``[in, out]``
(``fan_in_fan_out``, GPT-2's Conv1D) and for embeddings; a Conv2d delta is ``B[:, :, 0, 0] @ A``
over the flattened kernel. Where the layout can be read from the shapes (a non-square weight) the
shapes decide, as PEFT decides by the layer type; a square weight follows ``fan_in_fan_out``.

One module per job: :mod:`.config` (``adapter_config.json``), :mod:`.adapter` (the tensors checked
against the base), :mod:`.merge`, :mod:`.files` (reading and writing adapter directories). Pure
functions apart from :func:`read_adapter` (reads a directory) and :func:`save_adapter` (writes
one, atomically). Merges always start from the given base tensors, never from a previous
merge, and only the touched tensors are new objects in the result.
"""

from serving.publish.protocol import ADAPTER_CONFIG
from serving.weights.lora.adapter import PEFT_PREFIX, LoraAdapter, LoraModule, build_adapter
from serving.weights.lora.config import LoraConfig
from serving.weights.lora.files import (
    ADAPTER_WEIGHTS,
    adapter_weights_file,
    is_adapter_dir,
    random_adapter,
    read_adapter,
    read_adapter_config,
    save_adapter,
)
from serving.weights.lora.merge import lora_delta, merge_lora

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "LoraAdapter", "LoraConfig", "LoraModule",
    "adapter_weights_file", "build_adapter", "is_adapter_dir", "lora_delta", "merge_lora", "random_adapter",
    "read_adapter", "read_adapter_config", "save_adapter",
]
