"""Stage 2 of CBPT: class-wise prompt tuning against a fixed dummy trigger, and plain CoOp-CSC.

The image encoder is frozen and the trigger fixed, so the image features of every clean view
and every triggered view are computed once (:func:`cache_features`); the tuning loop
(:func:`tune_prompts`) runs only the text encoder on ``C`` class-wise prompts through
:class:`clipguard.prompts.PromptEncoder`.

Loss: ``L = L_clean + a * L_trigger + b * L_anchor`` with

* ``L_clean``: cross-entropy of clean views to their labels;
* ``L_trigger``: on triggered views, cross-entropy to the true label (``"true-class"``), or
  ``-log(1 - p(target | T(x)))`` over non-target shots (``"away"``: push triggered images
  off the suspected target class), or the sum of both (``"both"``);
* ``L_anchor``: ``mean_k (1 - cos(t_k, t_k^0))`` towards the reference prompt features: the
  hand-crafted prompts, or (``reference_prompts="fitted"``) prompts first fitted by plain CoOp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from clipguard.augment import apply_affine, random_affine
from clipguard.features import encode_images
from clipguard.model import ModelBundle
from clipguard.progress import Progress
from clipguard.prompts import (
    DEFAULT_CONTEXT_INIT,
    PromptEncoder,
    handcrafted_text_features,
    initial_context,
)
from clipguard.runtime import torch_settings
from clipguard.triggers import MaskPatternTrigger, Trigger

TriggerLoss = Literal["true-class", "away", "both"]
ReferencePrompts = Literal["auto", "handcrafted", "fitted"]


class TuningConfig(BaseModel):
    """Options of the class-wise prompt tuning (shared by the ``cbpt`` and ``coop`` purifiers)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(300, ge=1, description="optimisation steps (full batch of cached features)")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate of the context vectors")
    n_context: int = Field(4, ge=1, le=16, description="context vectors M per class")
    context_init: str = Field(DEFAULT_CONTEXT_INIT, description="text the context starts from")
    trigger_weight: float = Field(1.0, ge=0, description="a: weight of L_trigger")
    anchor_weight: float = Field(1.0, ge=0, description="b: weight of L_anchor")
    distill_weight: float = Field(
        0.0,
        ge=0,
        description="c: weight of L_distill, the KL divergence from the hand-crafted prompts' "
        "class probabilities to the tuned prompts' on the clean views",
    )
    trigger_loss: TriggerLoss = Field(
        "away", description="true-class CE, push-away from the target, or both"
    )
    augmentations: int = Field(
        4, ge=0, description="augmented views per shot (random resized crop + flip), cached"
    )
    crop_scale: float = Field(0.7, gt=0, le=1, description="smallest crop side fraction")
    reference_prompts: ReferencePrompts = Field(
        "auto",
        description=(
            "what L_anchor and L_distill hold the prompts to, and where the context starts: "
            "the hand-crafted prompts, or class-wise prompts first tuned on the clean views "
            "by L_clean alone (plain CoOp, as many steps again), for a model that the "
            "hand-crafted prompts read badly; auto: fitted when the cbpt purifier's trigger "
            "comes from a scan that read the model through fitted prompts (fit_prompts), "
            "else hand-crafted"
        ),
    )
    no_trigger_loss: bool = Field(False, description="ablation: drop L_trigger")
    no_anchor_loss: bool = Field(False, description="ablation: drop L_anchor")
    random_mask: bool = Field(
        False,
        description="ablation: replace the inverted trigger by a random mask of the same size",
    )
    threads: int = Field(
        1,
        ge=1,
        le=2,
        description="torch threads of the tuning loop (its ops are tiny; 1 avoids thread overhead)",
    )


class CoOpConfig(TuningConfig):
    """Options of the ``coop`` baseline: CoOp-CSC prompt tuning with ``L_clean`` only."""

    trigger_weight: float = Field(0.0, ge=0, description="unused by coop (no trigger)")
    anchor_weight: float = Field(0.0, ge=0, description="b: weight of L_anchor (0 = plain CoOp)")


