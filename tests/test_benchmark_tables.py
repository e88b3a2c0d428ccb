"""docs/benchmarks.md and README.md hold the tables benchmarks.tables computes from the
current result files, and every result file the docs cite exists."""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks import tables

ROOT = Path(__file__).resolve().parents[1]


def test_generated_tables_are_in_sync_with_the_results() -> None:
    assert tables.main(["--check"]) == 0, "run: python -m benchmarks.tables --write"


def test_every_generated_block_is_rendered_somewhere() -> None:
    text = "".join((ROOT / doc).read_text() for doc in tables.DOCUMENTS)
    for name in tables.BLOCKS:
        assert f"<!-- tables:{name}:begin -->" in text, name


def test_check_mode_finds_a_stale_table(tmp_path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- tables:detection:begin -->\nold\n<!-- tables:detection:end -->\n")
    assert tables.stale([doc]) == [doc]
    doc.write_text(tables.render(doc.read_text()))
    assert tables.stale([doc]) == []


def test_results_hold_only_what_the_docs_cite() -> None:
    cited = set()
    for path in [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *ROOT.glob("docs/*.md")]:
        cited |= set(re.findall(r"benchmarks/results/([\w.-]+)", path.read_text()))
    stored = {p.name for p in (ROOT / "benchmarks" / "results").iterdir()}
    assert cited <= stored, sorted(cited - stored)
    assert stored <= cited, sorted(stored - cited)
