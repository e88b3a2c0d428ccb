"""Differential reach (benchmarks.differential_reach): one additive change per class fitted to
move images to it on a suspect while keeping a reference off it, and the clean-fit judgement
of its lines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from benchmarks.differential_reach import differential_fit, judge, measure
from clipguard.model import ModelBundle, build_clip_from_config
from clipguard.prompts import PromptClassifier
from clipguard_cbpt.probe_families import AdditivePerturbation
from tests.cbpt.conftest import CLASSES, TINY


def _tiny(seed: int) -> ModelBundle:
    torch.manual_seed(seed)
    bundle = ModelBundle.from_model(build_clip_from_config(TINY), TINY)
    for parameter in bundle.model.parameters():
        parameter.requires_grad_(False)
    return bundle


def test_a_model_has_no_differential_reach_against_itself() -> None:
    model = _tiny(0)
    pixels = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(3).repeat(4)
    features = PromptClassifier(model, list(CLASSES)).class_features
    rows = [torch.nonzero(labels != k).flatten() for k in range(3)]
    family = AdditivePerturbation(0.05)
    changes = differential_fit(model, model, pixels, rows, (features, features), family, 3, 1.0)
    assert changes.shape == (3, 3, 16, 16)
    assert float(changes.abs().max()) <= 0.05 + 1e-7
    images = [family.apply(pixels[rows[k]], changes[k]) for k in range(3)]
    differential, suspect, reference = measure(model, model, images, (features, features))
    assert differential == [0.0, 0.0, 0.0]
    assert suspect == reference


def _line(model: str, top: float, top_class: str, target: str | None = None) -> str:
    return json.dumps(
        {"model": model, "target": target, "top": top, "top_class": top_class, "target_top": None}
    )


def test_judge_fits_on_clean_models_and_judges_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = tmp_path / "lines.jsonl"
    lines.write_text(
        "\n".join(
            [
                _line("clean-s1", 0.1, "cat"),
                _line("clean-s2", 0.2, "dog"),
                _line("clean-s20", 0.25, "dog"),
                _line("clean-s21", 0.15, "cat"),
                _line("bpp-s2", 0.3, "cat", target="cat"),
                _line("bpp-s3", 0.3, "dog", target="cat"),
                _line("grid-s2", 0.2, "cat", target="cat"),
            ]
        )
    )
    out = tmp_path / "judged.json"
    judge(argparse.Namespace(judge=[lines], fit=["clean-s[0-9]"], out=out))
    result = json.loads(out.read_text())
    assert result["threshold"] == 0.2
    verdicts = {row["model"]: row["judged"] for row in result["rows"]}
    assert verdicts == {
        "clean-s1": "fit",
        "clean-s2": "fit",
        "clean-s20": "false alarm",
        "clean-s21": "clean",
        "bpp-s2": "yes, right",
        "bpp-s3": "yes, wrong",
        "grid-s2": "no",
    }
    assert "threshold 0.2" in capsys.readouterr().out
