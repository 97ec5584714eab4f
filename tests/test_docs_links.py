"""Every relative link in the Markdown documentation reaches a file, and every `#anchor` a heading in it.

README.md sends readers to docs/*.md and benchmarks/README.md for the measurements behind its summaries (and
they link back), so a renamed heading or a moved section must not leave a link that lands nowhere. Anchors
are GitHub's: the heading lower-cased, punctuation other than `-` and `_` dropped, spaces turned into `-`, and
`-1`, `-2`, ... appended to repeats.
"""

from __future__ import annotations

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", REPO / "benchmarks" / "README.md", *(REPO / "docs").glob("*.md")])
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *#*$")


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (fenced code blocks skipped)."""
    anchors, seen, fenced = set(), {}, False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_heading_anchors_follow_github():
    text = "# Multi30k De→En (real data, 2 CPU cores)\n```\n# not a heading\n```\n## Setup\n## Setup\n"
    assert heading_anchors(text) == {"multi30k-deen-real-data-2-cpu-cores", "setup", "setup-1"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_reach_a_file_and_a_heading(doc: pathlib.Path):
    broken = []
    for link in _LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", link):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        if not target.exists():
            broken.append(f"{link}: no file {target}")
        elif anchor and target.suffix == ".md" and anchor not in heading_anchors(target.read_text(encoding="utf-8")):
            broken.append(f"{link}: no heading with anchor #{anchor} in {target.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)}:\n" + "\n".join(broken)
