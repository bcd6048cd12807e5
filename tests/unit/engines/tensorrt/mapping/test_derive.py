"""Deriving records from Torch-TensorRT's bookkeeping (converter names, FX annotation through constant
folding, batch-norm nodes) and checking them against an independent weight set."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from serving.engines.tensorrt import mapping as tm
from serving.specs import WeightSpec


def test_parse_weight_name_follows_to_trt_weights_format() -> None:
    # the f-strings of to_trt_weights (dynamo/conversion/converter_utils.py)
    layer, target, name, role = "SCALE", "ATEN_ops._native_batch_norm_legit_no_training.default", "bn1_bn", "SHIFT"
    p = tm.parse_weight_name(f"[{layer}]-[{target}]-[{name}] {role}")
    assert p == tm.ParsedWeightName(layer, target, name, role)
    assert tm.parse_weight_name("addmm_other CONSTANT") == tm.ParsedWeightName("CONSTANT", "", "addmm_other",
                                                                                 "CONSTANT")
    assert tm.parse_weight_name("some tensor") is None


def _export_module(module: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    ep = torch.export.export(module.eval(), (x,)).run_decompositions()
    return ep.module()  # type: ignore[return-value]


class _LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def test_annotation_survives_constant_folding_like_torch_tensorrt() -> None:
    """Fold constants with torch's ConstantFolder and replace nodes as Torch-TensorRT's
    ``replace_node_with_constant`` does (``meta.update`` from the replaced node): the folded
    ``_frozen_param`` carries the expression of the permuted linear weight."""
    from torch._inductor.constant_folding import ConstantFolder

    m = _LinearBN()
    gm = _export_module(m, torch.randn(2, 3))
    names = list(m.state_dict())
    exprs = tm.annotate_constant_exprs(gm, names)
    assert tm.Permute(tm.Source("fc.weight"), (1, 0)) in exprs.values()

    cf = ConstantFolder(gm, skip_constructors=False)
    cf.run()
    for i, (node, constant) in enumerate(cf.node_replacements.items()):
        with gm.graph.inserting_before(node):
            new = gm.graph.create_node("get_attr", f"_frozen_param{i}", (), {})
            node.replace_all_uses_with(new)
            new.meta.update(node.meta)
            gm.graph.erase_node(node)
        gm.register_parameter(f"_frozen_param{i}", nn.Parameter(constant, requires_grad=False))
    frozen = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("_frozen_param")]
    assert frozen, "expected the permute of fc.weight to be folded"
    got = {tm.node_expr(n, names) for n in frozen}
    assert tm.Permute(tm.Source("fc.weight"), (1, 0)) in got
    # the expression reproduces the folded tensor exactly
    folded = {n.target: getattr(gm, str(n.target)) for n in frozen}
    sd = m.state_dict()
    for n in frozen:
        e = tm.node_expr(n, names)
        assert e is not None and torch.equal(tm.evaluate(e, sd), folded[n.target])


def test_batch_norm_nodes_read_the_real_eps() -> None:
    from serving.examples.cnn import tiny_cnn

    m = tiny_cnn()
    gm = _export_module(m, torch.randn(1, 3, 32, 32))
    bns = tm.batch_norm_nodes(gm, list(m.state_dict()))
    assert len(bns) == 2
    for node in bns.values():
        assert node.eps == pytest.approx(1e-3)
        assert isinstance(node.weight, tm.Source) and node.weight.name.endswith(".weight")
        assert isinstance(node.running_var, tm.Source) and node.running_var.name.endswith(".running_var")


def _fake_torch_trt_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What Torch-TensorRT's converters would record for a linear+BN graph (shape of their naming)."""
    scale = sd["bn.weight"] / torch.sqrt(sd["bn.running_var"] + 1e-3)  # batch_norm_constant_folding
    return {
        "addmm_other CONSTANT": sd["fc.weight"].t().contiguous(),
        "addmm_bias CONSTANT": sd["fc.bias"],
        "[SCALE]-[ATEN_ops._native_batch_norm_legit_no_training.default]-[bn_node] SCALE": scale,
        "[SCALE]-[ATEN_ops._native_batch_norm_legit_no_training.default]-[bn_node] SHIFT":
            sd["bn.bias"] - sd["bn.running_mean"] * scale,
        "div_scalar CONSTANT": torch.tensor([0.125]),
    }


