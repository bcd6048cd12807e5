"""Every relative link and image in the README and the documents resolves: the file exists and, for a link to
a heading (``file.md#heading``), the heading does too (GitHub's anchors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown document. Pure."""
    out: set[str] = set()
    for line in _FENCE.sub("", markdown).splitlines():
        m = re.match(r"#{1,6} +(.*)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").strip().lower()).replace(" ", "-")
        n, candidate = 0, slug
        while candidate in out:
            n += 1
            candidate = f"{slug}-{n}"
        out.add(candidate)
    return out


def links(markdown: str) -> list[str]:
    """The targets of the links and images outside code. Pure."""
    return _LINK.findall(_CODE.sub("", _FENCE.sub("", markdown)))


def problems(doc: Path) -> list[str]:
    found = []
    for target in links(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, fragment = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            found.append(f"{target}: no {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file.read_text()):
            found.append(f"{target}: no heading #{fragment} in {file.name}")
    return found


def test_anchors_and_links_are_read_as_github_does() -> None:
    text = "# Which weights answered: the `version`\n## Tables\n## Tables\n```\n# not a heading\n```\n"
    assert anchors(text) == {"which-weights-answered-the-version", "tables", "tables-1"}
    assert links("see [a](docs/a.md#x), ![p](f.svg), `[not](this.md)`, [web](https://x.org)") == [
        "docs/a.md#x", "f.svg", "https://x.org"]


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path) -> None:
    assert problems(doc) == []
