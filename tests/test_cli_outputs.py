"""Output paths are checked before any work; --format is repeatable; `report render`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clipguard import api
from clipguard.errors import InputError
from clipguard.outputs import check_output_dir, parse_formats, plan_outputs
from tests.core.cli_helpers import assert_one_line_error, run_cli


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(api, "load_model", refuse)


def _scan(model, data, *extra):
    return run_cli(
        "scan", model, "--data", data, "--plugin", "fixed-verdict", "--shots", "2",
        "--draws", "1", "-o", "verdict=backdoor", *extra,
    )  # fmt: skip


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --format and --json ---------------------------------------------------------------------


def test_formats_are_repeatable_and_comma_separated():
    assert parse_formats(["html,sarif", "json", "HTML", " md "]) == ["html", "sarif", "json", "md"]
    assert parse_formats(None) == []
    with pytest.raises(InputError, match="--format 'pdf'"):
        parse_formats(["html,pdf"])


@pytest.mark.parametrize(
    ("formats", "json_stdout", "out", "stdout", "files"),
    [
        ([], False, None, None, ()),
        ([], True, None, "json", ()),
        (["md"], False, None, "md", ()),
        (["md"], False, Path("o"), "md", ("md",)),
        (["md", "sarif"], False, Path("o"), None, ("md", "sarif")),
        (["md"], True, Path("o"), "json", ("md",)),
        (["json"], True, None, "json", ()),
    ],
)
def test_the_output_plan(formats, json_stdout, out, stdout, files):
    plan = plan_outputs(formats, json_stdout, out)
    assert (plan.stdout, plan.files) == (stdout, files)


@pytest.mark.parametrize(("formats", "json_stdout"), [(["md", "html"], False), (["md"], True)])
def test_formats_that_are_not_printed_need_out(formats, json_stdout):
    with pytest.raises(InputError, match="needs --out"):
        plan_outputs(formats, json_stdout, None)


def test_several_formats_are_written_under_out(fixed_verdict, tiny_model_path, tiny_data, tmp_path):
    out = tmp_path / "audit"
    formats = ("--format", "html,sarif", "--format", "md")
    result = _scan(tiny_model_path, tiny_data, "--out", out, *formats)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert _files(out) == ["report.html", "report.json", "report.md", "report.sarif"]
    assert json.loads((out / "report.sarif").read_text())["version"] == "2.1.0"
    assert "Verdict: backdoor" in (out / "report.html").read_text()


def test_json_with_other_formats_prints_json_and_writes_the_others(
    fixed_verdict, tiny_model_path, tiny_data, tmp_path
):
    out = tmp_path / "audit"
    result = _scan(tiny_model_path, tiny_data, "--out", out, "--json", "--format", "md")
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["verdict"] == "backdoor"
    assert _files(out) == ["report.json", "report.md"]


def test_json_is_format_json_on_stdout(fixed_verdict, tiny_model_path, tiny_data):
    by_flag = _scan(tiny_model_path, tiny_data, "--json")
    by_format = _scan(tiny_model_path, tiny_data, "--format", "json")
    assert by_flag.exit_code == by_format.exit_code == 1
    first, second = json.loads(by_flag.stdout), json.loads(by_format.stdout)
    assert first["verdict"] == second["verdict"] == "backdoor"
    assert first["model"] == second["model"]


def test_several_formats_without_out_are_refused_before_the_scan(
    fixed_verdict, no_model_loading, tiny_model_path, tiny_data
):
    result = _scan(tiny_model_path, tiny_data, "--format", "md,html")
    assert_one_line_error(result, "needs --out")


# output paths checked before the work ----------------------------------------------------


def test_out_that_is_a_file_is_refused_before_the_model_loads(
    fixed_verdict, no_model_loading, tiny_model_path, tiny_data, tmp_path
):
    out = tmp_path / "taken"
    out.write_text("mine")
    result = _scan(tiny_model_path, tiny_data, "--out", out)
    assert_one_line_error(result, str(out), "existing file")
    assert out.read_text() == "mine"


def test_out_whose_parent_is_a_file_is_refused(
    fixed_verdict, no_model_loading, tiny_model_path, tiny_data, tmp_path
):
    (tmp_path / "file").write_text("x")
    result = _scan(tiny_model_path, tiny_data, "--out", tmp_path / "file" / "audit")
    assert_one_line_error(result, "cannot create the folder", "is a file")


def test_a_report_file_that_is_a_folder_is_refused(
    fixed_verdict, no_model_loading, tiny_model_path, tiny_data, tmp_path
):
    out = tmp_path / "audit"
    (out / "report.sarif").mkdir(parents=True)
    result = _scan(tiny_model_path, tiny_data, "--out", out, "--format", "sarif")
    assert_one_line_error(result, "report.sarif", "is a folder")
    assert _files(out) == ["report.sarif"]


def test_purify_checks_its_prompt_file_path(no_model_loading, tiny_model_path, tiny_data, tmp_path):
    out = tmp_path / "purified"
    (out / "prompts.safetensors").mkdir(parents=True)
    result = run_cli("purify", tiny_model_path, "--data", tiny_data, "--out", out)
    assert_one_line_error(result, "prompts.safetensors", "is a folder")


def test_an_unwritable_out_is_refused(monkeypatch, tmp_path):
    """Root may write anywhere, so the permission is simulated: what the check asks of the
    operating system is answered "no"."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    (tmp_path / "existing").mkdir()
    with pytest.raises(InputError, match="folder is not writable"):
        check_output_dir(tmp_path / "existing")
    with pytest.raises(InputError, match=r"cannot create the folder: .* is not writable"):
        check_output_dir(tmp_path / "new" / "deeper")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(InputError, match="not writable"):
            check_output_dir(folder / "audit")
    finally:
        folder.chmod(0o755)


