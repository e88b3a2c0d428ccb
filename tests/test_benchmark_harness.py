"""The benchmark harness's bookkeeping: merging the results of parallel runs."""

from __future__ import annotations

import json

import pytest

import benchmarks.harness as harness_module
from benchmarks.harness import Harness, ZooModel, markdown_tables


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


def test_a_model_rebuilt_under_the_same_name_is_measured_again(tmp_path, monkeypatch):
    """Stored results are reused only for the model file they were measured on (its sha256
    in the card): a rebuilt model of the same name is run again, not served stale figures."""
    results = tmp_path / "r.json"
    stored = {**_run("m1", "zeroshot", 0.5), "model_sha256": "aaa"}
    results.write_text(json.dumps({"runs": [stored], "scans": []}))
    harness = Harness(results_path=results, runs_dir=tmp_path / "runs")

    def model(sha: str) -> ZooModel:
        return ZooModel(
            path=tmp_path / "m1.safetensors",
            name="m1",
            attack="badnets",
            target="cat",
            trigger_options={},
            data_root=tmp_path,
            card={"model_sha256": sha},
        )

    assert harness.defend(model("aaa"), "zeroshot") == stored

    class Measuring(Exception):
        pass

    def measure(arguments):
        raise Measuring(arguments[0])

    monkeypatch.setattr(harness, "scan", lambda m: {})
    monkeypatch.setattr(harness_module, "run_measured", measure)
    with pytest.raises(Measuring, match="purify"):
        harness.defend(model("bbb"), "zeroshot")


def test_scans_made_with_other_options_are_not_mixed(tmp_path):
    sized = tmp_path / "size.json"
    Harness(results_path=sized, runs_dir=tmp_path / "r", scan_options={"signals": "size"})._save()
    with pytest.raises(ValueError, match="use another results file"):
        Harness(results_path=sized, runs_dir=tmp_path / "r")
    plain = Harness(results_path=tmp_path / "plain.json", runs_dir=tmp_path / "r")
    with pytest.raises(ValueError, match="not merged"):
        plain.merge(sized)


def test_cost_compares_defences_on_the_same_models():
    """A defence also run on clean models (cheaper there) is not averaged over more models
    than one run only on backdoored ones."""

    def run(model: str, attack: str, defence: str, seconds: float) -> dict:
        return {
            "model": model,
            "attack": attack,
            "defence": defence,
            "ca_before": 0.5,
            "asr_before": 0.9,
            "ca_after": 0.5,
            "asr_after": 0.1,
            "purify_seconds": seconds,
            "peak_rss_mb": 100.0,
            "image_encoder_images": 10,
        }

    runs = [
        run("bad", "badnets", "cbpt", 2.0),
        run("bad", "badnets", "finetune", 8.0),
        run("clean", "none", "cbpt", 0.5),
    ]

    def cost_rows(chosen: list[dict]) -> dict[str, str]:
        tables = markdown_tables({"runs": chosen, "scans": []}, ["cbpt", "finetune"])
        cost = tables.split("### Cost")[1]
        return {line.split("|")[1].strip(): line for line in cost.splitlines() if "|" in line}

    rows = cost_rows(runs)
    assert rows["cbpt"].split("|")[2].strip() == "2.00"
    assert rows["finetune"].split("|")[4].strip() == "4.00"
    # a zoo of clean models only: the cost is over those
    assert cost_rows(runs[2:])["cbpt"].split("|")[2].strip() == "0.50"


def test_recall_table_shows_the_target_given_up_and_the_runs_that_lost_a_class():
    def run(attack: str, defence: str, recall_after: float | None, lost: list[str]) -> dict:
        return {
            "model": f"{attack}-{defence}",
            "attack": attack,
            "defence": defence,
            "ca_before": 0.6,
            "asr_before": 0.9,
            "ca_after": 0.55,
            "asr_after": 0.0,
            "purify_seconds": 1.0,
            "peak_rss_mb": 100.0,
            "image_encoder_images": 10,
            "target_recall_before": None if attack == "none" else 0.8,
            "target_recall_after": recall_after,
            "lost_classes": lost,
        }

    runs = [
        run("badnets", "cbpt", 0.02, ["automobile"]),
        run("blended", "cbpt", 0.6, []),
        run("none", "cbpt", None, []),
    ]
    tables = markdown_tables({"runs": runs, "scans": []}, ["cbpt"])
    recall = tables.split("### The target class's recall")[1].split("###")[0]
    (row,) = [line for line in recall.splitlines() if line.startswith("| cbpt")]
    assert [cell.strip() for cell in row.split("|")[1:-1]] == [
        "cbpt", "80.00", "31.00", "1 of 2", "0 of 1",
    ]  # fmt: skip
    # results stored before recall was measured get no such table
    for each in runs:
        del each["lost_classes"]
    assert "target class's recall" not in markdown_tables({"runs": runs, "scans": []}, ["cbpt"])
