"""CBPT through clipguard's API: scan writes its files and report, purify reuses the trigger."""

from __future__ import annotations

import json

from clipguard import api

SMALL_SCAN = {
    "refine_batch_size": 4,
    "inversion_window": 1,
    "refine_steps": 2,
    "class_steps": 2,
    "budget": 200,
}


def test_scan_then_purify_through_the_api(tiny_model_path, tiny_data, tmp_path) -> None:
    scan_dir = tmp_path / "scan"
    report = api.scan(
        tiny_model_path, tiny_data, scanner="cbpt", shots=4, options=SMALL_SCAN, out_dir=scan_dir
    )
    finding = report.findings[0]
    assert finding.scanner == "cbpt"
    assert finding.config["budget"] == 200
    written = json.loads((scan_dir / "report.json").read_text())
    assert written["findings"][0]["statistics"]["thresholds"]["evidence_threshold"] > 0
    assert (scan_dir / "trigger.png").stat().st_size > 0
    purify_dir = tmp_path / "purify"
    result = api.purify(
        tiny_model_path,
        tiny_data,
        purifier="cbpt",
        shots=4,
        options={"steps": 3, "augmentations": 1},
        trigger_path=scan_dir / "trigger.safetensors",
        out_dir=purify_dir,
    )
    assert (purify_dir / "prompts.safetensors").is_file()
    assert result.purification.statistics["tuning_image_encoder_calls"] == 0
    assert (
        result.purification.statistics["trigger_target"] in finding.statistics["class_distribution"]
    )
