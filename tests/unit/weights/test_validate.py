"""check_metadata / conform: names, shapes, dtype casting rules, finite values."""

from __future__ import annotations

import pytest
import torch

import serving.weights.validate as validate_mod
from serving.errors import ConfigError, ValidationError
from serving.specs import WeightSpec
from serving.weights.safetensors_header import TensorMeta
from serving.weights.validate import ValidationPolicy, cast_allowed, check_metadata, conform

SAME_KIND = ValidationPolicy()
STRICT = ValidationPolicy(cast="strict")
IGNORE = ValidationPolicy(unexpected="ignore")

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def _specs(**shapes: tuple[tuple[int, ...], torch.dtype]) -> dict[str, WeightSpec]:
    return {k.replace("__", "."): WeightSpec(k.replace("__", "."), s, d) for k, (s, d) in shapes.items()}


def _meta(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> TensorMeta:
    n = 1
    for d in shape:
        n *= d
    return TensorMeta(name, dtype, shape, 0, n * dtype.itemsize, "ckpt.safetensors")


def _metas(*entries: tuple[str, tuple[int, ...], torch.dtype]) -> dict[str, TensorMeta]:
    return {name: _meta(name, shape, dtype) for name, shape, dtype in entries}


SPECS = {
    "w": WeightSpec("w", (4, 8), F32),
    "b": WeightSpec("b", (4,), F32),
    "steps": WeightSpec("steps", (), torch.int64),
}


# ------------------------------------------------------------------ check_metadata


def test_a_fitting_checkpoint_has_no_problems() -> None:
    found = _metas(("w", (4, 8), F32), ("b", (4,), F32), ("steps", (), torch.int64))
    assert check_metadata(SPECS, found, SAME_KIND, "ckpt") == []


def test_all_problems_are_reported_together() -> None:
    found = _metas(("w", (8, 4), F32), ("steps", (), torch.float32), ("extra", (3,), F32))
    problems = check_metadata(SPECS, found, SAME_KIND, "ckpt")
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert "tensor 'b': missing from the checkpoint (expected shape (4,), float32)" in text
    assert "tensor 'w': expected shape (4, 8), found (8, 4)" in text
    assert "transposed" in text
    assert "tensor 'steps': expected dtype int64, found float32" in text
    assert "tensor 'extra'" in text and "unexpected" in text and "unexpected='ignore'" in text
    err = ValidationError("ckpt", problems)
    assert err.problems == tuple(problems) and "4 problem(s)" in str(err)


def test_unexpected_ignored_by_policy() -> None:
    found = _metas(("w", (4, 8), F32), ("b", (4,), F32), ("steps", (), torch.int64), ("extra", (3,), F32))
    assert check_metadata(SPECS, found, IGNORE, "ckpt") == []
    assert len(check_metadata(SPECS, found, SAME_KIND, "ckpt")) == 1


def test_declared_ignored_names_are_accepted_silently() -> None:
    found = _metas(("w", (4, 8), F32), ("b", (4,), F32), ("steps", (), torch.int64),
                   ("bn.num_batches_tracked", (), torch.int64))
    assert check_metadata(SPECS, found, SAME_KIND, "ckpt", ignored={"bn.num_batches_tracked"}) == []
    assert check_metadata(SPECS, found, SAME_KIND, "ckpt") != []


def test_prefix_hint_for_wrapped_modules() -> None:
    found = _metas(("module.w", (4, 8), F32), ("b", (4,), F32), ("steps", (), torch.int64))
    problems = check_metadata(SPECS, found, SAME_KIND, "ckpt")
    assert any("missing" in p and "strip the prefix 'module.'" in p for p in problems), problems


def test_shape_hints() -> None:
    specs = _specs(a=((2, 6), F32), c=((3, 3), F32))
    problems = check_metadata(specs, _metas(("a", (3, 4), F32), ("c", (5, 3), F32)), SAME_KIND, "ckpt")
    assert "same number of elements" in problems[0]
    assert "different model configuration" in problems[1]


def test_strict_versus_same_kind() -> None:
    found = _metas(("w", (4, 8), F16), ("b", (4,), BF16), ("steps", (), torch.int64))
    assert check_metadata(SPECS, found, SAME_KIND, "ckpt") == []
    problems = check_metadata(SPECS, found, STRICT, "ckpt")
    assert len(problems) == 2
    assert "tensor 'w': expected dtype float32, found float16" in problems[0]
    assert "cast='same_kind'" in problems[0]


@pytest.mark.parametrize(("found", "expected"), [
    (torch.float32, torch.int64),   # float -> int
    (torch.int64, torch.float32),   # int -> float
    (torch.int32, torch.int64),     # ints must match exactly
    (torch.bool, torch.uint8),      # bools too
    (torch.float8_e4m3fn, torch.float32),  # scaled float8 is not cast
])
def test_never_cast(found: torch.dtype, expected: torch.dtype) -> None:
    specs = {"x": WeightSpec("x", (2,), expected)}
    problems = check_metadata(specs, _metas(("x", (2,), found)), SAME_KIND, "ckpt")
    assert len(problems) == 1 and "tensor 'x'" in problems[0]
    assert not cast_allowed(found, expected, "same_kind")


def test_cast_table() -> None:
    floats = [F32, F16, BF16, F64]
    for a in floats:
        for b in floats:
            assert cast_allowed(a, b, "same_kind")
            assert cast_allowed(a, b, "strict") == (a == b)
    assert cast_allowed(torch.int8, torch.int8, "strict")


def test_policy_values_are_checked() -> None:
    with pytest.raises(ConfigError, match="unexpected"):
        ValidationPolicy(unexpected="warn")
    with pytest.raises(ConfigError, match="cast"):
        ValidationPolicy(cast="unsafe")


# ------------------------------------------------------------------ conform


def test_conform_does_not_copy_what_needs_no_cast() -> None:
    w, b = torch.randn(4, 8), torch.randn(4)
    out = conform(SPECS, {"w": w, "b": b}, SAME_KIND, "ckpt")
    assert out["w"] is w and out["b"] is b


def test_conform_casts_floats_under_same_kind() -> None:
    w16 = torch.randn(4, 8).half()
    out = conform(SPECS, {"w": w16}, SAME_KIND, "ckpt")
    assert out["w"].dtype == F32 and torch.equal(out["w"], w16.float())
    assert w16.dtype == F16  # the input is untouched
    with pytest.raises(ValidationError, match="cast='strict' forbids casting"):
        conform(SPECS, {"w": w16}, STRICT, "ckpt")


def test_conform_refuses_float_to_int() -> None:
    with pytest.raises(ValidationError, match="never cast"):
        conform(SPECS, {"steps": torch.tensor(3.0)}, SAME_KIND, "ckpt")


def test_nan_is_found_and_named() -> None:
    w = torch.zeros(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ValidationError) as info:
        conform(SPECS, {"w": w}, SAME_KIND, "ckpt.safetensors")
    (problem,) = info.value.problems
    assert problem.startswith("tensor 'w': 1 NaN value(s), first at index (1, 2)")
    assert info.value.source == "ckpt.safetensors"


def test_inf_is_found_and_named() -> None:
    b = torch.tensor([0.0, float("-inf"), float("inf"), float("nan")])
    match = r"tensor 'b': 1 NaN and 2 Inf value\(s\), first at index \(1,\)"
    with pytest.raises(ValidationError, match=match):
        conform(SPECS, {"b": b}, SAME_KIND, "ckpt")


def test_check_finite_off() -> None:
    b = torch.tensor([0.0, float("nan"), 1.0, 2.0])
    out = conform(SPECS, {"b": b}, ValidationPolicy(check_finite=False), "ckpt")
    assert out["b"] is b


def test_overflow_on_cast_is_caught() -> None:
    specs = {"w": WeightSpec("w", (3,), F16)}
    w = torch.tensor([1.0, 1e6, -2e5], dtype=F32)
    with pytest.raises(ValidationError) as info:
        conform(specs, {"w": w}, SAME_KIND, "ckpt")
    (problem,) = info.value.problems
    assert "tensor 'w': 2 value(s) overflow to Inf when cast from float32 to float16" in problem
    assert "1e+06" in problem and "65504" in problem
    # in range: fine
    assert conform(specs, {"w": torch.tensor([1.0, 6e4, -2.0])}, SAME_KIND, "ckpt")["w"].dtype == F16


def test_overflow_float64_to_float32() -> None:
    specs = {"w": WeightSpec("w", (2,), F32)}
    with pytest.raises(ValidationError, match="overflow"):
        conform(specs, {"w": torch.tensor([1.0, 1e300], dtype=F64)}, SAME_KIND, "ckpt")


def test_finite_check_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate_mod, "_FINITE_CHUNK", 5)
    specs = {"x": WeightSpec("x", (4, 6), F32)}
    x = torch.zeros(4, 6)
    assert conform(specs, {"x": x}, SAME_KIND, "ckpt")["x"] is x
    x[3, 5] = float("inf")  # in the last chunk
    with pytest.raises(ValidationError, match=r"first at index \(3, 5\)"):
        conform(specs, {"x": x}, SAME_KIND, "ckpt")


