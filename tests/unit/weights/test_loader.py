"""load_weights end to end: only the needed tensors are read, metadata fails before any data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.errors import CheckpointError, ValidationError
from serving.specs import WeightSpec
from serving.weights import CheckpointPolicy, LoadedWeights, ValidationPolicy, load_weights

from .helpers import NUM_BATCHES, SafeOpenSpy, save, save_sharded, specs_of, tiny_state_dict


def test_load_a_single_file(tmp_path: Path, spy: SafeOpenSpy) -> None:
    sd = tiny_state_dict()
    specs = specs_of(sd)
    path = save(tmp_path / "step-100.safetensors", sd)
    loaded = load_weights(path, specs, ignored={NUM_BATCHES})
    assert isinstance(loaded, LoadedWeights)
    assert (loaded.version, loaded.source, loaded.format) == ("step-100", path, "safetensors")
    assert list(loaded.tensors) == list(specs)
    assert all(torch.equal(loaded.tensors[k], sd[k]) for k in specs)
    assert loaded.nbytes == sum(s.nbytes for s in specs.values())
    assert loaded.ignored == (NUM_BATCHES,)
    assert loaded.read_s >= 0 and loaded.validate_s >= 0
    assert NUM_BATCHES not in spy.read and sorted(spy.read) == sorted(specs)


def test_reads_only_the_needed_tensors(tmp_path: Path, spy: SafeOpenSpy) -> None:
    sd = tiny_state_dict()
    big = {**sd, "aux.head.weight": torch.randn(256, 256), "aux.head.bias": torch.randn(256)}
    path = save(tmp_path / "m.safetensors", big)
    loaded = load_weights(path, specs_of(sd), validation=ValidationPolicy(unexpected="ignore"))
    assert set(loaded.ignored) == {NUM_BATCHES, "aux.head.weight", "aux.head.bias"}
    assert sorted(spy.read) == sorted(specs_of(sd))


def test_shards_holding_only_unneeded_tensors_are_not_opened(tmp_path: Path, spy: SafeOpenSpy) -> None:
    sd = tiny_state_dict()
    directory = save_sharded(tmp_path / "hf", {
        "model-00001-of-00002.safetensors": sd,
        "model-00002-of-00002.safetensors": {"optimizer.m": torch.zeros(1000)},
    })
    loaded = load_weights(directory, specs_of(sd), validation=ValidationPolicy(unexpected="ignore"),
                          ignored={NUM_BATCHES})
    assert loaded.format == "sharded" and loaded.version == "hf"
    assert spy.opened == ["model-00001-of-00002.safetensors"]
    assert all(torch.equal(loaded.tensors[k], sd[k]) for k in specs_of(sd))


def test_wrong_metadata_fails_before_any_data_is_read(tmp_path: Path, spy: SafeOpenSpy) -> None:
    sd = tiny_state_dict()
    specs = specs_of(sd)
    broken = dict(sd)
    del broken["0.bias"]                               # missing
    broken["2.weight"] = broken["2.weight"].t().contiguous()  # bad shape
    broken["1.running_var"] = broken["1.running_var"].long()  # bad dtype
    broken["stray"] = torch.zeros(2)                   # unexpected
    path = save(tmp_path / "m.safetensors", broken)
    with pytest.raises(ValidationError) as info:
        load_weights(path, specs, ignored={NUM_BATCHES})
    assert info.value.source == str(path)
    named = sorted(p.split("'")[1] for p in info.value.problems)
    assert named == ["0.bias", "1.running_var", "2.weight", "stray"]
    assert spy.opened == [] and spy.read == []


def test_casts_to_the_engine_dtype(tmp_path: Path) -> None:
    sd = tiny_state_dict()
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    path = save(tmp_path / "fp16.safetensors", half)
    loaded = load_weights(path, specs_of(sd), ignored={NUM_BATCHES})
    assert all(loaded.tensors[k].dtype == torch.float32 for k in specs_of(sd))
    assert torch.equal(loaded.tensors["0.weight"], half["0.weight"].float())
    with pytest.raises(ValidationError, match="cast='strict'"):
        load_weights(path, specs_of(sd), validation=ValidationPolicy(cast="strict"), ignored={NUM_BATCHES})


def test_nan_in_the_data_is_refused(tmp_path: Path) -> None:
    sd = tiny_state_dict()
    sd["2.weight"][0, 1] = float("nan")
    path = save(tmp_path / "m.safetensors", sd)
    match = r"tensor '2.weight': 1 NaN value\(s\), first at index \(0, 1\)"
    with pytest.raises(ValidationError, match=match):
        load_weights(path, specs_of(sd), ignored={NUM_BATCHES})


def test_overflow_into_a_float16_engine(tmp_path: Path) -> None:
    path = save(tmp_path / "m.safetensors", {"w": torch.tensor([1.0, 1e6])})
    specs = {"w": WeightSpec("w", (2,), torch.float16)}
    with pytest.raises(ValidationError, match="overflow"):
        load_weights(path, specs)


def test_torch_pickle_when_allowed(tmp_path: Path) -> None:
    sd = tiny_state_dict()
    path = tmp_path / "model.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_weights(path, specs_of(sd))
    assert info.value.reason == "unsupported"
    loaded = load_weights(path, specs_of(sd), policy=CheckpointPolicy(allow_pickle=True), version="p1",
                          ignored={NUM_BATCHES})
    assert (loaded.format, loaded.version) == ("torch", "p1")
    assert all(torch.equal(loaded.tensors[k], sd[k]) for k in specs_of(sd))


def test_checkpoint_errors_pass_through(tmp_path: Path) -> None:
    (tmp_path / "m.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError) as info:
        load_weights(tmp_path / "m.safetensors", {})
    assert info.value.reason == "corrupt"


@pytest.mark.parametrize("fast", [False, True])
def test_strip_prefix_loads_a_checkpoint_saved_from_a_wrapper(tmp_path: Path, fast: bool) -> None:
    sd = tiny_state_dict()
    specs = specs_of(sd)
    path = save(tmp_path / "ddp.safetensors", {f"module._orig_mod.{k}": v for k, v in sd.items()})
    with pytest.raises(ValidationError, match="strip_prefix"):
        load_weights(path, specs, ignored={NUM_BATCHES})
    policy = ValidationPolicy(strip_prefix=("module.", "_orig_mod."))
    loaded = load_weights(path, specs, ignored={NUM_BATCHES}, validation=policy, device="cpu" if fast else None)
    assert list(loaded.tensors) == list(specs)
    assert all(torch.equal(loaded.tensors[k], sd[k]) for k in specs)
