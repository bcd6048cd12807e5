"""Weight records and the weight map: materializing, and their JSON form."""

from __future__ import annotations

import json

import pytest
import torch

from serving.engines.tensorrt import mapping as tm
from serving.specs import WeightSpec


def test_materialize_names_the_weight_on_mismatch() -> None:
    rec = tm.WeightRecord("mm_other CONSTANT", (3, 2), torch.float16, tm.Permute(tm.Source("w"), (1, 0)))
    with pytest.raises(tm.MappingError, match=r"mm_other CONSTANT.*dtype float32.*float16"):
        tm.materialize(rec, {"w": torch.zeros(2, 3)})
    with pytest.raises(tm.MappingError, match=r"mm_other CONSTANT.*'w' is needed"):
        tm.materialize(rec, {})
    with pytest.raises(tm.MappingError, match=r"shape \(4, 2\).*\(3, 2\)"):
        tm.materialize(rec, {"w": torch.zeros(2, 4, dtype=torch.float16)})


ALL_EXPRS: list[tm.Expr] = [
    tm.Source("a"),
    tm.Literal("lit0"),
    tm.Permute(tm.Source("a"), (1, 0)),
    tm.Reshape(tm.Source("a"), (2, 3)),
    tm.Cast(tm.Source("a"), torch.bfloat16),
    tm.BnScale(None, tm.Source("v"), 1e-3),
    tm.BnShift(tm.Source("b"), tm.Source("m"), tm.Source("w"), tm.Source("v"), 1e-3),
    tm.ConvBnWeight(tm.Source("cw"), tm.Source("w"), tm.Source("v"), 2e-5),
    tm.ConvBnBias(None, tm.Source("b"), tm.Source("m"), None, tm.Source("v"), 0.5),
]


@pytest.mark.parametrize("expr", ALL_EXPRS, ids=lambda e: type(e).__name__)
def test_expression_json_roundtrip(expr: tm.Expr) -> None:
    text = json.dumps(tm.expr_to_json(expr))
    assert tm.expr_from_json(json.loads(text)) == expr


def test_expression_json_errors() -> None:
    with pytest.raises(tm.MappingError, match="unknown expression op 'fft'"):
        tm.expr_from_json({"op": "fft"})
    with pytest.raises(tm.MappingError, match="lacks 'x'"):
        tm.expr_from_json({"op": "permute", "dims": [1, 0]})
    with pytest.raises(tm.MappingError, match="not an expression"):
        tm.expr_from_json([1, 2])


def _small_map() -> tm.WeightMap:
    records = (
        tm.WeightRecord("[CONSTANT]-[x]-[fc] w", (3, 2), torch.float32, tm.Permute(tm.Source("fc.weight"), (1, 0))),
        tm.WeightRecord("[SCALE]-[ATEN_ops.bn]-[bn] SCALE", (2,), torch.float32,
                        tm.BnScale(tm.Source("bn.weight"), tm.Source("bn.running_var"), 1e-3)),
        tm.WeightRecord("eps CONSTANT", (1,), torch.float32, tm.Literal("lit0")),
    )
    sources = {n: WeightSpec(n, s, torch.float32) for n, s in
               [("fc.weight", (2, 3)), ("bn.weight", (2,)), ("bn.running_var", (2,))]}
    return tm.WeightMap(records, sources, ("bn.num_batches_tracked",), ("lit0",))


def test_weight_map_json_roundtrip_and_dependents() -> None:
    wm = _small_map()
    back = tm.WeightMap.from_json(json.loads(json.dumps(wm.to_json())))
    assert back == wm
    assert [r.name for r in wm.dependents(["bn.running_var"])] == ["[SCALE]-[ATEN_ops.bn]-[bn] SCALE"]
    assert wm.dependents(["unrelated"]) == []


def test_weight_map_from_json_refuses_bad_maps() -> None:
    d = _small_map().to_json()
    with pytest.raises(tm.MappingError, match="schema 99"):
        tm.WeightMap.from_json({**d, "schema": 99})
    d2 = json.loads(json.dumps(d))
    d2["sources"] = [s for s in d2["sources"] if s["name"] != "bn.weight"]
    d2["literals"] = []
    with pytest.raises(tm.MappingError, match=r"undeclared checkpoint tensors \['bn.weight'\].*undeclared constants"):
        tm.WeightMap.from_json(d2)
