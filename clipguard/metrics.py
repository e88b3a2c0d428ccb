"""Clean accuracy (CA) and attack success rate (ASR).

* CA: top-1 accuracy on clean images.
* ASR: among images whose true class is not the target, the fraction classified as the target
  once the trigger is applied (in pixel space, before the model's normalisation).

Both are fractions in ``[0, 1]``; ASR is ``None`` when no trigger is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from clipguard.data import Sample, load_pixels
from clipguard.errors import InputError
from clipguard.model import ModelBundle
from clipguard.progress import Progress
from clipguard.prompts import PromptClassifier
from clipguard.triggers import Trigger


@dataclass(frozen=True)
class Evaluation:
    """CA and ASR of one classifier on one image set."""

    clean_accuracy: float
    attack_success_rate: float | None
    n_images: int
    n_attacked: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "clean_accuracy": self.clean_accuracy,
            "attack_success_rate": self.attack_success_rate,
            "n_images": self.n_images,
            "n_attacked": self.n_attacked,
        }


def clean_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``predictions`` equal to ``labels``."""
    if labels.numel() == 0:
        raise InputError("clean accuracy of an empty image set is undefined")
    return float((predictions == labels).float().mean().item())


def attack_success_rate(
    triggered_predictions: torch.Tensor, labels: torch.Tensor, target: int
) -> float | None:
    """Fraction of non-target images whose triggered prediction is ``target`` (None if none)."""
    keep = labels != target
    if not bool(keep.any()):
        return None
    return float((triggered_predictions[keep] == target).float().mean().item())


def evaluate_pixels(
    predict: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    labels: torch.Tensor,
    trigger: Trigger | None = None,
    target: int | None = None,
) -> Evaluation:
    """CA of ``predict`` on ``pixels``; ASR too when ``trigger`` and ``target`` are given."""
    if (trigger is None) != (target is None):
        raise InputError("an attack needs both a trigger and a target class")
    ca = clean_accuracy(predict(pixels), labels)
    asr, n_attacked = None, 0
    if trigger is not None and target is not None:
        asr, n_attacked = triggered_success(predict, pixels, labels, trigger, target)
    return Evaluation(ca, asr, int(labels.numel()), n_attacked)


def triggered_success(
    predict: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    labels: torch.Tensor,
    trigger: Trigger,
    target: int,
) -> tuple[float | None, int]:
    """ASR of ``trigger`` aimed at ``target``, and the number of non-target images it used."""
    keep = labels != target
    n_attacked = int(keep.sum())
    if not n_attacked:
        return None, 0
    triggered = predict(trigger.apply(pixels[keep]))
    return attack_success_rate(triggered, labels[keep], target), n_attacked


def evaluate_samples(
    predict: Callable[[torch.Tensor], torch.Tensor],
    samples: Sequence[Sample],
    transform: Callable[[Image.Image], torch.Tensor],
    trigger: Trigger | None = None,
    target: int | None = None,
    chunk_size: int = 1024,
    progress: Progress | None = None,
) -> Evaluation:
    """:func:`evaluate_pixels` over image files, loaded ``chunk_size`` at a time."""
    if not samples:
        raise InputError("no images to evaluate")
    progress = progress or Progress(quiet=True)
    correct = hits = n_attacked = 0
    chunks = [samples[i : i + chunk_size] for i in range(0, len(samples), chunk_size)]
    for chunk in progress.track(chunks, description="evaluating"):
        pixels, labels = load_pixels(chunk, transform)
        part = evaluate_pixels(predict, pixels, labels, trigger, target)
        correct += round(part.clean_accuracy * part.n_images)
        if part.attack_success_rate is not None:
            hits += round(part.attack_success_rate * part.n_attacked)
            n_attacked += part.n_attacked
    n_images = len(samples)
    asr = hits / n_attacked if n_attacked else None
    return Evaluation(correct / n_images, asr, n_images, n_attacked)


def evaluate_zero_shot(
    bundle: ModelBundle,
    classnames: Sequence[str],
    pixels: torch.Tensor,
    labels: torch.Tensor,
    trigger: Trigger | None = None,
    target: int | None = None,
) -> tuple[float, float | None]:
    """CA and ASR of ``bundle`` with hand-crafted prompts."""
    classifier = PromptClassifier(bundle, classnames)
    result = evaluate_pixels(classifier.predict, pixels, labels, trigger, target)
    return result.clean_accuracy, result.attack_success_rate
