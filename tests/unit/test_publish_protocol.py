"""The publish protocol's pure rules: names, versions, the order of publication, manifests, completeness."""

from __future__ import annotations

import hashlib
import json

import pytest

from serving.errors import CheckpointError
from serving.publish.protocol import (
    FoundFile,
    Manifest,
    ManifestEntry,
    Observation,
    classify_name,
    completeness,
    is_temp_name,
    manifest_problems,
    parse_manifest,
    publish_key,
    tree_hash,
    version_of,
)

SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()


@pytest.mark.parametrize("name", [".v3.safetensors", "v3.safetensors.tmp", "v3.TMP", "v3.part", "v3.partial",
                                  "x.crdownload", "v3.safetensors~", ".hidden_dir", "", "v3.incomplete"])
def test_temp_names_are_ignored(name: str) -> None:
    assert is_temp_name(name)
    assert classify_name(name, is_dir=False) == "temp"


@pytest.mark.parametrize(("name", "is_dir", "adapter", "kind"), [
    ("v3.safetensors", False, False, "checkpoint"),
    ("v3.SAFETENSORS", False, False, "checkpoint"),
    ("v3.pt", False, False, "checkpoint"),
    ("v3.bin", False, False, "checkpoint"),
    ("README.md", False, False, "ignored"),
    ("weights", False, False, "ignored"),
    ("v3", True, False, "checkpoint"),
    ("my-lora", True, True, "adapter"),
])
def test_classify_name(name: str, is_dir: bool, adapter: bool, kind: str) -> None:
    assert classify_name(name, is_dir=is_dir, has_adapter_config=adapter) == kind


def test_version_identity_is_manifest_version_else_name() -> None:
    assert version_of("v3.safetensors", is_dir=False) == "v3"
    assert version_of("model.v3.safetensors", is_dir=False) == "model.v3"
    assert version_of("v3.d", is_dir=True) == "v3.d"
    assert version_of("v3", is_dir=True, manifest_version="2024-06-01") == "2024-06-01"
    assert version_of("noext", is_dir=False) == "noext"


def test_publish_key_orders_by_mtime_then_name() -> None:
    keys = [publish_key(5, "b"), publish_key(7, "a"), publish_key(5, "a")]
    assert sorted(keys) == [(5, "a"), (5, "b"), (7, "a")]


def test_parse_manifest_both_forms_and_content_hash_ignores_order() -> None:
    a = parse_manifest(json.dumps({"version": "v9", "files": {"b.safetensors": SHA_B,
                                                               "a.safetensors": SHA_A}}).encode(), "m")
    b = parse_manifest(json.dumps({"files": [{"path": "a.safetensors", "sha256": SHA_A.upper(), "size": 1},
                                             {"path": "b.safetensors", "sha256": SHA_B}]}).encode(), "m")
    assert a.version == "v9" and b.version is None
    assert [f.path for f in a.files] == ["a.safetensors", "b.safetensors"]
    assert b.files[0] == ManifestEntry("a.safetensors", SHA_A, 1)
    assert a.content_hash() == b.content_hash() == tree_hash([("a.safetensors", SHA_A), ("b.safetensors", SHA_B)])


@pytest.mark.parametrize(("doc", "needle"), [
    (b"{not json", "not JSON"),
    (b"[]", "JSON list"),
    (json.dumps({"files": {}}).encode(), "lists no file"),
    (json.dumps({"version": ""}).encode(), "'files' is missing"),
    (json.dumps({"files": {"../x.safetensors": SHA_A}}).encode(), "relative path inside"),
    (json.dumps({"files": {"/etc/passwd": SHA_A}}).encode(), "relative path inside"),
    (json.dumps({"files": {"a": "abc"}}).encode(), "64 hex digits"),
    (json.dumps({"files": {"MANIFEST.json": SHA_A}}).encode(), "cannot list itself"),
    (json.dumps({"files": [{"path": "a", "sha256": SHA_A, "size": -1}]}).encode(), "non-negative"),
    (json.dumps({"files": [{"path": "a", "sha256": SHA_A}, {"path": "a", "sha256": SHA_A}]}).encode(), "twice"),
])
def test_parse_manifest_refuses_bad_documents(doc: bytes, needle: str) -> None:
    with pytest.raises(CheckpointError, match=needle) as info:
        parse_manifest(doc, "dir/MANIFEST.json")
    assert info.value.reason == "manifest_invalid"
    assert "dir/MANIFEST.json" in str(info.value)


def test_manifest_problems_name_each_file() -> None:
    m = Manifest((ManifestEntry("a", SHA_A, 1), ManifestEntry("b", SHA_B), ManifestEntry("c", SHA_A)))
    assert manifest_problems(m, {"a": FoundFile(1, SHA_A), "b": FoundFile(1, SHA_B), "c": FoundFile(1, SHA_A)}) == []
    problems = manifest_problems(m, {"a": FoundFile(2, None), "b": FoundFile(1, SHA_A)}, others=["extra"])
    assert problems[0].startswith("a: 2 bytes, the manifest says 1")
    assert problems[1].startswith("b: sha256")
    assert problems[2] == "c: listed in MANIFEST.json but missing"
    assert problems[3].startswith("extra: in the directory but not listed")


@pytest.mark.parametrize(("obs", "action", "problem"), [
    # atomic rename or a finished write: decide now, problems are final
    (Observation(renamed_in=True), "ready", None),
    (Observation(closed=True, problem=("corrupt", "x")), "ready", ("corrupt", "x")),
    # written in place: wait for a stable fingerprint first
    (Observation(stable=False), "wait", None),
    (Observation(stable=True), "ready", None),
    # stable but the header does not agree: maybe still copying, wait for settle
    (Observation(stable=True, age_s=0.5, problem=("corrupt", "x")), "wait", None),
    (Observation(stable=True, age_s=5.0, problem=("corrupt", "x")), "ready", ("corrupt", "x")),
    # a problem that cannot be a copy in progress is final at once
    (Observation(stable=True, age_s=0.0, problem=("outside_root", "x")), "ready", ("outside_root", "x")),
])
def test_completeness_rules(obs: Observation, action: str, problem: tuple[str, str] | None) -> None:
    d = completeness(obs, debounce_s=0.2, settle_s=2.0)
    assert (d.action, d.problem) == (action, problem)
    if action == "wait":
        assert d.recheck_in_s > 0
