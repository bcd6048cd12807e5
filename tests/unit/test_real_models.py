"""Real models written by others (transformers BERT, GPT-2, ResNet), saved with ``save_pretrained`` and
served from those files: outputs equal the library's own ``from_pretrained`` model on the same files.

Tiny configs (module-scoped fixtures); the AOTInductor compiles are marked slow.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file, save_file
from watch_helpers import DEBOUNCE, wait_for

from serving.engines import Engine, build_engine
from serving.errors import EngineBuildError, ValidationError
from serving.factory import build_module
from serving.metrics import prometheus_metrics
from serving.publish import publish
from serving.refit import RefitCoordinator
from serving.refit.canary import CanaryConfig
from serving.specs import BuildSpec, TensorSpec
from serving.watch import WeightsWatcher
from serving.weights import load_weights

ATOL = 1e-4
SEQ = 8


@dataclass(frozen=True)
class Model:
    """A library model: the factory that builds it, its config sizes, inputs, and its class."""

    key: str
    factory: str
    config: dict[str, Any]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    cls: Callable[..., Any]
    example: Callable[[int], torch.Tensor]
    #: the factory's model returns the logits of the last position only
    last_token: bool = False

    def spec(self, max_batch: int = 4) -> BuildSpec:
        return BuildSpec(factory=self.factory, inputs=self.inputs, outputs=self.outputs, max_batch=max_batch,
                         factory_kwargs=tuple(sorted(self.config.items())))

    def save(self, folder: Path, seed: int) -> Path:
        """``save_pretrained`` of a freshly initialized model (weights differ by seed): what a user publishes."""
        torch.manual_seed(seed)
        module = self.cls(self.cls.config_class(**self.config)).eval()
        with torch.no_grad():  # move every float tensor off its init (LayerNorm ones, zero biases): a swap shows
            for t in module.state_dict().values():
                if t.is_floating_point():
                    t.add_(torch.randn_like(t) * 0.02)
        module.save_pretrained(str(folder))
        return folder

    def reference(self, folder: Path, x: torch.Tensor) -> torch.Tensor:
        """The library's own model loaded from the same files."""
        module = self.cls.from_pretrained(str(folder)).eval()
        with torch.inference_mode():
            logits: torch.Tensor = module(x).logits
        return logits[:, -1, :] if self.last_token else logits


Saved = dict[str, tuple[Path, Path]]


class LastTokenGPT2(transformers.GPT2LMHeadModel):
    """GPT-2 as transformers builds it by default (``use_cache=True``), serving the next-token logits."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits: torch.Tensor = super().forward(input_ids=input_ids).logits
        return logits[:, -1, :]


def gpt2_last_token(**config: Any) -> torch.nn.Module:
    """A user's factory: a default ``GPT2Config`` (nothing switched off) and the last position's logits."""
    return LastTokenGPT2(transformers.GPT2Config(**config))


def _ids(vocab: int) -> Callable[[int], torch.Tensor]:
    return lambda seed: torch.randint(0, vocab, (3, SEQ), generator=torch.Generator().manual_seed(seed))


def _images(seed: int) -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


_TEXT = dict(vocab_size=64, max_position_embeddings=16)
MODELS = {
    "bert": Model(
        "bert", "serving.examples.hf:bert_classifier",
        dict(_TEXT, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3),
        (TensorSpec("INPUT_IDS", torch.int64, (SEQ,)),), (TensorSpec("LOGITS", torch.float32, (3,)),),
        transformers.BertForSequenceClassification, _ids(64)),
    "gpt2": Model(
        "gpt2", "serving.examples.hf:gpt2_lm",
        dict(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0),
        (TensorSpec("INPUT_IDS", torch.int64, (SEQ,)),), (TensorSpec("LOGITS", torch.float32, (SEQ, 64)),),
        transformers.GPT2LMHeadModel, _ids(64)),
    "gpt2-default": Model(
        "gpt2-default", f"{__name__}:gpt2_last_token",
        dict(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0),
        (TensorSpec("INPUT_IDS", torch.int64, (SEQ,)),), (TensorSpec("LOGITS", torch.float32, (64,)),),
        transformers.GPT2LMHeadModel, _ids(64), last_token=True),
    "resnet": Model(
        "resnet", "serving.examples.hf:resnet_classifier",
        dict(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4),
        (TensorSpec("IMAGE", torch.float32, (3, 32, 32)),), (TensorSpec("LOGITS", torch.float32, (4,)),),
        transformers.ResNetForImageClassification, _images),
}


@pytest.fixture(scope="module", autouse=True)
def no_tqdm_monitor() -> Iterator[None]:
    """save_pretrained/from_pretrained start tqdm's monitor thread, which outlives a test (the leak check objects)."""
    import tqdm

    before = tqdm.tqdm.monitor_interval
    tqdm.tqdm.monitor_interval = 0
    yield
    tqdm.tqdm.monitor_interval = before


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """Two ``save_pretrained`` versions of each model (different weights)."""
    root = tmp_path_factory.mktemp("pretrained")
    return {k: (m.save(root / f"{k}-a", 1), m.save(root / f"{k}-b", 2)) for k, m in MODELS.items()}


