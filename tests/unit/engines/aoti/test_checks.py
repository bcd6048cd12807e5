"""The AOTI engine's pure checks: what the graph reads and the engine keeps, the compiled constants, the package,
what a weight set must be for the runner, a cached weight list against the module."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from serving.engines.aoti import compiler
from serving.engines.aoti.checks import (
    cached_spec_problems,
    constant_problems,
    graph_tensor_usage,
    kept_tensors,
    package_problems,
    runner_problems,
    split_state,
    tensors_sha256,
)
from serving.engines.base import weight_problems
from serving.engines.export import nonpersistent_buffers
from serving.specs import WeightSpec


def test_constant_problems_name_both_directions() -> None:
    assert constant_problems(["a", "b"], ["b", "a"]) == []
    problems = constant_problems(["a", "x"], ["a", "bias"])
    assert len(problems) == 2
    assert "'bias' is read by the graph but is not a constant" in problems[0]
    assert "constant 'x'" in problems[1]


def test_split_state_ignores_unread_and_refuses_non_contiguous_tensors() -> None:
    state = {"w": torch.zeros(2, 2), "n": torch.zeros((), dtype=torch.int64), "t": torch.zeros(4, 2).t()}
    specs, ignored, problems = split_state(state, {"w", "t", "rope_cache"})
    assert set(specs) == {"w", "t"} and ignored == frozenset({"n"})
    (problem,) = problems  # rope_cache is not in the state dict: kept_tensors' business, not a weight
    assert "'t' is not contiguous" in problem


class _Kept(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("scale", torch.arange(4.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale + torch.tensor([1.0, 2.0, 3.0, 4.0])  # a constant lifted while tracing


def test_kept_tensors_are_the_non_persistent_buffers_and_traced_constants_the_graph_reads() -> None:
    module = _Kept()
    ep = torch.export.export(module, (torch.zeros(2, 4),), strict=False)
    used, _ = graph_tensor_usage(ep)
    values, why, problems = kept_tensors(ep, module.state_dict(), used)
    assert problems == [] and "scale" in values and len(values) == 2
    assert why["scale"].startswith("non-persistent buffer")
    (lifted,) = set(values) - {"scale"}
    assert why[lifted] == "tensor constant created while tracing"
    assert torch.equal(values["scale"], torch.arange(4.0))
    assert set(nonpersistent_buffers(module)) == {"scale"}
    other = _Kept()
    other.scale.add_(1)
    assert tensors_sha256(nonpersistent_buffers(module)) == tensors_sha256(nonpersistent_buffers(_Kept()))
    assert tensors_sha256(nonpersistent_buffers(module)) != tensors_sha256(nonpersistent_buffers(other))
    assert constant_problems(["lin.weight", "lin.bias", *values], ["lin.weight", "lin.bias"], values) == []


def test_runner_problems_add_the_device_index_and_compact_tensors_to_the_weight_checks() -> None:
    specs = {"w": WeightSpec("w", (2,), torch.float32), "b": WeightSpec("b", (1,), torch.float32)}
    cpu = torch.device("cpu")
    ok = {"w": torch.zeros(2)}
    assert weight_problems(specs, ok, cpu, full=False, extra=runner_problems(cpu)) == []
    (problem,) = weight_problems(specs, ok, cpu, full=True, extra=runner_problems(cpu))
    assert "missing 1: 'b'" in problem
    (view,) = weight_problems(specs, {"w": torch.zeros(4)[:2]}, cpu, full=False, extra=runner_problems(cpu))
    assert "'w': not contiguous or a view into a larger storage" in view
    assert runner_problems(torch.device("meta", 1))("w", torch.zeros(2, device="meta")) == [
        "'w': on meta, expected meta:1 (call transfer() first)"]


def test_package_problems_spot_packaged_weights(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.pt2", tmp_path / "bad.pt2"
    with zipfile.ZipFile(good, "w") as z:
        z.writestr("m/data/aotinductor/model/x.wrapper.so", b"code")
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("m/data/aotinductor/model/x.wrapper.so", b"code")
        z.writestr("m/data/weights/weight_0", b"w")
    assert package_problems(good) == []
    assert "holds weights" in package_problems(bad)[0]
    (tmp_path / "junk.pt2").write_bytes(b"no zip")
    assert "not a readable .pt2" in package_problems(tmp_path / "junk.pt2")[0]


def test_cached_spec_problems_compare_names_shapes_dtypes() -> None:
    state = {"w": torch.zeros(2, 3), "n": torch.zeros((), dtype=torch.int64)}
    good = {"w": WeightSpec("w", (2, 3), torch.float32)}
    assert cached_spec_problems(state, good, frozenset({"n"})) == []
    problems = cached_spec_problems(
        state, {"w": WeightSpec("w", (3, 2), torch.float16), "v": WeightSpec("v", (1,), torch.float32)},
        frozenset())
    assert len(problems) == 3
    assert "module tensor 'n'" in problems[0] and "'v' is not in the module" in problems[1]
    assert "'w' is [3, 2] float16, the module has [2, 3] float32" in problems[2]


def test_optional_inductor_configs_only_where_torch_has_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiler, "OPTIONAL_INDUCTOR_CONFIGS", {"aot_inductor.no_such_setting": 1,
                                                            "aot_inductor.debug_compile": False})
    configs = compiler.inductor_configs()
    assert configs == {**compiler.INDUCTOR_CONFIGS, "aot_inductor.debug_compile": False}