def test_conform_collects_every_problem() -> None:
    tensors = {"w": torch.zeros(8, 4), "b": torch.tensor([float("nan")] * 4), "steps": torch.tensor(1.0),
               "extra": torch.zeros(1)}
    with pytest.raises(ValidationError) as info:
        conform(SPECS, tensors, SAME_KIND, "ckpt")
    assert [p.split(":")[0] for p in info.value.problems] == [
        "tensor 'w'", "tensor 'b'", "tensor 'steps'", "tensor 'extra'"]


def test_conform_partial_and_unexpected() -> None:
    b = torch.zeros(4)
    assert conform(SPECS, {"b": b}, SAME_KIND, "ckpt") == {"b": b}  # a subset is a partial refit
    assert conform(SPECS, {"b": b, "extra": b}, IGNORE, "ckpt") == {"b": b}
    assert conform(SPECS, {"b": b, "extra": b}, SAME_KIND, "ckpt", ignored={"extra"}) == {"b": b}
    with pytest.raises(ValidationError, match="'extra'"):
        conform(SPECS, {"b": b, "extra": b}, SAME_KIND, "ckpt")


def test_finite_check_is_exact_when_the_sum_overflows() -> None:
    """Large finite values overflow the fast sum; the element-wise check must still accept them."""
    from serving.weights.validate import _all_finite

    big = torch.full((1000,), 3e38, dtype=torch.float32)
    assert not torch.isfinite(big.sum())
    assert _all_finite(big)
    big[500] = float("inf")
    assert not _all_finite(big)
    mixed = torch.tensor([float("inf"), float("-inf"), 1.0])
    assert not _all_finite(mixed)


