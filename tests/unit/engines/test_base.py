"""What every engine shares: one ``build`` signature and the contract's defaults, the device a build asks for
(refused with the engine's name), the weight checks, and the copy-in-place slot of the compiled engines."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence

import pytest
import torch

from serving.engines import ENGINES, build_engine
from serving.engines.base import CopySlot, Engine, weight_problems
from serving.errors import EngineBuildError, EngineUnavailableError, RefitError, ValidationError
from serving.examples import TRANSFORMER, example_build_spec
from serving.specs import WeightSpec


@pytest.mark.parametrize("kind", sorted(ENGINES))
def test_every_engine_is_built_through_the_one_declared_signature(kind: str) -> None:
    module_name, class_name = ENGINES[kind]
    cls = getattr(importlib.import_module(module_name), class_name)
    assert issubclass(cls, Engine) and cls.kind == kind
    assert inspect.signature(cls.build).parameters.keys() == inspect.signature(Engine.build).parameters.keys()
    for name in ("cache", "metrics"):
        assert inspect.signature(cls.build).parameters[name].default is None
    assert not getattr(cls.build, "__isabstractmethod__", False)


def test_engines_without_ignored_or_kept_tensors_have_empty_ones() -> None:
    engine = build_engine("eager", example_build_spec(TRANSFORMER))
    assert engine.ignored_names == frozenset() and dict(engine.kept_tensors) == {}


@pytest.mark.parametrize(("kind", "name"), [("aoti", "AOTI engine"), ("inductor", "Inductor engine"),
                                            ("eager", "eager engine")])
def test_a_build_names_a_bad_device_and_cuda_without_cuda(kind: str, name: str) -> None:
    with pytest.raises(EngineBuildError, match=rf"^{name}: invalid device 'nope'"):
        build_engine(kind, example_build_spec(TRANSFORMER, device="nope"))
    if torch.cuda.is_available():
        return
    with pytest.raises(EngineUnavailableError, match=rf"^{name}: device 'cuda' asked for, but this torch has no "
                       r"usable CUDA .*install a CUDA build of torch or use device 'cpu'"):
        build_engine(kind, example_build_spec(TRANSFORMER, device="cuda"))


def test_weight_problems_name_everything() -> None:
    specs = {"a": WeightSpec("a", (2,), torch.float32), "b": WeightSpec("b", (1,), torch.float32)}
    problems = weight_problems(specs, {"a": torch.zeros(3, dtype=torch.float16), "z": torch.zeros(1)},
                               torch.device("cpu"), full=True)
    text = "\n".join(problems)
    assert "'z': not a weight" in text and "shape (3,)" in text and "dtype float16" in text and "'b'" in text
    assert weight_problems(specs, {"n": torch.zeros(5)}, torch.device("cpu"), full=False, ignored=frozenset("n")) == []


class _Slot(CopySlot):
    """A copy-in-place slot over two tensors of its own; ``fail`` makes the step after the copies raise."""

    def __init__(self) -> None:
        specs = {"w": WeightSpec("w", (2,), torch.float32), "b": WeightSpec("b", (1,), torch.float32)}
        super().__init__("test engine m", specs, torch.device("cpu"), frozenset({"n"}))
        self.own = {"w": torch.zeros(2), "b": torch.zeros(1)}
        self.fail = False

    def buffers(self) -> Mapping[str, torch.Tensor]:
        return self.own

    def installed(self, buffers: Mapping[str, torch.Tensor]) -> None:
        if self.fail:
            raise RuntimeError("device lost")

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.own["w"] * inputs[0] + self.own["b"]]


def test_copy_slot_transfers_checks_copies_and_needs_a_full_refit_after_a_failure() -> None:
    slot = _Slot()
    moved = slot.transfer({"w": torch.ones(2, dtype=torch.float64), "b": torch.ones(1), "n": torch.zeros(3)})
    assert set(moved) == {"w", "b"} and moved["w"].dtype == torch.float32  # ignored names dropped, dtype converted
    with pytest.raises(ValidationError, match="missing 1: 'b'"):
        slot.refit({"w": moved["w"]})
    assert not slot.ready and torch.equal(slot.own["w"], torch.zeros(2))  # nothing copied
    slot.refit(moved)
    assert slot.ready and torch.equal(slot.own["w"], torch.ones(2))
    slot.refit({"b": torch.full((1,), 5.0)})  # partial: the rest stays
    assert slot.run([torch.ones(2)])[0].tolist() == [6.0, 6.0]
    slot.fail = True
    with pytest.raises(RefitError, match="test engine m: refit failed .device lost.; this slot needs a full refit"):
        slot.refit({"b": torch.zeros(1)})
    assert not slot.ready
    slot.fail = False
    with pytest.raises(ValidationError, match="missing 1: 'w'"):
        slot.refit({"b": torch.zeros(1)})
