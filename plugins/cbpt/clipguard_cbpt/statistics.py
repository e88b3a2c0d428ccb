"""The statistics a cbpt scan reports: where a trigger sends the shots, how far it collapses
their features, and the reach probes' and the reference contrast's parts of the report."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from clipguard.components import ShotSet
from clipguard.features import encode_images, mean_pairwise_cosine
from clipguard.model import ModelBundle
from clipguard.triggers import MaskPatternTrigger, Trigger
from clipguard_cbpt.config import PROBES

if TYPE_CHECKING:
    from clipguard_cbpt.config import ScanConfig
    from clipguard_cbpt.evidence import Screening, Suspicion
    from clipguard_cbpt.inversion import InversionResult
    from clipguard_cbpt.prompt_fit import PromptReading

_EPS = 1e-6


def relative_collapse(triggered_cos: float, clean_cos: float) -> float:
    """How far triggered features collapsed, from 0 (as spread as clean) to 1 (one point)."""
    return (triggered_cos - clean_cos) / max(1 - clean_cos, _EPS)


@torch.no_grad()
def prediction_distribution(
    predict: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    labels: torch.Tensor,
    trigger: MaskPatternTrigger,
    classnames: list[str],
) -> dict[str, Any]:
    """Zero-shot predictions on triggered ``pixels``: class distribution and dominant class.

    ``dominant_share`` is the share of all triggered shots predicted as the dominant class;
    ``dominant_share_others`` the same among shots whose true class is not the dominant one
    (an attack-success rate of the inverted trigger towards it).
    """
    predictions = predict(trigger.apply(pixels))
    counts = Counter(int(p) for p in predictions.tolist())
    dominant, count = max(sorted(counts.items()), key=lambda item: item[1])
    others = labels != dominant
    share_others = (
        float((predictions[others] == dominant).float().mean().item())
        if bool(others.any())
        else 0.0
    )
    return {
        "distribution": {
            classnames[k]: counts.get(k, 0) / len(predictions) for k in range(len(classnames))
        },
        "dominant_index": dominant,
        "dominant_class": classnames[dominant],
        "dominant_share": count / len(predictions),
        "dominant_share_others": share_others,
    }


def probe_evidence_settings(suspected: Suspicion) -> dict[str, float | None]:
    """Each probe's top evidence as trigger-file settings (``additive_evidence``,
    ``warp_evidence``; None for a probe that did not run), which the purifier's gate
    re-judges."""
    tops = suspected.top_probe_evidence()
    return {f"{name}_evidence": tops.get(name) for name in PROBES}


def deciding_probe_settings(suspected: Suspicion) -> dict[str, Any]:
    """``{"deciding_probe": {"name": ..., <bounds>}}``: the reach probe that decided the scan
    and the bounds it settled on (:meth:`ProbeFamily.settings`), which the purifier fits
    towards the target as a further trigger (``probe_trigger``); the value is None when the
    rule decided."""
    probe = suspected.probes.get(suspected.decided_by)
    if probe is None:
        return {"deciding_probe": None}
    return {"deciding_probe": probe.family.record()}


def decision_settings(suspected: Suspicion) -> dict[str, Any]:
    """How the scan was decided, as trigger-file settings: each probe's top evidence
    (:func:`probe_evidence_settings`), the deciding probe (:func:`deciding_probe_settings`),
    the top reference contrast (``reference_contrast``; None without a reference) and
    ``decided_by``; the scanner and the purifier's own inversion record the same."""
    return {
        **probe_evidence_settings(suspected),
        **deciding_probe_settings(suspected),
        "reference_contrast": None if suspected.reference is None else suspected.reference.top()[0],
        "decided_by": suspected.decided_by,
    }


def probe_statistics(suspected: Suspicion, names: list[str], config: ScanConfig) -> dict[str, Any]:
    """The reach probes' part of the report, per probe ``P`` in :data:`PROBES`: the suspect's
    evidence (``P_evidence``), every class's reach and evidence (``class_P_reach``,
    ``class_P_evidence``) and the probe's settings (``P``); all None for a probe that did not
    run."""
    report: dict[str, Any] = {}
    for name in PROBES:
        keys = (f"{name}_evidence", f"class_{name}_reach", f"class_{name}_evidence", name)
        probe = suspected.probes.get(name)
        if probe is None:
            report.update(dict.fromkeys(keys))
            continue
        evidence = probe.evidence()
        report.update(
            {
                keys[0]: evidence[suspected.suspect],
                keys[1]: dict(zip(names, probe.reach, strict=True)),
                keys[2]: dict(zip(names, evidence, strict=True)),
                keys[3]: {
                    **probe.family.settings(),
                    "steps": probe.steps,
                    "skipped": probe.skipped,
                    "threshold": config.probe_threshold(name),
                    "median_reach": probe.median,
                    "shot_median_reach": probe.shot_median,
                    "measured_images": dict(zip(names, probe.measured, strict=True))
                    if probe.measured
                    else None,
                    "tried": [
                        {**family.settings(), "median_reach": median}
                        for family, median in probe.tried
                    ],
                },
            }
        )
    return report


