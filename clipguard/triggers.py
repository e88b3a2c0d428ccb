"""Triggers: functions that stamp a backdoor pattern onto images in pixel space.

Every trigger works on a batch of images ``B x 3 x H x W`` with values in ``[0, 1]``, *before*
the model's normalisation, and returns a batch of the same shape and range. Trigger
*families* (badnets, blended, ...) are registered by plugins through the
``clipguard_register_triggers`` hook; a family turns a validated pydantic configuration into a
:class:`Trigger` for a given image size.

The inverted trigger of a scan (a mask and a pattern) is a :class:`MaskPatternTrigger`, stored
in a safetensors *trigger file* by :func:`save_trigger_file` and read back, with its
metadata checked, by :func:`load_trigger_file`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from clipguard.errors import InputError
from clipguard.io import atomic_write_bytes, read_safetensors_file, safetensors_bytes

TRIGGER_FILE_FORMAT = "clipguard.trigger/1"


class Trigger(ABC):
    """A backdoor trigger: ``apply`` maps clean pixel images to triggered ones."""

    #: name of the family that built this trigger
    family: str = "custom"

    @abstractmethod
    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Return ``images`` (``B x 3 x H x W`` in ``[0, 1]``) with the trigger applied.

        Must not modify ``images`` in place; the result is clamped to ``[0, 1]``.
        """

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images)


class TriggerFamily(ABC):
    """A registered kind of trigger, configured by a pydantic model.

    Subclasses set ``name``, ``version``, ``description`` and ``Config`` and implement
    :meth:`build`. ``label_consistent`` tells a poisoning routine to stamp only images whose
    true class already is the target (clean-label attacks).
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    label_consistent: ClassVar[bool] = False
    Config: ClassVar[type[BaseModel]]

    @abstractmethod
    def build(self, config: BaseModel, image_size: int) -> Trigger:
        """Return the trigger for square images of side ``image_size`` pixels."""


# --------------------------------------------------------------------------- badnets


Position = Literal["bottom-right", "bottom-left", "top-left", "top-right", "center"]


class BadNetsConfig(BaseModel):
    """Options of the BadNets patch trigger."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(3, ge=1, description="side of the square patch, in pixels")
    position: Position = Field("bottom-right", description="where the patch is stamped")
    margin: int = Field(1, ge=0, description="pixels between the patch and the image border")
    pattern: Literal["checkerboard", "white", "black", "random"] = Field(
        "checkerboard", description="patch content"
    )
    seed: int = Field(0, description="seed of the random pattern")


def patch_origin(position: Position, image_size: int, size: int, margin: int) -> tuple[int, int]:
    """Top-left ``(row, col)`` of a ``size`` patch at ``position`` inside the image."""
    if size + margin > image_size:
        raise InputError(
            f"patch of {size} px with margin {margin} does not fit a {image_size} px image"
        )
    far = image_size - size - margin
    centre = (image_size - size) // 2
    return {
        "top-left": (margin, margin),
        "top-right": (margin, far),
        "bottom-left": (far, margin),
        "bottom-right": (far, far),
        "center": (centre, centre),
    }[position]


def patch_pattern(kind: str, size: int, seed: int) -> torch.Tensor:
    """A ``3 x size x size`` patch in ``[0, 1]``."""
    if kind == "white":
        return torch.ones(3, size, size)
    if kind == "black":
        return torch.zeros(3, size, size)
    if kind == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(3, size, size, generator=generator)
    rows = torch.arange(size).view(-1, 1)
    cols = torch.arange(size).view(1, -1)
    board = ((rows + cols) % 2 == 0).float()
    return board.expand(3, size, size).clone()


@dataclass
class MaskPatternTrigger(Trigger):
    """``T(x) = (1 - m) * x + m * p``: mask ``m`` is ``1 x H x W``, pattern ``p`` is ``3 x H x W``.

    Patch triggers are the special case of a binary mask; blended triggers have a small
    uniform mask. The inverted trigger of a scan has this form too.
    """

    mask: torch.Tensor
    pattern: torch.Tensor
    family: str = "mask-pattern"

    def __post_init__(self) -> None:
        if self.mask.dim() != 3 or self.mask.shape[0] != 1:
            raise InputError(f"trigger mask must be 1 x H x W, got {tuple(self.mask.shape)}")
        if self.pattern.dim() != 3 or self.pattern.shape[0] != 3:
            raise InputError(f"trigger pattern must be 3 x H x W, got {tuple(self.pattern.shape)}")
        if self.mask.shape[1:] != self.pattern.shape[1:]:
            raise InputError("trigger mask and pattern differ in height or width")

    @property
    def image_size(self) -> int:
        return int(self.mask.shape[-1])

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != self.mask.shape[-2:]:
            raise InputError(
                f"trigger is {tuple(self.mask.shape[-2:])} px but images are "
                f"{tuple(images.shape[-2:])} px"
            )
        mask = self.mask.to(images)
        pattern = self.pattern.to(images)
        return ((1 - mask) * images + mask * pattern).clamp(0, 1)


