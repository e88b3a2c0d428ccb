"""Per-class trigger inversion (Neural Cleanse), all classes optimised in one batch.

For every class ``k`` a mask ``m_k`` (``1 x H x W``) and a pattern ``p_k`` (``3 x H x W``) are
tanh-parametrised, ``m = (tanh(a) + 1) / 2`` and ``p = (tanh(b) + 1) / 2``, and applied in pixel
space, ``T_k(x) = (1 - m_k) x + m_k p_k``, before the model's normalisation. The loss of class
``k`` on a batch of clean shots whose label is not ``k`` is

    CE(zero-shot logits of T_k(x), k) + lambda_k * |m_k|_1 / (H W)

with the hand-crafted prompt classifier. ``lambda_k`` follows the Neural Cleanse schedule:
0 until the triggered batch first reaches the success rate, then ``lambda_init``; after that it
is multiplied by ``lambda_up`` after ``patience`` consecutive steps at or above the success
rate and divided by ``lambda_down`` after ``patience`` consecutive steps below it. The kept
trigger of a class is the smallest one that met the success rate on its batch; its size is
``n_k``. A class stops early once its kept size has not shrunk by ``early_stop_tolerance``
(relative) for ``early_stop_patience`` steps.

Every class's loss depends only on its own mask and pattern, so stacking the classes into
one image-encoder call (``A x B`` images for ``A`` active classes) is the same optimisation as
running them one by one, with far fewer, larger matrix products on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from clipguard.model import ModelBundle
from torch.nn import functional as F

_EPSILON = 1e-6


@dataclass(frozen=True)
class InversionSettings:
    """Knobs of :func:`invert_classes` (see the module docstring for their meaning)."""

    steps: int = 80
    lr: float = 0.1
    batch_size: int = 8
    success_rate: float = 0.95
    lambda_init: float = 1.0
    lambda_up: float = 1.5
    lambda_down: float = 1.5**1.5
    patience: int = 5
    early_stop_patience: int = 30
    early_stop_tolerance: float = 0.01
    mask_init: float = 0.1
    #: the most images the image encoder may see in this call (forward + backward count once)
    image_budget: int | None = None


@dataclass
class ClassTrigger:
    """The kept trigger of one class and how it was found.

    ``mask_size`` is ``n_k = |m|_1 / (H W)`` of the smallest trigger that met the success rate
    on a batch (``reached``), or of the last trigger when none did. ``success`` is the kept
    trigger's rate on *all* clean shots not of class ``k`` (``None`` if there are none).
    """

    class_index: int
    mask: torch.Tensor
    pattern: torch.Tensor
    mask_size: float
    reached: bool
    success: float | None
    steps: int
    final_lambda: float


@dataclass
class InversionResult:
    """Every class's trigger plus the cost of finding them."""

    classes: list[ClassTrigger]
    steps_planned: int
    steps_run: int
    image_encoder_images: int
    budget_limited: bool


def plan_steps(
    settings: InversionSettings, labels: torch.Tensor, n_classes: int
) -> tuple[int, bool]:
    """``(steps, budget_limited)``: the steps :func:`invert_classes` will run at most.

    With an image budget, the final success check (every shot once per class it is not
    in) is paid first, and the rest buys steps of ``batch_size`` images per class.
    """
    counts = [int((labels != k).sum()) for k in range(n_classes)]
    usable = sum(1 for count in counts if count > 0)
    if settings.image_budget is None or usable == 0:
        return settings.steps, False
    affordable = max(0, settings.image_budget - sum(counts)) // (usable * settings.batch_size)
    if affordable < settings.steps:
        return int(affordable), True
    return settings.steps, False


def _to_logit(value: float) -> float:
    """``atanh(2 v - 1)``: the tanh parameter for a target value ``v`` in ``(0, 1)``."""
    value = min(max(value, 1e-3), 1 - 1e-3)
    return math.atanh(2 * value - 1)


