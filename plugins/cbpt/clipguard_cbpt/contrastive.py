"""Stage 1 of CBPT: the contrastive trigger inversion, refined towards its dominant class.

The contrastive objective (``docs/method.md``) pulls the features of triggered images (and of
augmented views of them) together and away from the clean features of the same images (and
of their augmented views). A mask-size term ``lambda * |m|_1 / (H W)`` with an adaptive
``lambda`` (zero until the collapse target is reached, then raised while it holds and lowered
when it breaks) yields the smallest trigger that still collapses the features.

The purifier runs it when asked (``inversion_method = "contrastive"``); on the lab models it
sent the shots to a class with a natural trigger instead of the backdoor target
(docs/method.md), so no scan verdict rests on it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from clipguard.augment import apply_affine, random_affine
from clipguard.components import RunContext, ShotSet
from clipguard.features import encode_images, mean_pairwise_cosine
from clipguard.model import ModelBundle
from clipguard.progress import Progress
from clipguard.prompts import PromptClassifier
from clipguard.triggers import MaskPatternTrigger
from clipguard_cbpt.inversion import (
    InversionConfig,
    InversionResult,
    LambdaSchedule,
    TriggerParameters,
    budget_left,
    invert_targeted,
)
from clipguard_cbpt.statistics import prediction_distribution, relative_collapse


class ContrastiveConfig(InversionConfig):
    """Settings of the contrastive inversion: the targeted inversion's (its refinement), plus
    the restarts, steps, temperature and collapse target of the contrastive objective."""

    steps: int = Field(200, ge=1, description="maximum steps of the kept restart, probe included")
    restarts: int = Field(3, ge=1, description="random initialisations probed; the best continues")
    probe_steps: int = Field(30, ge=1, description="steps each restart gets before the choice")
    temperature: float = Field(0.07, gt=0, description="contrastive temperature tau")
    collapse_target: float = Field(
        0.8,
        gt=0,
        lt=1,
        description=(
            "relative collapse to reach: (mean pairwise cosine of triggered features - the "
            "same for clean features) / (1 - the clean one)"
        ),
    )
    lambda_from_start: bool = Field(
        True,
        description="apply lambda_init from the first step (else 0 until the first collapse)",
    )


def contrastive_loss(
    triggered: torch.Tensor, clean: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The CBPT contrastive inversion loss.

    ``triggered`` (``A x E``) are normalised features of triggered images, several views per
    image allowed; ``clean`` (``K x E``) are normalised clean features (the same images, and
    their views). For every anchor ``z_i``: positives are all other triggered features,
    negatives all clean features; the loss is ``-mean_i log(P_i / (P_i + N_i))`` computed with
    log-sum-exp. Returns a scalar.
    """
    if triggered.shape[0] < 2:
        raise ValueError("the contrastive loss needs at least two triggered features")
    sim_pos = triggered @ triggered.T / temperature
    eye = torch.eye(sim_pos.shape[0], dtype=torch.bool, device=sim_pos.device)
    sim_pos = sim_pos.masked_fill(eye, float("-inf"))
    log_p = torch.logsumexp(sim_pos, dim=1)
    log_n = torch.logsumexp(triggered @ clean.T / temperature, dim=1)
    log_all = torch.logaddexp(log_p, log_n)
    return (log_all - log_p).mean()


class _ContrastiveRun:
    """One restart of the contrastive inversion: parameters, optimiser, schedule, kept trigger."""

    def __init__(
        self,
        bundle: ModelBundle,
        pixels: torch.Tensor,
        clean_all: torch.Tensor,
        clean_cos: float,
        config: ContrastiveConfig,
        generator: torch.Generator,
        restart: int,
    ) -> None:
        self.bundle, self.pixels, self.clean_all = bundle, pixels, clean_all
        self.clean_cos, self.config, self.generator = clean_cos, config, generator
        self.restart = restart
        self.params = TriggerParameters(bundle.image_size, config.mask_init, generator)
        self.optimizer = torch.optim.Adam(self.params.parameters(), lr=config.lr)
        self.schedule = LambdaSchedule.starting(
            config.lambda_init, config.lambda_up, config.lambda_down, config.lambda_from_start
        )
        self.best: MaskPatternTrigger | None = None
        self.best_pl1 = math.inf
        self.top_collapse = -math.inf
        self.top_trigger: MaskPatternTrigger | None = None
        self.last_window = -math.inf
        self.window: list[float] = []
        self.stale = 0
        self.steps = 0
        self.stopped = False

    def step(self) -> None:
        """One optimisation step on a random batch (2 or 3 encoder passes of the batch)."""
        config, bundle = self.config, self.bundle
        n = self.pixels.shape[0]
        batch = min(config.batch_size, n)
        index = torch.randperm(n, generator=self.generator)[:batch]
        x = self.pixels[index]
        triggered = self.params.apply(x)
        z = bundle.encode_image(triggered)
        views, negatives = [z], [self.clean_all[index]]
        if config.augment:
            theta = random_affine(batch, config.crop_scale, self.generator)
            views.append(bundle.encode_image(apply_affine(triggered, theta)))
            with torch.no_grad():
                negatives.append(bundle.encode_image(apply_affine(x, theta)))
        loss_con = contrastive_loss(torch.cat(views), torch.cat(negatives), config.temperature)
        loss = loss_con + self.schedule.value * self.params.mask().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        collapse = relative_collapse(mean_pairwise_cosine(z.detach()), self.clean_cos)
        self.window.append(collapse)
        if collapse > self.top_collapse:
            self.top_collapse, self.top_trigger = collapse, self.params.trigger()
        if self.steps % config.check_every == 0:
            self.last_window = sum(self.window) / len(self.window)
            met = self.last_window >= config.collapse_target
            self.window = []
            self.schedule.update(met)
            pl1 = float(self.params.mask().mean().item())
            if met and collapse >= config.collapse_target and pl1 < self.best_pl1 * 0.99:
                self.best, self.best_pl1, self.stale = self.params.trigger(), pl1, 0
            elif self.schedule.reached:
                self.stale += 1
            if self.stale >= config.early_stop_windows:
                self.stopped = True

    def rank(self) -> tuple[int, float]:
        """Sort key, smaller is better: reached runs by kept mask size, others by collapse."""
        if self.best is not None:
            return (0, self.best_pl1)
        return (1, -max(self.last_window, self.top_collapse))

    def result(self) -> InversionResult:
        """The kept trigger: the smallest collapsing one, else the most collapsed one."""
        kept = self.best if self.best is not None else self.top_trigger
        if kept is None:
            kept = self.params.trigger()
        return InversionResult(
            trigger=kept,
            pl1=float(kept.mask.mean().item()),
            collapse=0.0,
            reached=self.best is not None,
            steps=self.steps,
            restart=self.restart,
            lambda_history=list(self.schedule.history),
        )


