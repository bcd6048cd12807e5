"""Copy the `tensorrt-stubs` stubs into a folder mypy can read, fixing their few syntax errors.

tensorrt-stubs (PyPI) ships `.pyi` files generated from the TensorRT bindings; a handful of plugin
and network-definition signatures are not valid Python (a parameter named ``in``; a parameter
without a default after ones with defaults), and one syntax error stops mypy. None of them is an
API hotswap uses. Usage: ``python tools/trt_stubs.py OUT_DIR`` then ``mypy_path = OUT_DIR``.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

_DEF = re.compile(r"^(?P<head>\s*def \w+\()(?P<params>.*)(?P<tail>\)\s*->.*:\s*)$")


def _fix_params(params: str) -> str:
    parts = [p.strip() for p in params.split(",")] if params.strip() else []
    out, seen_default = [], False
    for p in parts:
        p = re.sub(r"^in(\s*:)", r"in_\1", p)
        if "=" in p:
            seen_default = True
        elif seen_default and p not in ("*", "/") and not p.startswith("*"):
            p = f"{p} = ..."
        out.append(p)
    return ", ".join(out)


def fix_stub(text: str) -> str:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _DEF.match(line)
        if m:
            lines[i] = m["head"] + _fix_params(m["params"]) + m["tail"]
    fixed = "\n".join(lines) + "\n"
    ast.parse(fixed)  # raises if something is still broken
    return fixed


def main(out_dir: str) -> None:
    out = Path(out_dir)
    for package in ("tensorrt", "tensorrt_bindings"):
        spec = importlib.util.find_spec(package)
        roots = list(spec.submodule_search_locations or []) if spec else []
        if not roots:
            sys.exit(f"{package} stubs not found: pip install tensorrt-stubs")
        for src in Path(roots[0]).rglob("*.pyi"):
            dst = out / package / src.relative_to(roots[0])
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(fix_stub(src.read_text()))
        (out / package / "py.typed").write_text("")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".venv/trt-stubs")
