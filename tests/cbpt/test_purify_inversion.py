"""The purifier's own inversion (no ``--trigger``) is the scan's: the same prompt reading,
shot draws and probes find the same trigger, so purifying without a trigger is never weaker
than purifying with the scan's."""

from __future__ import annotations

from pathlib import Path

import torch

from clipguard import api
from clipguard.triggers import load_trigger_file

BUDGET = 300


def test_purifier_inverts_the_scans_trigger(
    tiny_model_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    scan = api.scan(
        tiny_model_path,
        tiny_data,
        scanner="cbpt",
        shots=4,
        draws=2,
        options={"budget": BUDGET, "refine_clean": True},
        out_dir=tmp_path / "scan",
    )
    purified = api.purify(
        tiny_model_path,
        tiny_data,
        purifier="cbpt",
        shots=4,
        draws=2,
        options={"inversion_budget": BUDGET, "steps": 2, "augmentations": 1},
        out_dir=tmp_path / "purify",
    )
    finding = scan.findings[0]
    statistics = purified.purification.statistics
    assert statistics["inversion_evidence"] == finding.statistics["evidence"]
    scanned = load_trigger_file(tmp_path / "scan" / "trigger.safetensors")
    inverted = load_trigger_file(tmp_path / "purify" / "trigger.safetensors")
    assert torch.equal(scanned.trigger.mask, inverted.trigger.mask)
    assert torch.equal(scanned.trigger.pattern, inverted.trigger.pattern)
