"""Generated blocks of a Markdown document: the text between two marker lines, rewritten by a generator::

    <!-- BEGIN generated:NAME -->
    ...
    <!-- END generated:NAME -->

Everything else in the document is left as it is. A block without a generator, or a generator without
its block, is an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

_BLOCK = re.compile(r"^<!-- (BEGIN|END) generated:([A-Za-z0-9_.-]+) -->$", re.M)


# ---------------------------------------------------------------- blocks


def markers(name: str) -> tuple[str, str]:
    """The BEGIN and END marker lines of block ``name``."""
    return f"<!-- BEGIN generated:{name} -->", f"<!-- END generated:{name} -->"


def block_names(text: str) -> list[str]:
    """Names of the generated blocks in ``text``, in order; ValueError if the markers do not pair up."""
    names: list[str] = []
    open_name: str | None = None
    for m in _BLOCK.finditer(text):
        kind, name = m.groups()
        if kind == "BEGIN":
            if open_name is not None:
                raise ValueError(f"generated block {name!r} begins inside block {open_name!r}")
            if name in names:
                raise ValueError(f"generated block {name!r} appears twice")
            open_name = name
        else:
            if open_name != name:
                raise ValueError(f"END of generated block {name!r} without its BEGIN")
            names.append(name)
            open_name = None
    if open_name is not None:
        raise ValueError(f"generated block {open_name!r} has no END marker")
    return names


def read_block(text: str, name: str) -> str:
    """The current body of block ``name`` (between the marker lines)."""
    begin, end = markers(name)
    if name not in block_names(text):
        raise ValueError(f"no generated block {name!r} (expected the lines {begin!r} ... {end!r})")
    start = text.index(begin + "\n") + len(begin) + 1
    return text[start:text.index("\n" + end, start - 1) + 1]


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the body of block ``name`` replaced by ``body`` (the marker lines stay)."""
    old = read_block(text, name)
    begin, _ = markers(name)
    start = text.index(begin + "\n") + len(begin) + 1
    body = body if not body or body.endswith("\n") else body + "\n"
    return text[:start] + body + text[start + len(old):]


def render(text: str, generators: Mapping[str, Callable[[], str]]) -> str:
    """``text`` with every generated block rendered by its generator."""
    names = block_names(text)
    problems = [f"block {n!r} has no generator" for n in names if n not in generators]
    problems += [f"generator {n!r} has no block in the document" for n in generators if n not in names]
    if problems:
        raise ValueError("; ".join(problems))
    for name in names:
        text = replace_block(text, name, generators[name]())
    return text


def stale_blocks(text: str, generators: Mapping[str, Callable[[], str]]) -> list[str]:
    """Names of the blocks whose body differs from what their generator makes now."""
    rendered = render(text, generators)
    return [n for n in block_names(text) if read_block(text, n) != read_block(rendered, n)]