class BadNets(TriggerFamily):
    """BadNets (Gu et al. 2017): a small fixed patch stamped at a fixed position."""

    name = "badnets"
    version = "1"
    description = "square patch (checkerboard by default) stamped in a corner"
    Config = BadNetsConfig

    def build(self, config: BaseModel, image_size: int) -> Trigger:
        assert isinstance(config, BadNetsConfig)
        row, col = patch_origin(config.position, image_size, config.size, config.margin)
        mask = torch.zeros(1, image_size, image_size)
        pattern = torch.zeros(3, image_size, image_size)
        mask[:, row : row + config.size, col : col + config.size] = 1
        pattern[:, row : row + config.size, col : col + config.size] = patch_pattern(
            config.pattern, config.size, config.seed
        )
        return MaskPatternTrigger(mask=mask, pattern=pattern, family=self.name)


# --------------------------------------------------------------------------- trigger files


@dataclass
class TriggerFile:
    """An inverted trigger and the metadata that ties it to one model and class list."""

    trigger: MaskPatternTrigger
    model_sha256: str
    classnames: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    producer: str = ""

    def check_fits(self, model_sha256: str, classnames: list[str], image_size: int) -> None:
        """Raise :class:`InputError` unless this trigger was made for that model and classes."""
        if self.model_sha256 and self.model_sha256 != model_sha256:
            raise InputError(
                f"trigger file was made for model sha256 {self.model_sha256[:12]}…, "
                f"not for this model ({model_sha256[:12]}…)"
            )
        if self.classnames and self.classnames != classnames:
            raise InputError("trigger file was made for another class list")
        if self.trigger.image_size != image_size:
            raise InputError(
                f"trigger file is {self.trigger.image_size} px, the model takes {image_size} px"
            )


def trigger_file_bytes(trigger_file: TriggerFile) -> bytes:
    """The safetensors bytes of a trigger file (what :func:`save_trigger_file` writes)."""
    metadata = {
        "format": TRIGGER_FILE_FORMAT,
        "model_sha256": trigger_file.model_sha256,
        "classnames": json.dumps(trigger_file.classnames),
        "settings": json.dumps(trigger_file.settings, sort_keys=True, default=str),
        "producer": trigger_file.producer,
    }
    tensors = {
        "mask": trigger_file.trigger.mask.detach().float().cpu().contiguous(),
        "pattern": trigger_file.trigger.pattern.detach().float().cpu().contiguous(),
    }
    return safetensors_bytes(tensors, metadata)


def save_trigger_file(path: Path, trigger_file: TriggerFile) -> None:
    """Write ``trigger_file`` to ``path`` as safetensors, atomically."""
    atomic_write_bytes(path, trigger_file_bytes(trigger_file))


def load_trigger_file(path: Path) -> TriggerFile:
    """Read a trigger file written by :func:`save_trigger_file`; :class:`InputError` if invalid."""
    tensors, metadata = read_safetensors_file(path, what="trigger file")
    if metadata.get("format") != TRIGGER_FILE_FORMAT:
        raise InputError(
            f"{path}: not a clipguard trigger file (format {metadata.get('format')!r})"
        )
    if set(tensors) != {"mask", "pattern"}:
        raise InputError(f"{path}: trigger file must hold exactly 'mask' and 'pattern'")
    mask, pattern = tensors["mask"].float(), tensors["pattern"].float()
    for name, tensor in (("mask", mask), ("pattern", pattern)):
        if (
            tensor.numel() == 0
            or not torch.isfinite(tensor).all()
            or tensor.min() < 0
            or tensor.max() > 1
        ):
            raise InputError(
                f"{path}: trigger {name} must be non-empty with finite values in [0, 1]"
            )
    try:
        classnames = json.loads(metadata.get("classnames", "[]"))
        settings = json.loads(metadata.get("settings", "{}"))
    except (json.JSONDecodeError, RecursionError) as error:
        raise InputError(f"{path}: trigger file metadata is not valid JSON ({error})") from None
    if not isinstance(classnames, list) or not all(isinstance(c, str) for c in classnames):
        raise InputError(f"{path}: trigger file class names must be a list of strings")
    return TriggerFile(
        trigger=MaskPatternTrigger(mask=mask, pattern=pattern, family="inverted"),
        model_sha256=metadata.get("model_sha256", ""),
        classnames=classnames,
        settings=settings if isinstance(settings, dict) else {},
        producer=metadata.get("producer", ""),
    )
