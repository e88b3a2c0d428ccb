"""Stage 1 of CBPT: contrastive trigger inversion, and a targeted (Neural-Cleanse-like) refinement.

A dummy trigger is a mask ``m`` (``1 x H x W``) and a pattern ``p`` (``3 x H x W``), both in
``[0, 1]`` through a tanh parametrisation, applied in pixel space as
``T(x) = (1 - m) * x + m * p`` before the model's normalisation.

The contrastive objective (``docs/method.md``) pulls the features of triggered images (and of
augmented views of them) together and away from the clean features of the same images (and
of their augmented views). A mask-size term ``lambda * |m|_1 / (H W)`` with an adaptive
``lambda`` (zero until the collapse target is reached, then raised while it holds and lowered
when it breaks) yields the smallest trigger that still collapses the features.

Everything here is deterministic for a given ``torch.Generator`` on CPU, and every image
encoder pass goes through :meth:`ModelBundle.encode_image`, so ``image_encoder_images``
counts the cost and an encoder-pass ``budget`` bounds it.
"""

from __future__ import annotations

import math
import statistics
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from clipguard.augment import apply_affine, random_affine
from clipguard.model import ModelBundle
from clipguard.progress import Progress
from clipguard.triggers import MaskPatternTrigger, Trigger

_EPS = 1e-6


# --------------------------------------------------------------------------- configuration


class InversionConfig(BaseModel):
    """Options of the contrastive trigger inversion (and of the targeted refinement)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(200, ge=1, description="maximum steps of the kept restart, probe included")
    restarts: int = Field(3, ge=1, description="random initialisations probed; the best continues")
    probe_steps: int = Field(30, ge=1, description="steps each restart gets before the choice")
    batch_size: int = Field(32, ge=2, description="clean shots per step")
    temperature: float = Field(0.07, gt=0, description="contrastive temperature tau")
    lr: float = Field(0.1, gt=0, description="Adam learning rate on the tanh parameters")
    mask_init: float = Field(0.02, gt=0, lt=1, description="initial mean mask value")
    augment: bool = Field(True, description="augmented positive/negative views")
    crop_scale: float = Field(
        0.7, gt=0, le=1, description="smallest side fraction of the random resized crop"
    )
    collapse_target: float = Field(
        0.8,
        gt=0,
        lt=1,
        description=(
            "relative collapse to reach: (mean pairwise cosine of triggered features - the "
            "same for clean features) / (1 - the clean one)"
        ),
    )
    lambda_init: float = Field(
        1.0, gt=0, description="mask weight set when the collapse target is first reached"
    )
    lambda_from_start: bool = Field(
        True,
        description="apply lambda_init from the first step (else 0 until the first collapse)",
    )
    lambda_up: float = Field(1.5, gt=1, description="factor raising lambda while collapse holds")
    lambda_down: float = Field(
        1.5**1.5, gt=1, description="factor lowering lambda when the collapse breaks"
    )
    check_every: int = Field(10, ge=1, description="steps per lambda-schedule window")
    early_stop_windows: int = Field(
        8,
        ge=1,
        description="stop a restart after this many windows without a smaller collapsing mask",
    )
    refine: bool = Field(
        True, description="refine the best trigger towards the dominant class (targeted)"
    )
    refine_steps: int = Field(150, ge=0, description="maximum steps of the targeted refinement")
    refine_success: float = Field(
        0.9, gt=0, le=1, description="share of triggered shots the refinement must send to target"
    )
    class_steps: int = Field(
        300, ge=1, description="most steps of the per-class inversion (all classes at once)"
    )
    class_batch_size: int = Field(
        8, ge=1, description="shots per class and step of the per-class inversion"
    )
    class_success: float = Field(
        0.95,
        gt=0,
        le=1,
        description="share of a class's batch that must reach the class for its trigger to count",
    )
    class_patience: int = Field(
        60,
        ge=1,
        description="a class stops after this many steps without a 1 % smaller kept mask",
    )
    budget: int = Field(
        60_000,
        ge=1,
        description="maximum images through the image encoder for the whole inversion",
    )


# --------------------------------------------------------------------------- trigger params


def to_unit(weight: torch.Tensor) -> torch.Tensor:
    """The tanh parametrisation of masks and patterns: ``(tanh(w) + 1) / 2`` in ``[0, 1]``."""
    return (torch.tanh(weight) + 1) / 2


class TriggerParameters(torch.nn.Module):
    """A mask and a pattern in ``[0, 1]`` through ``(tanh(w) + 1) / 2``."""

    def __init__(self, image_size: int, mask_init: float, generator: torch.Generator) -> None:
        super().__init__()
        base = math.atanh(2 * mask_init - 1)
        noise = torch.randn(1, image_size, image_size, generator=generator) * 0.5
        self.mask_weight = torch.nn.Parameter(base + noise)
        self.pattern_weight = torch.nn.Parameter(
            torch.randn(3, image_size, image_size, generator=generator)
        )

    @classmethod
    def from_trigger(cls, trigger: MaskPatternTrigger) -> TriggerParameters:
        """Parameters that reproduce ``trigger`` (values clamped just inside ``(0, 1)``)."""
        params = cls.__new__(cls)
        torch.nn.Module.__init__(params)
        mask = trigger.mask.detach().float().clamp(1e-4, 1 - 1e-4)
        pattern = trigger.pattern.detach().float().clamp(1e-4, 1 - 1e-4)
        params.mask_weight = torch.nn.Parameter(torch.atanh(2 * mask - 1))
        params.pattern_weight = torch.nn.Parameter(torch.atanh(2 * pattern - 1))
        return params

    def mask(self) -> torch.Tensor:
        """The mask ``1 x H x W`` in ``[0, 1]``."""
        return to_unit(self.mask_weight)

    def pattern(self) -> torch.Tensor:
        """The pattern ``3 x H x W`` in ``[0, 1]``."""
        return to_unit(self.pattern_weight)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """``(1 - m) * x + m * p`` for images ``B x 3 x H x W`` (differentiable)."""
        mask = self.mask()
        return (1 - mask) * images + mask * self.pattern()

    def trigger(self) -> MaskPatternTrigger:
        """A detached :class:`MaskPatternTrigger` copy of the current parameters."""
        return MaskPatternTrigger(
            mask=self.mask().detach().clone(),
            pattern=self.pattern().detach().clone(),
            family="inverted",
        )


# --------------------------------------------------------------------------- augmentation


# --------------------------------------------------------------------------- losses


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


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity over distinct pairs of normalised ``features`` (``N x E``)."""
    n = features.shape[0]
    if n < 2:
        return 1.0
    gram = features @ features.T
    return float(((gram.sum() - gram.diagonal().sum()) / (n * (n - 1))).item())


