"""The calibration script's verdict rule: the scanner's rule evidence and its reach probes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks.calibrate import (
    Rule,
    app,
    fit_isolation_threshold,
    fit_threshold,
    judge,
    rates,
    scan_time_table,
    top_evidence,
)
from benchmarks.harness import ZooModel


def _scan(
    model: str,
    attack: str,
    target: str | None,
    size: dict,
    additive: dict | None,
    warp: dict | None = None,
) -> dict:
    names = list(size)
    return {
        "model": model,
        "attack": attack,
        "target": target,
        "statistics": {
            "class_size_index": size,
            "class_alignment_index": dict.fromkeys(names, 0.0),
            "class_additive_evidence": additive,
            "class_warp_evidence": warp,
        },
    }


def test_judge_combines_the_rule_and_the_probes_as_the_scanner_does():
    patch = _scan("badnets-s0", "badnets", "a", {"a": 4.0, "b": 0.5}, {"a": 0.0, "b": 0.05})
    sinus = _scan("sig-s0", "sig", "b", {"a": 1.0, "b": 0.8}, {"a": 0.0, "b": 0.3})
    clean = _scan("clean-s0", "none", None, {"a": 1.2, "b": 0.3}, {"a": 0.1, "b": 0.0})
    old = _scan("sig-s1", "sig", "b", {"a": 1.0, "b": 0.8}, None)  # scanned without the probe
    warped = _scan(
        "wanet-s0", "wanet", "a", {"a": 1.0, "b": 0.8}, {"a": 0.1, "b": 0.0}, {"a": 0.6, "b": 0.0}
    )
    rule = Rule("size", 2.0, {"additive": 0.2, "warp": 0.2})
    assert judge(patch, rule) == (True, "a")
    assert judge(sinus, rule) == (True, "b")
    assert judge(clean, rule)[0] is False
    assert judge(old, rule)[0] is False
    assert judge(warped, rule) == (True, "a")
    assert judge(sinus, Rule("size", 2.0))[0] is False  # probes ignored
    assert judge(warped, Rule("size", 2.0, {"additive": 0.2}))[0] is False  # warp ignored
    result = rates([patch, sinus, clean], rule)
    assert (result["tpr"], result["fpr"], result["target_accuracy"]) == (1.0, 0.0, 1.0)
    # with the probe held, the rule's threshold is fitted between clean and patch
    fitted = fit_threshold([patch, sinus, clean], Rule("size", 2.0, {"additive": 0.2}))
    assert 1.2 < fitted < 4.0


def test_the_joint_rule_is_corroborated_as_the_scan_recorded():
    """Under ``joint`` a scan's additive evidence, times the corroboration scale its report
    records, stands in for a class's alignment index; scans made before the scanner
    corroborated (no recorded scale) are judged without it."""
    lc = _scan("badnets-lc-s0", "badnets-lc", "a", {"a": 3.0, "b": 0.5}, {"a": 0.2, "b": 0.0})
    assert top_evidence(lc, "joint") == (0.0, "a")
    lc["statistics"]["thresholds"] = {"additive_corroboration": 10.0}
    value, suspect = top_evidence(lc, "joint")
    assert suspect == "a" and value == pytest.approx((3.0 * 2.0) ** 0.5)
    assert top_evidence(lc, "size") == (3.0, "a")
    assert judge(lc, Rule("joint", 2.0, {"additive": 0.24})) == (True, "a")


def test_an_isolated_size_index_counts_under_the_joint_rule_as_given_or_recorded():
    """A size index far above every other class's is evidence on its own under ``joint``
    (its isolation over the isolation threshold, in evidence-threshold units); scans made
    before the scanner used it are judged without it unless a threshold is given; the
    fitted isolation threshold lies between the clean model's isolation and the patch's."""
    patch = _scan("badnets-s0", "badnets", "a", {"a": 4.0, "b": 0.5, "c": 0.0}, None)
    natural = _scan("clean-s0", "none", None, {"a": 4.0, "b": 3.0, "c": 0.0}, None)
    assert top_evidence(patch, "joint") == (0.0, "a")  # recorded nothing: off
    value, suspect = top_evidence(patch, "joint", threshold=2.0, isolation_threshold=1.75)
    assert suspect == "a" and value == pytest.approx(3.5 * 2.0 / 1.75)
    patch["statistics"]["thresholds"] = {"isolation_threshold": 1.75}
    assert top_evidence(patch, "joint", threshold=2.0)[0] == pytest.approx(4.0)
    assert top_evidence(patch, "size")[0] == 4.0
    rule = Rule("joint", 2.0, isolation_threshold=1.75)
    assert judge(patch, rule) == (True, "a")
    assert judge(natural, rule)[0] is False
    assert judge(patch, Rule("joint", 2.0, isolation_threshold=0))[0] is False
    fitted = fit_isolation_threshold([patch, natural], Rule("joint", 2.0))
    assert 1.0 < fitted < 3.5
    assert rates([patch, natural], Rule("joint", 2.0, isolation_threshold=fitted))["tpr"] == 1.0


def test_a_scan_of_several_shot_draws_is_judged_by_each_class_median():
    """A scan that screened three shot draws is judged as the scanner judges it: each class by
    the median of its evidence recomputed on every draw, not by the first draw alone."""
    draws = [{"a": 1.0, "b": 3.0}, {"a": 2.5, "b": 0.5}, {"a": 2.2, "b": 0.2}]
    scan = _scan("badnets-s1", "badnets", "a", draws[0], None)
    scan["statistics"]["screen_draws"] = [
        {"class_size_index": sizes, "class_alignment_index": {"a": 0.0, "b": 0.0}}
        for sizes in draws
    ]
    assert top_evidence(scan, "size") == (2.2, "a")  # medians: a 2.2, b 0.5
    assert judge(scan, Rule("size", 2.0, screen_again=None)) == (True, "a")
    one = _scan("badnets-s1", "badnets", "a", draws[0], None)
    assert judge(one, Rule("size", 2.0)) == (True, "b")  # the first draw alone
    # the scanner's band [1, 3) at threshold 2: the first draw's 3.0 decides alone, as a
    # scan with that band would have stopped after it; at 2.9 the median decides
    assert judge(scan, Rule("size", 2.0)) == (True, "b")
    scan["statistics"]["screen_draws"][0]["class_size_index"]["b"] = 2.9
    assert judge(scan, Rule("size", 2.0)) == (True, "a")


def test_a_probe_that_flags_the_first_draws_suspect_ends_the_screening():
    """As the scanner's probe_settles: once the strongest probe of ratio 1 or more names the
    suspect of the draws so far, the later draws are not screened (here the median of three
    would name "a")."""
    draws = [{"a": 1.0, "b": 2.9}, {"a": 2.5, "b": 0.5}, {"a": 2.2, "b": 0.2}]
    scan = _scan("sig-s1", "sig", "b", draws[0], {"a": 0.0, "b": 0.25})
    scan["statistics"]["screen_draws"] = [
        {"class_size_index": sizes, "class_alignment_index": {"a": 0.0, "b": 0.0}}
        for sizes in draws
    ]
    rule = Rule("size", 2.0, {"additive": 0.24})
    assert top_evidence(scan, "size", 2.0, None, rule.screen_again, {"additive": (1.04, "b")}) == (
        2.9,
        "b",
    )
    assert judge(scan, rule) == (True, "b")
    assert judge(scan, replace(rule, probe_settles=False)) == (True, "a")  # medians: 2.2, 0.5
    scan["statistics"]["class_additive_evidence"] = {"a": 0.25, "b": 0.0}  # flags "a" instead
    assert judge(scan, rule) == (True, "a")


def test_zoos_whose_model_names_repeat_are_refused(tmp_path: Path) -> None:
    """Two lab zoos name their models alike (badnets-s0 ...); judged together, one zoo's
    scans would stand for the other's, so the script refuses and says why."""
    for zoo in ("synthetic", "cifar10"):
        folder = tmp_path / zoo
        folder.mkdir()
        (folder / "badnets-s0.safetensors").write_bytes(b"")
        card = {"attack": "badnets", "target": "cat", "dataset": {"root": str(tmp_path)}}
        (folder / "badnets-s0.card.json").write_text(json.dumps(card))
    zoos = ["--zoo", str(tmp_path / "synthetic"), "--zoo", str(tmp_path / "cifar10")]
    result = CliRunner().invoke(app, [*zoos, "--results", str(tmp_path / "r.json")])
    assert result.exit_code != 0
    assert "model names repeat across the --zoo folders (badnets-s0)" in result.output
    assert not (tmp_path / "r.json").exists()


