"""Baseline purifiers: they run through the CLI and produce model files that evaluate reads."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from clipguard.cli import app
from clipguard.model import load_model

runner = CliRunner()


@pytest.mark.parametrize("purifier", ["finetune", "cleanclip"])
def test_fine_tuning_purifier_writes_a_loadable_model(
    purifier, tiny_model_path, tiny_data, tmp_path
):
    out = tmp_path / purifier
    result = runner.invoke(
        app,
        [
            "purify",
            str(tiny_model_path),
            "--data",
            str(tiny_data),
            "--plugin",
            purifier,
            "--shots",
            "3",
            "-o",
            "epochs=2",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    statistics = report["purification"]["statistics"]
    assert statistics["steps"] == 2 and statistics["image_encoder_images"] > 0
    purified = load_model(out / "model.safetensors")
    assert purified.sha256 == statistics["purified_model_sha256"]
    original = load_model(tiny_model_path)
    changed = [
        name
        for name, tensor in purified.model.state_dict().items()
        if not tensor.equal(original.model.state_dict()[name])
    ]
    assert any(name.startswith("visual.") for name in changed)
    assert any(name.startswith("transformer.") for name in changed) == (purifier == "cleanclip")
    evaluated = runner.invoke(
        app, ["evaluate", str(out / "model.safetensors"), "--data", str(tiny_data), "--json"]
    )
    assert evaluated.exit_code == 0, evaluated.output


def test_zeroshot_reference_changes_nothing(tiny_model_path, tiny_data, tmp_path):
    result = runner.invoke(
        app,
        [
            "purify",
            str(tiny_model_path),
            "--data",
            str(tiny_data),
            "--plugin",
            "zeroshot",
            "--shots",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    purification = json.loads(result.output)["purification"]
    assert purification["before"] == purification["after"]