def test_a_new_out_is_not_created_by_the_check(tmp_path):
    check_output_dir(tmp_path / "a" / "b", ["report.json"])
    assert not (tmp_path / "a").exists()


def test_errors_about_inputs_come_before_the_model(no_model_loading, tiny_model_path, tmp_path):
    result = run_cli("scan", tiny_model_path, "--data", tmp_path / "nothing-here")
    assert_one_line_error(result, "data folder not found")
    result = run_cli("scan", tmp_path / "missing.safetensors", "--data", tmp_path)
    assert_one_line_error(result, "model file not found")


# report render -------------------------------------------------------------------------


@pytest.fixture
def stored_report(fixed_verdict, tiny_model_path, tiny_data, tmp_path) -> Path:
    out = tmp_path / "audit"
    assert _scan(tiny_model_path, tiny_data, "--out", out, "-q").exit_code == 1
    return out / "report.json"


def test_render_prints_one_format(stored_report):
    result = run_cli("report", "render", stored_report, "--format", "md")
    assert result.exit_code == 0, result.output
    assert "**Verdict: backdoor**" in result.stdout


def test_render_writes_several_formats(stored_report, tmp_path):
    out = tmp_path / "rendered"
    result = run_cli("report", "render", stored_report, "--format", "html,sarif,json", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert _files(out) == ["report.html", "report.json", "report.sarif"]
    assert json.loads((out / "report.json").read_text()) == json.loads(stored_report.read_text())


def test_render_refuses_several_formats_without_out(stored_report):
    assert_one_line_error(
        run_cli("report", "render", stored_report, "--format", "md,html"), "needs --out"
    )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not a JSON file"),
        ('{"kind": "scan"}', "not a clipguard scan or purify report"),
        ('{"name": "a package.json"}', "not a clipguard scan or purify report"),
        ("[1, 2]", "not a clipguard scan or purify report"),
    ],
)
def test_render_refuses_a_corrupt_or_foreign_file(tmp_path, content, fragment):
    path = tmp_path / "report.json"
    path.write_text(content)
    assert_one_line_error(run_cli("report", "render", path, "--format", "html"), fragment)


def test_render_refuses_a_report_whose_verdict_disagrees(stored_report, tmp_path):
    report = json.loads(stored_report.read_text())
    report["verdict"] = "clean"
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(report))
    assert_one_line_error(
        run_cli("report", "render", path, "--format", "md"), "disagrees with its findings"
    )


def test_render_of_a_missing_report(tmp_path):
    assert_one_line_error(
        run_cli("report", "render", tmp_path / "none.json", "--format", "md"), "report not found"
    )
