"""The Inductor cache entry: the kernels packed beside the compiler's artifacts, and unpacked safely on every
Python the project accepts (``TarFile.extractall(filter=...)`` exists only from 3.10.12 and 3.11.4)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from serving.cache import EngineCache
from serving.engines.cached_build import EntryUnfit
from serving.engines.inductor import entry
from serving.engines.inductor.entry import kernel_files, pack_kernels, unpack_kernels


def _tar(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_kernels_pack_skips_what_the_mega_cache_carries(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    for rel in ("ab/k.so", "ab/k.cpp", "fxgraph/x/entry", "aotautograd/y", "locks/z", "triton/0/h/k.cubin"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    (root / "ab/k.so").chmod(0o755)
    assert [str(p) for p in kernel_files(root)] == ["ab/k.cpp", "ab/k.so", "triton/0/h/k.cubin"]
    assert pack_kernels(root, tmp_path / "k.tar") == 3
    unpack_kernels(tmp_path / "k.tar", tmp_path / "out")
    assert _files(tmp_path / "out") == ["ab", "ab/k.cpp", "ab/k.so", "triton", "triton/0", "triton/0/h",
                                        "triton/0/h/k.cubin"]
    assert (tmp_path / "out/triton/0/h/k.cubin").read_bytes() == b"triton/0/h/k.cubin"
    assert (tmp_path / "out/ab/k.so").stat().st_mode & 0o777 == 0o755


def test_a_hostile_archive_is_refused_whole_and_nothing_is_written(tmp_path: Path) -> None:
    outside = tmp_path / "abs-target"
    archive = _tar(tmp_path / "evil.tar",
                   (_member("good.so"), b"code"),
                   (_member("../escaped"), b"x"),
                   (_member("sub/../../escaped2"), b"x"),
                   (_member(str(outside)), b"x"),
                   (_member("link", tarfile.SYMTYPE, "/etc/passwd"), b""),
                   (_member("hard", tarfile.LNKTYPE, "good.so"), b""),
                   (_member("dev", tarfile.CHRTYPE), b""),
                   (_member("good.so"), b"again"))
    root = tmp_path / "out"
    with pytest.raises(EntryUnfit) as err:
        unpack_kernels(archive, root)
    text = "\n".join(err.value.problems)
    for expected in ("'../escaped': leads outside the folder", "'sub/../../escaped2': leads outside the folder",
                     f"{str(outside)!r}: an absolute name", "'link': not a regular file or folder",
                     "'hard': not a regular file or folder", "'dev': not a regular file or folder",
                     "'good.so': in the archive more than once"):
        assert expected in text, text
    assert all(p.startswith(f"{archive}: refusing to unpack: ") for p in err.value.problems)
    assert _files(root) == [] and not outside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar"]


def test_sizes_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(entry, "MAX_KERNEL_FILE_BYTES", 10)
    monkeypatch.setattr(entry, "MAX_KERNELS_BYTES", 15)
    archive = _tar(tmp_path / "big.tar", (_member("a.so"), b"x" * 8), (_member("b.so"), b"y" * 11))
    with pytest.raises(EntryUnfit) as err:
        unpack_kernels(archive, tmp_path / "out")
    assert "'b.so': 11 bytes, more than a kernel file may have (10)" in str(err.value)
    assert "19 bytes in all, more than the kernels may have (15)" in str(err.value)
    assert _files(tmp_path / "out") == []


def test_a_file_cannot_also_be_a_folder(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "clash.tar", (_member("a"), b"x"), (_member("a/b"), b"y"))
    with pytest.raises(EntryUnfit, match="'a/b': inside a path the archive also has as a file"):
        unpack_kernels(archive, tmp_path / "out")


def test_unpacking_works_on_a_tarfile_without_extraction_filters(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.10.0-3.10.11 and 3.11.0-3.11.3: no ``filter`` argument, no ``tarfile.data_filter``."""

    def old_extractall(self: tarfile.TarFile, path: str = ".", members: object = None, *,
                       numeric_owner: bool = False) -> None:
        raise AssertionError("extractall of an old Python would extract links and absolute names as they are")

    monkeypatch.setattr(tarfile.TarFile, "extractall", old_extractall)
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    monkeypatch.delattr(tarfile.TarFile, "extraction_filter", raising=False)
    archive = _tar(tmp_path / "k.tar", (_member("d", tarfile.DIRTYPE), b""), (_member("d/k.so"), b"code"))
    unpack_kernels(archive, tmp_path / "out")
    assert (tmp_path / "out/d/k.so").read_bytes() == b"code"
    with pytest.raises(EntryUnfit, match="leads outside"):
        unpack_kernels(_tar(tmp_path / "evil.tar", (_member("../x"), b"x")), tmp_path / "out2")
    assert not (tmp_path / "x").exists()


def test_a_cache_entry_with_a_hostile_archive_does_not_fit(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "cache")
    (tmp_path / entry.ARTIFACTS_FILE).write_bytes(b"artifacts")
    evil = _tar(tmp_path / entry.KERNELS_FILE, (_member("link", tarfile.SYMTYPE, "/etc"), b""))
    cache.store("k", {entry.ARTIFACTS_FILE: tmp_path / entry.ARTIFACTS_FILE, entry.KERNELS_FILE: evil}, {})
    work, compile_dir = tmp_path / "work", tmp_path / "work" / "inductor"
    compile_dir.mkdir(parents=True)
    with pytest.raises(EntryUnfit, match="'link': not a regular file or folder"):
        cache.load("k", lambda e: entry.copy_out(e, work, compile_dir))
    assert _files(compile_dir) == []
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    cache.store("j", {entry.ARTIFACTS_FILE: tmp_path / entry.ARTIFACTS_FILE,
                      entry.KERNELS_FILE: tmp_path / "junk.tar"}, {})
    with pytest.raises(EntryUnfit, match="kernels.tar: ReadError"):
        cache.load("j", lambda e: entry.copy_out(e, work, compile_dir))
