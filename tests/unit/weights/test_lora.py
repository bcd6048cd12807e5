"""LoRA adapters: PEFT parsing, the merge against an independent unmerged computation, and the watcher's
adapter handling on the eager engine (A -> B -> A exactness, back to the base, only touched tensors)."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from watch_helpers import Rig, X, refits, state, wait_for, write_atomic

from serving.errors import ValidationError
from serving.examples import TRANSFORMER
from serving.factory import build_module
from serving.specs import WeightSpec
from serving.weights.lora import (
    LoraConfig,
    build_adapter,
    lora_delta,
    merge_lora,
    random_adapter,
    read_adapter,
    save_adapter,
)

P = "base_model.model."


def specs_of(sd: Mapping[str, torch.Tensor]) -> dict[str, WeightSpec]:
    return {k: WeightSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()}


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def cfg(**kw: object) -> LoraConfig:
    d: dict[str, object] = {"r": 2, "lora_alpha": 4, "target_modules": None}
    d.update(kw)
    return LoraConfig.from_dict(d, "test")


def unmerged(module: nn.Module, adapter_tensors: Mapping[str, torch.Tensor], scales: Mapping[str, float],
             *args: torch.Tensor) -> torch.Tensor:
    """The independent reference: the base module untouched, each adapted layer's output plus
    ``scale * B(A(x))`` (Linear/Conv1D: ``x A^T B^T``), as PEFT computes unmerged adapters."""
    handles = []
    for name, mod in module.named_modules():
        a_key = f"{P}{name}.lora_A.weight"
        if a_key not in adapter_tensors:
            continue
        a, b, s = adapter_tensors[a_key], adapter_tensors[f"{P}{name}.lora_B.weight"], scales[name]
        if a.dim() == 4:
            assert isinstance(mod, nn.Conv2d)
            conv: nn.Conv2d = mod

            def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor, a: torch.Tensor = a,
                     b: torch.Tensor = b, s: float = s, conv: nn.Module = conv) -> torch.Tensor:
                assert isinstance(conv, nn.Conv2d)
                padding = conv.padding if isinstance(conv.padding, tuple) else 0
                down = nn.functional.conv2d(inp[0], a, stride=conv.stride, padding=padding)
                return out + s * nn.functional.conv2d(down, b)
        else:
            def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor, a: torch.Tensor = a,
                     b: torch.Tensor = b, s: float = s, conv: nn.Module = mod) -> torch.Tensor:
                return out + s * (inp[0] @ a.T @ b.T)
        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            return module(*args)
    finally:
        for h in handles:
            h.remove()


def merged_forward(module: nn.Module, merged: Mapping[str, torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.func.functional_call(module, dict(merged), args)


# ---------------------------------------------------------------- config


def test_config_fields_defaults_and_nulls() -> None:
    c = LoraConfig.from_dict({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": None,
                              "use_rslora": None, "rank_pattern": {}, "alpha_pattern": {}, "peft_type": "LORA",
                              "lora_dropout": 0.1, "bias": "none", "task_type": "CAUSAL_LM"}, "x")
    assert (c.r, c.lora_alpha, c.target_modules, c.fan_in_fan_out, c.use_rslora) == (
        8, 16.0, ("q_proj", "v_proj"), False, False)
    assert LoraConfig.from_dict({"target_modules": "all-linear"}, "x").target_modules is None


def test_config_problems_are_listed_together() -> None:
    with pytest.raises(ValidationError) as info:
        LoraConfig.from_dict({"r": 0, "lora_alpha": "x", "target_modules": 5, "use_dora": True, "peft_type": "IA3",
                              "rank_pattern": {"(": 2}}, "dir")
    e = info.value
    assert e.reason == "lora_invalid" and "dir/adapter_config.json" in str(e)
    text = " ".join(e.problems)
    for needle in ("peft_type 'IA3'", "use_dora", "r must be a positive integer", "lora_alpha must be a finite",
                   "target_modules must be", "rank_pattern key '('"):
        assert needle in text


def test_scales_plain_rslora_and_per_module_patterns() -> None:
    c = cfg(r=8, lora_alpha=16, rank_pattern={"attn.q_proj": 4, "q_proj": 2},
            alpha_pattern={r"blocks\.1\..*v_proj": 32})
    assert c.scale_for("blocks.0.fc1") == 2.0
    assert c.rank_for("blocks.0.attn.q_proj") == 4  # first matching key in order wins
    assert c.rank_for("blocks.0.attn.xq_proj") == 8  # matches on a dotted boundary only
    assert c.alpha_for("blocks.1.attn.v_proj") == 32 and c.alpha_for("blocks.0.attn.v_proj") == 16
    assert c.scale_for("blocks.0.attn.q_proj") == 16 / 4
    rs = cfg(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"q_proj": 4})
    assert math.isclose(rs.scale_for("blocks.0.fc1"), 16 / math.sqrt(8))
    assert math.isclose(rs.scale_for("blocks.0.attn.q_proj"), 16 / 2)


def test_target_modules_list_regex_and_exclude() -> None:
    assert cfg(target_modules=["q_proj"]).targets("blocks.0.attn.q_proj")
    assert not cfg(target_modules=["q_proj"]).targets("blocks.0.attn.xq_proj")
    assert cfg(target_modules=r"blocks\.0\..*").targets("blocks.0.attn.q_proj")
    assert not cfg(target_modules=r"blocks\.0").targets("blocks.0.attn.q_proj")  # a full match
    assert not cfg(target_modules=["q_proj"], exclude_modules=["blocks.1.attn.q_proj"]).targets("blocks.1.attn.q_proj")


# ---------------------------------------------------------------- merge vs unmerged, both layouts


class Conv1D(nn.Module):
    """GPT-2's Conv1D: the weight is stored [in, out] and applied as ``x @ W + b``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.3)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class GPT2Style(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = Conv1D(6, 18)  # non-square: the layout is read from the shapes
        self.c_proj = Conv1D(18, 18)  # square: only fan_in_fan_out tells the layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.tanh(self.c_attn(x)))


class LinearNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 18)
        self.mid = nn.Linear(18, 18)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mid(torch.tanh(self.up(x)))


def _adapter_tensors(dims: Mapping[str, tuple[int, int]], r: int, seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, (n_in, n_out)) in enumerate(sorted(dims.items())):
        out[f"{P}{name}.lora_A.weight"] = randn(r, n_in, seed=seed + 2 * i) * 0.3
        out[f"{P}{name}.lora_B.weight"] = randn(n_out, r, seed=seed + 2 * i + 1) * 0.3
    return out


@pytest.mark.parametrize("layout", ["linear", "fan_in_fan_out"])
def test_merge_matches_the_unmerged_forward_in_both_layouts(layout: str) -> None:
    torch.manual_seed(0)
    module: nn.Module = LinearNet() if layout == "linear" else GPT2Style()
    names = ("up", "mid") if layout == "linear" else ("c_attn", "c_proj")
    base = {k: v.detach().clone() for k, v in module.state_dict().items()}
    tensors = _adapter_tensors({names[0]: (6, 18), names[1]: (18, 18)}, r=3, seed=1)
    config = cfg(r=3, lora_alpha=6, fan_in_fan_out=layout == "fan_in_fan_out")
    adapter = build_adapter(config, tensors, specs_of(base), source="a", name="a")
    assert {m.transposed for m in adapter.modules} == {layout == "fan_in_fan_out"}
    merged = merge_lora(base, adapter, scale=0.5)
    x = randn(5, 6, seed=9)
    ref = unmerged(module, tensors, dict.fromkeys(names, 0.5 * 6 / 3), x)
    torch.testing.assert_close(merged_forward(module, merged, x), ref, rtol=1e-5, atol=1e-5)
    # the base itself is left alone, untouched tensors are the very same objects
    assert all(torch.equal(base[k], v) for k, v in module.state_dict().items())
    for k in base:
        assert (merged[k] is base[k]) == (k not in adapter.touched)


def test_a_square_conv1d_weight_with_the_wrong_layout_gives_other_outputs() -> None:
    torch.manual_seed(0)
    module = GPT2Style()
    base = {k: v.detach().clone() for k, v in module.state_dict().items()}
    tensors = _adapter_tensors({"c_proj": (18, 18)}, r=2, seed=3)
    right = merge_lora(base, build_adapter(cfg(fan_in_fan_out=True), tensors, specs_of(base), source="a", name="a"))
    wrong = merge_lora(base, build_adapter(cfg(fan_in_fan_out=False), tensors, specs_of(base), source="a", name="a"))
    x = randn(4, 6, seed=5)
    ref = unmerged(module, tensors, {"c_proj": 2.0}, x)
    torch.testing.assert_close(merged_forward(module, right, x), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged_forward(module, wrong, x), ref, atol=1e-3)


