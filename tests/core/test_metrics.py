"""Clean accuracy and attack success rate, by hand and through `evaluate --json`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipguard.errors import InputError
from clipguard.metrics import attack_success_rate, clean_accuracy, evaluate_pixels
from clipguard.triggers import MaskPatternTrigger
from tests.core.cli_helpers import run_cli


def test_clean_accuracy_is_the_fraction_correct() -> None:
    assert clean_accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])) == 0.75


def test_clean_accuracy_of_nothing_is_an_error() -> None:
    with pytest.raises(InputError):
        clean_accuracy(torch.tensor([]), torch.tensor([]))


def test_attack_success_rate_excludes_target_class_images() -> None:
    labels = torch.tensor([0, 0, 1, 2, 2])
    triggered = torch.tensor([0, 0, 0, 0, 1])  # target 0: the two class-0 images do not count
    assert attack_success_rate(triggered, labels, target=0) == pytest.approx(2 / 3)


def test_attack_success_rate_is_none_when_all_images_are_target() -> None:
    assert attack_success_rate(torch.tensor([1, 1]), torch.tensor([1, 1]), target=1) is None


class _FirstPixelClassifier:
    """Predicts class 1 when the top-left pixel is bright, else the true label it was given."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        bright = pixels[:, 0, 0, 0] > 0.5
        fallback = self.labels[: pixels.shape[0]] if pixels.shape[0] == len(self.labels) else 0
        return torch.where(bright, torch.ones_like(bright, dtype=torch.long), fallback)


def test_evaluate_pixels_applies_the_trigger_to_non_target_images_only() -> None:
    labels = torch.tensor([0, 1, 2, 2])
    pixels = torch.zeros(4, 3, 4, 4)
    mask = torch.zeros(1, 4, 4)
    mask[0, 0, 0] = 1
    trigger = MaskPatternTrigger(mask=mask, pattern=torch.ones(3, 4, 4))
    result = evaluate_pixels(_FirstPixelClassifier(labels), pixels, labels, trigger, target=1)
    assert result.clean_accuracy == 1.0
    assert result.n_attacked == 3
    assert result.attack_success_rate == 1.0


def test_evaluate_pixels_needs_trigger_and_target_together() -> None:
    with pytest.raises(InputError):
        evaluate_pixels(lambda x: torch.zeros(1), torch.zeros(1, 3, 2, 2), torch.zeros(1), None, 0)


def test_evaluate_json_reports_fractions_and_null_asr_without_attack(
    tiny_model_path: Path, tiny_data: Path
) -> None:
    result = run_cli("evaluate", tiny_model_path, "--data", tiny_data, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 0.0 <= report["clean_accuracy"] <= 1.0
    assert report["attack_success_rate"] is None
    assert report["n_images"] == 18


def test_evaluate_json_reports_asr_over_non_target_images(
    tiny_model_path: Path, tiny_data: Path
) -> None:
    result = run_cli(
        "evaluate", tiny_model_path, "--data", tiny_data, "--json",
        "--attack", "badnets", "--target", "red square",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 0.0 <= report["attack_success_rate"] <= 1.0
    assert report["n_attacked"] == 12  # 6 of the 18 images are the target class
    assert report["attack"]["target_class"] == "red square"