def _serve_from(engine: Engine, folder: Path) -> Any:
    slot = engine.new_slot()
    loaded = load_weights(folder, engine.weight_specs(), ignored=engine.ignored_names, fixed=engine.kept_tensors)
    slot.refit(slot.transfer(loaded.tensors))
    return slot


def _check_engine(kind: str, model: Model, saved: tuple[Path, Path]) -> None:
    engine = build_engine(kind, model.spec())
    try:
        x = model.example(0)
        for folder in saved:
            (out,) = _serve_from(engine, folder).run([x])
            torch.testing.assert_close(out, model.reference(folder, x), atol=ATOL, rtol=0)
        assert not torch.allclose(model.reference(saved[0], x), model.reference(saved[1], x), atol=ATOL)
    finally:
        engine.close()


@pytest.mark.parametrize("key", sorted(MODELS))
def test_eager_serves_save_pretrained_output_like_from_pretrained(key: str, saved: Saved) -> None:
    _check_engine("eager", MODELS[key], saved[key])


@pytest.fixture(scope="module")
def aoti_engines() -> Iterator[dict[str, Engine]]:
    """One compiled AOTInductor engine per model (no cache), built on first use."""
    built: dict[str, Engine] = {}
    yield built
    for e in built.values():
        e.close()


def _aoti(key: str, engines: dict[str, Engine]) -> Engine:
    if key not in engines:
        engines[key] = build_engine("aoti", MODELS[key].spec())
    return engines[key]


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(MODELS))
def test_aoti_serves_save_pretrained_output_like_from_pretrained(key: str, saved: Saved,
                                                                 aoti_engines: dict[str, Engine]) -> None:
    model, engine = MODELS[key], _aoti(key, aoti_engines)
    x = model.example(0)
    for folder in saved[key]:
        (out,) = _serve_from(engine, folder).run([x])
        torch.testing.assert_close(out, model.reference(folder, x), atol=ATOL, rtol=0)


