"""The documentation's shape: a README of one screen or so, docs/ pages of a few KB, and links that resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import REPO

README_MAX_BYTES = 12 * 1024
PAGE_MAX_BYTES = 10 * 1024
PAGES = sorted((REPO / "docs").glob("*.md"))
DOCUMENTS = [REPO / "README.md", *PAGES]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```.*?^\s*```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _prose(path: Path) -> str:
    """The Markdown of ``path`` without code blocks and code spans (where brackets are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", path.read_text()))


def _anchors(path: Path) -> set[str]:
    """GitHub's anchor for every heading of ``path``: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", path.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_and_pages_stay_small() -> None:
    """README <= 12 KB; each docs/ page <= 10 KB (split a page that grows past it)."""
    assert len(PAGES) >= 6
    assert (REPO / "README.md").stat().st_size <= README_MAX_BYTES
    too_big = {p.name: p.stat().st_size for p in PAGES if p.stat().st_size > PAGE_MAX_BYTES}
    assert too_big == {}


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path) -> None:
    """Every relative link points at an existing file, and its #anchor (if any) at a heading of that file."""
    broken = []
    for target in LINK.findall(_prose(doc)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(target)
    assert broken == []


def test_readme_links_every_page_and_shows_the_ci_command() -> None:
    """Each docs/ page is reachable from the README (directly or from a page it links); `make test` is CI's."""
    reachable, todo = set(), [REPO / "README.md"]
    while todo:
        doc = todo.pop()
        for target in LINK.findall(_prose(doc)):
            path = (doc.parent / target.partition("#")[0]).resolve()
            if path.suffix == ".md" and path.parent == REPO / "docs" and path not in reachable:
                reachable.add(path)
                todo.append(path)
    assert sorted(p.name for p in PAGES if p not in reachable) == []
    ci_commands = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("make")]
    assert ci_commands == ["make floors", "make test"]
    readme = (REPO / "README.md").read_text()
    assert re.search(r"^make test\s+#", readme, re.M) and re.search(r"^make floors\s+#", readme, re.M)
    make_test = (REPO / "Makefile").read_text().split("\ntest: install\n")[1].split("\n\n")[0]
    ruff = "\t$(BIN)/ruff check dialogsum tools scripts tests"
    assert make_test.split("\n") == [ruff, "\t$(BIN)/python -m pytest -q"]


def test_no_reference_to_the_old_benchmarks_file() -> None:
    """BENCHMARKS.md moved to docs/benchmarks.md (and its split pages): nothing points at the old name."""
    texts = [*REPO.glob("*.md"), *PAGES, REPO / "Makefile", REPO / "pyproject.toml", REPO / ".ci" / "run"]
    for folder in ("dialogsum", "tools", "scripts", "tests", "accelerate_configs"):
        texts += [p for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".yaml") and p.name != "test_docs.py"]
    assert [str(p.relative_to(REPO)) for p in texts if "BENCHMARKS.md" in p.read_text()] == []


def test_the_module_map_names_every_module() -> None:
    """The README's module map has one line for every module of the package, script, tool and launcher config."""
    readme = (REPO / "README.md").read_text()
    shipped = [
        *(REPO / "dialogsum").glob("*.py"),
        *(REPO / "scripts").glob("*.py"),
        *(REPO / "tools").glob("*.py"),
        *(REPO / "accelerate_configs").glob("*.yaml"),
    ]
    listed = set(re.findall(r"^  (\S+\.(?:py|yaml)) ", readme, re.M))
    missing = [str(p.relative_to(REPO)) for p in shipped if p.name != "__init__.py" and p.name not in listed]
    assert not missing, f"not in the README's module map: {missing}"