def test_rslora_and_rank_alpha_patterns_give_per_module_scales() -> None:
    torch.manual_seed(0)
    module = LinearNet()
    base = {k: v.detach().clone() for k, v in module.state_dict().items()}
    tensors = {**_adapter_tensors({"up": (6, 18)}, r=4, seed=1), **_adapter_tensors({"mid": (18, 18)}, r=2, seed=7)}
    config = cfg(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"mid": 2}, alpha_pattern={"mid": 3})
    adapter = build_adapter(config, tensors, specs_of(base), source="a", name="a")
    x = randn(3, 6, seed=2)
    ref = unmerged(module, tensors, {"up": 8 / math.sqrt(4), "mid": 3 / math.sqrt(2)}, x)
    torch.testing.assert_close(merged_forward(module, merge_lora(base, adapter), x), ref, rtol=1e-5, atol=1e-5)


def test_embedding_and_conv2d_deltas_match_unmerged() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    a, b = randn(3, 10, seed=1), randn(4, 3, seed=2)
    adapter = build_adapter(cfg(r=3, lora_alpha=3), {f"{P}tok.lora_embedding_A": a, f"{P}tok.lora_embedding_B": b},
                            {"tok.weight": WeightSpec("tok.weight", (10, 4), torch.float32)}, source="e", name="e")
    ids = torch.tensor([[1, 7, 3]])
    merged = merge_lora({"tok.weight": emb.weight.detach()}, adapter)
    # PEFT's Embedding: out = emb(x) + scale * (one_hot(x) @ A^T) @ B^T
    ref = emb(ids) + 1.0 * (nn.functional.embedding(ids, a.T) @ b.T)
    torch.testing.assert_close(nn.functional.embedding(ids, merged["tok.weight"]), ref.detach(), rtol=1e-5, atol=1e-5)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    net = Net()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    tensors = {f"{P}conv.lora_A.weight": randn(2, 3, 3, 3, seed=3) * 0.3,
               f"{P}conv.lora_B.weight": randn(5, 2, 1, 1, seed=4) * 0.3}
    conv_adapter = build_adapter(cfg(r=2, lora_alpha=4), tensors, specs_of(base), source="c", name="c")
    x = randn(2, 3, 8, 8, seed=5)
    torch.testing.assert_close(merged_forward(net, merge_lora(base, conv_adapter), x),
                               unmerged(net, tensors, {"conv": 2.0}, x), rtol=1e-4, atol=1e-5)
    assert lora_delta(conv_adapter.modules[0]).shape == base["conv.weight"].shape


def test_adapter_name_in_keys_and_full_replacements_are_accepted() -> None:
    base = {"up.weight": torch.zeros(18, 6), "up.bias": torch.zeros(18)}
    tensors = {f"{P}up.lora_A.default.weight": torch.ones(2, 6), f"{P}up.lora_B.default.weight": torch.ones(18, 2),
               f"{P}up.bias": torch.full((18,), 3.0)}  # bias="all": trained biases saved whole
    adapter = build_adapter(cfg(), tensors, specs_of(base), source="a", name="a")
    merged = merge_lora(base, adapter)
    assert torch.equal(merged["up.weight"], torch.full((18, 6), 2.0 * 2))  # scale 4/2 times B@A (=2 everywhere)
    assert torch.equal(merged["up.bias"], torch.full((18,), 3.0))
    assert adapter.touched == {"up.weight", "up.bias"}


