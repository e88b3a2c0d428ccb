"""Trigger inversion towards a class: per class for every class at once (the screening),
and targeted (Neural-Cleanse-like) towards one class (the refinement).

A dummy trigger is a mask ``m`` (``1 x H x W``) and a pattern ``p`` (``3 x H x W``), both in
``[0, 1]`` through a tanh parametrisation, applied in pixel space as
``T(x) = (1 - m) * x + m * p`` before the model's normalisation. A mask-size term
``lambda * |m|_1 / (H W)`` with an adaptive ``lambda`` (:class:`LambdaSchedule`) yields the
smallest trigger that still sends the shots to the class.

Everything here is deterministic for a given ``torch.Generator`` on CPU, and every image
encoder pass goes through :meth:`ModelBundle.encode_image`, so ``image_encoder_images``
counts the cost and an encoder-pass ``budget`` bounds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from clipguard.augment import apply_affine, random_affine
from clipguard.model import ModelBundle
from clipguard.progress import Progress
from clipguard.triggers import MaskPatternTrigger

_EPS = 1e-6


class InversionConfig(BaseModel):
    """Settings of the per-class and the targeted inversion (the scanners build them from
    their options; the purifier's contrastive inversion extends them)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(32, ge=2, description="shots per step of the targeted inversion")
    lr: float = Field(0.1, gt=0, description="Adam learning rate on the tanh parameters")
    mask_init: float = Field(0.02, gt=0, lt=1, description="initial mean mask value")
    augment: bool = Field(True, description="augmented views in the targeted inversion")
    crop_scale: float = Field(
        0.7, gt=0, le=1, description="smallest side fraction of the random resized crop"
    )
    lambda_init: float = Field(
        1.0, gt=0, description="mask weight set when the success target is first reached"
    )
    lambda_up: float = Field(1.5, gt=1, description="factor raising lambda while the target holds")
    lambda_down: float = Field(
        1.5**1.5, gt=1, description="factor lowering lambda when the target breaks"
    )
    check_every: int = Field(10, ge=1, description="steps per lambda-schedule window")
    early_stop_windows: int = Field(
        8,
        ge=1,
        description="stop after this many windows without a smaller successful mask",
    )
    refine: bool = Field(True, description="refine the kept trigger towards its class (targeted)")
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


def budget_left(bundle: ModelBundle, start: int, budget: int) -> int:
    return budget - (bundle.image_encoder_images - start)


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
            if budget_left(bundle, start_images, budget) < batch:
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
            if not active or budget_left(bundle, start_images, budget) < batch * len(active):
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


def _class_trigger(mask: torch.Tensor, pattern: torch.Tensor) -> MaskPatternTrigger:
    return MaskPatternTrigger(
        mask=mask.detach().clone(), pattern=pattern.detach().clone(), family="inverted"
    )