@dataclass
class FeatureCache:
    """Image features computed once before tuning.

    ``clean`` and ``triggered`` are ``V x N x E`` normalised features of ``V`` views of the
    ``N`` shots (view 0 is the shot itself); ``triggered`` is None without a trigger.
    """

    clean: torch.Tensor
    triggered: torch.Tensor | None
    labels: torch.Tensor
    encoder_images: int


def cache_features(
    bundle: ModelBundle,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    trigger: Trigger | list[Trigger] | None,
    augmentations: int,
    crop_scale: float,
    generator: torch.Generator,
) -> FeatureCache:
    """Encode the clean views and, with a ``trigger``, the triggered views of ``pixels``.

    Views: the shot itself plus ``augmentations`` random resized crops with flips. Triggered
    view ``v`` applies the trigger after the augmentation on even ``v`` (the trigger sits at a
    fixed place in the model's input) and before it on odd ``v`` (the trigger moved and
    rescaled with the image). With several triggers, every trigger gets every view (the
    triggered views are stacked trigger after trigger). Runs the image encoder
    ``(1 + augmentations) * N`` times for the clean views and as often again per trigger;
    deterministic for ``generator``.
    """
    start = bundle.image_encoder_images
    triggers = [] if trigger is None else trigger if isinstance(trigger, list) else [trigger]
    clean_views, triggered_views = [], []
    for view in range(1 + augmentations):
        theta = None if view == 0 else random_affine(pixels.shape[0], crop_scale, generator)
        clean = pixels if theta is None else apply_affine(pixels, theta)
        clean_views.append(encode_images(bundle, clean))
        for each in triggers:
            if theta is None:
                triggered = each.apply(pixels)
            elif view % 2 == 0:
                triggered = each.apply(clean)
            else:
                triggered = apply_affine(each.apply(pixels), theta)
            triggered_views.append(encode_images(bundle, triggered.clamp(0, 1)))
    return FeatureCache(
        clean=torch.stack(clean_views),
        triggered=torch.stack(triggered_views) if triggered_views else None,
        labels=labels.clone(),
        encoder_images=bundle.image_encoder_images - start,
    )


def random_mask_like(trigger: MaskPatternTrigger, generator: torch.Generator) -> MaskPatternTrigger:
    """A random trigger of the same mask size: the mask's pixels shuffled, a uniform pattern."""
    flat = trigger.mask.flatten()
    order = torch.randperm(flat.numel(), generator=generator)
    mask = flat[order].view_as(trigger.mask).clone()
    pattern = torch.rand(trigger.pattern.shape, generator=generator)
    return MaskPatternTrigger(mask=mask, pattern=pattern, family="random-mask")


def reference_log_probs(cache: FeatureCache, anchor: torch.Tensor, scale: float) -> torch.Tensor:
    """Log class probabilities of the reference prompts ``anchor`` (hand-crafted or fitted,
    ``reference_prompts``) on every clean view (``V*N x C``): the reference of
    ``L_distill``, constant during tuning."""
    e = cache.clean.shape[2]
    return (scale * cache.clean.reshape(-1, e) @ anchor.T).log_softmax(dim=1)


