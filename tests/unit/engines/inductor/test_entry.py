"""The Inductor cache entry: the kernels packed beside the compiler's artifacts, and unpacked safely."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from serving.engines.inductor.entry import kernel_files, pack_kernels, unpack_kernels


def test_kernels_pack_skips_what_the_mega_cache_carries(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    for rel in ("ab/k.so", "ab/k.cpp", "fxgraph/x/entry", "aotautograd/y", "locks/z", "triton/0/h/k.cubin"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    assert [str(p) for p in kernel_files(root)] == ["ab/k.cpp", "ab/k.so", "triton/0/h/k.cubin"]
    assert pack_kernels(root, tmp_path / "k.tar") == 3
    unpack_kernels(tmp_path / "k.tar", tmp_path / "out")
    assert (tmp_path / "out/triton/0/h/k.cubin").read_bytes() == b"triton/0/h/k.cubin"
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:  # nothing is written outside the folder
        info = tarfile.TarInfo("../escaped")
        info.size = 0
        tar.addfile(info)
    with pytest.raises(tarfile.TarError):
        unpack_kernels(tmp_path / "evil.tar", tmp_path / "out2")
    assert not (tmp_path / "escaped").exists()
