"""Governance outputs: Markdown, self-contained HTML (checked in headless Chromium), SARIF."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from clipguard import plugins
from clipguard.cli import app
from clipguard.components import Scanner, ScanOutcome
from clipguard.hookspecs import hookimpl

runner = CliRunner()
TRIGGER_GREEN = (0, 255, 0)


def _trigger_png() -> bytes:
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste(Image.new("RGB", (40, 40), TRIGGER_GREEN), (12, 12))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PictureScanner(Scanner):
    name = "picture"
    version = "1"
    Config = NoOptions

    def scan(self, bundle, shots, config, context):
        return ScanOutcome(
            verdict="backdoor",
            score=0.9,
            target_class=shots.classnames[0],
            explanation="a green trigger",
            artifacts={"trigger.png": _trigger_png()},
        )


class Plugin:
    @hookimpl
    def clipguard_register_scanners(self, register):
        register(PictureScanner())


@pytest.fixture
def scanned(tiny_model_path, tiny_data, tmp_path):
    plugin = Plugin()
    plugins.get_plugin_manager().register(plugin, name="picture-plugin")
    out = tmp_path / "out"

    def run(fmt: str):
        return runner.invoke(
            app,
            [
                "scan",
                str(tiny_model_path),
                "--data",
                str(tiny_data),
                "--plugin",
                "picture",
                "--shots",
                "2",
                "--out",
                str(out),
                "--format",
                fmt,
            ],
        )

    yield run, out
    plugins.get_plugin_manager().unregister(plugin)


def test_markdown_report(scanned):
    run, out = scanned
    result = run("md")
    assert result.exit_code == 1
    assert "**Verdict: backdoor**" in result.output
    assert (out / "report.md").read_text() == result.output


def test_sarif_report(scanned):
    run, out = scanned
    result = run("sarif")
    assert result.exit_code == 1
    sarif = json.loads((out / "report.sarif").read_text())
    assert sarif["version"] == "2.1.0"
    (sarif_run,) = sarif["runs"]
    assert sarif_run["tool"]["driver"]["name"] == "clipguard"
    (finding,) = sarif_run["results"]
    assert finding["level"] == "error" and finding["ruleId"] in {
        rule["id"] for rule in sarif_run["tool"]["driver"]["rules"]
    }
    report = json.loads((out / "report.json").read_text())
    artifact = sarif_run["artifacts"][0]
    assert artifact["hashes"]["sha-256"] == report["model"]["sha256"]
    assert artifact["location"]["uri"].endswith(".safetensors")


def test_html_is_self_contained(scanned):
    run, out = scanned
    assert run("html").exit_code == 1
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page and "src='/" not in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_html_shows_verdict_and_trigger_in_chromium(scanned, tmp_path):
    run, out = scanned
    assert run("html").exit_code == 1
    screenshot = tmp_path / "page.png"
    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--hide-scrollbars",
            f"--screenshot={screenshot}",
            "--window-size=1200,1400",
            (out / "report.html").resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    colours = Image.open(screenshot).convert("RGB").getcolors(maxcolors=1 << 20)
    counts = {colour: n for n, colour in colours}
    verdict_red = (0xB0, 0x00, 0x20)
    assert counts.get(verdict_red, 0) > 2000, "the red verdict banner is not visible"
    assert counts.get(TRIGGER_GREEN, 0) > 1000, "the trigger picture is not visible"


def test_render_renders_a_saved_report(scanned):
    from clipguard.render import render
    from clipguard.report import Report

    run, out = scanned
    run("json")
    report = Report.model_validate_json((out / "report.json").read_text())
    assert "Verdict: backdoor" in render(report, "html")
    assert Path(out / "report.json").exists()


def _purify_report_with_a_lost_class(scan_report_path: Path):
    from clipguard.report import LostClass, Metrics, Purification, Report

    report = Report.model_validate_json(scan_report_path.read_text())
    metrics = {"n_images": 400, "n_attacked": 360, "attack_success_rate": None}
    return report.model_copy(
        update={
            "kind": "purify",
            "verdict": None,
            "target_class": None,
            "findings": [],
            "purification": Purification(
                purifier="cbpt",
                purifier_version="1",
                config={},
                evaluation_data="held out",
                attack=None,
                before=Metrics(clean_accuracy=0.6, **metrics, class_recall={"cat": 0.76}),
                after=Metrics(clean_accuracy=0.53, **metrics, class_recall={"cat": 0.01}),
                lost_classes=[LostClass(name="cat", recall_before=0.76, recall_after=0.01)],
            ),
        }
    )


def test_every_format_warns_of_a_class_lost_by_purification(scanned):
    from clipguard.render import render

    run, out = scanned
    run("json")
    report = _purify_report_with_a_lost_class(out / "report.json")
    expected = "class 'cat' is all but lost: recall 76.00 % -> 1.00 %"
    assert expected in render(report, "md")
    assert "warning: class &#x27;cat&#x27; is all but lost" in render(report, "html")
    sarif_run = json.loads(render(report, "sarif"))["runs"][0]
    (result,) = sarif_run["results"]
    assert result["ruleId"] == "clipguard/cbpt/lost-class" and result["level"] == "warning"
    assert expected in result["message"]["text"]
    assert result["properties"] == {"name": "cat", "recall_before": 0.76, "recall_after": 0.01}


def test_purify_command_warns_of_a_lost_class(scanned, monkeypatch, tiny_model_path, tiny_data):
    from clipguard import api

    run, out = scanned
    run("json")
    report = _purify_report_with_a_lost_class(out / "report.json")
    monkeypatch.setattr(api, "purify", lambda *args, **kwargs: report)
    result = runner.invoke(
        app, ["purify", str(tiny_model_path), "--data", str(tiny_data), "--plugin", "cbpt"]
    )
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "warning: class 'cat' is all but lost: recall 76.00 % -> 1.00 %" in output
    assert "classes had enough evaluation images" not in output
    judged_few = report.model_copy(
        update={"purification": report.purification.model_copy(update={"classes_judged": 1})}
    )
    monkeypatch.setattr(api, "purify", lambda *args, **kwargs: judged_few)
    result = runner.invoke(
        app, ["purify", str(tiny_model_path), "--data", str(tiny_data), "--plugin", "cbpt"]
    )
    assert "note: only 1 of 3 classes had enough evaluation images" in " ".join(
        result.output.split()
    )
    monkeypatch.setattr(api, "purify", lambda *args, **kwargs: report)
    arguments = ["purify", str(tiny_model_path), "--data", str(tiny_data), "--json"]
    gated = runner.invoke(app, [*arguments, "--fail-on-lost-class"])
    assert gated.exit_code == 1, gated.output
    assert json.loads(gated.stdout)["purification"]["lost_classes"][0]["name"] == "cat"
    kept = report.model_copy(
        update={"purification": report.purification.model_copy(update={"lost_classes": []})}
    )
    monkeypatch.setattr(api, "purify", lambda *args, **kwargs: kept)
    assert runner.invoke(app, [*arguments, "--fail-on-lost-class"]).exit_code == 0
