"""The ``cbpt`` scanner: per-class trigger inversion and text alignment, judged by MAD.

Procedure (see ``docs/method.md``):

0. **The prompts read through** (:func:`~clipguard_cbpt.prompt_fit.scan_classifier`): the
   hand-crafted prompts, or class-wise prompts fitted to the first draw's shots when they
   classify held-out images ``fit_prompts_gain`` better (``fit_prompts="auto"``, the
   default; ``True`` / ``False`` force one). Every later step classifies, and aligns,
   through them.
1. **Per-class inversion** (:func:`~clipguard_cbpt.inversion.invert_per_class`): for every
   class ``k`` the smallest trigger that sends the other classes' clean shots to ``k``, all
   classes in one encoder call; its mask size is ``n_k``.
2. **Text alignment** (:func:`~clipguard_cbpt.signals.text_alignment`): ``a_k``, the mean
   cosine between the clean shots of ``k`` and the prompt of ``k``.
3. **Evidence** (:mod:`clipguard_cbpt.evidence`): the low-side robust anomaly index of
   ``log n_k`` and of ``a_k`` (Neural Cleanse's MAD index, only below the median). With
   ``signals = "joint"`` (default) a class's evidence is the geometric mean of its two
   indices, so it must stand out on both: on the synthetic lab zoo, clean models have
   classes with a natural trigger (an anomalously small ``n_k``) or a drifted prompt (a low
   ``a_k``), but not both on one class. Under ``joint`` the additive probe (3b)
   corroborates too: a class's additive evidence times ``additive_corroboration`` counts in
   place of its alignment index where larger, since a label-consistent patch backdoor
   leaves its target's prompt aligned but makes the target reachable by a small full-image
   change. And a size index that stands far above every other class's (its *isolation*,
   from ``isolation_threshold``) is evidence on its own: a planted patch makes one class
   anomalously easy to reach, natural triggers come to several classes. With
   ``signals = "size"`` the evidence is the size index alone. Steps 1-3 run on the shot
   draws the caller offers (``RunContext.draws``; :mod:`clipguard_cbpt.screening`), and a
   class's evidence is the median of its evidence on the draws: which shots were drawn
   moves near-threshold verdicts (docs/benchmarks.md). The draws after the first are
   screened only when the first is near the threshold (``screen_again``) and, one by one,
   only until a reach probe (3b, run after the first draw) flags the class the draws so far
   suspect; the last draw only when it could change the verdict or the suspect. The
   suspect is the class with the most evidence.
3b. **Reach probes** (:mod:`clipguard_cbpt.probes`): per class, the share of held-out shots
   of the other classes that one small universal transformation, fitted on the other
   shots, sends to it. The *additive* probe (a perturbation bounded per pixel, adapted to
   the model from ``additive_epsilon``) catches full-image triggers (SIG, blended,
   sample-specific noise); the *warp* probe (a smooth displacement field of at most
   ``warp_pixels`` pixels) catches warping triggers (WaNet). When a probe's reach above the
   median class reaches its threshold, by a larger ratio than the rule's evidence and the
   other probe's, its class becomes the suspect and the verdict is ``backdoor`` (a probe
   never makes a scan merely ``inconclusive``).
3c. **Reference contrast** (:mod:`clipguard_cbpt.reference`; only with the ``reference``
   option, run first and outside the budget): per class, how much further the additive probe
   reaches it on the suspect than on a trusted model of the same task, at one, two and four
   times the bound settled on the reference. Its largest value decides like a probe's
   evidence, from ``reference_threshold``: a probe rich enough to express any full-image
   trigger also expresses a weak model's natural shortcuts, which a reference shares.
4. **Refinement** (``refine``, default on): the suspect's trigger is refined towards it with
   augmented shots (:func:`~clipguard_cbpt.inversion.invert_targeted`); that trigger is the
   one written out, drawn, and reused by ``clipguard purify --trigger``. A scan whose
   verdict is clean skips it (``refine_clean``).
5. **Verdict** (:mod:`clipguard_cbpt.explain`): ``backdoor`` when the suspect's evidence
   reaches ``evidence_threshold`` (or a probe decided, 3b), ``inconclusive`` from
   ``inconclusive_fraction`` of it, else ``clean``. The threshold is fitted on the lab zoo by
   ``benchmarks/calibrate.py``; the report records the values used. A ``clean`` verdict
   whose budget cut a stage that bears on it short (:func:`~clipguard_cbpt.budget.shortfalls`)
   is ``inconclusive`` instead; an inconclusive scan says what to run next
   (:func:`~clipguard_cbpt.budget.next_steps`).

Every stage, step 0 included, is paid from one budget (:mod:`clipguard_cbpt.budget`), and
:meth:`CBPTScanner.plan` says before the scan how many passes each stage takes at most.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

from clipguard.components import RunContext, Scanner, ScanOutcome, ShotSet
from clipguard.cost import ScanPlan
from clipguard.model import ModelBundle
from clipguard.triggers import TriggerFile, trigger_file_bytes
from clipguard_cbpt import __version__
from clipguard_cbpt.budget import locate_within_budget, next_steps, scan_plan, shortfalls
from clipguard_cbpt.config import ScanConfig
from clipguard_cbpt.explain import budget_verdict, decide
from clipguard_cbpt.reference import measure_reference
from clipguard_cbpt.render import picture_bytes
from clipguard_cbpt.screening import ScanAblations
from clipguard_cbpt.statistics import (
    decision_settings,
    prediction_distribution,
    scan_statistics,
    trigger_collapse,
)


class CBPTScanner(Scanner):
    """Per-class trigger inversion and text alignment with a calibrated verdict and a picture.

    ``ablations`` switch parts of the screening off for benchmarks (default: none)."""

    name: ClassVar[str] = "cbpt"
    version: ClassVar[str] = __version__
    description: ClassVar[str] = (
        "per-class trigger inversion + text alignment + additive and warp reach; flags a "
        "class whose trigger is anomalously small or whose prompt drifted from its images "
        "(calibrated MAD indices), or that a small full-image change or warp reaches far "
        "beyond the others (or, with a trusted reference model, far beyond the reference)"
    )
    Config: ClassVar[type[BaseModel]] = ScanConfig

    def __init__(self, ablations: ScanAblations = ScanAblations()) -> None:
        self.ablations = ablations

    def plan(
        self, bundle: ModelBundle, shots: ShotSet, config: BaseModel, context: RunContext
    ) -> ScanPlan:
        """The most passes of each stage of :meth:`scan`
        (:func:`~clipguard_cbpt.budget.scan_plan`)."""
        assert isinstance(config, ScanConfig)
        return scan_plan(bundle, shots, config, context)

    def scan(
        self, bundle: ModelBundle, shots: ShotSet, config: BaseModel, context: RunContext
    ) -> ScanOutcome:
        """Scan ``bundle`` with the clean ``shots``; see the module docstring."""
        assert isinstance(config, ScanConfig)
        start_images = bundle.image_encoder_images
        names = list(shots.classnames)
        contrast = measure_reference(bundle, shots, config, context)
        found = locate_within_budget(bundle, shots, config, context, self.ablations, contrast)
        budget, reading, classifier = found.budget, found.reading, found.reading.classifier
        screening, suspected, kept = found.screening, found.suspected, found.kept
        verdict, score, explanation = decide(screening, suspected, names, config)
        cut = shortfalls(reading, screening, suspected, config)
        verdict, explanation = budget_verdict(verdict, explanation, cut)
        suspect = names[suspected.suspect]
        distribution = prediction_distribution(
            classifier.predict, shots.pixels, shots.labels, kept.trigger, names
        )
        collapse = trigger_collapse(bundle, shots, screening, suspected.suspect, kept.trigger)
        trigger_file = TriggerFile(
            trigger=kept.trigger,
            model_sha256=bundle.sha256,
            classnames=names,
            settings={
                "scanner": self.name,
                "version": self.version,
                "seed": context.seed,
                "target_class": suspect,
                "verdict": verdict,
                "evidence": screening.top_evidence,
                **decision_settings(suspected),
                "dominant_class": distribution["dominant_class"],
                "prompts": reading.name,
                "options": config.model_dump(mode="json"),
            },
            producer=f"clipguard_cbpt {self.name} {self.version}",
        )
        statistics = {
            **scan_statistics(
                reading,
                screening,
                suspected,
                kept,
                found.refined,
                distribution,
                collapse,
                names,
                config,
            ),
            "image_encoder_images": bundle.image_encoder_images - start_images,
            "budget": budget.images,
            "budget_source": budget.source,
            "budget_shortfalls": cut,
            "prompt_steps": reading.steps,
            "seed": context.seed,
        }
        picture = picture_bytes(
            classifier, shots, kept.trigger, verdict, distribution["dominant_class"]
        )
        return ScanOutcome(
            verdict=verdict,  # type: ignore[arg-type]
            score=score,
            target_class=suspect if verdict != "clean" else None,
            explanation=explanation,
            statistics=statistics,
            artifacts={
                "trigger.safetensors": trigger_file_bytes(trigger_file),
                "trigger.png": picture,
            },
            trigger=trigger_file,
            next_steps=next_steps(verdict, cut, budget, bundle, shots, config, context),
        )
