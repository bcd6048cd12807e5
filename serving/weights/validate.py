"""Checking that a checkpoint fits an engine, and bringing its tensors to the engine's dtypes.

Pure functions: no files, no threads. Every problem is collected before anything is raised, so a
checkpoint can be fixed in one pass.

Casting rules (``ValidationPolicy.cast``):

* ``"strict"``: the checkpoint's dtype must equal the engine's exactly.
* ``"same_kind"`` (default): a floating-point tensor may be cast to another floating-point dtype
  among float32, float16, bfloat16 and float64 (either direction). Integer and bool tensors must match
  exactly. Floating <-> integer/bool is never cast, and neither are float8 (their scales would be lost)
  nor complex tensors.

Finite values (``ValidationPolicy.check_finite``, default on): a NaN or +/-Inf anywhere in a
floating-point tensor is an error, and so is a cast that overflows to Inf (e.g. float32 ``1e6`` cast
to float16, whose largest value is 65504). The check runs on the cast result.

Names (``ValidationPolicy.unexpected``): tensors the engine does not have are an error (``"error"``,
default) or dropped (``"ignore"``, listed in :attr:`~serving.weights.loader.LoadedWeights.ignored`).
Names passed as ``ignored`` (tensors the engine deliberately does not use, e.g. BatchNorm's
``num_batches_tracked``) are always accepted and dropped. A tensor the engine needs that the
checkpoint lacks is always an error in :func:`check_metadata`.

Tied names (``WeightSpec.aliases``: one tensor under several state-dict names, e.g. GPT-2's
``lm_head.weight`` and ``transformer.wte.weight``): a checkpoint that provides any one name of the
group is complete; one that provides several must give them the same shape, dtype and values
(:func:`tie_problems`), else it is rejected with a message naming the tie. Tensors are returned
under the spec's name.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from serving.choices import CAST_MODES, UNEXPECTED_MODES
from serving.errors import ConfigError, ValidationError
from serving.specs import WeightSpec, dtype_name
from serving.weights.safetensors_header import TensorMeta

#: prefixes that common wrappers add to every state-dict name, and the wrapper (for the rejection's hint)
WRAPPER_PREFIXES: Mapping[str, str] = MappingProxyType({
    "module.": "DistributedDataParallel or DataParallel",
    "model.": "a Lightning module",
    "_orig_mod.": "torch.compile",
})

#: floating-point dtypes that ``cast="same_kind"`` converts between
CASTABLE_FLOATS: frozenset[torch.dtype] = frozenset({torch.float32, torch.float16, torch.bfloat16,
                                                      torch.float64})

_FINITE_CHUNK = 1 << 24  # elements per isfinite() pass: bounds the temporary bool tensor


@dataclass(frozen=True)
class ValidationPolicy:
    """How strictly a checkpoint must match the engine (see the module docstring)."""

    unexpected: str = "error"
    cast: str = "same_kind"
    check_finite: bool = True
    #: prefixes removed from checkpoint names before matching (``module.`` of DDP...), see :func:`strip_names`
    strip_prefix: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        bad = [p for p in self.strip_prefix if not p]
        if bad:
            raise ConfigError("ValidationPolicy.strip_prefix: an empty prefix")
        if self.unexpected not in UNEXPECTED_MODES:
            raise ConfigError(f"ValidationPolicy.unexpected={self.unexpected!r}; "
                              f"expected one of {UNEXPECTED_MODES}")
        if self.cast not in CAST_MODES:
            raise ConfigError(f"ValidationPolicy.cast={self.cast!r}; expected one of {CAST_MODES}")


def cast_allowed(found: torch.dtype, expected: torch.dtype, cast: str) -> bool:
    """Whether a ``found`` tensor may be cast to ``expected`` under the ``cast`` mode."""
    if found == expected:
        return True
    return cast == "same_kind" and found in CASTABLE_FLOATS and expected in CASTABLE_FLOATS


def _dtype_problem(name: str, expected: torch.dtype, found: torch.dtype, cast: str) -> str | None:
    if cast_allowed(found, expected, cast):
        return None
    exp, got = dtype_name(expected), dtype_name(found)
    msg = f"tensor {name!r}: expected dtype {exp}, found {got}"
    if cast == "strict" and found in CASTABLE_FLOATS and expected in CASTABLE_FLOATS:
        return f"{msg}; cast='strict' forbids casting: re-save it as {exp} or use cast='same_kind'"
    if found.is_floating_point and found not in CASTABLE_FLOATS:
        return f"{msg}; {got} is not cast automatically (scaled formats lose meaning): dequantize to {exp}"
    return f"{msg}; integer, bool and floating-point tensors are never cast into each other: re-save as {exp}"


def _shape_problem(name: str, expected: tuple[int, ...], found: tuple[int, ...]) -> str:
    msg = f"tensor {name!r}: expected shape {expected}, found {found}"
    n_exp = n_found = 1
    for d in expected:
        n_exp *= d
    for d in found:
        n_found *= d
    if len(expected) == 2 and found == expected[::-1] and expected[0] != expected[1]:
        return f"{msg}: transposed (stored as [in, out], e.g. a Conv1D layer?); transpose it when converting"
    if n_exp == n_found:
        return f"{msg}: same number of elements, a different layout; reshape/permute it when converting"
    return f"{msg}: was the checkpoint made for a different model configuration (width, vocabulary, classes)?"


def _missing_hint(name: str, extra: Collection[str]) -> str:
    for other in extra:
        if other.endswith("." + name):
            prefix = other[: -len(name)]
            return f"; the checkpoint has {other!r}: strip the prefix {prefix!r} (saved from a wrapper?)"
        if name.endswith("." + other):
            prefix = name[: -len(other)]
            return f"; the checkpoint has {other!r}: add the prefix {prefix!r}"
    return ""


def strip_names(names: Collection[str], prefixes: Collection[str]) -> tuple[dict[str, str], list[str]]:
    """Checkpoint names with ``prefixes`` removed (each leading one, repeatedly: ``module._orig_mod.x`` -> ``x``):
    (stripped name -> name in the checkpoint, problems for two names that strip to the same one)."""
    out: dict[str, str] = {}
    problems: list[str] = []
    for name in names:
        short = name
        while prefixes:
            p = next((p for p in prefixes if short.startswith(p) and len(short) > len(p)), None)
            if p is None:
                break
            short = short[len(p):]
        if short in out:
            problems.append(f"tensors {out[short]!r} and {name!r} are both {short!r} once the prefix is stripped "
                            "(strip_prefix); keep only one")
        out[short] = name
    return out, problems


def wrapper_hint(specs: Mapping[str, WeightSpec], found: Mapping[str, TensorMeta]) -> str | None:
    """The ``strip_prefix`` to suggest when every checkpoint name is an engine name (of the right shape) behind
    one wrapper's prefix."""
    known = engine_names(specs)
    if not found or any(n in known for n in found):
        return None
    for prefix, wrapper in WRAPPER_PREFIXES.items():
        stripped, clashes = strip_names(found, (prefix,))
        provided = provided_names(specs, stripped)
        if not clashes and all(n.startswith(prefix) for n in found) and provided.keys() == specs.keys() and \
                all(found[stripped[m]].shape == specs[n].shape for n, names in provided.items() for m in names):
            return (f"every tensor name starts with {prefix!r} (saved from {wrapper}?): set the parameter "
                    f"strip_prefix to {prefix!r}")
    return None