def _sample(
    pools: list[torch.Tensor], classes: list[int], batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """``len(classes) x batch_size`` shot indices, each row drawn from that class's pool."""
    rows = []
    for k in classes:
        pool = pools[k]
        if len(pool) >= batch_size:
            pick = torch.randperm(len(pool), generator=generator)[:batch_size]
        else:
            pick = torch.randint(len(pool), (batch_size,), generator=generator)
        rows.append(pool[pick])
    return torch.stack(rows)


@torch.no_grad()
def trigger_success(
    bundle: ModelBundle,
    class_features: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    pattern: torch.Tensor,
    target: int,
    batch_size: int = 256,
) -> float:
    """Fraction of ``images`` that the zero-shot classifier puts in ``target`` once triggered."""
    hits = 0
    for chunk in images.split(batch_size):
        triggered = (1 - mask) * chunk + mask * pattern
        logits = bundle.encode_image(triggered) @ class_features.T
        hits += int((logits.argmax(dim=-1) == target).sum())
    return hits / max(1, len(images))


def invert_classes(
    bundle: ModelBundle,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_features: torch.Tensor,
    settings: InversionSettings,
    generator: torch.Generator,
    advance: Callable[[int], None] | None = None,
) -> InversionResult:
    """Invert a mask-and-pattern trigger towards every class of ``class_features``.

    ``pixels`` (``N x 3 x H x W`` in ``[0, 1]``) and ``labels`` are the clean shots;
    ``class_features`` (``C x E``, L2-normalised) the zero-shot text features. ``generator``
    drives every random choice (same generator state, same result on CPU). ``advance(n)`` is
    called after each step (for a progress bar). With ``settings.image_budget`` the number of
    steps is capped so that the optimisation and the final success check together pass at
    most that many images through the image encoder. A class with no shot of another class
    gets ``reached = False`` and ``mask_size = 1``.
    """
    device = bundle.device
    pixels = pixels.to(device)
    labels = labels.to(device)
    class_features = class_features.to(device)
    n_classes = int(class_features.shape[0])
    size = int(pixels.shape[-1])
    scale = bundle.logit_scale
    start_images = bundle.image_encoder_images
    pools = [torch.nonzero(labels != k).flatten().cpu() for k in range(n_classes)]
    usable = [k for k in range(n_classes) if len(pools[k]) > 0]
    batch = settings.batch_size

    steps, budget_limited = plan_steps(settings, labels, n_classes)

    mask_param = torch.full((n_classes, 1, size, size), _to_logit(settings.mask_init))
    mask_param += 0.1 * torch.randn(mask_param.shape, generator=generator)
    pattern_param = 0.5 * torch.randn((n_classes, 3, size, size), generator=generator)
    mask_param = mask_param.to(device).requires_grad_(True)
    pattern_param = pattern_param.to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_param, pattern_param], lr=settings.lr, betas=(0.5, 0.9))

    lam = [0.0] * n_classes
    armed = [False] * n_classes  # lambda switched on (success reached once)
    above = [0] * n_classes
    below = [0] * n_classes
    stale = [0] * n_classes
    done = [k not in usable for k in range(n_classes)]
    steps_of = [0] * n_classes
    best_size = [math.inf] * n_classes
    best_mask: list[torch.Tensor | None] = [None] * n_classes
    best_pattern: list[torch.Tensor | None] = [None] * n_classes
    steps_run = 0

    for _ in range(steps):
        active = [k for k in range(n_classes) if not done[k]]
        if not active:
            break
        index = _sample(pools, active, batch, generator).to(device)
        active_t = torch.tensor(active, device=device)
        mask = (torch.tanh(mask_param[active_t]) + 1) / 2  # A x 1 x H x W
        pattern = (torch.tanh(pattern_param[active_t]) + 1) / 2  # A x 3 x H x W
        clean = pixels[index]  # A x B x 3 x H x W
        triggered = (1 - mask.unsqueeze(1)) * clean + (mask * pattern).unsqueeze(1)
        features = bundle.encode_image(triggered.flatten(0, 1))
        logits = scale * features @ class_features.T
        targets = active_t.repeat_interleave(batch)
        cross_entropy = F.cross_entropy(logits, targets, reduction="none").view(len(active), -1)
        mask_size = mask.flatten(1).mean(dim=1)  # |m|_1 / (H W), as m >= 0
        weights = torch.tensor([lam[k] for k in active], device=device)
        loss = (cross_entropy.mean(dim=1) + weights * mask_size).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps_run += 1

        with torch.no_grad():
            hit = (logits.argmax(dim=-1) == targets).view(len(active), -1).float().mean(dim=1)
        for row, k in enumerate(active):
            steps_of[k] += 1
            success = float(hit[row]) >= settings.success_rate - _EPSILON
            current = float(mask_size[row].detach())
            if success and current < best_size[k]:
                improved = current < best_size[k] * (1 - settings.early_stop_tolerance)
                best_size[k] = current
                best_mask[k] = mask[row].detach().clone()
                best_pattern[k] = pattern[row].detach().clone()
                if improved:
                    stale[k] = 0
            if not armed[k]:
                if success:
                    armed[k], lam[k] = True, settings.lambda_init
                continue
            stale[k] += 1
            if success:
                above[k], below[k] = above[k] + 1, 0
            else:
                above[k], below[k] = 0, below[k] + 1
            if above[k] >= settings.patience:
                lam[k] *= settings.lambda_up
                above[k] = 0
            elif below[k] >= settings.patience:
                lam[k] /= settings.lambda_down
                below[k] = 0
            if settings.early_stop_patience > 0 and stale[k] >= settings.early_stop_patience:
                done[k] = True
        if advance is not None:
            advance(1)

    classes: list[ClassTrigger] = []
    with torch.no_grad():
        final_mask = (torch.tanh(mask_param) + 1) / 2
        final_pattern = (torch.tanh(pattern_param) + 1) / 2
    for k in range(n_classes):
        reached = best_mask[k] is not None
        mask_k = best_mask[k] if reached else final_mask[k].detach().clone()
        pattern_k = best_pattern[k] if reached else final_pattern[k].detach().clone()
        assert mask_k is not None and pattern_k is not None
        if k in usable:
            rate: float | None = trigger_success(
                bundle, class_features, pixels[pools[k].to(device)], mask_k, pattern_k, k
            )
            n_k = best_size[k] if reached else float(mask_k.mean())
        else:
            rate, n_k = None, 1.0
        classes.append(
            ClassTrigger(
                class_index=k,
                mask=mask_k.cpu(),
                pattern=pattern_k.cpu(),
                mask_size=n_k,
                reached=reached,
                success=rate,
                steps=steps_of[k],
                final_lambda=lam[k],
            )
        )
    return InversionResult(
        classes=classes,
        steps_planned=steps,
        steps_run=steps_run,
        image_encoder_images=bundle.image_encoder_images - start_images,
        budget_limited=budget_limited,
    )
