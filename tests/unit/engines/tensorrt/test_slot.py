"""The slot's refit control flow against :class:`FakeTensorRTRefitter`, a stand-in that enforces the call
rules of ``tensorrt.Refitter`` as its docstrings state them (trt_fakes.py). Nothing here runs TensorRT."""

from __future__ import annotations

import pytest
import torch

from serving.engines.tensorrt import TrtBuildOptions
from serving.errors import EngineBuildError, NotReadyError, RefitError

from .trt_fakes import PROTOS, SCALE, SHIFT, W, X, checkpoint, eager, install, make_rig


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