@pytest.mark.parametrize(("tensors", "config", "reason", "needles"), [
    ({f"{P}blocks.9.attn.q_proj.lora_A.weight": torch.ones(2, 6), f"{P}blocks.9.attn.q_proj.lora_B.weight":
      torch.ones(18, 2)}, {}, "lora_mismatch", ["module 'blocks.9.attn.q_proj'", "has no weight"]),
    ({f"{P}up.lora_A.weight": torch.ones(2, 7), f"{P}up.lora_B.weight": torch.ones(18, 2)}, {}, "lora_mismatch",
     ["module 'up'", "lora_A (2, 7)", "(18, 6)"]),
    ({f"{P}up.lora_A.weight": torch.ones(2, 6)}, {}, "lora_invalid", ["module 'up'", "lora_B is missing"]),
    ({f"{P}up.lora_A.weight": torch.ones(3, 6), f"{P}up.lora_B.weight": torch.ones(18, 3)}, {}, "lora_invalid",
     ["rank 3", "r=2"]),
    ({f"{P}up.lora_A.weight": torch.full((2, 6), float("nan")), f"{P}up.lora_B.weight": torch.ones(18, 2)}, {},
     "lora_invalid", ["NaN/Inf"]),
    ({f"{P}up.lora_A.weight": torch.ones(2, 6), f"{P}up.lora_B.weight": torch.ones(18, 2)},
     {"target_modules": ["mid"]}, "lora_mismatch", ["do not select it"]),
    ({f"{P}up.lora_A.a1.weight": torch.ones(2, 6), f"{P}up.lora_B.a1.weight": torch.ones(18, 2),
      f"{P}mid.lora_A.a2.weight": torch.ones(2, 18), f"{P}mid.lora_B.a2.weight": torch.ones(18, 2)}, {},
     "lora_invalid", ["several adapters"]),
    ({f"{P}up.lora_magnitude_vector": torch.ones(18)}, {}, "lora_invalid", ["DoRA"]),
    ({f"{P}other.weight": torch.ones(3)}, {}, "lora_mismatch", ["neither a LoRA tensor"]),
])
def test_adapters_that_do_not_fit_are_refused_naming_the_module(tensors: dict[str, torch.Tensor],
                                                                config: dict[str, object], reason: str,
                                                                needles: list[str]) -> None:
    base = {k: v.detach() for k, v in LinearNet().state_dict().items()}
    with pytest.raises(ValidationError) as info:
        build_adapter(cfg(**config), tensors, specs_of(base), source="/w/lora", name="lora")
    assert info.value.reason == reason
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_merge_overflowing_float16_is_refused() -> None:
    base = {"up.weight": torch.full((18, 6), 65000.0, dtype=torch.float16)}
    adapter = build_adapter(cfg(), {f"{P}up.lora_A.weight": torch.ones(2, 6), f"{P}up.lora_B.weight":
                                    torch.full((18, 2), 1000.0)}, specs_of(base), source="a", name="a")
    with pytest.raises(ValidationError, match="NaN/Inf") as info:
        merge_lora(base, adapter)
    assert info.value.reason == "lora_invalid"


def test_random_adapter_roundtrip_and_cli(tmp_path: Path) -> None:
    from serving.cli import main
    from serving.engines.eager import module_weight_specs

    module = build_module(TRANSFORMER)
    config, tensors = random_adapter(module, targets=["q_proj", "tok"], r=3, alpha=6, seed=1)
    path = save_adapter(tmp_path / "a", config, tensors)
    adapter = read_adapter(path, module_weight_specs(module))
    assert {m.module for m in adapter.modules} == {"tok", "blocks.0.attn.q_proj", "blocks.1.attn.q_proj"}
    assert {m.kind for m in adapter.modules} == {"embedding", "linear"}
    with pytest.raises(FileExistsError):
        save_adapter(path, config, tensors)
    assert main(["lora", "random", "--factory", TRANSFORMER, "--targets", "v_proj,fc2", "--r", "2", "--rslora",
                 "-o", str(tmp_path / "cli")]) == 0
    cli = read_adapter(tmp_path / "cli", module_weight_specs(module))
    assert len(cli.modules) == 4 and cli.config.use_rslora
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


# ---------------------------------------------------------------- through the watcher, eager engine


def publish_adapter(rig: Rig, name: str, config: Mapping[str, object], tensors: Mapping[str, torch.Tensor]) -> Path:
    tmp = rig.folder / f".{name}.tmp"
    tmp.mkdir()
    (tmp / "adapter_config.json").write_text(json.dumps(dict(config)))
    save_file(dict(tensors), str(tmp / "adapter_model.safetensors"))
    t = rig.clock.next()
    os.utime(tmp, ns=(t, t))
    os.rename(tmp, rig.folder / name)
    return rig.folder / name


def republish(rig: Rig, path: Path) -> None:
    t = rig.clock.next()
    os.utime(path, ns=(t, t))