# ---------------------------------------------------------------- tied parameters (one tensor, several names)

TIED = {"emb.weight": WeightSpec("emb.weight", (5, 4), F32, ("head.weight",)), "b": WeightSpec("b", (5,), F32)}


@pytest.mark.parametrize("name", ["emb.weight", "head.weight"])
def test_any_one_name_of_a_tie_completes_the_checkpoint(name: str) -> None:
    metas = _metas((name, (5, 4), F32), ("b", (5,), F32))
    assert check_metadata(TIED, metas, SAME_KIND, "ckpt") == []
    out = conform(TIED, {name: torch.ones(5, 4), "b": torch.zeros(5)}, SAME_KIND, "ckpt")
    assert set(out) == {"emb.weight", "b"}


def test_a_tie_missing_under_every_name_names_the_tie() -> None:
    (problem,) = check_metadata(TIED, _metas(("b", (5,), F32)), SAME_KIND, "ckpt")
    assert "'emb.weight' or its tied name(s) 'head.weight': missing" in problem


def test_a_tie_saved_twice_must_hold_equal_values() -> None:
    metas = _metas(("emb.weight", (5, 4), F32), ("head.weight", (5, 4), F32), ("b", (5,), F32))
    assert check_metadata(TIED, metas, SAME_KIND, "ckpt") == []
    w = torch.randn(5, 4)
    same = conform(TIED, {"emb.weight": w, "head.weight": w.clone(), "b": torch.zeros(5)}, SAME_KIND, "ckpt")
    assert set(same) == {"emb.weight", "b"}
    with pytest.raises(ValidationError) as e:
        conform(TIED, {"emb.weight": w, "head.weight": w + 1, "b": torch.zeros(5)}, SAME_KIND, "ckpt")
    assert "'emb.weight' and 'head.weight' are one tied parameter" in str(e.value)
    assert "largest difference 1" in str(e.value)
    shapes = _metas(("emb.weight", (5, 4), F32), ("head.weight", (5, 4), F16), ("b", (5,), F32))
    assert any("different shapes or dtypes" in p for p in check_metadata(TIED, shapes, STRICT, "ckpt"))


