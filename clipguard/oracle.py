"""The oracle ceiling: the best CA and ASR any prompt set could reach on a model.

Not available to a defender: the probe uses the *real* trigger. The lab's model cards, the
benchmarks and the cbpt plugin's studies report it beside a purifier's figures to separate
"the method missed" from "no prompt set could do better".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from clipguard.features import encode_images, mean_pairwise_cosine
from clipguard.model import ModelBundle
from clipguard.prompts import handcrafted_text_features
from clipguard.triggers import Trigger

#: Logit scale at which the oracle's probe trains: CLIP's largest (open_clip clamps at 100).
ORACLE_LOGIT_SCALE = 100.0
#: images per forward pass of the oracle's encoding: the lab's model cards were measured so
ORACLE_ENCODE_BATCH = 512


def oracle_ceiling(
    bundle: ModelBundle,
    classnames: Sequence[str],
    pixels: torch.Tensor,
    labels: torch.Tensor,
    trigger: Trigger,
    target: int,
    steps: int = 1000,
    lr: float = 0.01,
    logit_scale: float = ORACLE_LOGIT_SCALE,
    *,
    eval_pixels: torch.Tensor | None = None,
    eval_labels: torch.Tensor | None = None,
    trigger_weights: Sequence[float] = (1.0,),
    batch_size: int = ORACLE_ENCODE_BATCH,
) -> dict[str, Any]:
    """The oracle ceiling of ``bundle`` for ``trigger`` aimed at class index ``target``.

    A linear probe with unit-norm class vectors (the form of any prompt set's classifier),
    initialised from the hand-crafted prompts' text features, is fitted with full-batch Adam
    (``steps`` steps at ``lr``) on the features of clean and really-triggered images with
    their *true* labels. Its loss is the mean cross-entropy over the clean and the triggered
    images together, the triggered ones weighted ``w``. It trains at ``logit_scale``, not the
    model's own: predictions do not depend on the scale, and the lab models' own (10 to 15)
    left the probe short of what unit vectors can reach (docs/method.md).

    Fitted on ``pixels`` / ``labels`` and measured on ``eval_pixels`` / ``eval_labels`` when
    given; otherwise ``pixels`` is split into random halves (seed 0), fitted on the first and
    measured on the second. CA is measured on the clean evaluation images, ASR on the
    triggered evaluation images whose class is not ``target``. The probe is fitted once per
    weight ``w`` in ``trigger_weights``, and the best (highest CA - ASR; the first among
    ties) is reported. Images are encoded ``batch_size`` at a time
    (:func:`~clipguard.features.encode_images`). Deterministic.

    Returns ``oracle_clean_accuracy``, ``oracle_attack_success_rate``,
    ``oracle_logit_scale`` and the collapse of the triggered features beside the clean ones
    (:func:`~clipguard.features.mean_pairwise_cosine` of the non-target images, fitting and
    evaluation images together): ``triggered_feature_cosine`` and ``clean_feature_cosine``.
    With more than one weight, also ``oracle_trigger_weight`` (the best point's) and
    ``oracle_points`` (every weight's ``trigger_weight``, ``clean_accuracy`` and
    ``attack_success_rate``, in the order given).
    """
    if not trigger_weights:
        raise ValueError("trigger_weights must hold at least one weight")
    if eval_pixels is None or eval_labels is None:
        order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))
        half = labels.numel() // 2
        fit_rows, eval_rows = order[:half], order[half:]
        every_label = labels
        clean = encode_images(bundle, pixels, batch_size)
        triggered = encode_images(bundle, trigger.apply(pixels), batch_size)
    else:
        n_fit = labels.numel()
        fit_rows = torch.arange(n_fit)
        eval_rows = torch.arange(n_fit, n_fit + eval_labels.numel())
        every_label = torch.cat((labels, eval_labels))
        clean = torch.cat(
            (
                encode_images(bundle, pixels, batch_size),
                encode_images(bundle, eval_pixels, batch_size),
            )
        )
        triggered = torch.cat(
            (
                encode_images(bundle, trigger.apply(pixels), batch_size),
                encode_images(bundle, trigger.apply(eval_pixels), batch_size),
            )
        )
    initial = handcrafted_text_features(bundle, list(classnames)).detach()
    fit_labels = every_label[fit_rows]
    inputs = torch.cat((clean[fit_rows], triggered[fit_rows]))
    targets = torch.cat((fit_labels, fit_labels))
    held_labels = every_label[eval_rows]
    attacked = eval_rows[held_labels != target]
    points = []
    for weight in trigger_weights:
        classes = _fit_probe(inputs, targets, initial, float(weight), steps, lr, logit_scale)
        with torch.no_grad():
            ca = float(((clean[eval_rows] @ classes.t()).argmax(1) == held_labels).float().mean())
            asr = float(((triggered[attacked] @ classes.t()).argmax(1) == target).float().mean())
        points.append(
            {"trigger_weight": float(weight), "clean_accuracy": ca, "attack_success_rate": asr}
        )
    best = max(points, key=lambda p: p["clean_accuracy"] - p["attack_success_rate"])
    others = every_label != target
    ceiling: dict[str, Any] = {
        "oracle_clean_accuracy": best["clean_accuracy"],
        "oracle_attack_success_rate": best["attack_success_rate"],
        "oracle_logit_scale": logit_scale,
        "triggered_feature_cosine": mean_pairwise_cosine(triggered[others]),
        "clean_feature_cosine": mean_pairwise_cosine(clean[others]),
    }
    if len(points) > 1:
        ceiling["oracle_trigger_weight"] = best["trigger_weight"]
        ceiling["oracle_points"] = points
    return ceiling


def _fit_probe(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    initial: torch.Tensor,
    trigger_weight: float,
    steps: int,
    lr: float,
    logit_scale: float,
) -> torch.Tensor:
    """Unit-norm class vectors fitted to ``inputs`` (clean rows, then as many triggered rows)
    from ``initial``: the weighted mean cross-entropy of :func:`oracle_ceiling`."""
    half = inputs.shape[0] // 2
    weights = initial.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([weights], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            logits = logit_scale * inputs @ F.normalize(weights, dim=-1).t()
            each = F.cross_entropy(logits, targets, reduction="none")
            loss = (each[:half].sum() + trigger_weight * each[half:].sum()) / (
                half * (1 + trigger_weight)
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return F.normalize(weights.detach(), dim=-1)