def engine_names(specs: Mapping[str, WeightSpec]) -> dict[str, str]:
    """Every name the engine accepts (spec names and their tied aliases) -> the spec's name."""
    return {n: spec.name for spec in specs.values() for n in spec.names}


def unexpected_names(specs: Mapping[str, WeightSpec], found: Collection[str],
                     ignored: Collection[str] = ()) -> list[str]:
    """Names in the checkpoint that the engine does not have and that are not declared ``ignored``."""
    known = engine_names(specs)
    return [n for n in found if n not in known and n not in ignored]


def provided_names(specs: Mapping[str, WeightSpec], found: Collection[str]) -> dict[str, tuple[str, ...]]:
    """Spec name -> the names of its tie group that ``found`` holds (the spec's own name first);
    specs the checkpoint does not provide are left out."""
    out: dict[str, tuple[str, ...]] = {}
    for name, spec in specs.items():
        present = tuple(n for n in spec.names if n in found)
        if present:
            out[name] = present
    return out


def _tie_text(names: Collection[str]) -> str:
    return " and ".join(repr(n) for n in names)


def tie_problems(specs: Mapping[str, WeightSpec], tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Tie groups that ``tensors`` provides under several names with different values."""
    problems: list[str] = []
    for name, present in provided_names(specs, tensors).items():
        first = tensors[present[0]]
        for other in present[1:]:
            t = tensors[other]
            if t.shape != first.shape or t.dtype != first.dtype:
                continue  # check_metadata reports it
            if not torch.equal(t, first):
                diff = float((t.double() - first.double()).abs().max()) if t.is_floating_point() else float("nan")
                problems.append(
                    f"tensors {_tie_text(present)} are one tied parameter of the engine ({name!r}), but the "
                    f"checkpoint holds different values for {present[0]!r} and {other!r} (largest difference "
                    f"{diff:.6g}); save the model with its weights tied, or keep only one of the names")
    return problems


def check_metadata(specs: Mapping[str, WeightSpec], found: Mapping[str, TensorMeta], policy: ValidationPolicy,
                   source: str, *, ignored: Collection[str] = ()) -> list[str]:
    """Every problem with names, shapes and dtypes, from the checkpoint's headers alone.

    Returns the problems (empty when the checkpoint fits); the caller raises
    ``ValidationError(source, problems)``. ``source`` is accepted for symmetry with :func:`conform`.
    """
    del source  # messages name tensors; ValidationError names the source
    problems: list[str] = []
    extra = unexpected_names(specs, found, ignored)
    provided = provided_names(specs, found)
    for name, spec in specs.items():
        present = provided.get(name, ())
        if not present:
            tied = f" or its tied name(s) {_tie_text(spec.aliases)}" if spec.aliases else ""
            problems.append(f"tensor {name!r}{tied}: missing from the checkpoint (expected shape {spec.shape}, "
                            f"{dtype_name(spec.dtype)}){_missing_hint(name, extra)}")
            continue
        for n in present:
            meta = found[n]
            if meta.shape != spec.shape:
                problems.append(_shape_problem(n, spec.shape, meta.shape))
            dtype_problem = _dtype_problem(n, spec.dtype, meta.dtype, policy.cast)
            if dtype_problem is not None:
                problems.append(dtype_problem)
        if len(present) > 1 and len({(found[n].shape, found[n].dtype) for n in present}) > 1:
            problems.append(f"tensors {_tie_text(present)} are one tied parameter of the engine ({name!r}), "
                            "but the checkpoint stores them with different shapes or dtypes; keep only one")
    if policy.unexpected == "error":
        problems += [f"tensor {n!r}: in the checkpoint but not in the engine (unexpected); remove it, "
                     f"or set ValidationPolicy(unexpected='ignore')" for n in extra]
    hint = wrapper_hint(specs, found) if problems else None
    return [hint, *problems] if hint else problems


def _all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or Inf.

    Fast path: if the plain sum is finite, every element is (IEEE: a NaN or Inf element makes
    any sum NaN or Inf). A non-finite sum may be an overflow of finite values, so only then is
    the tensor checked element by element (in chunks, bounding the temporary mask).
    """
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    if not t.is_contiguous() or t.numel() <= _FINITE_CHUNK:
        return bool(torch.isfinite(t).all())
    flat = t.view(-1)
    return all(bool(torch.isfinite(flat[i:i + _FINITE_CHUNK]).all())
               for i in range(0, flat.numel(), _FINITE_CHUNK))


def _finite_problem(name: str, original: torch.Tensor, cast: torch.Tensor) -> str:
    """Describe the NaN/Inf values of a tensor that failed the finiteness check."""
    bad_src = ~torch.isfinite(original)
    n_src = int(bad_src.sum())
    if n_src:
        n_nan = int(torch.isnan(original).sum())
        n_inf = n_src - n_nan
        first = tuple(int(i) for i in torch.nonzero(bad_src)[0])
        parts = [f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_inf, "Inf")) if n]
        return (f"tensor {name!r}: {' and '.join(parts)} value(s), first at index {first}; the checkpoint is "
                f"damaged or training diverged")
    bad_cast = ~torch.isfinite(cast)
    n_cast = int(bad_cast.sum())
    first = tuple(int(i) for i in torch.nonzero(bad_cast)[0])
    largest = float(original.abs().max())
    limit = torch.finfo(cast.dtype).max
    return (f"tensor {name!r}: {n_cast} value(s) overflow to Inf when cast from {dtype_name(original.dtype)} "
            f"to {dtype_name(cast.dtype)} (largest magnitude {largest:.6g} > {limit:.6g}), first at index "
            f"{first}; keep the engine in {dtype_name(original.dtype)} or rescale the weights")


