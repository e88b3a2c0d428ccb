"""A scan's verdict reaches CI as its exit code and as report.json's top-level verdict."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from clipguard import __version__
from clipguard.report import REPORT_SCHEMA_VERSION, Report
from tests.core.cli_helpers import assert_one_line_error, run_cli


def _scan(tiny_model_path, tiny_data, out, verdict: str, *extra: str):
    return run_cli(
        "scan", tiny_model_path, "--data", tiny_data, "--plugin", "fixed-verdict", "--shots",
        "2", "--draws", "1", "--out", out, "--quiet", "-o", f"verdict={verdict}", *extra,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("verdict", "fail_on", "code"),
    [
        ("clean", [], 0),
        ("backdoor", [], 1),
        ("inconclusive", [], 3),
        ("inconclusive", ["--fail-on", "backdoor"], 0),
        ("backdoor", ["--fail-on", "inconclusive"], 0),
        ("backdoor", ["--fail-on", "backdoor,inconclusive"], 1),
        ("inconclusive", ["--fail-on", "backdoor", "--fail-on", "inconclusive"], 3),
        ("backdoor", ["--fail-on", "none"], 0),
    ],
)
def test_the_exit_code_follows_the_verdict_and_fail_on(
    fixed_verdict, tiny_model_path, tiny_data, tmp_path, verdict, fail_on, code
) -> None:
    out = tmp_path / "audit"
    result = _scan(tiny_model_path, tiny_data, out, verdict, *fail_on)
    assert result.exit_code == code, result.output
    stored = json.loads((out / "report.json").read_text())
    assert stored["verdict"] == verdict
    expected_target = None if verdict == "clean" else stored["data"]["classes"][0]
    assert stored["target_class"] == expected_target
    assert stored["schema_version"] == REPORT_SCHEMA_VERSION == "1.2"


def test_an_unknown_fail_on_value_is_refused_before_the_scan(
    tiny_model_path, tiny_data, tmp_path
) -> None:
    result = run_cli(
        "scan", tiny_model_path, "--data", tiny_data, "--fail-on", "maybe", "--out", tmp_path / "o"
    )  # fmt: skip
    assert_one_line_error(result, "--fail-on maybe")
    assert not (tmp_path / "o").exists()


def test_a_stored_verdict_that_disagrees_with_the_findings_is_refused(
    fixed_verdict, tiny_model_path, tiny_data, tmp_path
) -> None:
    out = tmp_path / "audit"
    _scan(tiny_model_path, tiny_data, out, "backdoor")
    stored = json.loads((out / "report.json").read_text())
    assert Report.model_validate(stored).verdict == "backdoor"
    stored["verdict"] = "clean"
    with pytest.raises(ValidationError, match="disagrees with its findings"):
        Report.model_validate(stored)


def test_version_prints_the_installed_version() -> None:
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"clipguard {__version__}"
