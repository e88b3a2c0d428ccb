"""Whole-encoder fine-tuning baselines (FT, CleanCLIP-style) and the zero-shot reference.

Both fine-tuning purifiers train a copy of the model on the defender's clean shots only, with
random resized crops and flips, and return the fine-tuned model as a safetensors file plus a
hand-crafted-prompt classifier over it. Image- and text-encoder passes are counted into the
original bundle, so reports compare their cost with prompt tuning's.
"""

from __future__ import annotations

import copy
import hashlib
from abc import abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from clipguard.augment import augment
from clipguard.components import Purifier, PurifyOutcome, RunContext, ShotSet
from clipguard.model import ModelBundle, model_file_bytes
from clipguard.prompts import PromptClassifier, handcrafted_text_features
from clipguard.triggers import TriggerFile
from clipguard_baselines import __version__

#: caption templates for CleanCLIP's multimodal and text self-supervised losses
CAPTION_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
)


class NoOptions(BaseModel):
    """The zero-shot reference takes no options."""

    model_config = ConfigDict(extra="forbid")


class ZeroShotPurifier(Purifier):
    """No defence: the model with hand-crafted prompts, the benchmark's reference row."""

    name = "zeroshot"
    version = __version__
    description = "no defence: hand-crafted prompts (reference)"
    Config = NoOptions

    def purify(
        self,
        bundle: ModelBundle,
        shots: ShotSet,
        config: BaseModel,
        context: RunContext,
        trigger: TriggerFile | None = None,
    ) -> PurifyOutcome:
        return PurifyOutcome(classifier=PromptClassifier(bundle, shots.classnames))


