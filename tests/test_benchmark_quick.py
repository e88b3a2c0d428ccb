"""The benchmark harness in --quick mode: one backdoored model, cbpt against finetune."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_runs_and_records_ratios(tmp_path):
    results = tmp_path / "quick.json"
    doc = tmp_path / "benchmarks.md"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--results",
         str(results), "--doc", str(doc), "--quiet", "--eval-limit", "600"],
        capture_output=True, text=True, timeout=1200, check=False, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    payload = json.loads(results.read_text())
    defences = {r["defence"]: r for r in payload["runs"]}
    assert set(defences) == {"cbpt", "finetune"}
    for row in defences.values():
        assert 0 <= row["ca_after"] <= 1 and 0 <= row["asr_after"] <= 1
        assert row["purify_seconds"] > 0 and row["peak_rss_mb"] > 0
    assert defences["cbpt"]["image_encoder_images"] > 0
    assert payload["scans"] and payload["scans"][0]["verdict"] in {
        "backdoor",
        "clean",
        "inconclusive",
    }
    text = doc.read_text()
    assert "<!-- benchmark-tables:begin -->" in text and "| cbpt |" in text
    assert results.with_suffix(".png").is_file()
