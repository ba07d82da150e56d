"""The user-facing documents: no placeholder left where a measured figure belongs, no link to a missing file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")])

# A line that is nothing but an upper-case token with underscores (MAKE_RUN_TABLE, FIGURES_HERE):
# what a draft leaves for a figure to be pasted in later.
_PLACEHOLDER = re.compile(r"^\s*[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\s*$")
# [text](target) with a relative target (no scheme, not an anchor in the same page).
_LINK = re.compile(r"\[[^\]]*\]\((?!https?:|mailto:|#)([^)\s]+)\)")


def placeholders(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if _PLACEHOLDER.match(line)]


def missing_links(path: Path, text: str) -> list[str]:
    targets = (m.group(1).split("#", 1)[0] for m in _LINK.finditer(text))
    return [t for t in targets if t and not (path.parent / t).exists()]


def test_the_placeholder_check_finds_a_draft_line_and_passes_prose_and_code():
    draft = "The table printed by `make run`:\n\n```\nMAKE_RUN_TABLE\n```\n"
    assert placeholders(draft) == ["MAKE_RUN_TABLE"]
    prose = "Set `PYSPARK_PYTHON` first.\nHOLDOUT\n    spark.sql.shuffle.partitions\nA_B testing is `A_B`.\n"
    assert placeholders(prose) == []


def test_the_link_check_finds_a_missing_file(tmp_path):
    (tmp_path / "there.md").write_text("x")
    text = "[ok](there.md#part) [gone](missing.md) [web](https://example.org/x) [here](#anchor)"
    assert missing_links(tmp_path / "page.md", text) == ["missing.md"]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_have_no_placeholders_or_dead_links(path):
    text = path.read_text(encoding="utf-8")
    assert placeholders(text) == []
    assert missing_links(path, text) == []
