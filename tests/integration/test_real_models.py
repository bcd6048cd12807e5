"""Models written by others (transformers BERT, GPT-2, ResNet), each on eager and aoti, served by a real Triton
from a repository the way a user lays it out: the factory module sits next to ``model.py``; weights are
``save_pretrained`` directories published with ``serving.publish.publish`` and copied in with ``cp -a``,
``rsync -a`` and ``tar -x``; every answer equals the library's own ``from_pretrained`` model on the same files
(atol 1e-4)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from serving.publish import publish
from serving.triton.scrape import scrape, weights_versions
from serving.triton.server import TritonProcess, seed_weights

pytestmark = pytest.mark.integration

transformers = pytest.importorskip("transformers")

SEQ = 8
#: a user's own factory module, next to model.py (Triton's stub puts that directory on sys.path)
FACTORY_MODULE = '''"""This repository's models: the library's classes, sizes from config.pbtxt's factory_kwargs."""
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, ResNetConfig,
                          ResNetForImageClassification)


def bert(**config):
    return BertForSequenceClassification(BertConfig(**config))


def gpt2(**config):
    return GPT2LMHeadModel(GPT2Config(use_cache=False, **config))


def resnet(**config):
    return ResNetForImageClassification(ResNetConfig(**config))
'''
TEXT = dict(vocab_size=64, max_position_embeddings=16)
#: kind -> (factory function, unused, config, input (name, wire dtype, dims), output dims, class)
MODELS: dict[str, tuple[str, str, dict[str, Any], tuple[str, str, list[int]], list[int], Any]] = {
    "bert": ("bert", "", dict(TEXT, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, num_labels=3),
             ("INPUT_IDS", "INT64", [SEQ]), [3], transformers.BertForSequenceClassification),
    "gpt2": ("gpt2", "", dict(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                                   eos_token_id=0),
             ("INPUT_IDS", "INT64", [SEQ]), [SEQ, 64], transformers.GPT2LMHeadModel),
    "resnet": ("resnet", "", dict(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=4),
               ("IMAGE", "FP32", [3, 32, 32]), [4], transformers.ResNetForImageClassification),
}


#: served model name -> (kind, engine): each library model on both CPU engines
SERVED = {f"{kind}_{engine}": (kind, engine) for kind in MODELS for engine in ("eager", "aoti")}


def _config_pbtxt(name: str) -> str:
    kind, engine = SERVED[name]
    factory, _, config, (inp, dtype, dims), out, _ = MODELS[kind]
    kwargs = json.dumps(config).replace('"', '\\"')
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 4\n'
            f'input [ {{ name: "{inp}", data_type: TYPE_{dtype}, dims: {dims} }} ]\n'
            f'output [ {{ name: "LOGITS", data_type: TYPE_FP32, dims: {out} }} ]\n'
            'instance_group [ { count: 1, kind: KIND_CPU } ]\n'
            f'parameters {{ key: "model_factory", value: {{ string_value: "hf_models:{factory}" }} }}\n'
            f'parameters {{ key: "factory_kwargs", value: {{ string_value: "{kwargs}" }} }}\n'
            f'parameters {{ key: "engine", value: {{ string_value: "{engine}" }} }}\n')


def _example(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if name == "resnet":
        return torch.randn(2, 3, 32, 32, generator=g)
    return torch.randint(0, 64, (2, SEQ), generator=g)


def _save(name: str, folder: Path, seed: int) -> Path:
    cls, config = MODELS[name][5], MODELS[name][2]
    torch.manual_seed(seed)
    module = cls(cls.config_class(**config)).eval()
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.02)
    module.save_pretrained(str(folder))
    return folder


def _reference(name: str, folder: Path, x: torch.Tensor) -> np.ndarray:
    module = MODELS[name][5].from_pretrained(str(folder)).eval()
    with torch.inference_mode():
        return module(x).logits.numpy()


def _infer(url: str, name: str, x: torch.Tensor) -> np.ndarray:
    import tritonclient.http as httpclient

    inp_name, dtype, _ = MODELS[SERVED[name][0]][3]
    client = httpclient.InferenceServerClient(url)
    try:
        inp = httpclient.InferInput(inp_name, list(x.shape), dtype)
        inp.set_data_from_numpy(x.numpy())
        return np.asarray(client.infer(name, [inp]).as_numpy("LOGITS"))
    finally:
        client.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonProcess, Path]]:
    import tqdm

    tqdm.tqdm.monitor_interval = 0  # save_pretrained's progress bar would leave its monitor thread behind
    root = tmp_path_factory.mktemp("user-repo")
    repo = root / "repository"
    for name in SERVED:
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.py").write_text("from serving.triton.model import TritonPythonModel\n")
        (repo / name / "1" / "hf_models.py").write_text(FACTORY_MODULE)
        (repo / name / "config.pbtxt").write_text(_config_pbtxt(name))
    env = dict(os.environ, HOTSWAP_WEIGHTS_ROOT=str(root / "weights"), HOTSWAP_CACHE_DIR=str(root / "cache"))
    seed_weights(repo, env)  # as hotswap serve does: the factory next to model.py must import here too
    triton = TritonProcess(repo, work_dir=root / "triton", env=env)
    triton.start()
    try:
        triton.wait_ready(list(SERVED), timeout=600)
        yield triton, root / "weights"
    finally:
        triton.stop()


def _wait_version(triton: TritonProcess, name: str, version: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        seen = weights_versions(scrape(triton.metrics_url), name)
        if seen and set(seen.values()) == {version}:
            return
        time.sleep(0.2)
    raise AssertionError(f"{name}: {version!r} not live after {timeout}s: {seen}\n{triton.log_tail(4000)}")


def _copy_in(tool: str, src: Path, dst: Path) -> None:
    """Copy a save_pretrained directory in with a tool that keeps its (older) modification times."""
    if tool == "rsync -a":
        subprocess.run(["rsync", "-a", f"{src}/", str(dst)], check=True)
    elif tool == "tar -x":
        dst.mkdir()
        subprocess.run(f"tar -C {shlex.quote(str(src))} -cf - . | tar -C {shlex.quote(str(dst))} -xf -",
                       shell=True, check=True)
    else:
        subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


#: copy tools that keep a directory's (older) modification times, and the programs each runs
COPY_TOOLS = {"cp -a": ("cp",), "rsync -a": ("rsync",), "tar -x": ("tar",)}


@pytest.mark.parametrize("tool", [pytest.param(tool, marks=pytest.mark.requires_tool(*programs), id=programs[0])
                                  for tool, programs in COPY_TOOLS.items()])
@pytest.mark.parametrize("name", sorted(SERVED))
def test_save_pretrained_published_then_copied_serves_like_from_pretrained(
        server: tuple[TritonProcess, Path], name: str, tool: str, tmp_path: Path) -> None:
    """One save_pretrained directory published by hotswap's publisher, then another copied in by ``tool``,
    saved before the first went live (the tool keeps that older time: arrival is what counts)."""
    triton, weights = server
    kind = SERVED[name][0]
    x = _example(kind)
    tag = COPY_TOOLS[tool][0]
    first = 2 * list(COPY_TOOLS).index(tool) + 1  # each tool's versions have weights of their own
    published, copied = f"{tag}-published", f"{tag}-copied"
    saved = {published: _save(kind, tmp_path / published, first), copied: _save(kind, tmp_path / copied, first + 1)}
    publish(saved[published], weights / name, version=published)
    _wait_version(triton, name, published)
    np.testing.assert_allclose(_infer(triton.http_url, name, x), _reference(kind, saved[published], x),
                               atol=1e-4, rtol=0)
    _copy_in(tool, saved[copied], weights / name / copied)
    _wait_version(triton, name, copied)
    out = _infer(triton.http_url, name, x)
    np.testing.assert_allclose(out, _reference(kind, saved[copied], x), atol=1e-4, rtol=0, err_msg=tool)
    assert not np.allclose(out, _reference(kind, saved[published], x), atol=1e-4), tool
