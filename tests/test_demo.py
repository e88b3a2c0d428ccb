"""`clipguard demo` end to end: the README's first command, on the cached demo model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_scans_then_purifies_with_the_scan_trigger(tmp_path) -> None:
    out = tmp_path / "demo"
    completed = subprocess.run(
        [sys.executable, "-m", "clipguard", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert completed.returncode == 0, completed.stderr
    output = completed.stdout + completed.stderr
    assert "verdict: backdoor, suspected target: blue star" in output
    assert "against the scan's trigger" in output
    for name in ("scan/report.json", "scan/trigger.png", "purify/prompts.safetensors"):
        assert (out / name).is_file(), name
        assert str(out / name) in output
    assert "before (hand-crafted prompts)" in output and "after (CBPT prompts)" in output
    assert "recall of the target, blue star" in output
    # the demo model's backdoor is removed without giving up its target class
    assert "is all but lost" not in output
