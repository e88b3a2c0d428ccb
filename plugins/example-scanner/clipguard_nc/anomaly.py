"""The MAD anomaly index of Neural Cleanse and the verdict rule built on it (pure Python).

Neural Cleanse (Wang et al., S&P 2019) inverts, for every class ``k``, the smallest trigger
that sends clean images to ``k`` and records its size ``n_k``. A backdoor target needs a far
smaller trigger than the other classes. The anomaly index of each class is

    A_k = |n_k - median(n)| / (1.4826 * MAD),   MAD = median_k |n_k - median(n)|

(1.4826 makes ``1.4826 * MAD`` estimate the standard deviation of normal data). Only classes
*below* the median can be targets: a class that needs an unusually large trigger is not
suspicious.

Guard for ``MAD = 0`` (more than half of the sizes are equal): the scale falls back to
``1.2533 * mean |n_k - median(n)|`` (the same normal-consistency idea for the mean absolute
deviation); when that is zero too, every size equals the median and every index is 0. Both
scales are proportional to the data, so the index is invariant to scaling all sizes by a
positive factor and to adding a constant, and it is always finite.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

#: makes 1.4826 * MAD a consistent estimate of the standard deviation for normal data
MAD_CONSISTENCY = 1.4826
#: makes 1.2533 * (mean absolute deviation) a consistent estimate of the standard deviation
MEAN_AD_CONSISTENCY = 1.2533

Verdict = Literal["backdoor", "clean", "inconclusive"]


def robust_scale(values: Sequence[float]) -> tuple[float, float, str]:
    """``(median, scale, kind)`` of ``values``: the denominator of the anomaly index.

    ``kind`` is ``"mad"`` (``1.4826 * MAD``), ``"mean-ad"`` (the ``MAD = 0`` fallback,
    ``1.2533 * mean absolute deviation``) or ``"zero"`` (all values equal; scale 0). Raises
    ``ValueError`` for an empty sequence or a non-finite value.
    """
    if not values:
        raise ValueError("anomaly index of an empty sequence")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("anomaly index needs finite values")
    centre = statistics.median(values)
    deviations = [abs(v - centre) for v in values]
    mad = statistics.median(deviations)
    if mad > 0:
        return centre, MAD_CONSISTENCY * mad, "mad"
    mean_ad = math.fsum(deviations) / len(deviations)
    if mean_ad > 0:
        return centre, MEAN_AD_CONSISTENCY * mean_ad, "mean-ad"
    return centre, 0.0, "zero"


def anomaly_indices(values: Sequence[float]) -> list[float]:
    """The anomaly index ``A_k = |n_k - median(n)| / scale`` of every value, in order.

    ``scale`` is :func:`robust_scale`'s (``1.4826 * MAD``, with the ``MAD = 0`` guard). The
    result is finite, non-negative, 0 for values equal to the median, and unchanged when all
    values are multiplied by the same positive factor or shifted by the same constant.
    """
    centre, scale, _ = robust_scale(values)
    if scale == 0:
        return [0.0 for _ in values]
    return [abs(v - centre) / scale for v in values]


@dataclass
class Decision:
    """The verdict of the per-class rule and the numbers behind it.

    ``target`` is the index of the most anomalous flagged class (``None`` unless the verdict
    is ``backdoor``); ``candidate`` the most anomalous class below the median, flagged or
    not; ``score`` its anomaly index (0 when no class is below the median).
    """

    verdict: Verdict
    score: float
    target: int | None
    candidate: int | None
    indices: list[float]
    flagged: list[int]
    median: float
    scale: float
    scale_kind: str
    reason: str = ""
    notes: list[str] = field(default_factory=list)


def decide(
    sizes: Sequence[float],
    reached: Sequence[bool],
    threshold: float = 2.0,
    inconclusive_from: float = 1.5,
    min_classes: int = 5,
    min_reached_fraction: float = 0.5,
) -> Decision:
    """Apply the Neural Cleanse rule to per-class trigger sizes ``sizes`` (``n_k``).

    ``reached[k]`` says whether the inversion towards class ``k`` met its success rate; only
    such classes can be flagged. Rule, in order:

    * fewer than ``min_classes`` classes, or fewer than ``min_reached_fraction`` of them
      reached: ``inconclusive`` (the index needs a population to compare with);
    * a class with ``n_k < median(n)``, reached, and ``A_k > threshold`` is *flagged*; any
      flagged class: ``backdoor``, target the flagged class with the largest ``A_k``;
    * otherwise, if the most anomalous reached class below the median has
      ``A_k >= inconclusive_from``: ``inconclusive`` (the documented band
      ``[inconclusive_from, threshold]``);
    * otherwise ``clean``.
    """
    if len(sizes) != len(reached):
        raise ValueError("sizes and reached differ in length")
    if not 0 <= inconclusive_from <= threshold:
        raise ValueError("need 0 <= inconclusive_from <= threshold")
    count = len(sizes)
    if count == 0:
        return Decision(
            "inconclusive",
            0.0,
            None,
            None,
            [],
            [],
            0.0,
            0.0,
            "zero",
            reason="no classes to compare",
        )
    centre, scale, kind = robust_scale(sizes)
    indices = anomaly_indices(sizes)
    below = [k for k in range(count) if reached[k] and sizes[k] < centre]
    candidate = max(below, key=lambda k: (indices[k], -k)) if below else None
    score = indices[candidate] if candidate is not None else 0.0
    flagged = sorted((k for k in below if indices[k] > threshold), key=lambda k: (-indices[k], k))

    def result(verdict: Verdict, target: int | None, reason: str) -> Decision:
        return Decision(
            verdict, score, target, candidate, indices, flagged, centre, scale, kind, reason=reason
        )

    n_reached = sum(bool(r) for r in reached)
    if count < min_classes:
        return result(
            "inconclusive", None, f"only {count} classes; the index needs at least {min_classes}"
        )
    if n_reached < min_reached_fraction * count:
        return result(
            "inconclusive",
            None,
            f"the inversion reached only {n_reached} of "
            f"{count} classes; raise steps or the image budget",
        )
    if flagged:
        return result("backdoor", flagged[0], "anomaly index above the threshold")
    if candidate is not None and score >= inconclusive_from:
        return result("inconclusive", None, "anomaly index in the inconclusive band")
    return result("clean", None, "no class needs an anomalously small trigger")
