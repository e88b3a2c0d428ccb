"""benchmarks.reference_scan: the verdict a scan would have given without its reference, and
the counts of what the reference adds."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.reference_scan import counts, read_scan


def _report(tmp_path: Path, name: str, card: dict | None, verdict: str, **stats: object) -> Path:
    model = tmp_path / f"{name}.safetensors"
    if card is not None:
        (tmp_path / f"{name}.card.json").write_text(json.dumps(card))
    statistics = {
        "evidence": 0.5,
        "thresholds": {"evidence_threshold": 2.0, "inconclusive_fraction": 0.75},
        "additive": {"threshold": 0.24},
        "class_additive_evidence": {"cat": 0.05, "dog": 0.0},
        "warp": None,
        "class_warp_evidence": None,
        "decided_by": "reference",
        "reference_contrast": {"contrast": 0.2, "contrast_class": "cat"},
        **stats,
    }
    report = {
        "model": {"path": str(model)},
        "run": {"stage_seconds": {"reference contrast": 12.0}},
        "findings": [{"verdict": verdict, "target_class": "cat", "statistics": statistics}],
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(report))
    return path


def test_the_verdict_without_the_reference_is_the_rule_and_probes(tmp_path: Path) -> None:
    caught = read_scan(_report(tmp_path, "bpp-s0", {"attack": "bpp", "target": "cat"}, "backdoor"))
    assert (caught.verdict_without, caught.verdict, caught.right) == ("clean", "backdoor", True)
    assert caught.contrast_seconds == 12.0
    near = read_scan(_report(tmp_path, "n", None, "inconclusive", evidence=1.6))
    assert near.verdict_without == "inconclusive" and near.target is None
    probe = read_scan(
        _report(tmp_path, "p", None, "backdoor", class_additive_evidence={"cat": 0.3, "dog": 0})
    )
    assert probe.verdict_without == "backdoor"


def test_counts_split_clean_and_backdoored_models(tmp_path: Path) -> None:
    rows = [
        read_scan(_report(tmp_path, "a", {"attack": "bpp", "target": "cat"}, "backdoor")),
        read_scan(_report(tmp_path, "b", {"attack": "bpp", "target": "dog"}, "backdoor")),
        read_scan(_report(tmp_path, "c", {"attack": "none"}, "clean")),
    ]
    assert counts(rows) == {
        "clean": {"models": 1, "flagged_without": 0, "flagged_with": 0},
        "backdoored": {
            "models": 2,
            "flagged_without": 0,
            "flagged_with": 2,
            "right_target_with": 1,
        },
    }