def invert_contrastive(
    bundle: ModelBundle,
    pixels: torch.Tensor,
    config: ContrastiveConfig,
    generator: torch.Generator,
    progress: Progress | None = None,
    budget: int | None = None,
) -> InversionResult:
    """Invert the smallest trigger that collapses the features of ``pixels`` (``N x 3 x H x W``).

    ``config.restarts`` random initialisations are each probed for ``config.probe_steps``
    steps; the most promising one (reached the collapse target with the smallest mask, else
    the most collapsed) then continues up to ``config.steps`` steps in all, or until no
    smaller collapsing mask was found for ``config.early_stop_windows`` windows, or until
    the image-encoder ``budget`` (default ``config.budget``) would be exceeded. The result's
    ``collapse`` is measured on all shots (one more encoder pass over them). Deterministic
    for ``generator``.
    """
    progress = progress or Progress(quiet=True)
    budget = config.budget if budget is None else budget
    start_images = bundle.image_encoder_images
    clean_all = encode_images(bundle, pixels)
    clean_cos = mean_pairwise_cosine(clean_all)
    batch = min(config.batch_size, pixels.shape[0])
    per_step = batch * (3 if config.augment else 1)
    # keep room for the final pass over the shots
    usable = budget - 2 * pixels.shape[0]
    probe = min(config.probe_steps, config.steps)
    probe = max(1, min(probe, (usable // per_step) // (config.restarts + 1)))
    total = max(config.steps, probe)
    runs: list[_ContrastiveRun] = []
    with progress.task("contrastive inversion", config.restarts * probe + total - probe) as advance:
        for restart in range(config.restarts):
            run = _ContrastiveRun(bundle, pixels, clean_all, clean_cos, config, generator, restart)
            runs.append(run)
            for _ in range(probe):
                if budget_left(bundle, start_images, usable) < per_step and run.steps > 0:
                    break
                run.step()
                advance(1)
                if run.stopped:
                    break
        chosen = min(runs, key=lambda r: r.rank())
        while chosen.steps < total and not chosen.stopped:
            if budget_left(bundle, start_images, usable) < per_step:
                break
            chosen.step()
            advance(1)
    result = chosen.result()
    features = encode_images(bundle, result.trigger.apply(pixels))
    result.collapse = relative_collapse(mean_pairwise_cosine(features), clean_cos)
    result.restarts = [
        {
            "restart": r.restart,
            "steps": r.steps,
            "reached": r.best is not None,
            "kept_pl1": r.best_pl1 if r.best is not None else None,
            "top_batch_collapse": r.top_collapse,
            "chosen": r is chosen,
        }
        for r in runs
    ]
    return result


def run_inversion(
    bundle: ModelBundle, shots: ShotSet, config: ContrastiveConfig, context: RunContext
) -> tuple[InversionResult, InversionResult | None, dict[str, Any], dict[str, Any]]:
    """Contrastive inversion plus optional targeted refinement on ``shots``.

    Returns the contrastive result, the refined result (None when ``refine`` is off or no
    budget is left), the prediction statistics of the contrastive trigger, and those of the
    refined one (empty without refinement). Deterministic for ``context.seed``.
    """
    classifier = PromptClassifier(bundle, shots.classnames)
    start_images = bundle.image_encoder_images
    with context.stage("inversion"):
        generator = context.generator(0)
        contrastive = invert_contrastive(
            bundle,
            shots.pixels,
            config,
            generator,
            context.progress,
            budget=config.budget if not config.refine else int(config.budget * 0.75),
        )
        stats = prediction_distribution(
            classifier.predict, shots.pixels, shots.labels, contrastive.trigger, shots.classnames
        )
    refined: InversionResult | None = None
    refined_stats: dict[str, Any] = {}
    left = config.budget - (bundle.image_encoder_images - start_images)
    if config.refine and config.refine_steps > 0 and left > config.batch_size:
        with context.stage("refinement"):
            refined = invert_targeted(
                bundle,
                shots.pixels,
                shots.labels,
                classifier.class_features,
                int(stats["dominant_index"]),
                config,
                context.generator(1),
                start=contrastive.trigger,
                progress=context.progress,
                budget=left,
            )
            refined_stats = prediction_distribution(
                classifier.predict,
                shots.pixels,
                shots.labels,
                refined.trigger,
                shots.classnames,
            )
    return contrastive, refined, stats, refined_stats
