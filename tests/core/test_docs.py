"""The README is a short product page and the docs pages are reachable from it: it stays under 200 lines, links
every page under docs/, names every model family in its table, and every relative link of the README, the docs
pages and the help pages (web/docs/) reaches a file and, with a #fragment, a heading of that file."""

from __future__ import annotations

import os
import re

import pytest

from comfyui_cones2.cones2_core.families import FAMILIES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPO, "README.md")
DOCS = os.path.join(REPO, "docs")
HELP = os.path.join(REPO, "web", "docs")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def markdown_files() -> list[str]:
    pages = [README]
    for folder in (DOCS, HELP):
        pages += sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".md"))
    return pages


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but - and _), spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    text = re.sub(r"```.*?```", "", read(path), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def broken_links(path: str) -> list[str]:
    out = []
    for target in LINK.findall(read(path)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(dest):
            out.append(f"{target}: no such file {os.path.relpath(dest, REPO)}")
        elif fragment and (not dest.endswith(".md") or fragment not in anchors(dest)):
            out.append(f"{target}: no heading #{fragment} in {os.path.relpath(dest, REPO)}")
    return out


def test_slug_matches_github():
    assert slug("Flux (joint attention)") == "flux-joint-attention"
    assert slug("Training (fast mode)") == "training-fast-mode"
    assert slug("Nodes (category `conditioning/cones2`)") == "nodes-category-conditioningcones2"


def test_readme_is_short():
    n = read(README).count("\n")
    assert n < 200, f"README.md has {n} lines; move detail into a page under docs/ and link it"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {os.path.normpath(os.path.join(REPO, t.partition("#")[0])) for t in LINK.findall(read(README))}
    pages = {os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith(".md")}
    assert pages, "no pages under docs/"
    unlinked = sorted(os.path.relpath(p, REPO) for p in pages - linked)
    assert not unlinked, f"pages not linked from the README: {unlinked}"


def test_readme_table_names_every_family():
    rows = [line for line in read(README).splitlines() if line.startswith("| ")]
    missing = [f.name for f in FAMILIES.values() if not any(line.startswith(f"| {f.name}") for line in rows)]
    assert not missing, f"the README's model tables have no row for {missing}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(path):
    assert not broken_links(path), "\n".join(broken_links(path))


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](#title) [gone](missing.md) [bad](#nowhere) [web](https://example.com)\n")
    assert broken_links(str(page)) == ["missing.md: no such file " + os.path.relpath(str(tmp_path / "missing.md"), REPO),
                                       "#nowhere: no heading #nowhere in " + os.path.relpath(str(page), REPO)]
