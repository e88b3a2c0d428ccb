"""The leave-one-family-out protocol: no family is both fitted on and judged in one fold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.leave_out import folds, joined_scans, seed_of

FAMILIES = st.sampled_from(["none", "badnets", "blended", "sig", "wanet", "ftrojan", "bpp"])


def _scans(entries: list[tuple[str, int]]) -> list[dict[str, object]]:
    name = {"none": "clean"}
    return [
        {"model": f"{name.get(family, family)}-s{seed}", "attack": family, "target": "cat"}
        for family, seed in dict.fromkeys(entries)
    ]


@given(st.lists(st.tuples(FAMILIES, st.integers(0, 9)), min_size=1, max_size=40))
def test_every_fold_keeps_its_family_and_odd_clean_seeds_out_of_the_fit(entries) -> None:
    scans = _scans(entries)
    families = {s["attack"] for s in scans} - {"none"}
    made = folds(scans)
    assert [fold.family for fold in made] == sorted(families)
    for fold in made:
        fitted = {s["attack"] for s in fold.fit}
        judged = {s["attack"] for s in fold.test} - {"none"}
        assert judged <= {fold.family}
        assert fold.family not in fitted
        assert not {s["model"] for s in fold.fit} & {s["model"] for s in fold.test}
        assert all(seed_of(s) % 2 == 0 for s in fold.fit if s["attack"] == "none")
        assert all(seed_of(s) % 2 == 1 for s in fold.test if s["attack"] == "none")
        others = [s for s in scans if s["attack"] not in ("none", fold.family)]
        assert all(s in fold.fit for s in others)


def test_a_model_name_without_a_seed_is_refused() -> None:
    with pytest.raises(ValueError, match="-s<seed>"):
        seed_of({"model": "clean"})


def _results(path, scans: list[dict[str, object]]):
    path.write_text(json.dumps({"scans": scans}))
    return str(path)


def test_files_joined_with_a_plus_are_one_zoo(tmp_path) -> None:
    first = _results(tmp_path / "seven.json", _scans([("none", 0), ("badnets", 0)]))
    second = _results(tmp_path / "more.json", _scans([("ftrojan", 0), ("none", 1)]))
    name, scans = joined_scans(f"{first}+{second}", min_asr=0.5)
    assert name == "seven"
    assert [s["model"] for s in scans] == ["clean-s0", "badnets-s0", "ftrojan-s0", "clean-s1"]
    with pytest.raises(ValueError, match="more than one file"):
        joined_scans(f"{first}+{first}", min_asr=0.5)


def test_the_command_writes_every_zoos_folds_from_stored_scans(tmp_path) -> None:
    from typer.testing import CliRunner

    from benchmarks.leave_out import app

    stored = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    joined = f"{stored / 'synthetic-defaults.json'}+{stored / 'synthetic-extended-defaults.json'}"
    out = tmp_path / "leave-out.json"
    result = CliRunner().invoke(app, [joined, "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    families = written["synthetic-defaults"]["families"]
    assert {"badnets", "ftrojan", "color-filter"} <= set(families)
    assert "| synthetic-defaults | ftrojan |" in result.output