@pytest.mark.slow
def test_aoti_keeps_bert_non_persistent_buffers_and_checks_a_checkpoint_that_carries_them(
        saved: Saved, aoti_engines: dict[str, Engine], tmp_path: Path) -> None:
    engine = _aoti("bert", aoti_engines)
    kept = {"bert.embeddings.position_ids", "bert.embeddings.token_type_ids"}
    assert set(engine.kept_tensors) == kept
    assert not kept & set(engine.weight_specs())
    assert "kept in the engine" in engine.build_info.detail and "non-persistent buffer" in engine.build_info.detail
    folder = saved["bert"][0]
    tensors = load_file(str(folder / "model.safetensors"))
    x = MODELS["bert"].example(0)
    # an older transformers saved position_ids: the same values are accepted
    positions = torch.arange(16).unsqueeze(0)
    save_file({**tensors, "bert.embeddings.position_ids": positions}, str(tmp_path / "old.safetensors"))
    (out,) = _serve_from(engine, tmp_path / "old.safetensors").run([x])
    torch.testing.assert_close(out, MODELS["bert"].reference(folder, x), atol=ATOL, rtol=0)
    # other values cannot be refitted: a clear rejection, naming the tensor
    save_file({**tensors, "bert.embeddings.position_ids": positions.flip(1).contiguous()},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(ValidationError, match="'bert.embeddings.position_ids': the engine keeps this tensor"):
        _serve_from(engine, tmp_path / "other.safetensors")


@pytest.fixture(scope="module")
def inductor_engines() -> Iterator[dict[str, Engine]]:
    """One compiled Inductor engine per model (no cache), built on first use."""
    built: dict[str, Engine] = {}
    yield built
    for e in built.values():
        e.close()


def _inductor(key: str, engines: dict[str, Engine]) -> Engine:
    if key not in engines:
        engines[key] = build_engine("inductor", MODELS[key].spec())
    return engines[key]


@pytest.mark.slow
@pytest.mark.parametrize("key", ["bert", "gpt2", "gpt2-default"])
def test_inductor_serves_save_pretrained_output_like_from_pretrained(key: str, saved: Saved,
                                                                     inductor_engines: dict[str, Engine]) -> None:
    """BERT reads non-persistent buffers (kept, not weights); GPT-2 ties lm_head to wte (one weight)."""
    engine = _inductor(key, inductor_engines)
    if key == "bert":
        assert set(engine.kept_tensors) == {"bert.embeddings.position_ids", "bert.embeddings.token_type_ids"}
        assert "non-persistent buffer" in engine.build_info.detail
    else:
        assert engine.weight_specs()["transformer.wte.weight"].aliases == ("lm_head.weight",)
    x = MODELS[key].example(0)
    slot = engine.new_slot()
    for folder in saved[key]:  # the same slot refitted twice: outputs follow the weights
        loaded = load_weights(folder, engine.weight_specs(), fixed=engine.kept_tensors)
        slot.refit(slot.transfer(loaded.tensors))
        (out,) = slot.run([x])
        torch.testing.assert_close(out, MODELS[key].reference(folder, x), atol=ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["aoti", "inductor"])
@pytest.mark.parametrize("key", ["bert", "gpt2-default"])
def test_default_configs_refit_through_the_coordinator_like_from_pretrained(
        kind: str, key: str, saved: Saved, aoti_engines: dict[str, Engine],
        inductor_engines: dict[str, Engine]) -> None:
    """transformers' default configs (``use_cache`` on: GPT-2 traces empty key/value tensors) refitted as serving
    refits them, by the coordinator from the save_pretrained folders, on the host path and the fast path (which
    writes into the slot's own buffers): outputs equal from_pretrained's on the same files."""
    model = MODELS[key]
    engine = _aoti(key, aoti_engines) if kind == "aoti" else _inductor(key, inductor_engines)
    x = model.example(0)
    for fast_path in (False, True):
        coord = RefitCoordinator(engine, metrics=prometheus_metrics(CollectorRegistry()), fast_path=fast_path,
                                 canary=CanaryConfig("reference", atol=ATOL), canary_input_specs=model.inputs,
                                 reference_factory=lambda: build_module(model.factory, dict(model.config)))
        try:
            for i, folder in enumerate(saved[key]):
                report = coord.refit_from_path(folder, version=f"v{i}")
                assert report.outcome == "success", report
                torch.testing.assert_close(coord.infer([x])[0], model.reference(folder, x), atol=ATOL, rtol=0)
        finally:
            coord.close()


@pytest.mark.slow
def test_aoti_build_refits_as_serving_does_so_a_constant_it_cannot_take_fails_the_build(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2's default config traces empty key/value tensors that Inductor folds into the code. Registered with
    the runner anyway (what the engine once did), the first refit failed after a good build; the build's own
    refit through serving's call now refuses such an engine, naming the constant and the fix."""
    from serving.engines.aoti import compiler
    from serving.engines.aoti.slot import AOTISlot

    def every_kept_tensor(runner: Any, spec: BuildSpec, device: torch.device, specs: Any, ignored: frozenset[str],
                          kept: Any) -> AOTISlot:
        return AOTISlot(runner, spec=spec, device=device, specs=specs, ignored=ignored, constants=kept)

    monkeypatch.setattr(compiler, "make_slot", every_kept_tensor)
    with pytest.raises(EngineBuildError, match=r"(?s)does not take the weights and kept tensors as serving installs "
                       r"them \(Constant not found: transformer\.h\.\d\.attn\.lifted_tensor_\d\).*use_cache=False"):
        build_engine("aoti", MODELS["gpt2-default"].spec())


def test_gpt2_tie_is_one_weight_given_under_either_name(saved: Saved, tmp_path: Path) -> None:
    model = MODELS["gpt2"]
    engine = build_engine("eager", model.spec())
    spec = engine.weight_specs()["transformer.wte.weight"]
    assert spec.aliases == ("lm_head.weight",) and "lm_head.weight" not in engine.weight_specs()
    folder = saved["gpt2"][1]
    tensors = load_file(str(folder / "model.safetensors"))
    assert "lm_head.weight" in tensors or "transformer.wte.weight" in tensors
    x = model.example(0)
    expected = model.reference(folder, x)
    # the other name only (a tool that keeps the head, not the embedding)
    wte = tensors.pop("transformer.wte.weight", None)
    head = tensors.pop("lm_head.weight", None)
    (weight,) = [t for t in (wte, head) if t is not None]
    save_file({**tensors, "lm_head.weight": weight}, str(tmp_path / "head.safetensors"))
    (out,) = _serve_from(engine, tmp_path / "head.safetensors").run([x])
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    # both names, same values (a plain torch state_dict): accepted; different values: rejected naming the tie
    save_file({**tensors, "lm_head.weight": weight, "transformer.wte.weight": weight.clone()},
              str(tmp_path / "both.safetensors"))
    (out,) = _serve_from(engine, tmp_path / "both.safetensors").run([x])
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    save_file({**tensors, "lm_head.weight": weight, "transformer.wte.weight": weight + 1},
              str(tmp_path / "differ.safetensors"))
    with pytest.raises(ValidationError, match="'transformer.wte.weight' and 'lm_head.weight' are one tied"):
        _serve_from(engine, tmp_path / "differ.safetensors")


# ---------------------------------------------------------------- through the coordinator and the watcher


def _serve_folder(engine: Engine, model: Model, folder: Path, saved: tuple[Path, Path], tmp: Path) -> None:
    """v1 by ``hotswap publish`` (serving.publish.publish), v2 by ``cp -a`` of a save_pretrained directory
    older than v1: each goes live with from_pretrained's outputs on the same files."""
    registry = CollectorRegistry()
    # the reference canary, as the service runs it on compiled engines: the library's module with the same weights
    coord = RefitCoordinator(engine, metrics=prometheus_metrics(registry), canary=CanaryConfig("reference", atol=ATOL),
                             canary_input_specs=model.inputs,
                             reference_factory=lambda: build_module(model.factory, dict(model.config)))
    watcher = WeightsWatcher(folder, coord, debounce_s=DEBOUNCE, poll_interval_s=0.05)
    x = model.example(0)
    try:
        watcher.start()
        publish(saved[0], folder, version="v1")
        wait_for(lambda: coord.live_version == "v1", f"v1 live (rejected: {dict(watcher.rejected)})", 120)
        torch.testing.assert_close(coord.infer([x])[0], model.reference(saved[0], x), atol=ATOL, rtol=0)
        fresh = saved[1]  # saved before v1 was published: cp -a keeps that older mtime, arrival is what counts
        subprocess.run(["cp", "-a", str(fresh), str(folder / "v2")], check=True)
        wait_for(lambda: coord.live_version == "v2", f"v2 live (rejected: {dict(watcher.rejected)})", 120)
        torch.testing.assert_close(coord.infer([x])[0], model.reference(fresh, x), atol=ATOL, rtol=0)
        assert watcher.rejected == {}
    finally:
        watcher.stop(timeout=10)
        coord.close()


@pytest.mark.parametrize("key", sorted(MODELS))
def test_eager_goes_live_from_published_and_copied_save_pretrained_dirs(key: str, saved: Saved, tmp_path: Path) -> None:
    engine = build_engine("eager", MODELS[key].spec())
    (tmp_path / "weights").mkdir()
    _serve_folder(engine, MODELS[key], tmp_path / "weights", saved[key], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(MODELS))
def test_aoti_goes_live_from_published_and_copied_save_pretrained_dirs(key: str, saved: Saved, tmp_path: Path,
                                                                       aoti_engines: dict[str, Engine]) -> None:
    (tmp_path / "weights").mkdir()
    _serve_folder(_aoti(key, aoti_engines), MODELS[key], tmp_path / "weights", saved[key], tmp_path)


@pytest.mark.slow
def test_aoti_cache_entry_holds_the_kept_tensors_and_a_hit_serves_like_the_build(saved: Saved, tmp_path: Path) -> None:
    from serving.cache import EngineCache

    model, cache = MODELS["bert"], EngineCache(tmp_path / "cache")
    x = model.example(0)
    first = build_engine("aoti", model.spec(), cache=cache)
    second = build_engine("aoti", model.spec(), cache=cache)
    try:
        assert (first.build_info.cache, second.build_info.cache) == ("miss", "hit")
        assert "position_ids" in second.build_info.detail
        kept = second.kept_tensors
        assert set(kept) == set(first.kept_tensors)
        assert all(torch.equal(kept[n], first.kept_tensors[n]) for n in kept)
        (out,) = _serve_from(second, saved["bert"][1]).run([x])
        torch.testing.assert_close(out, model.reference(saved["bert"][1], x), atol=ATOL, rtol=0)
    finally:
        first.close()
        second.close()


def test_random_weights_give_a_tie_equal_values(tmp_path: Path) -> None:
    """What ``hotswap serve`` seeds an empty folder with must pass the tie check."""
    from serving.weights.random_state import random_state_dict

    model = MODELS["gpt2"]
    state = random_state_dict(build_module(model.factory, dict(model.config)), seed=0)
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    engine = build_engine("eager", model.spec())
    assert set(engine.weight_specs()) == set(state) - {"lm_head.weight"}
    save_file(state, str(tmp_path / "initial.safetensors"))  # as hotswap serve writes it: no shared memory
    _serve_from(engine, tmp_path / "initial.safetensors")