def reference(base_seed: int, tensors: Mapping[str, torch.Tensor], alpha: float, r: int,
              extra_scale: float = 1.0) -> torch.Tensor:
    module = build_module(TRANSFORMER)
    module.load_state_dict(state(base_seed))
    modules = {k[len(P):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
    return unmerged(module, tensors, dict.fromkeys(modules, extra_scale * alpha / r), X)


def start_with_base(rigs: list[Rig], folder: Path, **kw: object) -> Rig:
    rig = Rig(folder, **kw)  # type: ignore[arg-type]
    rigs.append(rig)
    rig.publish("v1.safetensors", 1)
    rig.watcher.install_initial()
    rig.start()
    return rig


def test_adapter_matches_the_unmerged_reference_and_switching_a_b_a_is_exact(folder: Path, rigs: list[Rig]) -> None:
    rig = start_with_base(rigs, folder)
    module = build_module(TRANSFORMER)
    cfg_a, ten_a = random_adapter(module, targets=["q_proj", "v_proj", "fc1"], r=4, alpha=8, seed=1)
    cfg_b, ten_b = random_adapter(module, targets=["k_proj", "fc2", "q_proj"], r=2, alpha=2, seed=2)
    path_a = publish_adapter(rig, "lora-a", cfg_a, ten_a)
    rig.wait_live("v1+lora-a")
    out_a = rig.output()
    torch.testing.assert_close(out_a, reference(1, ten_a, 8, 4), rtol=1e-5, atol=1e-5)
    publish_adapter(rig, "lora-b", cfg_b, ten_b)
    rig.wait_live("v1+lora-b")
    out_b = rig.output()
    torch.testing.assert_close(out_b, reference(1, ten_b, 2, 2), rtol=1e-5, atol=1e-5)  # not stacked on A
    republish(rig, path_a)
    wait_for(lambda: rig.coord.live_version == "v1+lora-a" and refits(rig.registry, "success") == 4, "A again")
    assert torch.equal(rig.output(), out_a)  # bit for bit: always merged from the pristine base
    assert rig.watcher.adapter_version == "lora-a" and rig.watcher.base_version == "v1"


def test_removing_the_adapter_returns_exactly_to_the_base_refitting_only_touched(folder: Path,
                                                                                 rigs: list[Rig]) -> None:
    rig = start_with_base(rigs, folder, strategy="in_place")
    base_out = rig.output()
    base_live = rig.coord.live
    assert base_live is not None
    config, tensors = random_adapter(build_module(TRANSFORMER), targets=["q_proj", "fc2"], r=4, alpha=8, seed=3)
    path = publish_adapter(rig, "lora", config, tensors)
    rig.wait_live("v1+lora")
    rig.idle()  # the worker records its history just after the coordinator switched
    merged = rig.watcher.history[-1].report
    assert merged.tensors_refitted == 4  # q_proj and fc2 of two blocks; nothing else moved
    live = rig.coord.live
    assert live is not None
    assert sum(live.tensors[k] is not base_live.tensors[k] for k in live.tensors) == 4
    assert not torch.equal(rig.output(), base_out)
    # a setting-driven removal
    report = rig.watcher.clear_adapter()
    assert report is not None and report.outcome == "success" and report.tensors_refitted == 4
    assert torch.equal(rig.output(), base_out) and rig.watcher.adapter_version is None
    # the adapter again, then the base checkpoint published again (a fresh copy): back to the base
    republish(rig, path)
    rig.wait_live("v1+lora")
    shutil.copyfile(folder / "v1.safetensors", folder / ".again.tmp")
    os.rename(folder / ".again.tmp", folder / "v1-again.safetensors")
    rig.wait_live("v1-again")
    rig.idle()
    assert torch.equal(rig.output(), base_out)
    assert rig.watcher.history[-1].report.tensors_refitted == 4


def test_lora_scale_setting_multiplies_and_zero_disables(folder: Path, rigs: list[Rig]) -> None:
    config, tensors = random_adapter(build_module(TRANSFORMER), targets=["v_proj"], r=2, alpha=4, seed=4)
    rig = start_with_base(rigs, folder, lora_scale=0.5)
    publish_adapter(rig, "lora", config, tensors)
    rig.wait_live("v1+lora")
    torch.testing.assert_close(rig.output(), reference(1, tensors, 4, 2, extra_scale=0.5), rtol=1e-5, atol=1e-5)
    other = folder.parent / "other"
    other.mkdir()
    off = start_with_base(rigs, other, lora_scale=0.0)
    publish_adapter(off, "lora", config, tensors)
    off.publish("v2.safetensors", 2)  # processed after the adapter: the adapter was ignored, not refused
    off.wait_live("v2")
    assert not off.watcher.rejected and refits(off.registry, "success") == 2


def test_adapter_that_does_not_fit_is_rejected_and_the_base_keeps_serving(folder: Path, rigs: list[Rig]) -> None:
    rig = start_with_base(rigs, folder)
    base_out = rig.output()
    wide = build_module(TRANSFORMER, {"d_model": 32})
    config, tensors = random_adapter(wide, targets=["q_proj"], r=2, alpha=4, seed=5)
    path = publish_adapter(rig, "lora-wide", config, tensors)
    assert rig.wait_rejected(path) == "lora_mismatch"
    rejection = rig.watcher.rejection(path)
    assert rejection is not None and "module 'blocks.0.attn.q_proj'" in rejection.message
    assert torch.equal(rig.output(), base_out)
    assert refits(rig.registry, "rejected", "lora_mismatch") == 1


def test_startup_applies_an_adapter_only_if_published_after_the_newest_base(tmp_path: Path, rigs: list[Rig]) -> None:
    config, tensors = random_adapter(build_module(TRANSFORMER), targets=["q_proj"], r=2, alpha=4, seed=6)
    hour = 3600 * 10**9
    now = __import__("time").time_ns()

    def folder_with(name: str, order: list[str]) -> Path:
        d = tmp_path / name
        d.mkdir()
        for i, entry in enumerate(order):
            t = now - (len(order) - i) * hour
            if entry == "lora":
                save_adapter(d / "lora", config, tensors)
                os.utime(d / "lora", ns=(t, t))
            else:
                write_atomic(d / f"{entry}.safetensors", state(int(entry[1:])), mtime_ns=t)
        return d

    after = Rig(folder_with("after", ["v1", "lora"]))
    before = Rig(folder_with("before", ["v1", "lora", "v2"]))
    rigs += [after, before]
    report = after.watcher.install_initial().report
    assert report is not None and report.version == "v1+lora"
    torch.testing.assert_close(after.output(), reference(1, tensors, 4, 2), rtol=1e-5, atol=1e-5)
    report = before.watcher.install_initial().report
    assert report is not None and report.version == "v2"


def test_adapter_without_any_base_is_rejected(folder: Path, rigs: list[Rig]) -> None:
    rig = Rig(folder)
    rigs.append(rig)
    config, tensors = random_adapter(build_module(TRANSFORMER), targets=["q_proj"], r=2, alpha=4, seed=7)
    save_adapter(folder / "lora", config, tensors)
    assert rig.watcher.install_initial().report is None
    assert rig.watcher.rejected == {str(folder / "lora"): "no_base"}


# ---------------------------------------------------------------- against PEFT itself (where it is installed)


class _PeftNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(20, 8)
        self.up = nn.Linear(8, 12)
        self.mid = nn.Linear(12, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(torch.tanh(self.up(self.tok(ids))))))


@pytest.fixture
def no_tqdm_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    """peft/transformers start tqdm's monitor thread, which outlives a test (the leak check would object)."""
    tqdm = pytest.importorskip("tqdm")
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)