def reference_statistics(
    suspected: Suspicion, names: list[str], config: ScanConfig
) -> dict[str, Any] | None:
    """The reference contrast's part of the report (None without a reference model): the
    reference's sha256, the bounds probed, every class's largest contrast, the top contrast
    with its class and bound, the threshold, both models' reach per bound, and the images
    through both models' encoders."""
    contrast = suspected.reference
    if contrast is None:
        return None
    value, k, bound = contrast.top()
    return {
        "reference_sha256": contrast.reference_sha256,
        "contrast": value,
        "contrast_class": names[k],
        "contrast_bound": bound,
        "threshold": config.reference_threshold,
        "bounds": contrast.bounds,
        "class_contrast": dict(zip(names, contrast.per_class(), strict=True)),
        "suspect_reach": [dict(zip(names, r, strict=True)) for r in contrast.suspect_reach],
        "reference_reach": [dict(zip(names, r, strict=True)) for r in contrast.reference_reach],
        "images": contrast.images,
    }


def trigger_collapse(
    bundle: ModelBundle, shots: ShotSet, screening: Screening, target: int, trigger: Trigger
) -> float:
    """How far ``trigger`` collapses the features of the shots of the classes other than
    ``target`` (:func:`relative_collapse`), against the spread of every shot's clean features
    on the first draw (``screening.clean_features``). One encoder pass over those shots."""
    clean_cos = mean_pairwise_cosine(screening.clean_features)
    others = shots.pixels[shots.labels != target]
    triggered = mean_pairwise_cosine(encode_images(bundle, trigger.apply(others)))
    return relative_collapse(triggered, clean_cos)


def scan_statistics(
    reading: PromptReading,
    screening: Screening,
    suspected: Suspicion,
    kept: InversionResult,
    refined: InversionResult | None,
    distribution: dict[str, Any],
    collapse: float,
    names: list[str],
    config: ScanConfig,
) -> dict[str, Any]:
    """The statistics of a cbpt scan's report, but for its cost and seed: the prompts read
    through, the suspect's signals, the kept trigger's ``distribution``
    (:func:`prediction_distribution`) and ``collapse`` (:func:`trigger_collapse`), every
    class's signals on the combined screening and on each shot draw, the reach probes
    (:func:`probe_statistics`), the reference contrast (:func:`reference_statistics`), the
    refinement and the thresholds in force."""
    return {
        "prompts": reading.name,
        "prompt_accuracy": reading.accuracy,
        "prompt_accuracy_images": reading.held_out_images,
        "suspect_class": names[suspected.suspect],
        "decided_by": suspected.decided_by,
        "evidence": screening.top_evidence,
        "size_index": screening.size_index[suspected.suspect],
        "alignment_index": screening.alignment_index[suspected.suspect],
        "pl1": kept.pl1,
        "collapse_score": collapse,
        "dominant_class": distribution["dominant_class"],
        "dominant_share": distribution["dominant_share"],
        "dominant_share_others": distribution["dominant_share_others"],
        "class_distribution": distribution["distribution"],
        "class_pl1": dict(zip(names, screening.sizes, strict=True)),
        "class_reached": {c: r.reached for c, r in zip(names, screening.inversions, strict=True)},
        "class_size_index": dict(zip(names, screening.size_index, strict=True)),
        "class_alignment": dict(zip(names, screening.alignment, strict=True)),
        "class_alignment_index": dict(zip(names, screening.alignment_index, strict=True)),
        "class_isolation": dict(zip(names, screening.isolation, strict=True)),
        "class_evidence": dict(zip(names, screening.evidence, strict=True)),
        "class_additive_corroboration": dict(zip(names, screening.corroboration, strict=True))
        if screening.corroboration
        else None,
        "screen_draws_offered": screening.draws_offered,
        "screen_draws_stopped": screening.stopped,
        "screen_draws": [
            {
                "seed": seed,
                "suspect_class": names[draw.suspect],
                "evidence": draw.top_evidence,
                "class_evidence": dict(zip(names, draw.evidence, strict=True)),
                "class_pl1": dict(zip(names, draw.sizes, strict=True)),
                "class_size_index": dict(zip(names, draw.size_index, strict=True)),
                "class_alignment_index": dict(zip(names, draw.alignment_index, strict=True)),
            }
            for seed, draw in zip(screening.draw_seeds, screening.draws, strict=True)
        ],
        **probe_statistics(suspected, names, config),
        "reference_contrast": reference_statistics(suspected, names, config),
        "refined": None
        if refined is None
        else {"pl1": refined.pl1, "reached": refined.reached, "steps": refined.steps},
        "signals": config.signals,
        "thresholds": {
            "evidence_threshold": config.threshold,
            "inconclusive_fraction": config.inconclusive_fraction,
            "additive_corroboration": config.additive_corroboration,
            "isolation_threshold": config.isolation_threshold,
        },
    }
