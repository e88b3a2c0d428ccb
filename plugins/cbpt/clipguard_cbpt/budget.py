"""The budget of a cbpt scan: the budget in force (``budget``, lowered by a time budget), the
plan of its stages (:func:`scan_plan`, what ``clipguard scan --estimate`` prints), the stages
a budget cut short (:func:`shortfalls`) and what to run next when a scan is inconclusive
(:func:`next_steps`).

Every stage is paid from the one budget of image-encoder images: the prompt check first (at
most :data:`~clipguard_cbpt.prompt_fit.PROMPT_SHARE` of it, its text-encoder steps counted as
images of equal compute), then the screening, the reach probes and the refinement as
:func:`~clipguard_cbpt.screening.locate_trigger` shares out what is left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from clipguard.components import RunContext, ShotSet
from clipguard.cost import (
    ScanPlan,
    StagePlan,
    affordable_images,
    image_flops,
    minutes,
    stage_seconds,
)
from clipguard.model import ModelBundle
from clipguard.report import NextStep
from clipguard_cbpt.config import ScanConfig
from clipguard_cbpt.evidence import Screening, Suspicion
from clipguard_cbpt.inversion import InversionResult
from clipguard_cbpt.probes import probe_cost, probe_held_out
from clipguard_cbpt.prompt_fit import (
    PROMPT_SHARE,
    PromptReading,
    planned_held_out,
    prompt_check_cost,
    scan_classifier,
)
from clipguard_cbpt.reference import ReferenceContrast, contrast_cost
from clipguard_cbpt.screening import ScanAblations, locate_trigger, screening_cost

#: the share of what the prompt check leaves that the screenings get when the trigger is
#: refined (:func:`~clipguard_cbpt.screening.locate_trigger`)
SCREEN_SHARE = 0.7
#: shot draws an inconclusive scan is advised to use at least
ADVISED_DRAWS = 5


@dataclass(frozen=True)
class Budget:
    """The budget in force: ``images`` budget units, from the ``budget`` option (``source``
    "option") or, where less, what the ``compute_budget`` option buys on this model
    ("compute") or the time left before the run's deadline affords ("max-minutes")."""

    images: int
    source: str

    def prompt_allowance(self) -> int:
        """The most the prompt check may take."""
        return int(self.images * PROMPT_SHARE)


def compute_images(config: ScanConfig, bundle: ModelBundle) -> int:
    """The image-encoder images ``config.compute_budget`` buys on ``bundle``
    (:func:`~clipguard.cost.image_flops`)."""
    return int(config.compute_budget * 1e9 / max(image_flops(bundle), 1.0))


def budget_in_force(config: ScanConfig, context: RunContext, bundle: ModelBundle) -> Budget:
    """``config.budget``, or where fewer the images ``config.compute_budget`` buys on this
    model (:func:`compute_images`: deterministic, the same on every machine), or where fewer
    still the images the time left affords (:func:`~clipguard.cost.affordable_images`)."""
    budget = Budget(config.budget, "option")
    bought = compute_images(config, bundle)
    if bought < budget.images:
        budget = Budget(bought, "compute")
    affordable = affordable_images(context)
    if affordable is not None and affordable < budget.images:
        return Budget(affordable, "max-minutes")
    return budget


@dataclass(frozen=True)
class Localisation:
    """What the scan's stages found within one budget (:func:`locate_within_budget`): the
    budget in force, the prompt reading, and :func:`~clipguard_cbpt.screening.locate_trigger`'s
    screening, suspicion, kept trigger and refinement."""

    budget: Budget
    reading: PromptReading
    screening: Screening
    suspected: Suspicion
    kept: InversionResult
    refined: InversionResult | None


