"""Clean accuracy and attack success rate, by hand and through `evaluate --json`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clipguard.errors import InputError
from clipguard.metrics import (
    LOST_MIN_IMAGES,
    Evaluation,
    attack_success_rate,
    class_counts,
    classes_judged,
    clean_accuracy,
    evaluate_pixels,
    lost_classes,
)
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
    text = run_cli(
        "evaluate", tiny_model_path, "--data", tiny_data,
        "--attack", "badnets", "--target", "red square",
    )  # fmt: skip
    assert text.exit_code == 0, text.output
    recall = report["class_recall"]["red square"]
    assert f"recall of the target class 'red square': {100 * recall:.2f} %" in text.stdout


def test_evaluate_pixels_counts_every_class_and_none_for_an_absent_one() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    predictions = torch.tensor([0, 0, 0, 1, 1, 0])
    result = evaluate_pixels(lambda x: predictions, torch.zeros(6, 3, 2, 2), labels, n_classes=3)
    assert result.class_images == (4, 2, 0)
    assert result.class_correct == (3, 1, 0)
    assert result.class_recall == [0.75, 0.5, None]
    without = evaluate_pixels(lambda x: predictions, torch.zeros(6, 3, 2, 2), labels)
    assert without.class_images == () and without.class_recall == []


@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=60),
)
def test_class_counts_add_up_to_the_clean_accuracy(pairs: list[tuple[int, int]]) -> None:
    labels = torch.tensor([label for label, _ in pairs])
    predictions = torch.tensor([prediction for _, prediction in pairs])
    images, correct = class_counts(predictions, labels, 5)
    assert sum(images) == len(pairs)
    assert all(0 <= right <= count for right, count in zip(correct, images, strict=True))
    assert sum(correct) / len(pairs) == pytest.approx(clean_accuracy(predictions, labels))


def _evaluation(images: tuple[int, ...], correct: tuple[int, ...]) -> Evaluation:
    return Evaluation(sum(correct) / sum(images), None, sum(images), 0, images, correct)


def test_a_class_whose_recall_collapses_is_lost_and_small_moves_are_not() -> None:
    n = LOST_MIN_IMAGES * 5
    before = _evaluation((n, n, n, n, LOST_MIN_IMAGES - 1), (80, 80, 30, 20, 19))
    after = _evaluation((n, n, n, n, LOST_MIN_IMAGES - 1), (5, 50, 10, 9, 0))
    # class 0: 0.80 -> 0.05 lost; class 1: 0.80 -> 0.50 kept more than half;
    # class 2: 0.30 -> 0.10 lost; class 3: 0.20 -> 0.09 under half but by 11 points only;
    # class 4: too few images to judge
    lost = lost_classes(before, after)
    assert lost == [0, 2]
    assert (before.class_recall[lost[0]], after.class_recall[lost[0]]) == (0.8, 0.05)
    assert lost_classes(before, before) == []


def test_lost_classes_need_the_same_images() -> None:
    with pytest.raises(ValueError, match="same images"):
        lost_classes(_evaluation((30, 30), (20, 20)), _evaluation((30, 31), (20, 20)))


def test_only_classes_with_enough_images_are_judged() -> None:
    evaluation = _evaluation((LOST_MIN_IMAGES, LOST_MIN_IMAGES - 1, 0), (5, 5, 0))
    assert classes_judged(evaluation) == 1
