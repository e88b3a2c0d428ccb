"""The small universal image transformations the reach probes fit, one per class: an
additive perturbation bounded per pixel and a smooth warp; fitted towards a class, either is a
trigger (:func:`transform_towards`, the purifier's warp trigger)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from clipguard.model import ModelBundle
from clipguard.triggers import Trigger


class ProbeFamily(ABC):
    """A family of small universal image transformations, one per class, for the reach probes.

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

    def record(self) -> dict[str, Any]:
        """Its name and bounds, as trigger files and reports keep it (the inverse of
        :func:`family_from_settings`)."""
        return {"name": self.name, **self.settings()}

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


def family_from_settings(name: str, settings: dict[str, Any]) -> ProbeFamily | None:
    """The probe family ``name`` ("additive", "warp") with the bounds of ``settings`` (as
    :meth:`ProbeFamily.settings` wrote them), or None for an unknown name or incomplete
    settings (a trigger file written by another version)."""
    try:
        if name == AdditivePerturbation.name:
            return AdditivePerturbation(float(settings["epsilon"]))
        if name == SmoothWarp.name:
            return SmoothWarp(int(settings["grid"]), float(settings["max_pixels"]))
    except (KeyError, TypeError, ValueError):
        return None
    return None


def spread_rows(rows: torch.Tensor, limit: int) -> torch.Tensor:
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
    rows = spread_rows(torch.nonzero(labels != target).flatten(), max_images)
    parameters = fit_transforms(bundle, pixels, [rows], [target], class_features, family, steps)
    return TransformTrigger(family, parameters[0])
