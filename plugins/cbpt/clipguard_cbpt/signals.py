"""Per-class backdoor signals and the robust anomaly index they are judged by.

Two signals, each one number per class, where a backdoor target stands out on the low side:

* **trigger size** ``n_k``: the mask size of the smallest trigger that sends clean shots of
  the other classes to class ``k`` (:func:`~clipguard_cbpt.inversion.invert_per_class`). A
  backdoor target needs a far smaller trigger than the other classes (Neural Cleanse). The
  index is taken on ``log n_k``, so it measures *ratios* of sizes, which compare across
  models and image sizes.
* **text alignment** ``a_k``: the mean cosine between the clean shots of class ``k`` and the
  hand-crafted prompt feature of ``k``. Poisoning pairs triggered images with captions of the
  target class, which pulls the target's caption features towards the trigger's region of
  feature space and away from the target's own clean images: the target's alignment drops.
  It needs only the shots' clean features and catches the full-image triggers (blended,
  SIG, WaNet, sample-specific noise) whose inverted masks are not small.

:func:`low_side_indices` is the MAD anomaly index of Neural Cleanse restricted to values
*below* the median: ``max(0, median - v) / (1.4826 MAD)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: makes ``1.4826 * MAD`` a consistent estimate of the standard deviation of normal data
MAD_SCALE = 1.4826
#: the same for the mean absolute deviation (the fallback when MAD is 0)
MEAN_AD_SCALE = 1.2533


def robust_spread(values: Sequence[float]) -> tuple[float, float]:
    """``(median, scale)``: ``1.4826 * MAD``, or ``1.2533 *`` the mean absolute deviation when
    more than half of the values are equal (MAD 0); ``scale`` is 0 only if all are equal."""
    data = torch.tensor(list(values), dtype=torch.float64)
    if data.numel() == 0:
        raise ValueError("anomaly index of no values")
    median = float(data.median())
    deviations = (data - median).abs()
    mad = float(deviations.median())
    if mad > 1e-12:
        return median, MAD_SCALE * mad
    return median, MEAN_AD_SCALE * float(deviations.mean())


def anomaly_indices(values: Sequence[float]) -> list[float]:
    """Neural Cleanse's two-sided index ``|v - median| / scale`` (all 0 when the scale is 0)."""
    median, scale = robust_spread(values)
    if scale <= 1e-12:
        return [0.0] * len(values)
    return [abs(v - median) / scale for v in values]


def low_side_indices(values: Sequence[float], log: bool = False) -> list[float]:
    """How far each value lies below the median, in robust standard deviations (>= 0).

    With ``log`` the index is computed on ``log(v)`` (values must be positive), so that it is
    invariant to multiplying all values by one factor.
    """
    data = [math.log(max(v, 1e-12)) for v in values] if log else list(values)
    median, scale = robust_spread(data)
    if scale <= 1e-12:
        return [0.0] * len(data)
    return [max(0.0, median - v) / scale for v in data]


def text_alignment(
    features: torch.Tensor, labels: torch.Tensor, class_features: torch.Tensor
) -> list[float]:
    """``a_k``: mean cosine between the clean shot features of class ``k`` (``features``,
    normalised, with ``labels``) and its prompt feature (row ``k`` of ``class_features``);
    0 for a class without shots."""
    similarity = features @ class_features.T
    return [
        float(similarity[labels == k, k].mean()) if bool((labels == k).any()) else 0.0
        for k in range(class_features.shape[0])
    ]