def prompt_losses(
    text: torch.Tensor,
    anchor: torch.Tensor,
    cache: FeatureCache,
    scale: float,
    target: int | None,
    config: TuningConfig,
    reference: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The CBPT losses for text features ``text`` (``C x E``), as scalars.

    ``L_trigger`` is 0 without triggered features or when disabled; ``"away"`` needs a
    ``target`` (without one only the true-class part is used). ``L_distill`` is 0 unless
    ``config.distill_weight`` is set; ``reference`` is :func:`reference_log_probs`, passed
    in by a loop that calls this many times (computed here otherwise).
    """
    n_views, e = cache.clean.shape[0], cache.clean.shape[2]
    labels = cache.labels.repeat(n_views)
    logits_clean = scale * cache.clean.reshape(-1, e) @ text.T
    losses = {"clean": F.cross_entropy(logits_clean, labels)}
    zero = text.new_zeros(())
    trigger_loss = zero
    if cache.triggered is not None and not config.no_trigger_loss:
        logits_trig = scale * cache.triggered.reshape(-1, e) @ text.T
        trig_labels = cache.labels.repeat(cache.triggered.shape[0])
        if config.trigger_loss in ("true-class", "both") or target is None:
            trigger_loss = trigger_loss + F.cross_entropy(logits_trig, trig_labels)
        if config.trigger_loss in ("away", "both") and target is not None:
            keep = trig_labels != target
            if bool(keep.any()):
                p_target = logits_trig[keep].softmax(dim=1)[:, target]
                trigger_loss = trigger_loss - torch.log1p(-p_target.clamp(max=1 - 1e-6)).mean()
    losses["trigger"] = trigger_loss
    losses["anchor"] = zero if config.no_anchor_loss else (1 - (text * anchor).sum(dim=1)).mean()
    losses["distill"] = zero
    if config.distill_weight > 0:
        if reference is None:
            reference = reference_log_probs(cache, anchor, scale)
        losses["distill"] = F.kl_div(
            logits_clean.log_softmax(dim=1), reference, log_target=True, reduction="batchmean"
        )
    return losses


def tune_prompts(
    bundle: ModelBundle,
    classnames: list[str],
    cache: FeatureCache,
    target: int | None,
    config: TuningConfig,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Learn ``C x M x D`` class-wise context vectors on cached features.

    Runs only the text encoder (the image encoder is never called here). With
    ``reference_prompts="fitted"`` (``"auto"`` reads as ``"handcrafted"`` here; the purifier
    resolves it) a plain CoOp tuning of ``config.steps`` steps comes first
    and gives the starting context and the reference of ``L_anchor`` and ``L_distill``.
    Returns the context tensor and statistics: steps (of the final tuning), first and last
    losses, text-encoder prompts (of both tunings).
    """
    progress = progress or Progress(quiet=True)
    encoder = PromptEncoder(bundle, classnames, config.n_context)
    fitting_prompts = 0
    if config.reference_prompts == "fitted":
        plain_coop = config.model_copy(
            update={
                "reference_prompts": "handcrafted",
                "no_trigger_loss": True,
                "no_anchor_loss": True,
                "distill_weight": 0.0,
            }
        )
        start, fitting = tune_prompts(bundle, classnames, cache, None, plain_coop, progress)
        fitting_prompts = fitting["text_encoder_prompts"]
        with torch.no_grad():
            anchor = encoder(start)
    else:
        start = initial_context(bundle, len(classnames), config.n_context, config.context_init)
        anchor = handcrafted_text_features(bundle, classnames).detach()
    context = torch.nn.Parameter(start)
    scale = bundle.logit_scale
    reference = reference_log_probs(cache, anchor, scale) if config.distill_weight > 0 else None
    optimizer = torch.optim.Adam([context], lr=config.lr)
    a = 0.0 if config.no_trigger_loss else config.trigger_weight
    b = 0.0 if config.no_anchor_loss else config.anchor_weight
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    text_start = bundle.text_encoder_prompts
    with (
        torch_settings(threads=config.threads),
        progress.task("prompt tuning", config.steps) as advance,
    ):
        for step in range(config.steps):
            text = encoder(context)
            losses = prompt_losses(text, anchor, cache, scale, target, config, reference)
            total = (
                losses["clean"]
                + a * losses["trigger"]
                + b * losses["anchor"]
                + config.distill_weight * losses["distill"]
            )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            values = {k: float(v.detach()) for k, v in losses.items()}
            values["total"] = float(total.detach())
            if step == 0:
                first = values
            last = values
            advance(1)
    statistics = {
        "steps": config.steps,
        "loss_first": first,
        "loss_last": last,
        "text_encoder_prompts": bundle.text_encoder_prompts - text_start + fitting_prompts,
    }
    return context.detach().clone(), statistics
