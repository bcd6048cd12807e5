"""The TensorRT engine without TensorRT: availability message, cache key and bridge, and the slot's
refit control flow against :class:`FakeTensorRTRefitter`, a stand-in that enforces the call rules of
``tensorrt.Refitter`` as its docstrings state them. Nothing here runs TensorRT."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from serving.cache import EngineCache
from serving.engines.tensorrt import (
    CacheBridge,
    TensorRTEngine,
    TensorRTSlot,
    TrtBuildOptions,
    TrtEnvironment,
    cache_key,
    cache_key_fields,
    parse_version,
    probe_environment,
    torch_dtype_to_trt_name,
    trt_dtype_to_torch,
    unavailable_message,
)
from serving.engines.tensorrt import mapping as tm
from serving.errors import (
    CacheError,
    ConfigError,
    EngineBuildError,
    EngineUnavailableError,
    NotReadyError,
    RefitError,
)
from serving.examples import CNN, example_build_spec
from serving.metrics import prometheus_metrics
from serving.specs import BuildSpec, WeightSpec

T = TypeVar("T")


# =========================================================================== availability
def test_build_without_tensorrt_says_what_is_missing_and_how_to_install() -> None:
    spec = example_build_spec(CNN, device="cuda")
    with pytest.raises(EngineUnavailableError) as info:
        TensorRTEngine.build(spec)
    msg = str(info.value)
    assert msg.startswith("engine 'tensorrt' is not available on this machine:")
    assert "TensorRT" in msg and ">= 10.14" in msg
    assert "pip install 'trt-hotswap[tensorrt]'" in msg and "NGC Triton container" in msg
    assert "Traceback" not in msg
    assert info.value.reason == "engine_unavailable"


def test_missing_tensorrt_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(EngineUnavailableError, match=r"the TensorRT Python package cannot be imported"):
        probe_environment(torch.device("cuda"))


def test_cpu_device_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineUnavailableError, match=r"device 'cpu' is not a CUDA device; set device 'cuda'"):
        probe_environment(torch.device("cpu"))


def test_registry_reports_the_same_message() -> None:
    from serving.engines import build_engine

    with pytest.raises(EngineUnavailableError, match=r"pip install 'trt-hotswap\[tensorrt\]'"):
        build_engine("tensorrt", example_build_spec(CNN, device="cuda"))


def test_unavailable_message_lists_every_problem() -> None:
    msg = unavailable_message(["a is missing", "b is too old"])
    assert "  - a is missing\n  - b is too old\n" in msg


@pytest.mark.parametrize(("text", "expected"), [
    ("10.14.1.48.post1", (10, 14, 1, 48)), ("10.13.3.9", (10, 13, 3, 9)), ("2.13.0+cu130", (2, 13, 0)),
    ("2.10.0a0", (2, 10, 0)), ("11.0.0.114", (11, 0, 0, 114)),
])
def test_parse_version(text: str, expected: tuple[int, ...]) -> None:
    assert parse_version(text) == expected
    assert (parse_version(text) >= (10, 14)) == (expected >= (10, 14))


# =========================================================================== options and key
def test_options_from_spec() -> None:
    spec = BuildSpec("m:f", (), options=(("trt_weights_validation", "false"), ("trt_refit_max_threads", "4")))
    opts = TrtBuildOptions.from_spec(spec)
    assert opts.weights_validation is False and opts.max_threads == 4
    assert TrtBuildOptions.from_spec(BuildSpec("m:f", ())).weights_validation is True
    with pytest.raises(ConfigError, match="trt_refit_max_threads"):
        TrtBuildOptions.from_spec(BuildSpec("m:f", (), options=(("trt_refit_max_threads", "many"),)))
    with pytest.raises(ConfigError, match="trt_weights_validation"):
        TrtBuildOptions.from_spec(BuildSpec("m:f", (), options=(("trt_weights_validation", "maybe"),)))


ENV = TrtEnvironment("10.14.1.48", "2.10.0", "2.10.0", "13.0", "NVIDIA H100 80GB HBM3", "9.0")


def test_cache_key_is_stricter_than_the_graph_hash() -> None:
    spec = example_build_spec(CNN, device="cuda")
    opts = TrtBuildOptions()
    base = cache_key(cache_key_fields("abc", ENV, spec, opts))
    assert base == cache_key(cache_key_fields("abc", ENV, spec, opts)) and base.startswith("trt-")
    variants = [
        cache_key_fields("abd", ENV, spec, opts),
        cache_key_fields("abc", TrtEnvironment("10.15.1.29", *list(vars(ENV).values())[1:]), spec, opts),
        cache_key_fields("abc", TrtEnvironment("10.14.1.48", "2.11.0", "2.10.0", "13.0", ENV.device_name, "9.0"),
                         spec, opts),
        cache_key_fields("abc", TrtEnvironment("10.14.1.48", "2.10.0", "2.10.1", "13.0", ENV.device_name, "9.0"),
                         spec, opts),
        cache_key_fields("abc", TrtEnvironment("10.14.1.48", "2.10.0", "2.10.0", "13.0", "NVIDIA L4", "8.9"),
                         spec, opts),
        cache_key_fields("abc", ENV, example_build_spec(CNN, device="cuda", max_batch=4), opts),
        {**cache_key_fields("abc", ENV, spec, opts), "schema": 999},
    ]
    assert len({base, *(cache_key(v) for v in variants)}) == len(variants) + 1


# =========================================================================== cache bridge
def _events(registry: CollectorRegistry, event: str) -> float:
    return registry.get_sample_value("hotswap_engine_cache_events_total", {"event": event}) or 0.0


def _tiny_map() -> tuple[tm.WeightMap, dict[str, torch.Tensor]]:
    rec = tm.WeightRecord("w CONSTANT", (2,), torch.float32, tm.Source("w"))
    lit = tm.WeightRecord("k CONSTANT", (1,), torch.float32, tm.Literal("lit0"))
    return (tm.WeightMap((rec, lit), {"w": WeightSpec("w", (2,), torch.float32)}, (), ("lit0",)),
            {"lit0": torch.tensor([0.5])})


def test_cache_bridge_miss_store_hit_and_corrupt(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = prometheus_metrics(registry)
    cache = EngineCache(tmp_path, metrics=metrics)  # the real cache: it counts its own events
    spec = example_build_spec(CNN, device="cuda")

    def fields(h: str) -> dict[str, object]:
        return cache_key_fields(h, ENV, spec, TrtBuildOptions())

    bridge = CacheBridge(cache, fields, metrics)
    assert bridge.load("h1") is None and bridge.load("h1") is None  # Torch-TensorRT asks twice on a miss
    assert _events(registry, "miss") == 1
    bridge.save("h1", b"engine-blob")
    wm, lits = _tiny_map()
    key = bridge.commit(wm, lits)
    assert key == cache_key(fields("h1")) and _events(registry, "store") == 1
    assert [e.key for e in cache.entries()] == [key]

    again = CacheBridge(cache, fields, metrics)
    assert again.load("h1") == b"engine-blob"
    assert again.hit is not None
    _, entry = again.hit
    assert entry.weight_map == wm and torch.equal(entry.literals["lit0"], lits["lit0"])
    assert _events(registry, "hit") == 1

    (tmp_path / key / "torch_trt_blob.bin").write_bytes(b"engine-blub")  # corrupted on disk
    third = CacheBridge(cache, fields, metrics)
    assert third.load("h1") is None and third.hit is None
    assert _events(registry, "corrupt") == 1
    assert cache.entries() == []  # removed, to be rebuilt


def test_read_entry_names_the_file(tmp_path: Path) -> None:
    from serving.engines.tensorrt import entry_files, read_entry

    wm, lits = _tiny_map()
    for name, data in entry_files(b"x", wm, lits, {"a": 1}).items():
        (tmp_path / name).write_bytes(data)
    assert read_entry(tmp_path).blob == b"x"
    (tmp_path / "weight_map.json").write_text("{not json")
    with pytest.raises(CacheError, match=r"unreadable"):
        read_entry(tmp_path)


def test_commit_without_a_staged_engine_is_a_build_error() -> None:
    bridge = CacheBridge(None, lambda h: {"h": h}, prometheus_metrics(CollectorRegistry()))
    with pytest.raises(EngineBuildError, match="save was never called"):
        bridge.commit(*_tiny_map())


def test_dtype_names() -> None:
    @dataclass
    class FakeDataType:
        name: str

    assert trt_dtype_to_torch(FakeDataType("HALF")) is torch.float16
    assert trt_dtype_to_torch(FakeDataType("FP8")) is None
    assert torch_dtype_to_trt_name(torch.bfloat16) == "BF16"
    with pytest.raises(RefitError, match="float64 has no TensorRT weights type"):
        torch_dtype_to_trt_name(torch.float64)


# =========================================================================== the fake refitter
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
    tensor: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def size(self) -> int:
        return self.tensor.numel()


@dataclass
class FakePrototype:
    dtype: str  # a trt.DataType member name
    size: int


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
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x)) * 0.5


def weight_map() -> tuple[tm.WeightMap, dict[str, torch.Tensor]]:
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
    slot: TensorRTSlot
    refitter: FakeTensorRTRefitter
    handle: FakeHandle
    infer: FakeStream
    refit: FakeStream


def make_rig(*, groups: Sequence[set[str]] = (), protos: Mapping[str, tuple[str, int]] = PROTOS,
             options: TrtBuildOptions | None = None, missing_lies: bool = False) -> Rig:
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
    with torch.no_grad():
        out: torch.Tensor = m(X)
    return out


def install(rig: Rig, sd: Mapping[str, torch.Tensor]) -> None:
    rig.slot.refit(rig.slot.transfer(sd))


# =========================================================================== slot control flow
def test_slot_never_runs_before_its_first_refit() -> None:
    rig = make_rig()
    with pytest.raises(NotReadyError, match="no weights yet"):
        rig.slot.run([X])
    assert rig.handle.runs == 0


def test_first_refit_sets_every_weight_on_device_and_matches_eager() -> None:
    rig = make_rig()
    m, sd = checkpoint(0)
    install(rig, sd)
    assert sorted(rig.refitter.set_calls) == sorted(PROTOS)
    assert rig.refitter.refit_calls == 1
    assert rig.refitter.pending == {}, "every weight is unset after the refit (before its memory is freed)"
    assert torch.allclose(rig.slot.run([X])[0], eager(m), atol=1e-5)
    assert rig.slot.refit_count == 1 and rig.slot.ready


def test_first_refit_sets_all_names_even_if_get_missing_weights_says_none() -> None:
    rig = make_rig(missing_lies=True)
    install(rig, checkpoint(0)[1])
    assert set(rig.refitter.set_calls) == set(PROTOS)


def test_incomplete_first_refit_is_refused_before_anything_changes() -> None:
    rig = make_rig()
    sd = checkpoint(0)[1]
    del sd["bn.running_var"]
    with pytest.raises(RefitError, match=r"nothing changed[\s\S]*missing \['bn.running_var'\]"):
        install(rig, sd)
    assert rig.refitter.set_calls == [] and rig.refitter.refit_calls == 0
    assert not rig.slot.ready


def test_every_problem_is_reported_at_once() -> None:
    rig = make_rig()
    sd = checkpoint(0)[1]
    sd["fc.weight"] = torch.zeros(4, 4)
    sd["bn.bias"] = sd["bn.bias"].half()
    sd["stranger"] = torch.zeros(1)
    with pytest.raises(RefitError) as info:
        install(rig, sd)
    msg = str(info.value)
    assert "fc.weight: expected [4, 3] float32, found [4, 4] float32" in msg
    assert "bn.bias: expected [4] float32, found [4] float16" in msg
    assert "stranger: not a tensor this engine reads" in msg
    assert rig.refitter.set_calls == []


def test_ignored_names_are_accepted_and_skipped() -> None:
    rig = make_rig()
    sd = checkpoint(0)[1]
    assert "bn.num_batches_tracked" in sd
    install(rig, sd)
    assert rig.slot.ready


def test_partial_refit_sets_only_dependent_weights() -> None:
    rig = make_rig()
    m, sd = checkpoint(0)
    install(rig, sd)
    rig.refitter.set_calls.clear()
    new_var = sd["bn.running_var"] * 3
    rig.slot.refit(rig.slot.transfer({"bn.running_var": new_var}))
    assert sorted(rig.refitter.set_calls) == sorted([SCALE, SHIFT])
    with torch.no_grad():
        m.bn.running_var.copy_(new_var)
    assert torch.allclose(rig.slot.run([X])[0], eager(m), atol=1e-5)


def test_partners_that_tensorrt_combined_are_supplied_from_held_tensors() -> None:
    rig = make_rig(groups=[{W, SHIFT}])  # pretend TensorRT fused the kernel with the shift
    m, sd = checkpoint(0)
    install(rig, sd)
    rig.refitter.set_calls.clear()
    new_bias = sd["bn.bias"] + 1
    rig.slot.refit(rig.slot.transfer({"bn.bias": new_bias}))
    assert rig.refitter.set_calls == [SHIFT, W]
    with torch.no_grad():
        m.bn.bias.copy_(new_bias)
    assert torch.allclose(rig.slot.run([X])[0], eager(m), atol=1e-5)


def test_slot_keeps_host_references_not_device_copies() -> None:
    rig = make_rig()
    sd = checkpoint(0)[1]
    install(rig, sd)
    assert all(rig.slot.state.current[k] is sd[k] for k in rig.slot.weight_map.sources)


def test_refit_drains_pending_inference_first() -> None:
    rig = make_rig()
    sd = checkpoint(0)[1]
    install(rig, sd)
    rig.slot.run([X])
    assert rig.infer.pending
    rig.slot.refit(rig.slot.transfer({"fc.bias": sd["fc.bias"] + 1}))
    assert rig.refitter.refit_calls == 2 and not rig.infer.pending


def test_fake_refitter_refuses_a_refit_with_pending_work() -> None:
    rig = make_rig()
    rig.infer.pending = True
    with pytest.raises(AssertionError, match="pending work"):
        rig.refitter.refit_cuda_engine_async(rig.refit.cuda_stream)


def test_rejected_weight_refuses_refit_and_unsets_what_was_set() -> None:
    protos = {**PROTOS, SHIFT: ("HALF", 4)}  # the engine was built with an fp16 shift
    rig = make_rig(protos=protos)
    with pytest.raises(RefitError, match=r"engine weight '.*SHIFT': engine expects 4 x float16, computed 4 x float32"):
        install(rig, checkpoint(0)[1])
    assert rig.refitter.refit_calls == 0 and rig.refitter.pending == {}


def test_failed_refit_leaves_the_slot_not_ready_until_a_complete_refit() -> None:
    rig = make_rig()
    m, sd = checkpoint(0)
    install(rig, sd)
    rig.refitter.fail_after = 1
    with pytest.raises(RefitError, match="returned False.*fake refitter says no.*partial weight set"):
        rig.slot.refit(rig.slot.transfer({"fc.bias": sd["fc.bias"] + 1}))
    with pytest.raises(NotReadyError):
        rig.slot.run([X])
    assert rig.refitter.pending == {}
    rig.refitter.fail_after = None
    with pytest.raises(RefitError, match="must provide every tensor"):
        rig.slot.refit(rig.slot.transfer({"fc.bias": sd["fc.bias"]}))
    install(rig, sd)
    assert torch.allclose(rig.slot.run([X])[0], eager(m), atol=1e-5)


def test_weights_validation_and_max_threads_reach_the_refitter() -> None:
    rig = make_rig(options=TrtBuildOptions(weights_validation=False, max_threads=3))
    assert rig.refitter.weights_validation is False and rig.refitter.max_threads == 3
    rig = make_rig()
    assert rig.refitter.weights_validation is True
    sd = checkpoint(0)[1]
    sd["fc.bias"] = sd["fc.bias"].clone()
    sd["fc.bias"][0] = float("nan")
    with pytest.raises(RefitError, match="returned False"):
        install(rig, sd)


def test_engine_with_an_unmapped_weight_is_refused() -> None:
    protos = {**PROTOS, "mystery CONSTANT": ("FLOAT", 3)}
    with pytest.raises(EngineBuildError, match=r"does not cover: \['mystery CONSTANT'\]"):
        make_rig(protos=protos)


def test_serialize_refittable_needs_weights() -> None:
    rig = make_rig()
    with pytest.raises(NotReadyError):
        rig.slot.serialize_refittable()
    install(rig, checkpoint(0)[1])
    assert rig.slot.serialize_refittable() == b"engine-with-weights"


def test_three_refits_in_a_row_each_match_eager() -> None:
    rig = make_rig()
    for seed in (1, 2, 3):
        m, sd = checkpoint(seed)
        install(rig, sd)
        assert torch.allclose(rig.slot.run([X])[0], eager(m), atol=1e-5)
    assert rig.refitter.refit_calls == 3


def test_graph_reads_excludes_unused_state() -> None:
    from serving.engines.export import export
    from serving.engines.tensorrt.build import graph_reads
    from serving.examples.cnn import tiny_cnn

    spec = example_build_spec(CNN, device="cpu", max_batch=4)
    m = tiny_cnn().eval()
    reads = graph_reads(export(m, spec, torch.device("cpu")))
    assert "bn1.running_var" in reads and "conv1.weight" in reads and "head.bias" in reads
    assert "bn1.num_batches_tracked" not in reads