def relative_collapse(triggered_cos: float, clean_cos: float) -> float:
    """How far triggered features collapsed, from 0 (as spread as clean) to 1 (one point)."""
    return (triggered_cos - clean_cos) / max(1 - clean_cos, _EPS)


# --------------------------------------------------------------------------- helpers


@torch.no_grad()
def encode_batched(
    bundle: ModelBundle, pixels: torch.Tensor, batch_size: int = 128
) -> torch.Tensor:
    """Normalised image features of ``pixels``, computed in batches, without gradients."""
    return torch.cat([bundle.encode_image(chunk) for chunk in pixels.split(batch_size)])


@dataclass
class LambdaSchedule:
    """Neural-Cleanse-style adaptive mask weight.

    ``lambda`` starts at ``start`` (0 or ``init``) and stays there until the target is met
    for the first time ("reach the collapse"); from then on, after every window it is
    multiplied by ``up`` when the target held and divided by ``down`` when not (a ``start``
    of 0 jumps to ``init`` at the first success).
    """

    init: float
    up: float
    down: float
    value: float = 0.0

    @classmethod
    def starting(cls, init: float, up: float, down: float, from_start: bool) -> LambdaSchedule:
        """A schedule whose weight is ``init`` from the first step (or 0 until success)."""
        return cls(init=init, up=up, down=down, value=init if from_start else 0.0)

    reached: bool = False
    history: list[float] = field(default_factory=list)

    def update(self, met: bool) -> None:
        """Advance one window; ``met`` says whether the target held during it."""
        if met and not self.reached:
            self.reached = True
            self.value = self.init if self.value == 0 else self.value * self.up
        elif self.reached:
            self.value = self.value * self.up if met else self.value / self.down
        self.history.append(self.value)


@dataclass
class InversionResult:
    """The kept trigger of an inversion and how it was found."""

    trigger: MaskPatternTrigger
    pl1: float
    collapse: float
    reached: bool
    steps: int
    restart: int
    restarts: list[dict[str, Any]] = field(default_factory=list)
    lambda_history: list[float] = field(default_factory=list)


def _budget_left(bundle: ModelBundle, start: int, budget: int) -> int:
    return budget - (bundle.image_encoder_images - start)


# --------------------------------------------------------------------------- contrastive