def _specs(sd: dict[str, torch.Tensor]) -> dict[str, WeightSpec]:
    return {k: WeightSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()}


def test_derive_records_by_identity_and_converter_names_then_verify() -> None:
    torch.manual_seed(2)
    m = _LinearBN().eval()
    sd = {k: v.detach().clone() for k, v in m.state_dict().items() if v.dtype.is_floating_point}
    refit_map = _fake_torch_trt_weights(sd)
    # the interpreter's get_attr results: the folded permute (with its expression) and the bias itself
    attrs = [(refit_map["addmm_other CONSTANT"], tm.Permute(tm.Source("fc.weight"), (1, 0))),
             (refit_map["addmm_bias CONSTANT"], tm.Source("fc.bias"))]
    bn = {"bn_node": tm.BatchNormNode(tm.Source("bn.weight"), tm.Source("bn.bias"), tm.Source("bn.running_mean"),
                                      tm.Source("bn.running_var"), 1e-3)}
    d = tm.derive_records(refit_map, list(refit_map), attrs, bn, _specs(sd))
    assert d.problems == ()
    by = {r.name: r.expr for r in d.records}
    assert by["addmm_other CONSTANT"] == tm.Permute(tm.Source("fc.weight"), (1, 0))
    assert by["addmm_bias CONSTANT"] == tm.Source("fc.bias")
    assert isinstance(by["[SCALE]-[ATEN_ops._native_batch_norm_legit_no_training.default]-[bn_node] SCALE"],
                      tm.BnScale)
    assert by["div_scalar CONSTANT"] == tm.Literal("lit0")
    # an independent weight set gives exactly what "Torch-TensorRT" gives
    rnd = tm.random_sources(_specs(sd), seed=3)
    assert tm.compare_records(d.records, rnd, d.literals, _fake_torch_trt_weights(rnd)) == []


def test_verification_catches_a_weight_taken_for_a_constant() -> None:
    torch.manual_seed(3)
    sd = {k: v.detach().clone() for k, v in _LinearBN().state_dict().items() if v.dtype.is_floating_point}
    refit_map = _fake_torch_trt_weights(sd)
    # no provenance given at all: every weight would become a stored constant
    d = tm.derive_records(refit_map, list(refit_map), [], {}, _specs(sd))
    rnd = tm.random_sources(_specs(sd), seed=4)
    problems = tm.compare_records(d.records, rnd, d.literals, _fake_torch_trt_weights(rnd))
    flagged = {p.split("'")[1] for p in problems}
    assert flagged == {"addmm_other CONSTANT", "addmm_bias CONSTANT"}
    assert all("would stay baked in" in p for p in problems)
    # a SCALE/SHIFT whose batch-norm node is unknown is not guessed at: it is reported
    assert len(d.problems) == 2 and all("no batch-norm node 'bn_node'" in p for p in d.problems)


def test_derive_records_adds_the_converters_cast() -> None:
    w = torch.randn(4, 3)
    value = w.to(torch.float16)  # e.g. to_torch(weight, dtype=input.dtype) in the conv converter
    name = "[CONVOLUTION]-[ATEN_ops.convolution.default]-[conv] KERNEL"
    d = tm.derive_records({name: value}, [name], [(value, tm.Source("w"))], {},
                          {"w": WeightSpec("w", (4, 3), torch.float32)})
    assert d.records[0].expr == tm.Cast(tm.Source("w"), torch.float16)
    assert torch.equal(tm.materialize(d.records[0], {"w": w}), value)


def test_derive_records_reports_unknown_names() -> None:
    d = tm.derive_records({}, ["ghost CONSTANT"], [], {}, {})
    assert d.records == () and "ghost CONSTANT" in d.problems[0]


def test_random_sources_are_positive_floats_only() -> None:
    specs = {"w": WeightSpec("w", (3, 2), torch.float16), "ids": WeightSpec("ids", (4,), torch.int64)}
    rnd = tm.random_sources(specs, seed=0)
    assert set(rnd) == {"w"} and rnd["w"].dtype == torch.float16
    assert bool((rnd["w"] >= 0.5).all()) and bool((rnd["w"] <= 1.5).all())
    assert torch.equal(rnd["w"], tm.random_sources(specs, seed=0)["w"])
