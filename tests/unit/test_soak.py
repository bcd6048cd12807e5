"""bench/soak.py: what it publishes and prunes, the adapters' reference outputs (against PEFT's own merge),
how a series is judged flat, and the soak itself at a tiny size against a real Triton: no error, no torn
response, every tool used, nothing left behind, the metrics endpoint not growing with versions, and the
server stopped at the end and on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.lib.soak_models import EXAMPLES, LORA_ALPHA, LORA_R, ExampleModels, merged_state
from bench.lib.soak_plan import EXAMPLE_TOOLS, UNADAPT_TOOLS, plan, settled, to_prune, tool_counts
from bench.lib.soak_samples import analyse, series_table, smallest
from bench.render.soak import soak as soak_table
from bench.render.soak import soak_pictures
from serving.examples import CNN
from serving.factory import build_module
from serving.weights.lora import random_adapter

ROOT = Path(__file__).resolve().parents[2]


def test_models_take_turns_and_an_adapter_is_taken_off_by_the_next_swap_of_its_model() -> None:
    steps = plan(26, ["a", "b"], ("publish", "rename"), adapter_every=3)
    assert [(s.model, s.action, s.tool) for s in steps[:8]] == [
        ("a", "base", "publish"), ("b", "base", "publish"), ("a", "base", "rename"), ("b", "base", "rename"),
        ("a", "adapter", "lora"), ("b", "adapter", "lora"), ("a", "unadapt", "touch"), ("b", "unadapt", "republish")]
    adapter, unadapt = steps[4], steps[6]
    assert adapter.live == "s00003+a00005" and adapter.base == "s00003" and adapter.adapter == "a00005"
    assert unadapt.live == unadapt.entry == unadapt.base == "s00003" and unadapt.adapter is None
    assert steps[7].tool == UNADAPT_TOOLS[1] and steps[12].action == "unadapt"  # the next way back
    assert len({s.live for s in steps if s.action != "unadapt"}) == 20  # every other version is new
    assert tool_counts(steps) == {"adapter: lora": 6, "base: publish": 8, "base: rename": 6, "unadapt: republish": 3,
                                  "unadapt: touch": 3}
    history: dict[str, list[str]] = {"a": [], "b": []}
    for step in steps:
        history[step.model].append(step.action)
    assert settled(history)  # the run ends as every sample is taken: no adapter in the last rounds
    assert not settled({"a": ["base"] * 5 + ["adapter", "unadapt", "base", "base"], "b": ["base"] * 3})
    assert {s.tool for s in plan(40, ["m"], EXAMPLE_TOOLS, 0)} == set(EXAMPLE_TOOLS)
    for bad in ({"adapter_every": 1}, {"adapter_every": -2}):
        with pytest.raises(ValueError, match="adapter_every"):
            plan(10, ["a"], ("publish",), **bad)
    with pytest.raises(ValueError, match="a soak needs"):
        plan(0, ["a"], ("publish",), 0)


def test_pruning_keeps_the_live_base_and_adapter_and_every_hidden_entry() -> None:
    step = plan(9, ["m"], ("publish",), adapter_every=5)[4]  # an adapter on s00004
    names = ["s00003.safetensors", "s00004.safetensors", "a00005", "a00001", ".s00006.safetensors.1a2b.tmp",
             "notes.txt.part", "s00002"]
    assert to_prune(names, step) == ["a00001", "s00002", "s00003.safetensors"]


@pytest.mark.parametrize(("factory", "targets"), [(CNN, ("conv2", "head")), (EXAMPLES["tiny_transformer"][0],
                                                                           EXAMPLES["tiny_transformer"][3])])
def test_an_adapters_reference_is_what_peft_merges(factory: str, targets: tuple[str, ...]) -> None:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    module = build_module(factory)
    base = {k: v.clone() for k, v in module.state_dict().items()}
    _, tensors = random_adapter(module, targets=targets, r=LORA_R, alpha=LORA_ALPHA, seed=5)
    ours = merged_state(base, tensors, LORA_ALPHA / LORA_R)
    theirs_base = build_module(factory)
    theirs_base.load_state_dict(base)
    peft = get_peft_model(theirs_base, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=list(targets)))
    set_peft_model_state_dict(peft, tensors)
    theirs = peft.merge_and_unload().state_dict()
    changed = [k for k in base if not torch.equal(ours[k], base[k])]
    assert changed and all(k.endswith(".weight") for k in changed)
    for k in base:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)


def test_each_tool_publishes_the_version_whose_answer_is_its_reference(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    models = ExampleModels(tmp_path / "work")
    folder = tmp_path / "weights"
    models.first(folder, "tiny_cnn")
    for step in plan(8, ["tiny_cnn"], EXAMPLE_TOOLS, adapter_every=5)[:4]:
        ref = models.reference(step)
        models.publish(step, folder)
        module = models.modules["tiny_cnn"]
        module.load_state_dict(load_file(folder / f"{step.entry}.safetensors"))
        with torch.inference_mode():
            torch.testing.assert_close(module(models.inputs["tiny_cnn"]).numpy(), ref, rtol=0, atol=0)
    assert sorted(p.name for p in folder.iterdir()) == [f"s0000{i}.safetensors" for i in range(5)]
    assert list((tmp_path / "work" / "staged").iterdir()) == []  # sources of copies are removed


def test_a_series_is_flat_when_it_grows_under_one_percent_per_100_swaps_after_warm_up() -> None:
    swaps = [0, 100, 200, 300, 400]
    assert analyse(swaps, [50, 90, 100, 100, 100], warmup=200) == {"growth_pct_per_100_swaps": 0.0, "flat": True}
    grows = analyse(swaps, [100, 100, 100, 102, 104], warmup=200)
    assert grows["flat"] is False and grows["growth_pct_per_100_swaps"] == pytest.approx(1.9608, abs=1e-3)
    assert analyse(swaps, [1, 1, 1, None, 1], warmup=200)["flat"] is False  # a stub that was gone
    assert analyse(swaps, [1, 1, 1, 1, 1], warmup=400)["flat"] is None  # one sample: no slope
    table = series_table(swaps, [{"a/fds": 7, "gpu/used_bytes": None}] * 5, warmup=200)
    assert table["a/fds"]["unit"] == "count" and table["a/fds"]["flat"] is True
    assert table["gpu/used_bytes"]["flat"] is None and table["gpu/used_bytes"]["why"] == "not measurable here"
    assert smallest([{"x": 3, "y": None}, {"x": 2, "y": None}, {"x": 5}]) == {"x": 2, "y": None}


def _processes_under(path: Path) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(path) in cmd and "pytest" not in cmd:
                found.append(f"{entry.name}: {cmd[:200]}")
    return found


def _soak(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "bench.soak", "--dir", str(tmp_path), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_tiny_soak_of_the_examples_on_a_real_triton(tmp_path: Path) -> None:
    out = tmp_path / "soak-tiny.json"
    proc = _soak(tmp_path, "--swaps", "20", "--sample-every", "10", "--warmup-swaps", "0", "--adapter-every", "5",
                 "--clients", "2", "--json", str(out))
    log, _ = proc.communicate(timeout=900)
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["swaps"] == 20 and doc["requests"] > 0, log[-3000:]
    assert doc["errors"] == 0 and doc["torn"] == 0, doc["error_samples"]
    assert set(doc["publishes"]) == {f"base: {t}" for t in EXAMPLE_TOOLS} | {
        "adapter: lora", *(f"unadapt: {t}" for t in UNADAPT_TOOLS)}
    assert doc["refits"].get("success", 0) >= 20 and not doc["refits"].get("failed") and not doc["stub_restarts"]
    assert [s["swap"] for s in doc["samples"]][0] == 0 and doc["samples"][-1]["swap"] == 20
    series = doc["series"]
    for instance in ("tiny_transformer_0_0", "tiny_cnn_0_0", "tiny_cnn_0_1", "server"):
        for what in ("rss_bytes", "fds", "threads"):
            assert all(v and v > 0 for v in series[f"{instance}/{what}"]["values"]), (instance, what)
    # nothing a publish writes is left behind, and the metrics endpoint does not grow with the versions
    assert set(series["files/weights_leftovers"]["values"]) == {0}
    assert series["metrics/hotswap_series"]["flat"] is True, series["metrics/hotswap_series"]
    assert doc["gpu_memory"].startswith("the CPU run")
    assert _processes_under(tmp_path) == [] and list(tmp_path.iterdir()) == [out]
    # the renderer reads what the soak writes
    assert "| 2 | 20 | 2 |" in soak_table(tmp_path) and "`tiny_cnn_0_1/threads`" in soak_table(tmp_path)
    [picture] = soak_pictures([out])
    assert picture.svg().startswith(b"<?xml")


def test_ctrl_c_stops_the_server_and_keeps_what_was_measured(tmp_path: Path) -> None:
    """The GPU model's path, run on the CPU at a tiny size, interrupted after its third sample."""
    out = tmp_path / "soak.json"
    proc = _soak(tmp_path, "--models", "mlp", "--size-gb", "0.002", "--swaps", "500", "--sample-every", "4",
                 "--warmup-swaps", "0", "--adapter-every", "5", "--clients", "2", "--json", str(out))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and len(json.loads(out.read_text() or "{}").get("samples", [])) >= 3:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    doc = json.loads(out.read_text())
    assert not doc["complete"] and doc["swaps"] >= 9 and doc["errors"] == 0 and doc["torn"] == 0, log[-3000:]
    assert {"adapter: lora", "base: publish"} <= set(doc["publishes"])
    assert doc["models"]["factory"] == "bench.lib.models:big_mlp"
    assert _processes_under(tmp_path) == [] and list(tmp_path.iterdir()) == [out]
