"""The benchmark harness's bookkeeping: merging the results of parallel runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import Harness  # noqa: E402


def _run(model: str, defence: str, asr: float) -> dict:
    return {"model": model, "defence": defence, "attack": "badnets", "asr_after": asr}


def test_merge_adds_what_is_missing_and_keeps_what_is_there(tmp_path):
    mine, other = tmp_path / "a.json", tmp_path / "b.json"
    mine.write_text(
        json.dumps({"runs": [_run("m1", "cbpt", 0.1)], "scans": [{"model": "m1", "verdict": "x"}]})
    )
    other.write_text(
        json.dumps(
            {
                "runs": [_run("m1", "cbpt", 0.9), _run("m2", "cbpt", 0.2)],
                "scans": [{"model": "m1", "verdict": "y"}, {"model": "m2", "verdict": "z"}],
            }
        )
    )
    harness = Harness(results_path=mine, runs_dir=tmp_path / "runs")
    harness.merge(other)
    runs = {(r["model"], r["defence"]): r["asr_after"] for r in harness.results["runs"]}
    assert runs == {("m1", "cbpt"): 0.1, ("m2", "cbpt"): 0.2}
    verdicts = {s["model"]: s["verdict"] for s in harness.results["scans"]}
    assert verdicts == {"m1": "x", "m2": "z"}
    assert json.loads(mine.read_text())["runs"] == harness.results["runs"]


def test_scans_made_with_other_options_are_not_mixed(tmp_path):
    sized = tmp_path / "size.json"
    Harness(results_path=sized, runs_dir=tmp_path / "r", scan_options={"signals": "size"})._save()
    with pytest.raises(ValueError, match="use another results file"):
        Harness(results_path=sized, runs_dir=tmp_path / "r")
    plain = Harness(results_path=tmp_path / "plain.json", runs_dir=tmp_path / "r")
    with pytest.raises(ValueError, match="not merged"):
        plain.merge(sized)