def locate_within_budget(
    bundle: ModelBundle,
    shots: ShotSet,
    config: ScanConfig,
    context: RunContext,
    ablations: ScanAblations = ScanAblations(),
    reference: ReferenceContrast | None = None,
) -> Localisation:
    """The scan's localisation, paid from one budget: the budget in force
    (:func:`budget_in_force`), the prompt check within its allowance
    (:func:`~clipguard_cbpt.prompt_fit.scan_classifier`; its text-encoder steps counted as
    images), then :func:`~clipguard_cbpt.screening.locate_trigger` with what is left (at
    least one image), the ``reference`` contrast (measured before, outside the budget) among
    its signals where the scan has one. The scanner and the purifier's own inversion both run
    exactly this."""
    start_images = bundle.image_encoder_images
    budget = budget_in_force(config, context, bundle)
    reading = scan_classifier(bundle, shots, config, context, budget.prompt_allowance())
    spent = bundle.image_encoder_images - start_images
    text_spent = reading.budget_images - min(reading.budget_images, spent)
    left = max(budget.images - spent - text_spent, 1)
    screening, suspected, kept, refined = locate_trigger(
        bundle,
        shots,
        config.model_copy(update={"budget": left}),
        context,
        reading.classifier,
        ablations,
        reference,
    )
    return Localisation(budget, reading, screening, suspected, kept, refined)


def _draws_on_offer(context: RunContext) -> int:
    return context.draws if context.draw_shots is not None else 1


def _probe_stages(
    shots: ShotSet, config: ScanConfig, held_labels: torch.Tensor | None
) -> list[StagePlan]:
    """Each reach probe's most passes: every fit its band allows (``1 + refits``), each
    ``steps`` passes over the fitted shots and one forward over the measured images."""
    n_classes = len(shots.classnames)
    stages = []
    for spec in config.probes():

        def cost(steps: int) -> int:
            return probe_cost(
                shots.labels,
                n_classes,
                config.probe_shots,
                steps,
                held_labels,
                config.probe_held_out_max,
            )

        measured = cost(0)
        fits = 1 + spec.band.refits
        stages.append(
            StagePlan(
                f"{spec.family.name} reach",
                image_passes=fits * (cost(spec.steps) - measured),
                image_forwards=fits * measured,
                condition=None if fits == 1 else f"up to {fits} fits (bound adapts)",
            )
        )
    return stages


def needed_budget(
    bundle: ModelBundle, shots: ShotSet, config: ScanConfig, context: RunContext, draws: int
) -> int:
    """The budget at which no stage of a scan offered ``draws`` shot draws is cut short:
    the prompt check whole within its share, and every draw's screening, every probe fit and
    the whole refinement within the shares of what it leaves."""
    fits, held_out = planned_held_out(config, context, len(shots.classnames))
    prompt = 0
    if fits:
        held = 0 if held_out is None else len(held_out[1])
        prompt = prompt_check_cost(bundle, shots, held).budget_images(config.prompt_steps)
    rest = {
        s.name: s.image_passes + s.image_forwards
        for s in _stages(bundle, shots, config, context, draws, budget=None)
        if s.name != "prompt fitting"
    }
    screen = rest.get("per-class inversion", 0) + rest.get("text alignment", 0)
    refine = rest.get("refinement", 0)
    probes = sum(v for k, v in rest.items() if k.endswith(" reach"))
    refining = config.refine and config.refine_steps > 0
    after_prompt = max(
        math.ceil(screen / SCREEN_SHARE) if refining else screen, screen + probes + refine
    )
    return max(math.ceil(prompt / PROMPT_SHARE), prompt + after_prompt) + 1