def conform(specs: Mapping[str, WeightSpec], tensors: Mapping[str, torch.Tensor], policy: ValidationPolicy,
            source: str, *, ignored: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Check shapes, cast to the specs' dtypes and check finiteness; returns a new dict.

    ``tensors`` may be a subset of ``specs`` (a partial refit): completeness is
    :func:`check_metadata`'s job. A tensor under a tied alias is returned under its spec's name (a tie
    given several names must hold equal values, :func:`tie_problems`). Names not in ``specs`` are
    dropped (an error under ``unexpected="error"`` unless listed in ``ignored``). A tensor that needs
    no cast is returned as is, not copied. Raises :class:`ValidationError` with every problem found.
    """
    problems: list[str] = tie_problems(specs, tensors)
    out: dict[str, torch.Tensor] = {}
    known = engine_names(specs)
    for name, t in tensors.items():
        spec = specs.get(known.get(name, name))
        if spec is not None and spec.name in out:
            continue  # a tied alias of a tensor already taken (tie_problems compared them)
        if spec is None:
            if policy.unexpected == "error" and name not in ignored:
                problems.append(f"tensor {name!r}: not in the engine (unexpected); remove it, or set "
                                f"ValidationPolicy(unexpected='ignore')")
            continue
        shape = tuple(t.shape)
        if shape != spec.shape:
            problems.append(_shape_problem(name, spec.shape, shape))
            continue
        dtype_problem = _dtype_problem(name, spec.dtype, t.dtype, policy.cast)
        if dtype_problem is not None:
            problems.append(dtype_problem)
            continue
        cast = t if t.dtype == spec.dtype else t.to(spec.dtype)
        if policy.check_finite and cast.is_floating_point() and not _all_finite(cast):
            problems.append(_finite_problem(name, t, cast))
            continue
        out[spec.name] = cast
    if problems:
        raise ValidationError(source, problems)
    return out
