"""SARIF that code-scanning services accept: locations relative to --sarif-base with a
uriBaseId, partialFingerprints from the model's sha256, the whole command line recorded."""

from __future__ import annotations

import json
import shlex
import shutil
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from clipguard.render import SARIF_BASE_ID, SARIF_FINGERPRINT, to_sarif
from clipguard.report import read_report
from tests.core.cli_helpers import run_cli

LEVELS = {"none", "note", "warning", "error"}
KINDS = {"notApplicable", "pass", "fail", "review", "open", "informational"}


def check_sarif_2_1_0(log: dict) -> None:
    """The structure SARIF 2.1.0 requires (OASIS SARIF 2.1.0, sections 3.13 to 3.27): the
    required properties, their types and enumerations, and every uriBaseId declared."""
    assert log["version"] == "2.1.0"
    assert isinstance(log["runs"], list) and log["runs"]
    for run in log["runs"]:
        driver = run["tool"]["driver"]
        assert isinstance(driver["name"], str) and driver["name"]
        rule_ids = [rule["id"] for rule in driver.get("rules", [])]
        assert all(isinstance(rule_id, str) for rule_id in rule_ids)
        base_ids = run.get("originalUriBaseIds", {})
        for base in base_ids.values():
            parts = urlsplit(base["uri"])
            assert parts.scheme == "file" and base["uri"].endswith("/"), base
        artifacts = run.get("artifacts", [])

        def check_location(location: dict, base_ids=base_ids, artifacts=artifacts) -> None:
            assert isinstance(location["uri"], str)
            if "uriBaseId" in location:
                assert location["uriBaseId"] in base_ids
                assert not urlsplit(location["uri"]).scheme, location  # relative reference
                assert not location["uri"].startswith(("/", "..")), location
            else:
                assert urlsplit(location["uri"]).scheme == "file", location
            if "index" in location:
                assert 0 <= location["index"] < len(artifacts)

        for artifact in artifacts:
            check_location(artifact["location"])
            assert all(isinstance(v, str) for v in artifact.get("hashes", {}).values())
        for result in run["results"]:
            assert isinstance(result["message"]["text"], str)
            assert result["ruleId"] in rule_ids
            assert result["level"] in LEVELS and result["kind"] in KINDS
            for location in result["locations"]:
                check_location(location["physicalLocation"]["artifactLocation"])
            fingerprints = result["partialFingerprints"]
            assert fingerprints and all(isinstance(v, str) for v in fingerprints.values())
        for invocation in run["invocations"]:
            assert isinstance(invocation["executionSuccessful"], bool)
            assert isinstance(invocation["commandLine"], str)
            for key in ("startTimeUtc", "endTimeUtc"):
                datetime.fromisoformat(invocation[key])


@pytest.fixture
def workspace(fixed_verdict, tiny_model_path, tiny_data, tmp_path, monkeypatch):
    """A repository-like folder with the model under ``models dir/`` (a space to encode),
    the current folder."""
    root = tmp_path / "repo"
    model = root / "models dir" / "tiny model.safetensors"
    model.parent.mkdir(parents=True)
    shutil.copy(tiny_model_path, model)
    shutil.copytree(tiny_data, root / "data")
    monkeypatch.chdir(root)
    return root


ARGS = ["--plugin", "fixed-verdict", "--shots", "2", "--draws", "1", "-o", "verdict=backdoor"]


def _scan(*extra: str):
    return run_cli("scan", "models dir/tiny model.safetensors", "--data", "data", *ARGS, *extra)


def test_sarif_locations_are_relative_to_the_current_folder(workspace):
    result = _scan("--out", "audit", "--format", "sarif")
    assert result.exit_code == 1, result.output
    log = json.loads((workspace / "audit" / "report.sarif").read_text())
    check_sarif_2_1_0(log)
    (run,) = log["runs"]
    assert run["originalUriBaseIds"] == {SARIF_BASE_ID: {"uri": workspace.as_uri() + "/"}}
    location = run["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]
    expected = {"uri": "models%20dir/tiny%20model.safetensors", "uriBaseId": SARIF_BASE_ID}
    assert location == {**expected, "index": 0}
    assert run["artifacts"][0]["location"] == expected


def test_sarif_base_moves_the_base(workspace):
    result = _scan("--format", "sarif", "--sarif-base", "models dir")
    assert result.exit_code == 1, result.output
    (run,) = json.loads(result.stdout)["runs"]
    assert run["artifacts"][0]["location"]["uri"] == "tiny%20model.safetensors"
    base = run["originalUriBaseIds"][SARIF_BASE_ID]["uri"]
    assert base == (workspace / "models dir").as_uri() + "/"


def test_a_model_outside_the_base_keeps_its_absolute_uri(workspace, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log = json.loads(_scan("--format", "sarif", "--sarif-base", str(elsewhere)).stdout)
    check_sarif_2_1_0(log)
    (run,) = log["runs"]
    assert "originalUriBaseIds" not in run
    model = workspace / "models dir" / "tiny model.safetensors"
    assert run["artifacts"][0]["location"] == {"uri": model.as_uri()}


def test_fingerprints_follow_the_model_and_the_rule(workspace):
    report = read_report(_stored(workspace))
    first = to_sarif(report)["runs"][0]["results"][0]["partialFingerprints"]
    again = to_sarif(read_report(_stored(workspace, "again")))["runs"][0]["results"][0]
    assert again["partialFingerprints"] == first
    assert set(first) == {SARIF_FINGERPRINT}
    model = report.model.model_copy(update={"sha256": "0" * 64})
    other = report.model_copy(update={"model": model})
    assert to_sarif(other)["runs"][0]["results"][0]["partialFingerprints"] != first


def _stored(workspace: Path, name: str = "audit") -> Path:
    assert _scan("--out", name, "-q").exit_code == 1
    return workspace / name / "report.json"


def test_the_whole_command_line_is_recorded(workspace):
    path = _stored(workspace)
    report = read_report(path)
    model, outputs = "models dir/tiny model.safetensors", ["--out", "audit", "-q"]
    expected = shlex.join(["clipguard", "scan", model, "--data", "data", *ARGS, *outputs])
    assert report.run.command == expected
    assert report.run.working_directory == str(workspace)
    (invocation,) = to_sarif(report)["runs"][0]["invocations"]
    assert invocation["commandLine"] == expected
    assert invocation["workingDirectory"] == {"uri": workspace.as_uri() + "/"}


def test_a_rendered_report_resolves_paths_where_the_run_was(workspace, tmp_path, monkeypatch):
    """`report render` from another folder still finds the model under the base."""
    path = _stored(workspace)
    monkeypatch.chdir(tmp_path)
    result = run_cli("report", "render", path, "--format", "sarif", "--sarif-base", workspace)
    assert result.exit_code == 0, result.output
    (run,) = json.loads(result.stdout)["runs"]
    assert run["artifacts"][0]["location"]["uri"] == "models%20dir/tiny%20model.safetensors"


def test_the_api_records_the_process_command_line(workspace, monkeypatch):
    from clipguard import api

    monkeypatch.setattr("sys.argv", ["governance-pipeline", "--audit", "tiny model"])
    report = api.scan("models dir/tiny model.safetensors", "data", scanner="fixed-verdict", shots=2)
    assert report.run.command == "governance-pipeline --audit 'tiny model'"
    command = api.scan("models dir/tiny model.safetensors", "data", "fixed-verdict", 2, command="x")
    assert command.run.command == "x"