class FinetuneConfig(BaseModel):
    """Options of supervised fine-tuning of the image encoder."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1, description="passes over the clean shots")
    batch_size: int = Field(32, ge=2, description="images per step")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    crop_scale: float = Field(0.7, gt=0, le=1, description="smallest side of the random crop")


class CleanClipConfig(FinetuneConfig):
    """Options of CleanCLIP-style fine-tuning of both encoders."""

    lr: float = Field(3e-5, gt=0, description="AdamW learning rate")
    self_supervised_weight: float = Field(
        1.0, ge=0, description="weight of the in-modal self-supervised losses"
    )
    ssl_temperature: float = Field(0.07, gt=0, description="temperature of the in-modal losses")


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=generator).split(batch_size))


class _FineTuner(Purifier):
    """Shared loop: copy the model, train the chosen parameters, return a model file."""

    trains_text: ClassVar[bool] = False

    def purify(
        self,
        bundle: ModelBundle,
        shots: ShotSet,
        config: BaseModel,
        context: RunContext,
        trigger: TriggerFile | None = None,
    ) -> PurifyOutcome:
        assert isinstance(config, FinetuneConfig)
        model = copy.deepcopy(bundle.model)
        work = ModelBundle.from_model(model, bundle.model_cfg, arch=bundle.arch, sha256="work")
        trainable = model if self.trains_text else model.visual
        trainable.requires_grad_(True)
        model.logit_scale.requires_grad_(False)
        trainable.train()
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        generator = context.generator(offset=17)
        steps_per_epoch = len(_batches(len(shots.labels), config.batch_size, generator))
        prepared = self.prepare(work, shots)
        losses: list[float] = []
        with (
            context.stage(f"{self.name} training"),
            context.progress.task(
                f"{self.name}: fine-tuning", total=config.epochs * steps_per_epoch
            ) as advance,
        ):
            for _ in range(config.epochs):
                for index in _batches(len(shots.labels), config.batch_size, generator):
                    loss = self.loss(work, shots, index, config, generator, prepared)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
                    advance()
        model.eval()
        model.requires_grad_(False)
        data = model_file_bytes(
            model, bundle.model_cfg, {"purified_from_sha256": bundle.sha256, "purifier": self.name}
        )
        purified = ModelBundle.from_model(
            model, bundle.model_cfg, arch=bundle.arch, sha256=hashlib.sha256(data).hexdigest()
        )
        bundle.image_encoder_images += work.image_encoder_images
        bundle.text_encoder_prompts += work.text_encoder_prompts
        return PurifyOutcome(
            classifier=PromptClassifier(purified, shots.classnames),
            statistics={
                "steps": len(losses),
                "first_loss": losses[0],
                "last_loss": losses[-1],
                "image_encoder_images": work.image_encoder_images,
                "text_encoder_prompts": work.text_encoder_prompts,
                "trained_parameters": sum(
                    p.numel() for p in trainable.parameters() if p is not model.logit_scale
                ),
                "purified_model_sha256": purified.sha256,
            },
            artifacts={"model.safetensors": data},
        )

    def prepare(self, work: ModelBundle, shots: ShotSet) -> torch.Tensor | None:
        """Anything computed once before training (frozen text features, say)."""
        return None

    @abstractmethod
    def loss(
        self,
        work: ModelBundle,
        shots: ShotSet,
        index: torch.Tensor,
        config: BaseModel,
        generator: torch.Generator,
        prepared: torch.Tensor | None,
    ) -> torch.Tensor:
        """The training loss on the shots selected by ``index``."""


class FinetunePurifier(_FineTuner):
    """FT: cross-entropy fine-tuning of the image encoder against hand-crafted prompts."""

    name = "finetune"
    version = __version__
    description = "supervised fine-tuning of the image encoder on the clean shots (FT)"
    Config = FinetuneConfig

    def prepare(self, work: ModelBundle, shots: ShotSet) -> torch.Tensor:
        return handcrafted_text_features(work, shots.classnames)

    def loss(self, work, shots, index, config, generator, prepared):
        pixels = augment(shots.pixels[index], generator, config.crop_scale)
        logits = work.logit_scale * work.encode_image(pixels) @ prepared.T
        return F.cross_entropy(logits, shots.labels[index])


def _info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = a @ b.T / temperature
    targets = torch.arange(len(a))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class CleanClipPurifier(_FineTuner):
    """CleanCLIP-style: multimodal contrastive + in-modal self-supervised losses, both towers."""

    name = "cleanclip"
    version = __version__
    description = "CleanCLIP-style fine-tuning of both encoders (multimodal + self-supervised)"
    Config = CleanClipConfig
    trains_text = True

    def loss(self, work, shots, index, config, generator, prepared):
        assert isinstance(config, CleanClipConfig)
        labels = shots.labels[index]
        view_a = work.encode_image(augment(shots.pixels[index], generator, config.crop_scale))
        view_b = work.encode_image(augment(shots.pixels[index], generator, config.crop_scale))
        picks = torch.randint(len(CAPTION_TEMPLATES), (2, len(index)), generator=generator)
        captions = [
            [
                CAPTION_TEMPLATES[int(t)].format(shots.classnames[int(y)])
                for t, y in zip(row, labels, strict=True)
            ]
            for row in picks
        ]
        # on the host, as encode_image returns the views (the encoders run on the device)
        text_a = F.normalize(work.model.encode_text(work.tokenize(captions[0])), dim=-1)
        text_b = F.normalize(work.model.encode_text(work.tokenize(captions[1])), dim=-1)
        text_a, text_b = text_a.to(view_a.device), text_b.to(view_a.device)
        work.text_encoder_prompts += 2 * len(index)
        # multimodal loss with every caption of the same class as a positive
        same_class = (labels[:, None] == labels[None, :]).float()
        targets = same_class / same_class.sum(dim=1, keepdim=True)
        logits = work.logit_scale * view_a @ text_a.T
        multimodal = (
            -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
            - (targets * F.log_softmax(logits.T, dim=1)).sum(1).mean()
        ) / 2
        self_supervised = _info_nce(view_a, view_b, config.ssl_temperature) + _info_nce(
            text_a, text_b, config.ssl_temperature
        )
        return multimodal + config.self_supervised_weight * self_supervised