def test_tie_groups_follow_storage_and_identity() -> None:
    from serving.specs import specs_with_ties, tie_groups

    emb = torch.nn.Embedding(5, 4)
    head = torch.nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    net = torch.nn.ModuleDict({"emb": emb, "head": head})
    assert tie_groups(net.state_dict()) == [("emb.weight", "head.weight")]
    with torch.device("meta"):
        meta = torch.nn.ModuleDict({"emb": torch.nn.Embedding(5, 4), "head": torch.nn.Linear(4, 5, bias=False)})
    meta["head"].weight = meta["emb"].weight
    assert tie_groups(meta.state_dict(keep_vars=True)) == [("emb.weight", "head.weight")]
    specs = specs_with_ties(net.state_dict(), {"head.weight"})
    assert specs == {"head.weight": WeightSpec("head.weight", (5, 4), F32, ("emb.weight",))}
    assert WeightSpec.from_json(specs["head.weight"].to_json()) == specs["head.weight"]


# ---------------------------------------------------------------- wrapper prefixes (DDP, Lightning, torch.compile)


@pytest.mark.parametrize("prefix", ["module.", "model.", "_orig_mod."])
def test_a_checkpoint_behind_a_wrapper_prefix_is_rejected_with_the_strip_prefix_to_set(prefix: str) -> None:
    metas = _metas(*((prefix + n, s.shape, s.dtype) for n, s in SPECS.items()))
    problems = check_metadata(SPECS, metas, SAME_KIND, "ckpt")
    assert problems[0].startswith(f"every tensor name starts with {prefix!r}")
    assert f"set the parameter strip_prefix to {prefix!r}" in problems[0]
    # not when only some names are behind it, or when stripping would not make it fit
    partial = {**metas, "w": _meta("w", (4, 8), F32)}
    partial.pop(prefix + "w")
    assert not any("every tensor name" in p for p in check_metadata(SPECS, partial, SAME_KIND, "ckpt"))
    wrong = _metas(*((prefix + n, (9,), s.dtype) for n, s in SPECS.items()))
    assert not any("every tensor name" in p for p in check_metadata(SPECS, wrong, SAME_KIND, "ckpt"))


def test_strip_names_removes_nested_wrappers_and_reports_clashes() -> None:
    from serving.weights.validate import strip_names

    renamed, clashes = strip_names(["module._orig_mod.w", "module.b", "steps"], ("module.", "_orig_mod."))
    assert renamed == {"w": "module._orig_mod.w", "b": "module.b", "steps": "steps"} and clashes == []
    _, clashes = strip_names(["module.w", "w"], ("module.",))
    assert clashes and "'module.w' and 'w' are both 'w'" in clashes[0]
    with pytest.raises(ConfigError, match="empty prefix"):
        ValidationPolicy(strip_prefix=("",))
