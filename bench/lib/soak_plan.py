"""What a soak publishes, swap by swap, and what it deletes after each: pure rules, no files touched.

The models take turns. For each model, most swaps are a new random base version, published with the tools a
user has in turn (:data:`EXAMPLE_TOOLS`, :data:`DIRECTORY_TOOLS`); every ``adapter_every``-th swap of a model
is a new PEFT LoRA adapter on its live base, and the swap after it takes the adapter off again by publishing
that base once more (``touch``, or a fresh copy under the same name): the documented way back to a base.
After each swap the folder is pruned as a user would: every visible entry but the live base and the live
adapter is deleted. Hidden and temporary names are left alone (they are what the soak looks for).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from serving.publish.protocol import is_temp_name

#: the ways a single-file version is published: ``serving.publish.publish`` (what ``hotswap publish`` runs),
#: ``publish_tensors`` (a training loop's state dict), a write under a hidden name then ``os.rename``, and a
#: plain copy written in place (considered once its size is stable)
EXAMPLE_TOOLS = ("publish", "publish_tensors", "rename", "copy")
#: the ways a directory version (a sharded checkpoint) is published: ``hotswap publish`` (hard links and a
#: MANIFEST.json) and a directory built under a hidden name then renamed in
DIRECTORY_TOOLS = ("publish", "rename")
#: how an adapter is taken off: its base touched, or published again under its own name
UNADAPT_TOOLS = ("touch", "republish")
#: the entry every model's folder holds when the server starts
FIRST = "s00000"
#: a sample is taken once each model's last this many swaps installed new versions (:func:`settled`)
SETTLED = 3


@dataclass(frozen=True)
class Step:
    """One swap: ``action`` is ``base`` (a new version), ``adapter`` (a LoRA adapter on the live base) or
    ``unadapt`` (the live base published again, which takes the adapter off)."""

    swap: int
    model: str
    action: str
    tool: str
    #: the name published: the version (a base), the adapter's directory, or the base published again
    entry: str
    #: the version responses name once the swap is live (``base+adapter`` with an adapter)
    live: str
    #: the live base after the swap (what an adapter is merged into)
    base: str
    #: the live adapter after the swap, if any
    adapter: str | None
    #: the random seed of a new version or adapter
    seed: int

    @property
    def key(self) -> str:
        """``model:live``: how a response of this version is named among every model's."""
        return f"{self.model}:{self.live}"


def plan(swaps: int, models: Sequence[str], tools: Sequence[str], adapter_every: int) -> list[Step]:
    """The soak's swaps, in order (``adapter_every`` 0: no adapters; otherwise at least 2). No adapter starts in
    the last rounds, so the run ends in the state every sample is taken in (:func:`settled`). Pure."""
    if swaps < 1 or not models or not tools:
        raise ValueError(f"a soak needs swaps ({swaps}), models ({list(models)}) and tools ({list(tools)})")
    if adapter_every == 1 or adapter_every < 0:
        raise ValueError(f"adapter_every={adapter_every}: 0 (no adapters) or at least 2 (an adapter needs a base)")
    base = dict.fromkeys(models, FIRST)
    adapter: dict[str, str | None] = dict.fromkeys(models)
    count = dict.fromkeys(models, 0)
    used = dict.fromkeys(models, 0)
    unadapted = 0
    steps = []
    for i in range(1, swaps + 1):
        m = models[(i - 1) % len(models)]
        count[m] += 1
        if adapter[m] is not None:
            tool = UNADAPT_TOOLS[unadapted % len(UNADAPT_TOOLS)]
            unadapted += 1
            adapter[m] = None
            steps.append(Step(i, m, "unadapt", tool, base[m], base[m], base[m], None, i))
        elif adapter_every and count[m] % adapter_every == 0 and i <= swaps - (SETTLED + 1) * len(models):
            name = f"a{i:05d}"
            adapter[m] = name
            steps.append(Step(i, m, "adapter", "lora", name, f"{base[m]}+{name}", base[m], name, i))
        else:
            tool = tools[used[m] % len(tools)]
            used[m] += 1
            base[m] = f"s{i:05d}"
            steps.append(Step(i, m, "base", tool, base[m], base[m], base[m], None, i))
    return steps


def settled(history: Mapping[str, Sequence[str]]) -> bool:
    """Whether every model's last :data:`SETTLED` swaps (``history``: model -> actions so far, the version it
    started with counting as one ``base``) installed new versions: the state every sample is taken in. Right
    after an adapter, or a base published again, a model holds other things (the adapter's pristine base
    weights, the version before it) whose memory differs without anything leaking. Pure."""
    return all(len(a) >= SETTLED and all(x == "base" for x in a[-SETTLED:]) for a in history.values())


def entry_stem(name: str) -> str:
    """A folder entry's version name: the name without ``.safetensors``. Pure."""
    return name.removesuffix(".safetensors")


def to_prune(names: Iterable[str], step: Step) -> list[str]:
    """The entries of a model's folder a user deletes once ``step`` is live: every visible one but the live
    base and adapter (hidden and temporary names stay: nothing of the soak's should be left there). Pure."""
    keep = {step.base, step.adapter}
    return sorted(n for n in names if not is_temp_name(n) and entry_stem(n) not in keep)


def tool_counts(steps: Iterable[Step]) -> dict[str, int]:
    """How many swaps each ``action: tool`` made. Pure."""
    out: dict[str, int] = {}
    for s in steps:
        key = f"{s.action}: {s.tool}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))
