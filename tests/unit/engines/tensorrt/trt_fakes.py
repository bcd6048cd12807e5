"""A stand-in for TensorRT, named as such: :class:`FakeTensorRTRefitter` enforces the call rules of
``tensorrt.Refitter`` as its docstrings state them, :class:`FakeBackend`, :class:`FakeHandle` and
:class:`FakeStream` take the places of the real backend, execution handle and CUDA streams; and a
rig (:func:`make_rig`) wires them to a real :class:`~serving.engines.tensorrt.TensorRTSlot` for a
small Linear + BatchNorm engine. Nothing here is TensorRT."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from serving.engines.tensorrt import TensorRTSlot, TrtBuildOptions, torch_dtype_to_trt_name, trt_dtype_to_torch
from serving.engines.tensorrt import mapping as tm
from serving.specs import WeightSpec


class FakeStream:
    """A stream with a ``pending`` flag: work enqueued and not yet finished."""

    def __init__(self, handle: int) -> None:
        self.cuda_stream = handle
        self.pending = False
        self.syncs = 0

    def synchronize(self) -> None:
        self.pending = False
        self.syncs += 1

    def query(self) -> bool:
        return not self.pending


@dataclass
class FakeWeights:
    """What ``trt.Weights`` wraps: a tensor, by reference."""

    tensor: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def size(self) -> int:
        return self.tensor.numel()


@dataclass
class FakePrototype:
    """What ``Refitter.get_weights_prototype`` returns: dtype and element count."""

    dtype: str  # a trt.DataType member name
    size: int


#: stands for ``trt.TensorLocation.DEVICE``
DEVICE = "DEVICE"


class FakeTensorRTRefitter:
    """NOT TensorRT. Enforces the rules of ``tensorrt.Refitter``'s docstrings (TensorRT 10.x):

    * ``set_named_weights`` returns False for an unknown name or when size or dtype differ from
      ``get_weights_prototype``; hotswap must pass ``TensorLocation.DEVICE`` (asserted);
    * ``get_missing_weights`` lists every weight of a stripped engine until set, and the partners
      of a set weight that TensorRT combined with it (``groups``);
    * ``refit_cuda_engine_async`` returns False when weights are missing or, with
      ``weights_validation``, not finite; ``fail_after`` makes it apply only some weights and
      return False ("a subset of weights may have been refitted"); refitting while the engine's
      inference stream has pending work is undefined behaviour, so it raises;
    * weights set are held by reference until ``unset_named_weights``.
    """

    def __init__(self, prototypes: Mapping[str, tuple[str, int]], *, groups: Sequence[set[str]] = (),
                 infer_stream: FakeStream, refit_stream: FakeStream, missing_lies: bool = False) -> None:
        self.prototypes = dict(prototypes)
        self.groups = [set(g) for g in groups]
        self.infer_stream = infer_stream
        self.refit_stream = refit_stream
        self.weights_validation = True
        self.max_threads = 1
        self.pending: dict[str, torch.Tensor] = {}
        self.engine: dict[str, torch.Tensor] = {}  # what the engine holds after refits
        self.never_refitted = set(prototypes)
        self.refit_calls = 0
        self.set_calls: list[str] = []
        self.fail_after: int | None = None
        self.missing_lies = missing_lies

    def get_all_weights(self) -> list[str]:
        return list(self.prototypes)

    def get_weights_prototype(self, weights_name: str) -> FakePrototype:
        if weights_name not in self.prototypes:
            return FakePrototype("FLOAT", -1)
        dt, size = self.prototypes[weights_name]
        return FakePrototype(dt, size)

    def set_named_weights(self, name: str, weights: Any, location: Any) -> bool:
        assert location == DEVICE, "hotswap passes CUDA tensors with TensorLocation.DEVICE"
        self.set_calls.append(name)
        proto = self.prototypes.get(name)
        if proto is None:
            return False
        t = weights.tensor
        if t.numel() != proto[1] or torch_dtype_to_trt_name(t.dtype) != proto[0]:
            return False
        self.pending[name] = t
        return True

    def unset_named_weights(self, weights_name: str) -> bool:
        return self.pending.pop(weights_name, None) is not None

    def get_missing_weights(self) -> list[str]:
        if self.missing_lies:
            return []
        missing = {n for n in self.never_refitted if n not in self.pending}
        for g in self.groups:
            if g & set(self.pending):
                missing |= g - set(self.pending)
        return sorted(missing)

    def refit_cuda_engine_async(self, stream_handle: int) -> bool:
        if not self.infer_stream.query():
            raise AssertionError("refit while the engine has pending work on another stream (undefined)")
        assert stream_handle == self.refit_stream.cuda_stream, "refit on the slot's own refit stream"
        self.refit_calls += 1
        if self.get_missing_weights():
            return False
        if self.weights_validation and not all(bool(torch.isfinite(t).all()) for t in self.pending.values()):
            return False
        items = list(self.pending.items())
        if self.fail_after is not None:
            for name, t in items[: self.fail_after]:
                self.engine[name] = t.clone()
            return False
        for name, t in items:
            self.engine[name] = t.clone()
            self.never_refitted.discard(name)
        return True


class FakeBackend:
    """The slot's refit backend without TensorRT: weights are the tensors themselves."""

    device_location = DEVICE

    def make_weights(self, tensor: torch.Tensor) -> FakeWeights:
        return FakeWeights(tensor)

    def prototype(self, refitter: Any, name: str) -> tuple[torch.dtype | None, int]:
        p = refitter.get_weights_prototype(name)
        return trt_dtype_to_torch(p.dtype), int(p.size)

    def stream_context(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def errors(self) -> list[str]:
        return ["fake refitter says no"]


# --------------------------------------------------------------------------- the rig: a Linear + BatchNorm engine
#: engine weight names as Torch-TensorRT would give them: the linear kernel and bias, the folded
#: batch-norm scale and shift, and a constant that is not in the checkpoint (the ``* 0.5``)
W, B, SCALE, SHIFT, HALF_SCALE = ("fc CONSTANT", "fc_bias CONSTANT",
                                  "[SCALE]-[ATEN_ops._native_batch_norm_legit_no_training.default]-[bn] SCALE",
                                  "[SCALE]-[ATEN_ops._native_batch_norm_legit_no_training.default]-[bn] SHIFT",
                                  "half CONSTANT")
EPS = 1e-3


class FakeHandle:
    """Computes the model from what the fake engine holds; leaves its inference 'pending'."""

    def __init__(self, refitter: FakeTensorRTRefitter, infer_stream: FakeStream) -> None:
        self.refitter = refitter
        self.infer_stream = infer_stream
        self.runs = 0

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        e = self.refitter.engine
        y = inputs[0] @ e[W] + e[B]
        y = (y * e[SCALE] + e[SHIFT]) * e[HALF_SCALE]
        self.infer_stream.pending = True  # enqueued work; the slot must drain it before a refit
        self.runs += 1
        return [y]

    def serialize_refittable(self) -> bytes:
        return b"engine-with-weights"

    def close(self) -> None:
        self.refitter.engine.clear()


class LinearBN(nn.Module):
    """The eager model the fake engine computes: ``bn(fc(x)) * 0.5``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x)) * 0.5


def weight_map() -> tuple[tm.WeightMap, dict[str, torch.Tensor]]:
    """The weight map of the fake engine and its stored constant."""
    f32 = torch.float32
    records = (
        tm.WeightRecord(W, (3, 4), f32, tm.Permute(tm.Source("fc.weight"), (1, 0))),
        tm.WeightRecord(B, (4,), f32, tm.Source("fc.bias")),
        tm.WeightRecord(SCALE, (4,), f32, tm.BnScale(tm.Source("bn.weight"), tm.Source("bn.running_var"), EPS)),
        tm.WeightRecord(SHIFT, (4,), f32, tm.BnShift(tm.Source("bn.bias"), tm.Source("bn.running_mean"),
                                                     tm.Source("bn.weight"), tm.Source("bn.running_var"), EPS)),
        tm.WeightRecord(HALF_SCALE, (1,), f32, tm.Literal("lit0")),
    )
    m = LinearBN()
    specs = {k: WeightSpec(k, tuple(v.shape), v.dtype) for k, v in m.state_dict().items()
             if k != "bn.num_batches_tracked"}
    return tm.WeightMap(records, specs, ("bn.num_batches_tracked",), ("lit0",)), {"lit0": torch.tensor([0.5])}


PROTOS = {W: ("FLOAT", 12), B: ("FLOAT", 4), SCALE: ("FLOAT", 4), SHIFT: ("FLOAT", 4), HALF_SCALE: ("FLOAT", 1)}


@dataclass
class Rig:
    """A real :class:`TensorRTSlot` on the fakes, with the fakes at hand for assertions."""

    slot: TensorRTSlot
    refitter: FakeTensorRTRefitter
    handle: FakeHandle
    infer: FakeStream
    refit: FakeStream


def make_rig(*, groups: Sequence[set[str]] = (), protos: Mapping[str, tuple[str, int]] = PROTOS,
             options: TrtBuildOptions | None = None, missing_lies: bool = False) -> Rig:
    """A fresh slot on a fresh fake engine (``groups``: weights TensorRT combined; ``protos``: its prototypes)."""
    infer, refit = FakeStream(11), FakeStream(22)
    refitter = FakeTensorRTRefitter(protos, groups=groups, infer_stream=infer, refit_stream=refit,
                                    missing_lies=missing_lies)
    handle = FakeHandle(refitter, infer)
    wm, lits = weight_map()
    slot = TensorRTSlot(weight_map=wm, literals=lits, refitter=refitter, backend=FakeBackend(), handle=handle,
                        refit_stream=refit, infer_stream=infer, device=torch.device("cpu"),
                        options=options or TrtBuildOptions())
    return Rig(slot, refitter, handle, infer, refit)


def checkpoint(seed: int) -> tuple[LinearBN, dict[str, torch.Tensor]]:
    """An eager model with random weights (small variances: eps matters) and its state dict."""
    torch.manual_seed(seed)
    m = LinearBN().eval()
    with torch.no_grad():
        m.bn.weight.uniform_(0.5, 2.0)
        m.bn.bias.uniform_(-1, 1)
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(1e-3, 1e-2)
    return m, {k: v.detach().clone() for k, v in m.state_dict().items()}


X = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))


def eager(m: nn.Module) -> torch.Tensor:
    """The eager model's output on :data:`X`."""
    with torch.no_grad():
        out: torch.Tensor = m(X)
    return out


def install(rig: Rig, sd: Mapping[str, torch.Tensor]) -> None:
    """Transfer, then refit, as the coordinator does."""
    rig.slot.refit(rig.slot.transfer(sd))