class _ContrastiveRun:
    """One restart of the contrastive inversion: parameters, optimiser, schedule, kept trigger."""

    def __init__(
        self,
        bundle: ModelBundle,
        pixels: torch.Tensor,
        clean_all: torch.Tensor,
        clean_cos: float,
        config: InversionConfig,
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
    config: InversionConfig,
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
    clean_all = encode_batched(bundle, pixels)
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
                if _budget_left(bundle, start_images, usable) < per_step and run.steps > 0:
                    break
                run.step()
                advance(1)
                if run.stopped:
                    break
        chosen = min(runs, key=lambda r: r.rank())
        while chosen.steps < total and not chosen.stopped:
            if _budget_left(bundle, start_images, usable) < per_step:
                break
            chosen.step()
            advance(1)
    result = chosen.result()
    features = encode_batched(bundle, result.trigger.apply(pixels))
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


# --------------------------------------------------------------------------- targeted


def invert_targeted(
    bundle: ModelBundle,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_features: torch.Tensor,
    target: int,
    config: InversionConfig,
    generator: torch.Generator,
    start: MaskPatternTrigger | None = None,
    progress: Progress | None = None,
    budget: int | None = None,
) -> InversionResult:
    """Neural-Cleanse-like inversion: the smallest trigger sending shots to class ``target``.

    Loss: cross-entropy of ``s * f(T(x)) . class_features`` towards ``target`` over shots
    whose label is not ``target``, plus ``lambda * mean(m)`` with the same adaptive schedule;
    the success criterion is a share ``config.refine_success`` of the batch predicted as
    ``target``. Starts from ``start`` when given. At most ``config.refine_steps`` steps and
    ``budget`` encoder images. ``reached`` is False if no step met the criterion (then the
    trigger with the highest success is kept).
    """
    progress = progress or Progress(quiet=True)
    budget = config.budget if budget is None else budget
    start_images = bundle.image_encoder_images
    keep = labels != target
    source = pixels[keep] if bool(keep.any()) else pixels
    n = source.shape[0]
    batch = min(config.batch_size, n)
    max_steps = min(config.refine_steps, max(budget // batch, 0))
    if start is not None:
        params = TriggerParameters.from_trigger(start)
    else:
        params = TriggerParameters(bundle.image_size, config.mask_init, generator)
    optimizer = torch.optim.Adam(params.parameters(), lr=config.lr)
    schedule = LambdaSchedule(config.lambda_init, config.lambda_up, config.lambda_down)
    goal = torch.full((batch,), target, dtype=torch.long)
    scale = bundle.logit_scale
    best: MaskPatternTrigger | None = None
    best_pl1 = math.inf
    top_success, top_trigger = -1.0, params.trigger()
    window: list[float] = []
    stale = 0
    step = 0
    with progress.task(f"targeted refinement -> class {target}", max(max_steps, 1)) as advance:
        for step in range(1, max_steps + 1):
            index = torch.randperm(n, generator=generator)[:batch]
            x = source[index]
            if config.augment:
                theta = random_affine(batch, config.crop_scale, generator)
                x = apply_affine(x, theta)
            logits = scale * bundle.encode_image(params.apply(x)) @ class_features.T
            loss_ce = F.cross_entropy(logits, goal[: x.shape[0]])
            loss = loss_ce + schedule.value * params.mask().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            success = float((logits.argmax(dim=1) == target).float().mean().item())
            window.append(success)
            advance(1)
            if success > top_success:
                top_success, top_trigger = success, params.trigger()
            if step % config.check_every == 0:
                met = sum(window) / len(window) >= config.refine_success
                window = []
                schedule.update(met)
                pl1 = float(params.mask().mean().item())
                if met and success >= config.refine_success and pl1 < best_pl1 * 0.99:
                    best, best_pl1, stale = params.trigger(), pl1, 0
                elif schedule.reached:
                    stale += 1
                if stale >= config.early_stop_windows:
                    break
            if _budget_left(bundle, start_images, budget) < batch:
                break
    kept = best if best is not None else top_trigger
    return InversionResult(
        trigger=kept,
        pl1=float(kept.mask.mean().item()),
        collapse=0.0,
        reached=best is not None,
        steps=step,
        restart=0,
        lambda_history=list(schedule.history),
    )


# --------------------------------------------------------------------------- per class


def invert_per_class(
    bundle: ModelBundle,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_features: torch.Tensor,
    config: InversionConfig,
    generator: torch.Generator,
    progress: Progress | None = None,
    budget: int | None = None,
) -> list[InversionResult]:
    """The smallest trigger towards every class, all classes optimised in one encoder call.

    For class ``k`` the loss on a batch of ``config.class_batch_size`` shots whose label is
    not ``k`` is the cross-entropy of ``s f(T_k(x)) . class_features`` towards ``k`` plus
    ``lambda_k * mean(m_k)``. ``lambda_k`` is 0 until the batch success (share predicted as
    ``k``) first reaches ``config.class_success``, then follows the windowed schedule of
    :class:`LambdaSchedule` (``config.check_every`` steps per window). The kept trigger of a
    class is the smallest one whose batch met the success share; a class stops after
    ``config.class_patience`` steps without a 1 % smaller kept mask. Every class's loss
    depends only on its own trigger, so stacking the classes is the same optimisation as
    running them one after the other, with far larger (cheaper per image) encoder batches.

    Runs at most ``config.class_steps`` steps and ``budget`` (default ``config.budget``)
    encoder images. Result ``k`` has ``reached`` False when no batch met the share (then the
    trigger with the highest batch success is kept) and ``collapse`` 0 (not measured).
    Deterministic for ``generator``.
    """
    progress = progress or Progress(quiet=True)
    budget = config.budget if budget is None else budget
    start_images = bundle.image_encoder_images
    n_classes = int(class_features.shape[0])
    size = bundle.image_size
    batch = config.class_batch_size
    pools = [torch.nonzero(labels != k).flatten() for k in range(n_classes)]
    base = math.atanh(2 * config.mask_init - 1)
    mask_weight = base + 0.1 * torch.randn(n_classes, 1, size, size, generator=generator)
    pattern_weight = 0.5 * torch.randn(n_classes, 3, size, size, generator=generator)
    mask_weight.requires_grad_(True)
    pattern_weight.requires_grad_(True)
    optimizer = torch.optim.Adam([mask_weight, pattern_weight], lr=config.lr, betas=(0.5, 0.9))
    schedules = [
        LambdaSchedule.starting(config.lambda_init, config.lambda_up, config.lambda_down, False)
        for _ in range(n_classes)
    ]
    windows: list[list[float]] = [[] for _ in range(n_classes)]
    kept: list[MaskPatternTrigger | None] = [None] * n_classes
    kept_pl1 = [math.inf] * n_classes
    top: list[tuple[float, MaskPatternTrigger | None]] = [(-1.0, None)] * n_classes
    stale = [0] * n_classes
    steps_of = [0] * n_classes
    active = [k for k in range(n_classes) if len(pools[k]) > 0]
    scale = bundle.logit_scale
    with progress.task("per-class trigger inversion", config.class_steps) as advance:
        for _ in range(config.class_steps):
            if not active or _budget_left(bundle, start_images, budget) < batch * len(active):
                break
            rows = []
            for k in active:
                pool = pools[k]
                if len(pool) >= batch:
                    rows.append(pool[torch.randperm(len(pool), generator=generator)[:batch]])
                else:
                    rows.append(pool[torch.randint(len(pool), (batch,), generator=generator)])
            chosen = torch.tensor(active)
            mask, pattern = to_unit(mask_weight[chosen]), to_unit(pattern_weight[chosen])
            clean = pixels[torch.stack(rows)]
            triggered = (1 - mask.unsqueeze(1)) * clean + (mask * pattern).unsqueeze(1)
            logits = scale * bundle.encode_image(triggered.flatten(0, 1)) @ class_features.T
            goal = chosen.repeat_interleave(batch)
            ce = F.cross_entropy(logits, goal, reduction="none").view(len(active), batch)
            pl1 = mask.flatten(1).mean(dim=1)
            weights = torch.tensor([schedules[k].value for k in active])
            loss = (ce.mean(dim=1) + weights * pl1).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            hits = (logits.argmax(dim=1) == goal).float().view(len(active), batch).mean(dim=1)
            for row, k in enumerate(active):
                steps_of[k] += 1
                success, current = float(hits[row]), float(pl1[row].detach())
                met = success >= config.class_success - _EPS
                snapshot = None
                if success > top[k][0]:
                    snapshot = _class_trigger(mask[row], pattern[row])
                    top[k] = (success, snapshot)
                stale[k] += 1
                if met and current < kept_pl1[k]:
                    if current < kept_pl1[k] * 0.99:
                        stale[k] = 0
                    kept[k] = snapshot or _class_trigger(mask[row], pattern[row])
                    kept_pl1[k] = current
                windows[k].append(1.0 if met else 0.0)
                if not schedules[k].reached and met:
                    schedules[k].update(True)
                    windows[k] = []
                elif len(windows[k]) >= config.check_every:
                    schedules[k].update(sum(windows[k]) / len(windows[k]) >= 0.5)
                    windows[k] = []
            active = [k for k in active if kept[k] is None or stale[k] < config.class_patience]
            advance(1)
    results = []
    for k in range(n_classes):
        trigger = kept[k] if kept[k] is not None else top[k][1]
        if trigger is None:  # a class with no other-class shot, or no step at all
            trigger = _class_trigger(to_unit(mask_weight[k]), to_unit(pattern_weight[k]))
        results.append(
            InversionResult(
                trigger=trigger,
                pl1=float(trigger.mask.mean().item()),
                collapse=0.0,
                reached=kept[k] is not None,
                steps=steps_of[k],
                restart=0,
                lambda_history=list(schedules[k].history),
            )
        )
    return results


# --------------------------------------------------------------------------- reach probes


class ProbeFamily(ABC):
    """A family of small universal image transformations, one per class, for :func:`probe_reach`.

    Each class ``k`` gets its own parameters (row ``k`` of :meth:`initial`), starting at the
    identity transformation; :meth:`bound` projects them back into the family after every step.
    """

    #: the probe's name in reports ("additive", "warp")
    name: ClassVar[str]
    #: the kind of backdoor it signals, for explanations ("full-image", "warping")
    signal: ClassVar[str]

    @abstractmethod
    def initial(self, n_classes: int, image_shape: tuple[int, ...]) -> torch.Tensor:
        """The identity parameters of ``n_classes`` transformations of ``image_shape`` images."""

    @abstractmethod
    def apply(self, images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        """``images`` transformed by one class's ``parameters`` (differentiable, in ``[0, 1]``)."""

    @abstractmethod
    def bound(self, parameters: torch.Tensor) -> None:
        """Project ``parameters`` into the family, in place."""

    @property
    @abstractmethod
    def lr(self) -> float:
        """Adam learning rate of the fit."""

    @abstractmethod
    def settings(self) -> dict[str, float]:
        """The family's bounds, for reports."""

    @abstractmethod
    def describe(self) -> str:
        """One transformation of the family in words, for explanations."""

    @abstractmethod
    def rescaled(self, factor: float) -> ProbeFamily:
        """The same family with its bound multiplied by ``factor``."""


@dataclass(frozen=True)
class AdditivePerturbation(ProbeFamily):
    """``clamp(x + d, 0, 1)`` with ``|d| <= epsilon`` per pixel: the reach of full-image
    additive or blended triggers (SIG, blended, sample-specific noise)."""

    epsilon: float
    name: ClassVar[str] = "additive"
    signal: ClassVar[str] = "full-image"

    def initial(self, n_classes: int, image_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(n_classes, *image_shape)

    def apply(self, images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        return (images + parameters).clamp(0, 1)

    def bound(self, parameters: torch.Tensor) -> None:
        parameters.clamp_(-self.epsilon, self.epsilon)

    @property
    def lr(self) -> float:
        return self.epsilon / 10

    def settings(self) -> dict[str, float]:
        return {"epsilon": self.epsilon}

    def describe(self) -> str:
        return f"a perturbation of at most {self.epsilon:g} per pixel"

    def rescaled(self, factor: float) -> AdditivePerturbation:
        return replace(self, epsilon=self.epsilon * factor)


@dataclass(frozen=True)
class SmoothWarp(ProbeFamily):
    """A smooth warp: a ``grid x grid`` field of displacements of at most ``max_pixels``
    pixels per axis, upsampled bicubically to the image and applied by bilinear resampling
    (edges repeated): the reach of warping triggers (WaNet), which no additive change or
    small mask expresses. A grid of 8 expresses the WaNet fields of control grids up to 8."""

    grid: int
    max_pixels: float
    name: ClassVar[str] = "warp"
    signal: ClassVar[str] = "warping"

    def initial(self, n_classes: int, image_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(n_classes, 2, self.grid, self.grid)

    def apply(self, images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        size = int(images.shape[-1])
        field_px = F.interpolate(
            parameters.unsqueeze(0), size=(size, size), mode="bicubic", align_corners=True
        )[0].permute(1, 2, 0)
        line = torch.linspace(-1, 1, size)
        rows, cols = torch.meshgrid(line, line, indexing="ij")
        grid = torch.stack((cols, rows), dim=-1) + field_px * (2.0 / max(size - 1, 1))
        sampled = F.grid_sample(
            images,
            grid.unsqueeze(0).expand(images.shape[0], -1, -1, -1),
            mode="bilinear",
            padding_mode="border",
            align_corners=True,
        )
        return sampled.clamp(0, 1)

    def bound(self, parameters: torch.Tensor) -> None:
        parameters.clamp_(-self.max_pixels, self.max_pixels)

    @property
    def lr(self) -> float:
        return self.max_pixels / 10

    def settings(self) -> dict[str, float]:
        return {"max_pixels": self.max_pixels, "grid": self.grid}

    def describe(self) -> str:
        return f"a smooth warp of at most {self.max_pixels:g} pixels"

    def rescaled(self, factor: float) -> SmoothWarp:
        return replace(self, max_pixels=self.max_pixels * factor)


#: most held-out images (not shots) each class's probe reach is also measured on
HELD_OUT_IMAGES = 600


@dataclass
class ProbeReach:
    """A reach probe's result for every class (:func:`probe_reach`)."""

    #: the family of transformations probed
    family: ProbeFamily
    #: per class, the share of held-out other-class shots its transformation sends to it
    reach: list[float]
    #: optimisation steps run (fewer than asked when the budget ran short)
    steps: int
    #: why the probe did not run (the encoder budget), else None
    skipped: str | None = None
    #: every fit of :func:`probe_reach_in_band`, in order: its family and median class
    #: reach; empty for :func:`probe_reach` alone
    tried: list[tuple[ProbeFamily, float]] = field(default_factory=list)
    #: per class, how many images its reach was measured on (held-out shots and images)
    measured: list[int] = field(default_factory=list)
    #: per class, its reach on the held-out shots alone (``reach`` when no held-out images
    #: were measured): what :func:`probe_reach_in_band` judges a bound by
    shot_reach: list[float] = field(default_factory=list)

    @property
    def probe(self) -> str:
        """The probe's name (its family's)."""
        return self.family.name

    @property
    def median(self) -> float:
        """The median class's reach."""
        return float(statistics.median(self.reach))

    @property
    def shot_median(self) -> float:
        """The median class's reach on the held-out shots alone."""
        return float(statistics.median(self.shot_reach or self.reach))

    def evidence(self) -> list[float]:
        """Per class, its reach above the median reach of all classes (>= 0)."""
        if self.skipped is not None:
            return [0.0] * len(self.reach)
        return [max(0.0, r - self.median) for r in self.reach]


def _spread_rows(rows: torch.Tensor, limit: int) -> torch.Tensor:
    """At most ``limit`` of ``rows``, evenly spaced (deterministic, every class represented
    when ``rows`` are grouped by class)."""
    if len(rows) <= limit:
        return rows
    return rows[torch.linspace(0, len(rows) - 1, limit).round().long()]


def fit_transforms(
    bundle: ModelBundle,
    pixels: torch.Tensor,
    rows: list[torch.Tensor],
    goals: list[int],
    class_features: torch.Tensor,
    family: ProbeFamily,
    steps: int,
    chunk_images: int = 1024,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """One transformation of ``family`` per entry ``i``, fitted from the identity with Adam
    (``family.lr``) for ``steps`` steps to send ``pixels[rows[i]]`` to class ``goals[i]``
    (cross-entropy of the zero-shot logits). The entries are optimised together (each loss
    depends on its own parameters only), in encoder calls of at most ``chunk_images`` images;
    costs ``steps`` times the images of all entries; ``on_step(1)`` is called after each step
    (a progress bar's advance). Returns the parameters, one row per entry (detached).
    Deterministic."""
    parameters = family.initial(len(rows), tuple(pixels.shape[1:])).requires_grad_(True)
    optimizer = torch.optim.Adam([parameters], lr=family.lr)
    scale = bundle.logit_scale
    groups: list[list[int]] = [[]]
    for i in range(len(rows)):
        if groups[-1] and sum(len(rows[j]) for j in groups[-1]) + len(rows[i]) > chunk_images:
            groups.append([])
        groups[-1].append(i)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for group in groups:
            images = torch.cat([family.apply(pixels[rows[i]], parameters[i]) for i in group])
            goal = torch.cat([torch.full((len(rows[i]),), goals[i]) for i in group])
            logits = scale * bundle.encode_image(images) @ class_features.T
            losses = F.cross_entropy(logits, goal, reduction="none")
            # each entry's mean loss, summed: the entries' gradients do not mix
            weights = torch.cat([torch.full((len(rows[i]),), 1.0 / len(rows[i])) for i in group])
            (losses * weights).sum().backward()
        optimizer.step()
        with torch.no_grad():
            family.bound(parameters)
        if on_step is not None:
            on_step(1)
    return parameters.detach()


@dataclass
class TransformTrigger(Trigger):
    """A fitted transformation of a :class:`ProbeFamily` used as a trigger (a warp towards a
    class, say): ``apply`` runs the family's transformation with ``parameters``."""

    transform: ProbeFamily
    parameters: torch.Tensor
    family: str = "fitted-transform"

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return self.transform.apply(images, self.parameters.to(images))


def transform_towards(
    bundle: ModelBundle,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_features: torch.Tensor,
    family: ProbeFamily,
    target: int,
    steps: int,
    max_images: int = 1024,
) -> TransformTrigger:
    """The universal transformation of ``family`` that sends the shots of the other classes
    (at most ``max_images``, evenly spread) to ``target`` (:func:`fit_transforms`), as a
    trigger. Costs ``steps`` times those shots in encoder passes with gradients."""
    rows = _spread_rows(torch.nonzero(labels != target).flatten(), max_images)
    parameters = fit_transforms(bundle, pixels, [rows], [target], class_features, family, steps)
    return TransformTrigger(family, parameters[0])


def _other_class_rows(
    labels: torch.Tensor, n_classes: int, max_images: int, among: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Per class ``k``, the rows (of those flagged in ``among``; all when None) whose label is
    not ``k``: at most ``max_images``, evenly spread."""
    others = [labels != k for k in range(n_classes)]
    if among is not None:
        others = [rows & among for rows in others]
    return [_spread_rows(torch.nonzero(rows).flatten(), max_images) for rows in others]


def _probe_rows(
    labels: torch.Tensor, n_classes: int, max_images: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per class, the rows of :func:`probe_reach`: the even shots of the other classes it
    fits on and the odd ones it measures on (at most ``max_images`` each, evenly spread)."""
    even = torch.arange(len(labels)) % 2 == 0
    return (
        _other_class_rows(labels, n_classes, max_images, even),
        _other_class_rows(labels, n_classes, max_images, ~even),
    )


def _held_out_rows(
    labels: torch.Tensor | None, n_classes: int, max_images: int
) -> list[torch.Tensor]:
    """Per class, the rows of the held-out images (``labels``; none when None) of the other
    classes, which :func:`probe_reach` also measures its reach on (at most ``max_images``
    each, evenly spread)."""
    if labels is None:
        return [torch.zeros(0, dtype=torch.long) for _ in range(n_classes)]
    return _other_class_rows(labels, n_classes, max_images)


def probe_cost(
    labels: torch.Tensor,
    n_classes: int,
    max_images: int,
    steps: int,
    held_out_labels: torch.Tensor | None = None,
    max_held_out: int = HELD_OUT_IMAGES,
) -> int:
    """Encoder images of one whole :func:`probe_reach` fit of ``steps`` steps on shots with
    ``labels``, measured on held-out images with ``held_out_labels`` too."""
    fit, held = _probe_rows(labels, n_classes, max_images)
    extra = _held_out_rows(held_out_labels, n_classes, max_held_out)
    return steps * sum(len(r) for r in fit) + sum(len(r) for r in held + extra)


def probe_reach(
    bundle: ModelBundle,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_features: torch.Tensor,
    family: ProbeFamily,
    steps: int,
    max_images: int,
    budget: int,
    chunk_images: int = 1024,
    progress: Progress | None = None,
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_held_out: int = HELD_OUT_IMAGES,
) -> ProbeReach:
    """For every class ``k``, how far one small universal transformation of ``family`` reaches.

    The shots are split by position (even / odd). A transformation ``T_k`` of ``family``, from
    the identity, is fitted with Adam (``family.lr``) for ``steps`` steps to send the even shots
    of the other classes (at most ``max_images``) to ``k``; the reach of ``k`` is the share of
    the odd shots of the other classes (at most ``max_images``), and of the ``held_out``
    images (pixels, labels: images that are not shots) of the other classes (at most
    ``max_held_out``), that ``T_k`` sends to ``k`` (``shot_reach``: the share of the odd
    shots alone). A backdoor whose
    trigger lies in (or near) the family makes its target reachable far beyond the other
    classes; a clean model's classes are reached alike (docs/method.md); the more images the
    reach is measured on, the less a clean class's reach varies by chance. All classes are
    optimised together (each loss depends on its own ``T_k`` only), in encoder calls of at
    most ``chunk_images`` images. Costs ``steps`` times the fitted images plus the measured
    ones (:func:`probe_cost`), and runs fewer steps, or none (``skipped``), when ``budget``
    encoder images do not allow them. Shows a progress bar on ``progress``. Deterministic.
    """
    n_classes = int(class_features.shape[0])
    fit, held = _probe_rows(labels, n_classes, max_images)
    extra = _held_out_rows(None if held_out is None else held_out[1], n_classes, max_held_out)
    per_step = sum(len(r) for r in fit)
    to_measure = sum(len(r) for r in held + extra)
    if per_step == 0 or to_measure == 0 or budget < per_step + to_measure:
        return ProbeReach(family, [0.0] * n_classes, 0, "encoder budget too small or no shots")
    steps = min(steps, (budget - to_measure) // per_step)
    progress = progress or Progress(quiet=True)
    with progress.task(f"{family.name} reach: {family.describe()}", max(steps, 1)) as advance:
        parameters = fit_transforms(
            bundle,
            pixels,
            fit,
            list(range(n_classes)),
            class_features,
            family,
            steps,
            chunk_images,
            on_step=advance,
        )
    reach, measured, shot_reach = [], [], []
    with torch.no_grad():
        for k in range(n_classes):
            images = [pixels[held[k]]]
            if held_out is not None:
                images.append(held_out[0][extra[k]])
            transformed = family.apply(torch.cat(images), parameters[k])
            measured.append(len(transformed))
            if len(transformed) == 0:
                reach.append(0.0)
                shot_reach.append(0.0)
                continue
            hits = (encode_batched(bundle, transformed) @ class_features.T).argmax(dim=1) == k
            reach.append(float(hits.float().mean()))
            shots_hit = hits[: len(held[k])]
            shot_reach.append(float(shots_hit.float().mean()) if len(shots_hit) else 0.0)
    return ProbeReach(family, reach, steps, measured=measured, shot_reach=shot_reach)


@dataclass(frozen=True)
class MedianBand:
    """Where the median class's reach should lie for a probe's bound to suit a model
    (:func:`probe_reach_in_band`), and how many extra fits may bring it there."""

    low: float
    high: float
    refits: int

    def distance(self, median: float) -> float:
        """How far ``median`` lies outside the band (0 inside)."""
        return max(self.low - median, median - self.high, 0.0)


def probe_reach_in_band(
    bundle: ModelBundle,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_features: torch.Tensor,
    family: ProbeFamily,
    steps: int,
    max_images: int,
    budget: int,
    band: MedianBand,
    keep: int = 0,
    chunk_images: int = 1024,
    progress: Progress | None = None,
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_held_out: int = HELD_OUT_IMAGES,
) -> ProbeReach:
    """:func:`probe_reach` with a bound suited to the model (reach measured on the odd
    shots and ``held_out`` images alike; the bound judged by the odd shots alone, the
    ``shot_median``, as the band was chosen, so held-out images sharpen the reach reported
    at the bound the shots choose).

    One bound does not suit every model: an additive change of 0.02 per pixel sends a median
    CIFAR-10 lab class 10-20 % of the other classes' held-out shots but a synthetic-set class
    almost none, and at 0.05 CIFAR-10 classes are all reached alike (docs/method.md). So the
    probe is fitted with ``family`` first; while the median class's reach lies below
    ``band.low`` the bound is doubled (:meth:`ProbeFamily.rescaled`) and the probe fitted
    again, while above ``band.high`` halved, at most ``band.refits`` times. It stops when the
    median enters the band, when the direction would turn (the band lies between two bounds a
    factor 2 apart), or when what is left of ``budget``, less ``keep`` images left for later
    work, does not pay for a whole fit. Returns
    the fit whose median lies nearest the band (the first of equals), with every fit in
    ``tried``. Costs each fit's encoder images (:func:`probe_reach`). Deterministic.
    """
    whole_fit = probe_cost(
        labels,
        int(class_features.shape[0]),
        max_images,
        steps,
        None if held_out is None else held_out[1],
        max_held_out,
    )
    start = bundle.image_encoder_images
    fits: list[ProbeReach] = []
    current, direction = family, 0
    while True:
        left = budget - (bundle.image_encoder_images - start)
        fits.append(
            probe_reach(
                bundle,
                pixels,
                labels,
                class_features,
                current,
                steps,
                max_images,
                left,
                chunk_images,
                progress,
                held_out,
                max_held_out,
            )
        )
        latest = fits[-1]
        if latest.skipped is not None or len(fits) > band.refits:
            break
        turn = 1 if latest.shot_median < band.low else -1 if latest.shot_median > band.high else 0
        left = budget - (bundle.image_encoder_images - start)
        if turn == 0 or turn == -direction or left - keep < whole_fit:
            break
        current, direction = current.rescaled(2.0**turn), turn
    best = min(fits, key=lambda f: band.distance(f.shot_median))
    return replace(best, tried=[(f.family, f.shot_median) for f in fits])


def _class_trigger(mask: torch.Tensor, pattern: torch.Tensor) -> MaskPatternTrigger:
    return MaskPatternTrigger(
        mask=mask.detach().clone(), pattern=pattern.detach().clone(), family="inverted"
    )


# --------------------------------------------------------------------------- statistics


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
