"""Check that the TensorRT Python wheel matches the TensorRT of the Triton base image.

Run in the image build (deploy/Dockerfile) after ``pip install``; exits 1 with the fix when the
versions differ. The base image's TensorRT is read from its ``libnvinfer.so.X.Y.Z`` file, else
from ``$TRT_VERSION``.
Engines are version-locked: an engine built by one TensorRT release does not load in another.

    python3 check_tensorrt.py [--lib-dir DIR ...] [--installed VERSION] [--container VERSION]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path

LIB_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/local/tensorrt/lib",
    "/opt/tensorrt/lib",
)
_LIB = re.compile(r"^libnvinfer\.so\.(\d+\.\d+\.\d+)$")
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)")


def container_version(env: Mapping[str, str], lib_dirs: Iterable[Path]) -> str | None:
    """The base image's TensorRT version (X.Y.Z...), or None when it has none.

    The library file wins; ``$TRT_VERSION`` (set by NGC images) is the fallback. ``$TENSORRT_VERSION``
    is not read: it is deploy/Dockerfile's own build argument, the value under test.
    """
    for d in lib_dirs:
        if d.is_dir():
            for p in sorted(d.iterdir()):
                m = _LIB.match(p.name)
                if m:
                    return m.group(1)
    if _VERSION.match(env.get("TRT_VERSION", "")):
        return env["TRT_VERSION"]
    return None


def installed_version() -> str | None:
    """Version of the installed ``tensorrt`` wheel, or None."""
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def release(version: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a version string, ignoring build numbers and suffixes."""
    m = _VERSION.match(version)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def check(installed: str | None, container: str | None) -> list[str]:
    """Problems (empty when the wheel matches the image)."""
    if installed is None:
        return ["the tensorrt wheel is not installed: build with HOTSWAP_EXTRAS=tensorrt "
                "(pip install '.[tensorrt]')"]
    if container is None:
        return ["found no TensorRT in the base image (no libnvinfer.so.X.Y.Z in "
                f"{', '.join(LIB_DIRS)}, no $TRT_VERSION): is it an nvcr.io/nvidia/tritonserver image "
                "with TensorRT >= 10.14, e.g. 26.03-trtllm-python-py3 (TRITON_VERSION, TRITON_IMAGE_SUFFIX)?"]
    a, b = release(installed), release(container)
    if a is None or b is None or a != b:
        return [f"tensorrt wheel {installed} does not match the base image's TensorRT {container}: "
                f"build with --build-arg TENSORRT_VERSION={'.'.join(map(str, b)) if b else container} "
                "(engines built by one TensorRT release do not load in another)"]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib-dir", action="append", type=Path, help="library folder to search (repeatable)")
    parser.add_argument("--installed", help="wheel version to check instead of the installed one")
    parser.add_argument("--container", help="base-image version to check against instead of detecting it")
    args = parser.parse_args(argv)
    lib_dirs = args.lib_dir or [Path(d) for d in LIB_DIRS]
    installed = args.installed or installed_version()
    container = args.container or container_version(os.environ, lib_dirs)
    problems = check(installed, container)
    for p in problems:
        print(f"check_tensorrt: {p}", file=sys.stderr)
    if not problems:
        print(f"check_tensorrt: tensorrt wheel {installed} matches the base image's TensorRT {container}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
