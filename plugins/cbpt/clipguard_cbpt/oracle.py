"""The oracle ceiling of prompt-based purification, and the fidelity of an inverted trigger.

Neither is available to a defender: both use the *real* trigger. Benchmarks report them
beside CBPT's figures to separate "the method missed" from "no prompt set could do better".

* :func:`probe_ceiling`: a linear probe with unit-norm class vectors (exactly the form of any
  prompt set's classifier; trained at the lab oracle's logit scale,
  :data:`clipguard.lab.train.ORACLE_LOGIT_SCALE`, since predictions do not depend on it),
  trained on features of clean and really-triggered images with their *true* labels;
  evaluated on other images. The probe is trained for several weights of the triggered loss;
  the result lists every point and the best one (highest ``CA - ASR``).
* :func:`trigger_fidelity`: cosine between the mean feature shifts ``f(T(x)) - f(x)`` of the
  real and of the inverted trigger, and the mean per-image cosine of the shifts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from clipguard.lab.train import ORACLE_LOGIT_SCALE
from clipguard.model import ModelBundle
from clipguard.prompts import handcrafted_text_features
from clipguard.triggers import Trigger
from clipguard_cbpt.inversion import encode_batched


@dataclass
class ProbePoint:
    """CA and ASR of the probe trained with one triggered-loss weight."""

    trigger_weight: float
    clean_accuracy: float
    attack_success_rate: float


@dataclass
class Ceiling:
    """All probe points and the best (highest ``CA - ASR``)."""

    best: ProbePoint
    points: list[ProbePoint] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "best": vars(self.best),
            "points": [vars(point) for point in self.points],
        }


def probe_ceiling(
    bundle: ModelBundle,
    classnames: Sequence[str],
    train_pixels: torch.Tensor,
    train_labels: torch.Tensor,
    eval_pixels: torch.Tensor,
    eval_labels: torch.Tensor,
    trigger: Trigger,
    target: int,
    trigger_weights: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    steps: int = 500,
    lr: float = 1e-2,
) -> Ceiling:
    """Best CA/ASR a unit-norm linear head (any prompt set) can reach on ``bundle``.

    Trains ``W`` (``C x E``, rows normalised, initialised from the hand-crafted prompt
    features) with ``CE(s f(x) W^T, y) + w * CE(s f(T(x)) W^T, y)`` on ``train_*`` (full
    batch Adam, ``steps`` steps) for each ``w`` in ``trigger_weights``; CA and ASR are
    measured on ``eval_*`` (ASR over non-target images). Deterministic.
    """
    scale = ORACLE_LOGIT_SCALE
    clean_train = encode_batched(bundle, train_pixels)
    trig_train = encode_batched(bundle, trigger.apply(train_pixels))
    clean_eval = encode_batched(bundle, eval_pixels)
    keep = eval_labels != target
    trig_eval = encode_batched(bundle, trigger.apply(eval_pixels[keep]))
    init = handcrafted_text_features(bundle, list(classnames)).detach()
    points = []
    for weight in trigger_weights:
        head = torch.nn.Parameter(init.clone())
        optimizer = torch.optim.Adam([head], lr=lr)
        for _ in range(steps):
            classes = F.normalize(head, dim=-1)
            loss = F.cross_entropy(scale * clean_train @ classes.T, train_labels)
            loss = loss + weight * F.cross_entropy(scale * trig_train @ classes.T, train_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            classes = F.normalize(head, dim=-1)
            ca = float(((clean_eval @ classes.T).argmax(1) == eval_labels).float().mean())
            asr = float(((trig_eval @ classes.T).argmax(1) == target).float().mean())
        points.append(ProbePoint(float(weight), ca, asr))
    best = max(points, key=lambda p: p.clean_accuracy - p.attack_success_rate)
    return Ceiling(best=best, points=points)


@torch.no_grad()
def trigger_fidelity(
    bundle: ModelBundle, pixels: torch.Tensor, real: Trigger, inverted: Trigger
) -> dict[str, float]:
    """How well ``inverted`` reproduces ``real`` in feature space, on clean ``pixels``.

    Returns ``mean_shift_cosine`` (cosine between the mean shifts ``f(T(x)) - f(x)`` of the
    two triggers) and ``per_image_cosine`` (the mean over images of the cosine of the two
    shifts of that image).
    """
    clean = encode_batched(bundle, pixels)
    shift_real = encode_batched(bundle, real.apply(pixels)) - clean
    shift_inv = encode_batched(bundle, inverted.apply(pixels)) - clean
    mean_cos = F.cosine_similarity(shift_real.mean(0), shift_inv.mean(0), dim=0)
    per_image = F.cosine_similarity(shift_real, shift_inv, dim=1).mean()
    return {"mean_shift_cosine": float(mean_cos), "per_image_cosine": float(per_image)}