def test_the_scan_time_table_counts_the_scans_within_two_minutes(tmp_path: Path) -> None:
    """Each stored scan is listed as it ran (draws, why it stopped, seconds, encoder images,
    the prompts it read through; '-' where an older scan did not record them), and the
    summary counts the scans whose report seconds kept within the scanner issue's 120 s."""

    def model(name: str) -> ZooModel:
        return ZooModel(tmp_path / f"{name}.safetensors", name, "none", None, {}, tmp_path, {})

    fast = {
        "verdict": "clean",
        "suspected_target": None,
        "statistics": {
            "prompts": "fitted",
            "decided_by": "rule",
            "screen_draws": [{}, {}],
            "screen_draws_stopped": "moot",
        },
        "scan_seconds": 61.0,
        "wall_seconds": 68.5,
        "image_encoder_images": 80680,
    }
    slow = {
        "verdict": "backdoor",
        "suspected_target": "cat",
        "statistics": {},
        "scan_seconds": 130.0,
        "wall_seconds": 138.0,
        "image_encoder_images": 104400,
    }
    table = scan_time_table([model("a"), model("b")], {"a": fast, "b": slow})
    assert "| a | clean | - | fitted | rule | 2 | moot | 61.0 | 68.5 | 80,680 |" in table
    assert "| b | backdoor | cat | - | - | 1 | - | 130.0 | 138.0 | 104,400 |" in table
    assert "1 of 2 scans within 120 s" in table and "slowest 130.0 s, b" in table