def _peft_roundtrip(base: nn.Module, config: object, x: torch.Tensor, tmp: Path) -> None:
    """PEFT's own forward and merge_and_unload() against read_adapter + merge_lora of its saved files."""
    import copy

    import peft

    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(copy.deepcopy(base), config)  # type: ignore[arg-type]
    model.eval()
    model.save_pretrained(str(tmp / "adapter"))
    with torch.inference_mode():
        expected_out = model(x)
        peft_merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    adapter = read_adapter(tmp / "adapter", specs_of(base_state))
    merged = merge_lora(base_state, adapter)
    torch.testing.assert_close(merged_forward(base, merged, x), expected_out, rtol=1e-5, atol=1e-5)
    assert set(peft_merged) == set(merged)
    for k in merged:
        torch.testing.assert_close(merged[k], peft_merged[k], rtol=1e-5, atol=1e-6, msg=k)


def test_matches_peft_rslora_rank_and_alpha_patterns_and_embeddings(tmp_path: Path, no_tqdm_monitor: None) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["tok", "up", "mid"], use_rslora=True,
                             rank_pattern={"mid": 2}, alpha_pattern={"up": 3}, init_lora_weights=False)
    _peft_roundtrip(_PeftNet(), config, torch.tensor([[1, 5, 7, 19]]), tmp_path)


def test_matches_peft_on_gpt2_conv1d_layers(tmp_path: Path, no_tqdm_monitor: None) -> None:
    peft = pytest.importorskip("peft")
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = conv1d(18, 6)  # weight [6, 18]: non-square
            self.c_proj = conv1d(18, 18)  # square

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c_proj(torch.tanh(self.c_attn(x)))

    torch.manual_seed(0)
    net = Net()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                             init_lora_weights=False)
    _peft_roundtrip(net, config, randn(4, 6, seed=1), tmp_path)
