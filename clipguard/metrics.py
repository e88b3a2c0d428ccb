"""Clean accuracy (CA) and attack success rate (ASR).

* CA: top-1 accuracy on clean images.
* ASR: among images whose true class is not the target, the fraction classified as the target
  once the trigger is applied (in pixel space, before the model's normalisation).
* Class recall: per class, the fraction of its clean images classified as it. A purification
  can bring ASR to 0 by no longer predicting the target class at all; CA hides that on many
  classes, recall does not (:func:`lost_classes`).

All are fractions in ``[0, 1]``; ASR is ``None`` when no trigger is given, a class's recall
``None`` when no image of it was evaluated.
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

#: a class is *lost* by a purification when its recall falls below this fraction of what it was
LOST_RECALL_RATIO = 0.5
#: ... and by at least this much (absolute), so that a weak class's noise does not count
LOST_RECALL_DROP = 0.15
#: ... measured on at least this many images of the class
LOST_MIN_IMAGES = 20


@dataclass(frozen=True)
class Evaluation:
    """CA and ASR of one classifier on one image set, and the per-class counts behind CA.

    ``class_images[k]`` images of class ``k`` were evaluated, ``class_correct[k]`` of them
    classified as ``k`` (both empty when the number of classes was not given).
    """

    clean_accuracy: float
    attack_success_rate: float | None
    n_images: int
    n_attacked: int
    class_images: tuple[int, ...] = ()
    class_correct: tuple[int, ...] = ()

    @property
    def class_recall(self) -> list[float | None]:
        """Recall of every class (``None`` for a class with no evaluated image)."""
        return [
            correct / images if images else None
            for images, correct in zip(self.class_images, self.class_correct, strict=True)
        ]

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "clean_accuracy": self.clean_accuracy,
            "attack_success_rate": self.attack_success_rate,
            "n_images": self.n_images,
            "n_attacked": self.n_attacked,
        }


def lost_classes(before: Evaluation, after: Evaluation) -> list[int]:
    """The indices of the classes that ``after`` (a purified classifier) has all but stopped
    recognising; their recalls are ``before.class_recall[k]`` and ``after.class_recall[k]``.

    A class is lost when, on the same images, its recall fell below :data:`LOST_RECALL_RATIO`
    of its recall ``before`` and by at least :data:`LOST_RECALL_DROP`, with at least
    :data:`LOST_MIN_IMAGES` images of it evaluated. Removing a backdoor by giving up its target
    class is the typical case: ASR reaches 0 because nothing is classified as the target.
    """
    if before.class_images != after.class_images:
        raise ValueError("lost classes compare two evaluations of the same images")
    return [
        index
        for index, (images, was, now) in enumerate(
            zip(before.class_images, before.class_recall, after.class_recall, strict=True)
        )
        if images >= LOST_MIN_IMAGES
        and was is not None
        and now is not None
        and now < LOST_RECALL_RATIO * was
        and was - now >= LOST_RECALL_DROP
    ]


def classes_judged(evaluation: Evaluation) -> int:
    """How many classes :func:`lost_classes` can judge: those with at least
    :data:`LOST_MIN_IMAGES` evaluated images."""
    return sum(1 for images in evaluation.class_images if images >= LOST_MIN_IMAGES)


def class_counts(
    predictions: torch.Tensor, labels: torch.Tensor, n_classes: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Images per class and correctly classified images per class, for ``n_classes`` classes."""
    images = torch.bincount(labels, minlength=n_classes)[:n_classes]
    correct = torch.bincount(labels[predictions == labels], minlength=n_classes)[:n_classes]
    return tuple(int(v) for v in images), tuple(int(v) for v in correct)


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
    n_classes: int | None = None,
) -> Evaluation:
    """CA of ``predict`` on ``pixels``; ASR too when ``trigger`` and ``target`` are given;
    per-class counts (:attr:`Evaluation.class_recall`) when ``n_classes`` is given."""
    if (trigger is None) != (target is None):
        raise InputError("an attack needs both a trigger and a target class")
    predictions = predict(pixels)
    ca = clean_accuracy(predictions, labels)
    asr, n_attacked = None, 0
    if trigger is not None and target is not None:
        asr, n_attacked = triggered_success(predict, pixels, labels, trigger, target)
    images, correct = class_counts(predictions, labels, n_classes) if n_classes else ((), ())
    return Evaluation(ca, asr, int(labels.numel()), n_attacked, images, correct)


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
    n_classes: int | None = None,
) -> Evaluation:
    """:func:`evaluate_pixels` over image files, loaded ``chunk_size`` at a time."""
    if not samples:
        raise InputError("no images to evaluate")
    progress = progress or Progress(quiet=True)
    correct = hits = n_attacked = 0
    class_images = [0] * (n_classes or 0)
    class_correct = [0] * (n_classes or 0)
    chunks = [samples[i : i + chunk_size] for i in range(0, len(samples), chunk_size)]
    for chunk in progress.track(chunks, description="evaluating"):
        pixels, labels = load_pixels(chunk, transform)
        part = evaluate_pixels(predict, pixels, labels, trigger, target, n_classes)
        correct += round(part.clean_accuracy * part.n_images)
        for k, images in enumerate(part.class_images):
            class_images[k] += images
            class_correct[k] += part.class_correct[k]
        if part.attack_success_rate is not None:
            hits += round(part.attack_success_rate * part.n_attacked)
            n_attacked += part.n_attacked
    n_images = len(samples)
    asr = hits / n_attacked if n_attacked else None
    return Evaluation(
        correct / n_images, asr, n_images, n_attacked, tuple(class_images), tuple(class_correct)
    )


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
