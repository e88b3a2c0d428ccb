"""The screening of a cbpt scan and its budget: the per-class inversion and text alignment on
each shot draw the caller offers, the reach probes between the first draw and the others, and
the refinement of the suspect's trigger (steps 1-4 of :mod:`clipguard_cbpt.scanner`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from clipguard.components import RunContext, ShotSet
from clipguard.features import encode_images
from clipguard.model import ModelBundle
from clipguard.prompts import PromptClassifier
from clipguard_cbpt.config import ScanConfig
from clipguard_cbpt.evidence import (
    Screening,
    Stopped,
    Suspicion,
    corroborate,
    judge_classes,
    last_draw_moot,
    median_screening,
    probe_flags_suspect,
    probe_ratios,
    suspicion,
    verdict_of,
)
from clipguard_cbpt.inversion import (
    InversionConfig,
    InversionResult,
    invert_per_class,
    invert_targeted,
)
from clipguard_cbpt.probes import ProbeReach, probe_cost, probe_held_out, run_probe
from clipguard_cbpt.reference import ReferenceContrast
from clipguard_cbpt.signals import low_side_indices, text_alignment


@dataclass(frozen=True)
class ScanAblations:
    """Parts of the screening a benchmark may switch off (``CBPTScanner(ablations=...)``);
    not options: a scan always runs with the defaults.

    ``skip_moot_draw``: run the reach probes before the last shot draw on offer and skip that
    draw when whatever it gave could change neither the verdict nor the suspect of a backdoor
    or inconclusive verdict (:func:`~clipguard_cbpt.evidence.last_draw_moot`); False screens it
    whenever the earlier draws were not decisive. ``probe_settles``: stop screening shot draws
    once a reach probe flags the class the draws screened so far suspect
    (:func:`~clipguard_cbpt.evidence.probe_flags_suspect`); False screens the draws the band
    and ``skip_moot_draw`` call for.
    """

    skip_moot_draw: bool = True
    probe_settles: bool = True


def class_triggers(
    bundle: ModelBundle,
    shots: ShotSet,
    config: InversionConfig,
    context: RunContext,
    classifier: PromptClassifier,
    budget: int | None = None,
) -> tuple[list[InversionResult], list[float]]:
    """The per-class inversion of every class (stage "per-class inversion") and the sizes
    ``n_k`` (the mask size, 1.0 where the class's success share was never met)."""
    with context.stage("per-class inversion"):
        inversions = invert_per_class(
            bundle,
            shots.pixels,
            shots.labels,
            classifier.class_features,
            config,
            context.generator(0),
            context.progress,
            budget=budget,
        )
    return inversions, [r.pl1 if r.reached else 1.0 for r in inversions]


def screen(
    bundle: ModelBundle,
    shots: ShotSet,
    config: ScanConfig,
    context: RunContext,
    classifier: PromptClassifier,
    budget: int,
) -> Screening:
    """Per-class inversion and text alignment of every class, and the suspect (steps 1-3)."""
    inversions, sizes = class_triggers(
        bundle, shots, config.inversion(), context, classifier, budget
    )
    with context.stage("text alignment"):
        clean_features = encode_images(bundle, shots.pixels)
        alignment = text_alignment(clean_features, shots.labels, classifier.class_features)
    size_index = low_side_indices(sizes, log=True)
    alignment_index = low_side_indices(alignment)
    evidence, suspect = judge_classes(size_index, alignment_index, sizes, config)
    return Screening(
        inversions,
        clean_features,
        sizes,
        size_index,
        alignment,
        alignment_index,
        evidence,
        suspect,
    )


def screening_cost(config: ScanConfig, shots: ShotSet) -> int:
    """The most encoder images the screening of one shot draw like ``shots`` takes: every
    class's batch on every step of the per-class inversion, and one pass over the shots for
    the text alignment. What the reach probes leave for the draws still pending."""
    return config.class_steps * config.class_batch_size * len(shots.classnames) + len(shots.labels)


def shot_draws(
    context: RunContext, shots: ShotSet, draws: int
) -> Iterator[tuple[RunContext, ShotSet]]:
    """The shot draws a scan screens, each with a context of its seed: ``shots`` with
    ``context``, then ``draws - 1`` more from :attr:`RunContext.draw_shots` (seeds
    ``context.seed + 1`` ...; their contexts share its timings and progress), none where the
    caller offers no more. Each draw is drawn when the iteration reaches it, so a draw the
    caller stops before is never drawn (nor counted among the run's images)."""
    yield context, shots
    if context.draw_shots is not None:
        for index in range(1, draws):
            yield replace(context, seed=context.seed + index), context.draw_shots(index)


def locate_trigger(
    bundle: ModelBundle,
    shots: ShotSet,
    config: ScanConfig,
    context: RunContext,
    classifier: PromptClassifier,
    ablations: ScanAblations = ScanAblations(),
    reference: ReferenceContrast | None = None,
) -> tuple[Screening, Suspicion, InversionResult, InversionResult | None]:
    """Steps 1-4: screen every class on the first shot draw, run the reach probes on
    ``shots`` (their reach measured on ``probe_held_out`` more images per class too, where
    the context offers them), then, unless the first draw is decisive
    (:meth:`ScanConfig.decisive`), screen the other draws on offer (``context.draws`` where
    the context can draw more, :func:`shot_draws`) one by one until a probe flags the suspect
    of the draws screened so far (:func:`probe_flags_suspect`, unless ``ablations`` switch
    ``probe_settles`` off) or the last is moot (:func:`last_draw_moot`, unless they switch
    ``skip_moot_draw`` off); judge the median screening
    (:func:`median_screening`), with the ``reference`` contrast where the scan measured one
    (:func:`~clipguard_cbpt.evidence.suspicion`), then refine the suspect's trigger within
    the budget.

    Returns the screening, the suspicion, the kept trigger (the refined one when its
    refinement met the success share, else the suspect's per-class trigger on ``shots``) and
    the refinement (None when ``refine`` is off, when the verdict is clean and
    ``refine_clean`` off, or when no budget is left). The screenings share
    70 % of the budget (all of it without refinement), each draw taking at most an even share
    of what the earlier ones left; the probes, in turn, get the rest less what the pending
    draws can take (:func:`screening_cost` each, within their share) and the refinement's
    share (``refine_steps`` batches).
    """
    start_images = bundle.image_encoder_images
    refining = config.refine and config.refine_steps > 0
    screen_budget = int(config.budget * 0.7) if refining else config.budget
    on_offer = context.draws if context.draw_shots is not None else 1
    inversion = config.inversion()
    draws = shot_draws(context, shots, on_offer)
    screenings: list[Screening] = []
    seeds: list[int] = []
    screened_images = 0

    def screen_next() -> None:
        nonlocal screened_images
        draw_context, draw = next(draws)
        share = (screen_budget - screened_images) // (on_offer - len(screenings))
        before = bundle.image_encoder_images
        screenings.append(screen(bundle, draw, config, draw_context, classifier, budget=share))
        seeds.append(draw_context.seed)
        screened_images += bundle.image_encoder_images - before

    screen_next()
    decisive = config.decisive(screenings[0].top_evidence)
    probes: dict[str, ProbeReach] = {}
    reserve = config.refine_steps * config.refine_batch_size if refining else 0
    pending = 0 if decisive else on_offer - len(screenings)
    reserve += min(screen_budget - screened_images, pending * screening_cost(config, shots))
    specs = config.probes()
    n_classes = len(shots.classnames)
    held_out = probe_held_out(context, config, n_classes) if specs else None
    held_out_labels = None if held_out is None else held_out[1]
    for i, spec in enumerate(specs):
        left = config.budget - (bundle.image_encoder_images - start_images) - reserve
        # an adapted probe's extra fits leave room for one fit of every later probe
        later = sum(
            probe_cost(
                shots.labels,
                n_classes,
                config.probe_shots,
                s.steps,
                held_out_labels,
                config.probe_held_out_max,
            )
            for s in specs[i + 1 :]
        )
        with context.stage(f"{spec.family.name} reach"):
            probes[spec.family.name] = run_probe(
                bundle,
                shots.pixels,
                shots.labels,
                classifier.class_features,
                spec,
                config.probe_shots,
                budget=max(left, 0),
                keep=later,
                progress=context.progress,
                held_out=held_out,
                max_held_out=config.probe_held_out_max,
            )
    ranked = probe_ratios(probes, config)
    corroborated = [corroborate(screenings[0], probes.get("additive"), config)]
    stopped: Stopped | None = None
    if decisive and on_offer > 1:
        stopped = "band"
    while stopped is None and len(screenings) < on_offer:
        if ablations.probe_settles and probe_flags_suspect(
            median_screening(corroborated, seeds).suspect, ranked
        ):
            stopped = "probe"
        elif (
            ablations.skip_moot_draw
            and len(screenings) == on_offer - 1
            and last_draw_moot([s.evidence for s in corroborated], ranked, config)
        ):
            stopped = "moot"
        else:
            screen_next()
            corroborated.append(corroborate(screenings[-1], probes.get("additive"), config))
    screening = median_screening(corroborated, seeds, on_offer, stopped)
    suspected = suspicion(screening, probes, config, reference)
    kept = screening.inversions[suspected.suspect]
    left = config.budget - (bundle.image_encoder_images - start_images)
    refined: InversionResult | None = None
    wanted = config.refine_clean or verdict_of(suspected.ratio, config) != "clean"
    if refining and wanted and left > config.refine_batch_size:
        with context.stage("refinement"):
            refined = invert_targeted(
                bundle,
                shots.pixels,
                shots.labels,
                classifier.class_features,
                suspected.suspect,
                inversion,
                context.generator(1),
                start=kept.trigger,
                progress=context.progress,
                budget=left,
            )
        if refined.reached:
            kept = refined
    return screening, suspected, kept, refined