def _stages(
    bundle: ModelBundle,
    shots: ShotSet,
    config: ScanConfig,
    context: RunContext,
    draws: int,
    budget: Budget | None,
) -> list[StagePlan]:
    """The stages of a scan of ``draws`` shot draws, their passes cut to ``budget`` (none:
    uncut)."""
    n_classes = len(shots.classnames)
    fits, held_out = planned_held_out(config, context, n_classes)
    if config.probes():
        held_out = probe_held_out(context, config, n_classes)
    held_labels = None if held_out is None else held_out[1]
    stages: list[StagePlan] = []
    left = math.inf if budget is None else budget.images
    if fits:
        prompt_held = 0 if config.fit_prompts is True or held_labels is None else len(held_labels)
        cost = prompt_check_cost(bundle, shots, prompt_held)
        allowance = None if budget is None else budget.prompt_allowance()
        steps = cost.affordable_steps(allowance, config.prompt_steps)
        spent = cost.budget_images(steps) if steps else 0
        stages.append(
            StagePlan(
                "prompt fitting",
                image_forwards=cost.images if steps else 0,
                text_passes=steps * cost.prompts,
            )
        )
        left -= spent
    per_draw = screening_cost(config, shots) - len(shots.labels)
    refining = config.refine and config.refine_steps > 0
    screen_left = SCREEN_SHARE * left if refining else left
    # the inversion runs whole steps of every class's batch, or none
    step = config.class_batch_size * n_classes
    inversion = min(draws * per_draw, step * (screen_left // step))
    stages.append(
        StagePlan(
            "per-class inversion",
            image_passes=int(inversion),
            condition=None
            if draws == 1
            else f"draws 2-{draws}: first draw near the threshold (screen_again)",
        )
    )
    stages.append(StagePlan("text alignment", image_forwards=draws * len(shots.labels)))
    left -= inversion + draws * len(shots.labels)
    for stage in _probe_stages(shots, config, held_labels):
        share = min(1.0, max(left, 0) / max(stage.image_passes + stage.image_forwards, 1))
        stage = StagePlan(
            stage.name,
            image_passes=int(stage.image_passes * share),
            image_forwards=int(stage.image_forwards * share),
            condition=stage.condition,
        )
        stages.append(stage)
        left -= stage.image_passes + stage.image_forwards
    if refining:
        stages.append(
            StagePlan(
                "refinement",
                image_passes=int(min(config.refine_steps * config.refine_batch_size, max(left, 0))),
                condition="only when the verdict is not clean" if not config.refine_clean else None,
            )
        )
    return stages


def _reference_stages(shots: ShotSet, config: ScanConfig, context: RunContext) -> list[StagePlan]:
    """The reference contrast's most passes (:func:`~clipguard_cbpt.reference.contrast_cost`;
    none without a reference), counted at the suspect's unit costs."""
    if config.reference is None:
        return []
    spec = config.additive_probe()
    held_out = probe_held_out(context, config, len(shots.classnames))
    passes, forwards = contrast_cost(
        shots.labels,
        len(shots.classnames),
        config.probe_shots,
        spec.steps,
        spec.band,
        None if held_out is None else held_out[1],
        config.probe_held_out_max,
    )
    return [
        StagePlan(
            "reference contrast",
            image_passes=passes,
            image_forwards=forwards,
            condition="always, outside the budget (both models)",
        )
    ]


def scan_plan(
    bundle: ModelBundle,
    shots: ShotSet,
    config: ScanConfig,
    context: RunContext,
    draws: int | None = None,
) -> ScanPlan:
    """The plan of a cbpt scan offered ``draws`` shot draws (None: what ``context``
    offers): per stage, at most how many passes, within the budget in force
    (:func:`budget_in_force`), the reference contrast first where there is one; the budget at
    which none is cut (:func:`needed_budget`)."""
    draws = _draws_on_offer(context) if draws is None else draws
    budget = budget_in_force(config, context, bundle)
    stages = _reference_stages(shots, config, context) + _stages(
        bundle, shots, config, context, draws, budget
    )
    needed = needed_budget(bundle, shots, config, context, draws)
    notes = []
    if budget.source == "max-minutes":
        notes.append(
            f"--max-minutes lowers the budget from {config.budget:,} to {budget.images:,} images"
        )
    elif budget.source == "compute":
        notes.append(
            f"compute_budget ({config.compute_budget:,.0f} GFLOPs) buys {budget.images:,} of "
            f"the {config.budget:,} images on this model"
        )
    if needed > budget.images:
        notes.append(
            f"the budget ({budget.images:,}) may cut stages short; {needed:,} would cut none "
            "(a clean scan whose budget cut a stage is inconclusive)"
        )
    return ScanPlan(stages=stages, budget=budget.images, budget_needed=needed, notes=notes)


def _inversion_cut(screening: Screening, config: ScanConfig) -> bool:
    """Whether the budget stopped a draw's per-class inversion: it ended before
    ``class_steps`` with a class that was still searching (a class that never met its
    success share stops only at ``class_steps`` or when the budget ends)."""
    steps = [r.steps for r in screening.inversions]
    if not steps:
        return False
    ran = max(steps)
    return ran < config.class_steps and any(
        not r.reached and r.steps == ran for r in screening.inversions
    )


def shortfalls(
    reading: PromptReading, screening: Screening, suspected: Suspicion, config: ScanConfig
) -> list[str]:
    """The stages that bear on the verdict and that the budget cut short: the prompt
    check's fitting, a draw's per-class inversion (:func:`_inversion_cut`), a reach probe
    (skipped, or fewer steps than asked). The refinement is not among them: it shapes the
    trigger written out, not the verdict."""
    found = []
    if reading.cut:
        found.append(
            f"prompt fitting ran {reading.steps} of {reading.steps_wanted} steps"
            if reading.steps
            else "prompt fitting skipped"
        )
    draws = screening.draws or [screening]
    cut = [i + 1 for i, draw in enumerate(draws) if _inversion_cut(draw, config)]
    if cut:
        which = ", ".join(str(i) for i in cut)
        found.append(f"per-class inversion stopped early on shot draw {which}")
    steps = {spec.family.name: spec.steps for spec in config.probes()}
    for name, reach in suspected.probes.items():
        if reach.skipped is not None:
            found.append(f"{name} reach probe skipped")
        elif reach.steps < steps.get(name, 0):
            found.append(f"{name} reach probe ran {reach.steps} of {steps[name]} steps")
    return found


def _seconds_of(
    bundle: ModelBundle, shots: ShotSet, config: ScanConfig, context: RunContext, draws: int
) -> float | None:
    """Projected seconds of an uncut scan of ``draws`` draws at the run's unit costs."""
    if context.unit_costs is None:
        return None
    stages = _stages(bundle, shots, config, context, draws, budget=None)
    return sum(stage_seconds(stage, context.unit_costs) for stage in stages)


def next_steps(
    verdict: str,
    cut: list[str],
    budget: Budget,
    bundle: ModelBundle,
    shots: ShotSet,
    config: ScanConfig,
    context: RunContext,
) -> list[NextStep]:
    """What to run to settle an inconclusive scan (none for another verdict): with more
    shot draws (at least :data:`ADVISED_DRAWS`, two more than offered) where the evidence
    itself lies in the inconclusive band, and a budget that cuts no stage of that scan
    (``-o budget=`` and ``-o compute_budget=`` as needed or, where a time budget set it,
    ``--max-minutes``) where the budget cut
    one short (``cut``) or would cut the scan with more draws."""
    if verdict != "inconclusive":
        return []
    offered = _draws_on_offer(context)
    draws = offered if cut else max(ADVISED_DRAWS, offered + 2)
    needed = needed_budget(bundle, shots, config, context, draws)
    args: list[str] = [] if draws == offered else ["--draws", str(draws)]
    why = []
    if draws != offered:
        why.append(
            f"screen {draws} shot draws instead of {offered}: the evidence lies between the "
            "inconclusive and the backdoor threshold, and the median over more draws is "
            "steadier (where it stays between them, more draws will not decide)"
        )
    if needed > budget.images:
        seconds = _seconds_of(bundle, shots, config, context, draws)
        took = f" (about {minutes(seconds)} on this device)" if seconds is not None else ""
        if budget.source == "max-minutes" and seconds is not None:
            args += ["--max-minutes", str(math.ceil(1.25 * seconds / 60))]
            why.append(f"give the scan time for its whole budget of {needed:,} images{took}")
        else:
            if budget.source == "option" or needed > config.budget:
                args += ["-o", f"budget={needed}"]
            if needed > compute_images(config, bundle):
                gflops = math.ceil(needed * image_flops(bundle) / 1e9)
                args += ["-o", f"compute_budget={gflops}"]
            why.append(f"raise the budget to {needed:,} images so no stage is cut short{took}")
    if cut:
        why.insert(0, f"the budget cut the scan short ({'; '.join(cut)})")
    return [NextStep(args=args, text="; ".join(why))] if args else []
