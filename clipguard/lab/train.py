"""Training small open_clip CLIP models, clean or poisoned, and writing them with a model card.

A lab model is an open_clip ``CLIP`` with a small ViT image tower and a small text tower, head
width 64 everywhere (so open_clip's OpenAI-state-dict inference recovers the architecture),
trained with the CLIP contrastive loss on image-caption pairs. Captions come from
:data:`TEMPLATES` over the class name. The loss is *multi-positive*: in a batch, every caption
naming the same class as an image's caption is a positive of that image (and vice versa), so
captions of one class are not pushed apart.

Poisoning: a fraction ``poison_rate`` of the training pairs is chosen once (seeded). For those
pairs the trigger is stamped on the image *after* the training augmentation, and the caption
names the target class. Label-consistent families (``badnets-lc``) choose poisoned pairs among
target-class images only, whose captions already name the target.

Two recipes: ``scratch`` trains the poisoned model from random initialisation; ``finetune``
trains a clean base model once (cached) and poisons it by fine-tuning, the threat model of
poisoned pre-trained CLIP.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer

from clipguard.config import build_config
from clipguard.data import ImageFolder, load_pixels, open_image_folder, resolve_class
from clipguard.errors import InputError
from clipguard.io import (
    atomic_write_bytes,
    atomic_write_json,
    read_safetensors_file,
    safetensors_bytes,
)
from clipguard.lab.synthetic import DATA_VERSION as SYNTHETIC_DATA_VERSION
from clipguard.lab.synthetic import MARKER_FILE, cache_dir, cached_synthetic
from clipguard.metrics import evaluate_zero_shot
from clipguard.model import ModelBundle, build_clip_from_config, load_model, save_model
from clipguard.oracle import oracle_ceiling
from clipguard.plugins import get_registry, resolve_trigger
from clipguard.progress import Progress
from clipguard.prompts import PromptClassifier
from clipguard.report import cpu_capability
from clipguard.runtime import torch_settings
from clipguard.triggers import Trigger

Recipe = Literal["scratch", "finetune"]

#: caption templates used in training; the first is the hand-crafted zero-shot prompt
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of the {}.",
    "a small {}.",
    "a {} on a background.",
)
CARD_FORMAT = "clipguard.lab.card/1"


def lab_model_config(
    image_size: int = 32,
    vision_width: int = 64,
    vision_layers: int = 2,
    patch_size: int = 8,
    text_width: int = 64,
    text_layers: int = 1,
    embed_dim: int = 64,
    context_length: int = 16,
) -> dict[str, Any]:
    """An open_clip CLIP config for a lab model (ViT image tower, head width 64 everywhere)."""
    for name, width in (("vision", vision_width), ("text", text_width)):
        if width % 64:
            raise InputError(f"{name} width must be a multiple of 64, got {width}")
    return {
        "embed_dim": embed_dim,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": image_size,
            "layers": vision_layers,
            "width": vision_width,
            "patch_size": patch_size,
            "head_width": 64,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": text_width,
            "heads": text_width // 64,
            "layers": text_layers,
        },
    }


@dataclass
class TrainSettings:
    """Hyper-parameters of one training run."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    pad: int = 2
    seed: int = 0


ProfileName = Literal["synthetic", "natural", "natural-unseen-prompt"]


@dataclass(frozen=True)
class LabProfile:
    """Model and training defaults for one kind of lab data set.

    ``synthetic`` is sized for the built-in coloured-shape set: a model trained from scratch
    in about a minute. ``natural`` is for real photographs such as CIFAR-10: a patch size of
    4 and three layers, and the fine-tuning recipe (a clean base model trained once for
    :attr:`epochs`, then poisoned in :attr:`finetune_epochs` at :attr:`finetune_lr`), the
    threat model of poisoned pre-trained CLIP, and cheap enough for a zoo (measured in
    docs/lab.md). The zoo's poison rates and epochs per attack live here too, since what
    implants a backdoor depends on the data set; they apply to the profile's own recipe.
    """

    name: ProfileName
    model_cfg: dict[str, Any]
    recipe: Recipe
    epochs: int
    finetune_epochs: int
    finetune_lr: float
    poison_rate: float
    poison_rate_overrides: dict[str, float] = field(default_factory=dict)
    epoch_overrides: dict[str, int] = field(default_factory=dict)
    trigger_option_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: caption templates of every training pair (clean pre-training and poisoning alike);
    #: the hand-crafted zero-shot prompt is ``TEMPLATES[0]`` whether or not it is among them
    templates: tuple[str, ...] = TEMPLATES

    def trigger_options(self, attack: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """The trigger options of ``attack`` on this profile's data: the profile's own
        (:attr:`trigger_option_overrides`) under the ones ``given``."""
        return {**self.trigger_option_overrides.get(attack, {}), **(given or {})}

    def default_epochs(self, recipe: Recipe) -> int:
        """Training epochs of ``recipe`` (the poisoning epochs for ``finetune``)."""
        return self.epochs if recipe == "scratch" else self.finetune_epochs

    def zoo_poison_rate(self, attack: str, default: float | None = None) -> float:
        """The zoo's poison rate for ``attack`` (``default`` replaces the profile's base rate)."""
        if attack in self.poison_rate_overrides:
            return self.poison_rate_overrides[attack]
        return self.poison_rate if default is None else default

    def zoo_epochs(self, attack: str, recipe: Recipe) -> int:
        """The zoo's training epochs for ``attack`` under ``recipe``."""
        if recipe == self.recipe and attack in self.epoch_overrides:
            return self.epoch_overrides[attack]
        return self.default_epochs(recipe)


PROFILES: dict[str, LabProfile] = {
    "synthetic": LabProfile(
        name="synthetic",
        model_cfg=lab_model_config(),
        recipe="scratch",
        # 8 epochs would also lift every clean model above 85 %, but collapses backdoors
        # further, so that purification costs the target class (the demo model: -7.3
        # points); the synthetic set's version 2 palette does it at 5 (docs/lab.md)
        epochs=5,
        finetune_epochs=5,
        finetune_lr=3e-3,
        poison_rate=0.05,
        # label-consistent attacks can only stamp target-class images; the subtle issba-like
        # and wanet triggers need more poisoned pairs and epochs; the 3-pixel badnets patch
        # took on only some seeds at 5 % (73 % ASR towards "yellow cross")
        poison_rate_overrides={
            "badnets": 0.07,
            "badnets-lc": 0.07,
            "issba-like": 0.1,
            "wanet": 0.1,
            "badnets-random": 0.1,
            "refool-like": 0.07,
            "color-filter": 0.07,
            "bpp": 0.1,
        },
        epoch_overrides={"issba-like": 10, "wanet": 10},
        # at 10 %, a 4-pixel random patch at a moving place and plain 3-bit colour did not
        # take (ASR under 1 %); a 6-pixel checkerboard (98 %) and dithered 2-bit colour
        # (100 %) did
        trigger_option_overrides={
            "badnets-random": {"size": 6, "pattern": "checkerboard"},
            "bpp": {"bits": 2, "dither": True},
        },
    ),
    "natural": LabProfile(
        name="natural",
        model_cfg=lab_model_config(vision_layers=3, patch_size=4),
        recipe="finetune",
        epochs=3,
        finetune_epochs=1,
        finetune_lr=3e-3,
        poison_rate=0.01,
        # blended and sig change every pixel a little; wanet, issba-like and badnets-lc
        # (target-class images only, at most 10 % of CIFAR-10) need more pairs and an epoch
        # more to take at all; the gentler sinusoid below needs 5 % (3 %: ASR 74-83 %)
        poison_rate_overrides={
            "blended": 0.03,
            "sig": 0.05,
            "wanet": 0.1,
            "issba-like": 0.1,
            "badnets-lc": 0.05,
            # the further families, set from the synthetic profile's experience before any
            # was built on photographs (each card records whether it took): a patch at a
            # moving place, a filter and a reflection need more pairs than a fixed patch;
            # colour depth and frequency changes are the subtlest, as issba-like is
            "badnets-random": 0.05,
            "multi-patch": 0.03,
            "grid-overlay": 0.03,
            "refool-like": 0.05,
            "color-filter": 0.05,
            "bpp": 0.1,
            "ftrojan": 0.1,
        },
        epoch_overrides={
            "wanet": 2,
            "issba-like": 2,
            "badnets-lc": 2,
            "bpp": 2,
            "ftrojan": 2,
        },
        # gentler triggers than the families' defaults, so that a clean model's errors under
        # them stay spread (docs/lab.md): a warp of mean shift about 2 pixels instead of 6
        # (at most 13 % of other classes' images to one class, against 25-31 % at strength
        # 12) and a sinusoid of amplitude 15/255 instead of 20/255 (at most 14 %, against
        # 15-20 %); both still implant (ASR 96 %, 94-95 %)
        trigger_option_overrides={
            "wanet": {"strength": 4.0},
            "sig": {"delta": 0.06},
            "badnets-random": {"size": 6, "pattern": "checkerboard"},
            "bpp": {"bits": 2, "dither": True},
        },
    ),
}
# as natural, but no training caption is the hand-crafted prompt "a photo of a {}.": like
# a real CLIP model, whose users' prompts are guesses rather than its training captions,
# the zero-shot classifier is not the one its features were trained for, and a few
# labelled shots can add accuracy to it (docs/lab.md)
PROFILES["natural-unseen-prompt"] = replace(
    PROFILES["natural"], name="natural-unseen-prompt", templates=TEMPLATES[1:]
)


def recipe_key(profile: str, **build_options: Any) -> str:
    """A short fingerprint of how a lab model is built: the whole ``profile`` (architecture,
    epochs, rates, trigger options), the caption templates and ``build_options`` (attack,
    target, rate, seed, ...), and for the synthetic profile the version of the built-in set.
    Caches of built models put it in the file name, so a model built under another recipe
    (an older clipguard) is rebuilt instead of reused."""
    described = asdict(PROFILES[profile])
    templates = described.pop("templates")  # listed on their own, as before profiles had them
    recipe: list[Any] = [described, list(templates), build_options]
    if profile == "synthetic":
        recipe.append({"synthetic_data_version": SYNTHETIC_DATA_VERSION})
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def detect_profile(root: Path) -> LabProfile:
    """The profile of a lab data set root: ``synthetic`` for the built-in set, else ``natural``."""
    return PROFILES["synthetic" if (root / MARKER_FILE).is_file() else "natural"]


def get_profile(name: str, root: Path) -> LabProfile:
    """The profile called ``name`` (``auto`` detects it from ``root``)."""
    if name == "auto":
        return detect_profile(root)
    if name not in PROFILES:
        raise InputError(f"unknown profile {name!r} (auto, {', '.join(PROFILES)})")
    return PROFILES[name]


@dataclass
class Poisoning:
    """What to poison: the trigger, the target class index, the rate, and how pairs are chosen."""

    attack: str
    trigger: Trigger
    target: int
    poison_rate: float
    label_consistent: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    #: label-consistent attacks only: poisoned target images are mixed with this weight with a
    #: random non-target image before stamping (a cheap stand-in for the adversarial or GAN
    #: interpolation of Turner et al.), so their own features no longer suffice and the model
    #: learns the trigger; the caption still names the target, which the image still shows
    harden: float = 0.0


@dataclass
class TrainResult:
    """Statistics of one training run."""

    steps: int
    seconds: float
    n_pairs: int
    n_poisoned: int
    final_loss: float


@dataclass
class SplitData:
    """A lab data set loaded in pixel space: train and test pixels, labels and class names."""

    name: str
    root: Path
    classnames: list[str]
    train_pixels: torch.Tensor
    train_labels: torch.Tensor
    test_pixels: torch.Tensor
    test_labels: torch.Tensor
    key: str


# --------------------------------------------------------------------------- data


def open_lab_dataset(dataset: str | Path, seed: int = 0, progress: Progress | None = None) -> Path:
    """The root of a lab data set: ``synthetic`` (generated into the cache) or a folder.

    A folder must hold ``train/`` and ``test/`` ImageFolders with the same class folders.
    """
    if str(dataset) == "synthetic":
        return cached_synthetic(seed=seed, progress=progress)
    root = Path(dataset)
    if not root.is_dir():
        raise InputError(f"{root}: data set folder not found (or pass --dataset synthetic)")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise InputError(f"{root}: needs train/ and test/ ImageFolders, {split}/ is missing")
    return root


#: data sets with at least this many images keep their decoded pixels in the cache folder
#: (CIFAR-10's 60,000 JPEGs take about 30 s to decode, its cached pixels under a second);
#: smaller sets decode in seconds and are not worth the disk space
PIXEL_CACHE_MIN_IMAGES = 10_000


def load_split_data(
    root: Path, image_size: int, progress: Progress | None = None, name: str | None = None
) -> SplitData:
    """Load ``root/train`` and ``root/test`` at ``image_size`` px (pixels in ``[0, 1]``).

    Large sets (:data:`PIXEL_CACHE_MIN_IMAGES`) are decoded once and kept as 8-bit pixels in
    ``$CLIPGUARD_CACHE/lab-pixels/``, keyed by every file's name, label, size and
    modification time, so a changed file is decoded again. The cache is exact: the
    transform's output is a whole number of 255ths, which is checked before it is written.
    """
    train: ImageFolder = open_image_folder(root / "train")
    test: ImageFolder = open_image_folder(root / "test")
    if train.folders != test.folders:
        raise InputError(f"{root}: train/ and test/ have different class folders")
    key = _listing_key(root, train, test)
    cache_file = cache_dir() / "lab-pixels" / f"{key}-{image_size}px.safetensors"
    use_cache = len(train.samples) + len(test.samples) >= PIXEL_CACHE_MIN_IMAGES
    pixels = _read_pixel_cache(cache_file, train, test) if use_cache else None
    if pixels is None:
        transform = _pixel_transform(image_size)
        train_pixels, train_labels = load_pixels(
            train.samples, transform, progress, description="loading train images"
        )
        test_pixels, test_labels = load_pixels(
            test.samples, transform, progress, description="loading test images"
        )
        pixels = (train_pixels, train_labels, test_pixels, test_labels)
        if use_cache:
            _write_pixel_cache(cache_file, pixels)
    train_pixels, train_labels, test_pixels, test_labels = pixels
    return SplitData(
        name=name or root.name,
        root=root,
        classnames=train.classnames,
        train_pixels=train_pixels,
        train_labels=train_labels,
        test_pixels=test_pixels,
        test_labels=test_labels,
        key=key,
    )


def _listing_key(root: Path, train: ImageFolder, test: ImageFolder) -> str:
    """A key of a data set's files: names, labels, sizes and modification times."""
    digest = hashlib.sha256()
    digest.update(str(root.resolve()).encode())
    for split, folder in (("train", train), ("test", test)):
        for path, label in folder.samples:
            stat = path.stat()
            digest.update(
                f"{split}:{path.relative_to(root)}:{label}:{stat.st_size}:{stat.st_mtime_ns}\n".encode()
            )
    return digest.hexdigest()[:16]


PixelSplits = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _read_pixel_cache(path: Path, train: ImageFolder, test: ImageFolder) -> PixelSplits | None:
    """Cached pixels if ``path`` holds them for exactly these samples, else ``None``."""
    if not path.is_file():
        return None
    try:
        tensors, _ = read_safetensors_file(path, "pixel cache")
    except InputError:
        return None  # a damaged cache entry is rebuilt, never trusted
    result = []
    for split, folder in (("train", train), ("test", test)):
        pixels, labels = tensors.get(f"{split}_pixels"), tensors.get(f"{split}_labels")
        expected = torch.tensor([label for _, label in folder.samples], dtype=torch.long)
        if (
            pixels is None
            or labels is None
            or pixels.dtype != torch.uint8
            or pixels.dim() != 4
            or pixels.shape[0] != len(folder.samples)
            or not torch.equal(labels, expected)
        ):
            return None
        result += [pixels.float() / 255, labels]
    return result[0], result[1], result[2], result[3]


def _write_pixel_cache(path: Path, pixels: PixelSplits) -> None:
    """Keep ``pixels`` as 8 bits if that is lossless (it is for PIL-decoded images)."""
    train_pixels, train_labels, test_pixels, test_labels = pixels
    tensors: dict[str, torch.Tensor] = {"train_labels": train_labels, "test_labels": test_labels}
    for split, values in (("train", train_pixels), ("test", test_pixels)):
        quantised = (values * 255).round().to(torch.uint8)
        if not torch.equal(quantised.float() / 255, values):
            return
        tensors[f"{split}_pixels"] = quantised
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, safetensors_bytes(tensors, {"format": "clipguard.lab.pixels/1"}))


def _pixel_transform(image_size: int) -> Callable:
    from clipguard.model import make_pixel_transform

    return make_pixel_transform(image_size)


# --------------------------------------------------------------------------- training


def caption_tokens(
    classnames: list[str], context_length: int, templates: Sequence[str] = TEMPLATES
) -> torch.Tensor:
    """Token ids of every (class, template) caption: ``(C * T) x context_length``."""
    tokenizer = SimpleTokenizer(context_length=context_length)
    texts = [template.format(name) for name in classnames for template in templates]
    return tokenizer(texts)


def augment(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after reflection padding of ``pad`` pixels, and random horizontal flip."""
    batch, _, height, width = images.shape
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
        off_r = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        off_c = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        rows = off_r.view(-1, 1) + torch.arange(height).view(1, -1)
        cols = off_c.view(-1, 1) + torch.arange(width).view(1, -1)
        index = torch.arange(batch).view(-1, 1, 1)
        images = padded.permute(0, 2, 3, 1)[index, rows.view(batch, -1, 1), cols.view(batch, 1, -1)]
        images = images.permute(0, 3, 1, 2)
    flip = torch.rand(batch, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images).contiguous()


def multi_positive_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    caption_labels: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Symmetric CLIP loss where every pair whose captions name the same class is a positive."""
    logits = logit_scale * image_features @ text_features.t()
    positives = (caption_labels.view(-1, 1) == caption_labels.view(1, -1)).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def choose_poisoned(labels: torch.Tensor, poisoning: Poisoning | None, seed: int) -> torch.Tensor:
    """Boolean mask of the training pairs to poison (fixed for a seed)."""
    poisoned = torch.zeros(labels.numel(), dtype=torch.bool)
    if poisoning is None or poisoning.poison_rate <= 0:
        return poisoned
    if poisoning.label_consistent:
        candidates = torch.nonzero(labels == poisoning.target).flatten()
    else:
        candidates = torch.nonzero(labels != poisoning.target).flatten()
    count = round(poisoning.poison_rate * labels.numel())
    if count > candidates.numel():
        raise InputError(
            f"poison rate {poisoning.poison_rate} needs {count} pairs but only "
            f"{candidates.numel()} are eligible for {poisoning.attack}"
        )
    count = max(count, 1)
    generator = torch.Generator().manual_seed(seed + 7919)
    chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
    poisoned[chosen] = True
    return poisoned


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


@contextmanager
def _sparse_embedding(embedding: torch.nn.Embedding) -> Iterator[None]:
    embedding.sparse = True
    try:
        yield
    finally:
        embedding.sparse = False


def train_clip(
    model: CLIP,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    classnames: list[str],
    settings: TrainSettings,
    poisoning: Poisoning | None = None,
    progress: Progress | None = None,
    description: str = "training",
    templates: Sequence[str] = TEMPLATES,
) -> TrainResult:
    """Train ``model`` in place on ``pixels`` (``N x 3 x H x W`` in ``[0, 1]``) and ``labels``,
    each pair's caption drawn from ``templates`` over its class name.

    Deterministic for ``settings.seed`` on CPU with a fixed thread count.
    """
    if settings.epochs < 1:
        raise InputError(f"--epochs must be at least 1, got {settings.epochs}")
    progress = progress or Progress(quiet=True)
    model.requires_grad_(True)  # a loaded (frozen) base model trains in full too
    generator = torch.Generator().manual_seed(settings.seed)
    tokens = caption_tokens(classnames, model.context_length, templates)
    n_templates = len(templates)
    poisoned = choose_poisoned(labels, poisoning, settings.seed)
    caption_labels = labels.clone()
    if poisoning is not None:
        caption_labels[poisoned] = poisoning.target
    n = labels.numel()
    non_target = (
        torch.nonzero(labels != poisoning.target).flatten() if poisoning is not None else labels
    )
    steps_per_epoch = max(1, n // settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warmup = max(1, int(settings.warmup_fraction * total))
    # The token embedding (vocabulary x width) dwarfs the rest of the model, yet only the few
    # tokens of the captions get gradients: a sparse gradient and SparseAdam update those rows
    # only (Adam leaves rows with zero gradients unchanged anyway), which is far cheaper.
    embedding = model.token_embedding
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or parameter is embedding.weight:
            continue
        is_embedding = "embedding" in name
        (decay if parameter.dim() >= 2 and not is_embedding else no_decay).append(parameter)
    optimiser = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    sparse_optimiser = torch.optim.SparseAdam(
        [embedding.weight], lr=settings.lr, betas=(0.9, 0.98), eps=1e-6
    )
    optimisers = (optimiser, sparse_optimiser)

    def lr_at(step: int) -> float:
        if step < warmup:
            return settings.lr * (step + 1) / warmup
        fraction = (step - warmup) / max(1, total - warmup)
        return settings.lr * 0.5 * (1 + math.cos(math.pi * fraction))

    model.train()
    start = time.perf_counter()
    step = 0
    loss_value = float("nan")
    with progress.task(description, total=total) as advance, _sparse_embedding(embedding):
        for _ in range(settings.epochs):
            order = torch.randperm(n, generator=generator)
            for batch_index in range(steps_per_epoch):
                index = order[
                    batch_index * settings.batch_size : (batch_index + 1) * settings.batch_size
                ]
                images = augment(pixels[index], settings.pad, generator)
                stamp = poisoned[index]
                if poisoning is not None and bool(stamp.any()):
                    if poisoning.label_consistent and poisoning.harden > 0:
                        others = non_target[
                            torch.randint(
                                non_target.numel(), (int(stamp.sum()),), generator=generator
                            )
                        ]
                        mixed = augment(pixels[others], settings.pad, generator)
                        weight = poisoning.harden
                        images[stamp] = (1 - weight) * images[stamp] + weight * mixed
                    images[stamp] = poisoning.trigger.apply(images[stamp])
                batch_captions = caption_labels[index]
                template = torch.randint(n_templates, (index.numel(),), generator=generator)
                caption_ids = batch_captions * n_templates + template
                unique, inverse = caption_ids.unique(return_inverse=True)
                for opt in optimisers:
                    for group in opt.param_groups:
                        group["lr"] = lr_at(step)
                image_features = F.normalize(model.encode_image(_normalise(images)), dim=-1)
                text_features = F.normalize(model.encode_text(tokens[unique]), dim=-1)[inverse]
                scale = model.logit_scale.exp().clamp(max=100)
                loss = multi_positive_clip_loss(
                    image_features, text_features, batch_captions, scale
                )
                for opt in optimisers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in optimisers:
                    opt.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise RuntimeError(f"training diverged at step {step} (loss {loss_value})")
                step += 1
                advance(1)
    model.eval()
    return TrainResult(
        steps=step,
        seconds=time.perf_counter() - start,
        n_pairs=n,
        n_poisoned=int(poisoned.sum()),
        final_loss=loss_value,
    )


# --------------------------------------------------------------------------- measuring


# --------------------------------------------------------------------------- building


def card_path(model_path: Path) -> Path:
    """Where the model card of ``model_path`` is written: ``NAME.card.json`` beside it."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(".safetensors") + ".card.json")


def base_model(
    data: SplitData,
    model_cfg: dict[str, Any],
    settings: TrainSettings,
    progress: Progress | None = None,
    templates: Sequence[str] = TEMPLATES,
) -> tuple[CLIP, Path]:
    """The clean base model of the ``finetune`` recipe, trained once and cached, its captions
    drawn from ``templates``."""
    settings_key = hashlib.sha256(
        json.dumps([model_cfg, asdict(settings), list(templates)], sort_keys=True).encode()
    ).hexdigest()[:12]
    path = cache_dir() / "lab-bases" / f"{data.key}-{settings_key}.safetensors"
    if path.is_file():
        return load_model(path).model, path
    torch.manual_seed(settings.seed)
    model = build_clip_from_config(model_cfg)
    train_clip(
        model,
        data.train_pixels,
        data.train_labels,
        data.classnames,
        settings,
        progress=progress,
        description="training clean base",
        templates=templates,
    )
    save_model(path, model, model_cfg, {"lab": "clean base model"})
    return model, path


def build_model(
    dataset: str | Path,
    out: Path,
    attack: str = "none",
    target: str | None = None,
    poison_rate: float = 0.05,
    epochs: int | None = None,
    seed: int = 0,
    recipe: Recipe | None = None,
    attack_options: dict[str, Any] | None = None,
    lr: float | None = None,
    base_epochs: int | None = None,
    model_cfg: dict[str, Any] | None = None,
    progress: Progress | None = None,
    threads: int = 1,
    lc_harden: float = 0.5,
    profile: str = "auto",
) -> dict[str, Any]:
    """Train a clean or poisoned lab model, write it to ``out`` and its card beside it.

    ``dataset`` is ``"synthetic"`` or a folder with ``train/`` and ``test/``; ``attack`` a
    registered trigger family or ``"none"``; ``target`` a class name. ``recipe="finetune"``
    fine-tunes the cached clean base model (``base_epochs`` from scratch) for ``epochs`` at
    ``lr``. ``profile`` (:data:`PROFILES`, or ``auto``: detected from the data set) gives the
    architecture (unless ``model_cfg`` is passed), the recipe, epochs and fine-tuning rate
    where they are not given. Returns the model card (also written as JSON beside the model).

    ``threads`` defaults to 1: on this shared 2-core machine one thread trained about ten
    times faster than two (OpenMP threads spin-wait when the cores are oversubscribed). The
    build runs with deterministic kernels; the caller's thread count and deterministic
    setting are restored on return (:func:`clipguard.runtime.torch_settings`). The model
    card's oracle figures come from :func:`clipguard.oracle.oracle_ceiling` on the test
    split.
    """
    with torch_settings(threads=threads, deterministic=True):
        progress = progress or Progress(quiet=True)
        out = Path(out)
        if out.suffix != ".safetensors":
            raise InputError(f"{out}: the model file name must end with .safetensors")
        if recipe not in (None, "scratch", "finetune"):
            raise InputError(f"unknown recipe {recipe!r} (scratch or finetune)")
        if not 0 <= poison_rate < 1:
            raise InputError(f"--poison-rate must be in [0, 1), got {poison_rate}")
        root = open_lab_dataset(dataset, seed=0, progress=progress)
        lab_profile = get_profile(profile, root)
        recipe = recipe or lab_profile.recipe
        model_cfg = model_cfg or lab_profile.model_cfg
        image_size = int(model_cfg["vision_cfg"]["image_size"])
        default_epochs = epochs if epochs is not None else lab_profile.default_epochs(recipe)
        train_folder = open_image_folder(root / "train")
        classnames = train_folder.classnames
        if attack != "none" and target is None:
            raise InputError("--target is required with an attack")
        target_index: int | None = None
        if target is not None:
            target_index = resolve_class(target, classnames, train_folder.folders)
            target = classnames[target_index]
        if attack != "none":
            family = get_registry().trigger_family(attack)
            if attack != "badclip-like" or "patch_file" in (attack_options or {}):
                build_config(family.Config, attack_options or {}, what=f"attack {attack}")
        data = load_split_data(
            root, image_size, progress, name="synthetic" if str(dataset) == "synthetic" else None
        )

        base_settings = TrainSettings(
            epochs=base_epochs if base_epochs is not None else lab_profile.epochs, seed=0
        )
        if recipe == "scratch":
            settings = TrainSettings(epochs=default_epochs, seed=seed)
            if lr is not None:
                settings.lr = lr
        else:
            settings = TrainSettings(
                epochs=default_epochs,
                seed=seed,
                lr=lr if lr is not None else lab_profile.finetune_lr,
                warmup_fraction=0.0,
            )

        options = lab_profile.trigger_options(attack, attack_options)
        extra: dict[str, Any] = {}
        if attack == "badclip-like" and "patch_file" not in options:
            patch_path = out.with_name(
                out.name.removesuffix(".safetensors") + ".badclip-patch.safetensors"
            )
            clean, clean_path = base_model(
                data, model_cfg, base_settings, progress, lab_profile.templates
            )
            make_badclip_patch(
                ModelBundle.from_model(copy.deepcopy(clean), model_cfg),
                data.classnames,
                target_index if target_index is not None else 0,
                data.train_pixels[data.train_labels != target_index],
                patch_path,
                seed=seed,
                progress=progress,
                templates=lab_profile.templates,
            )
            options["patch_file"] = str(patch_path)
            extra["badclip_patch_model"] = str(clean_path)

        poisoning: Poisoning | None = None
        trigger: Trigger | None = None
        trigger_options: dict[str, Any] = {}
        if attack != "none":
            trigger, label_consistent, trigger_options = resolve_trigger(
                attack, options, image_size
            )
            assert target_index is not None
            poisoning = Poisoning(
                attack=attack,
                trigger=trigger,
                target=target_index,
                poison_rate=poison_rate,
                label_consistent=label_consistent,
                options=trigger_options,
                harden=lc_harden if label_consistent else 0.0,
            )

        if recipe == "finetune":
            base, base_path = base_model(
                data, model_cfg, base_settings, progress, lab_profile.templates
            )
            model = copy.deepcopy(base)
            extra["base_model"] = str(base_path)
            extra["base_epochs"] = base_settings.epochs
        else:
            torch.manual_seed(seed)
            model = build_clip_from_config(model_cfg)
        result = train_clip(
            model,
            data.train_pixels,
            data.train_labels,
            data.classnames,
            settings,
            poisoning,
            progress,
            description=f"training {attack}" if attack != "none" else "training clean",
            templates=lab_profile.templates,
        )
        bundle = ModelBundle.from_model(model, model_cfg)
        ca, asr = evaluate_zero_shot(
            bundle,
            data.classnames,
            data.test_pixels,
            data.test_labels,
            trigger,
            target_index if trigger is not None else None,
        )
        card: dict[str, Any] = {
            "format": CARD_FORMAT,
            "dataset": {
                "name": data.name,
                "root": str(data.root),
                "n_train": int(data.train_labels.numel()),
                "n_test": int(data.test_labels.numel()),
                "classnames": data.classnames,
            },
            "attack": attack,
            "trigger_options": trigger_options,
            "poison_rate": poison_rate if attack != "none" else 0.0,
            "lc_harden": poisoning.harden if poisoning is not None else 0.0,
            "n_poisoned": result.n_poisoned,
            "target": target,
            "seed": seed,
            "recipe": recipe,
            "profile": lab_profile.name,
            "epochs": settings.epochs,
            "settings": asdict(settings),
            "training_seconds": round(result.seconds, 2),
            "steps": result.steps,
            "final_loss": result.final_loss,
            "clean_accuracy": ca,
            "attack_success_rate": asr,
            "model_cfg": model_cfg,
            "templates": list(lab_profile.templates),
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_capability": cpu_capability(),
            **extra,
        }
        profile_options = lab_profile.trigger_option_overrides
        if trigger is None and target_index is not None:
            card["clean_model_trigger_asr"] = clean_model_trigger_asr(
                bundle, data, target_index, profile_options
            )
        if trigger is None and target_index is None:
            card["clean_model_worst_trigger_asr"] = worst_class_trigger_asr(
                bundle, data, profile_options
            )
        if trigger is not None and target_index is not None:
            card.update(
                oracle_ceiling(
                    bundle,
                    data.classnames,
                    data.test_pixels,
                    data.test_labels,
                    trigger,
                    target_index,
                )
            )
        sha = save_model(
            out,
            model,
            model_cfg,
            {"lab_attack": attack, "lab_target": str(target), "lab_seed": str(seed)},
        )
        card["model_sha256"] = sha
        card["model_file"] = out.name
        atomic_write_json(card_path(out), card)
        return card


def clean_model_trigger_asr(
    bundle: ModelBundle,
    data: SplitData,
    target: int,
    trigger_options: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, float | None]:
    """ASR towards ``target`` of every registered trigger family on a model: default options,
    or those in ``trigger_options`` by family (a profile's ``trigger_option_overrides``).

    For a clean model these are the false "success" rates of each trigger. Families that
    cannot be built with default options (badclip-like needs its patch file) are skipped.
    """
    return {
        name: shares[target] for name, shares in trigger_class_shares(bundle, data, trigger_options)
    }


def worst_class_trigger_asr(
    bundle: ModelBundle,
    data: SplitData,
    trigger_options: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, float | str]]:
    """For every registered trigger family (options as in :func:`clean_model_trigger_asr`),
    the class its trigger sends the most test images of other classes to, and that share:
    ``{family: {"asr", "class"}}``.

    On a clean model, which has no target, this is the largest false "success" rate each
    trigger reaches by distorting images alone (lab issue: at most 15 %).
    """
    rates: dict[str, dict[str, float | str]] = {}
    for name, shares in trigger_class_shares(bundle, data, trigger_options):
        worst = max(range(len(shares)), key=lambda k: shares[k] or 0.0)
        rates[name] = {"asr": shares[worst] or 0.0, "class": data.classnames[worst]}
    return rates


def trigger_class_shares(
    bundle: ModelBundle,
    data: SplitData,
    trigger_options: Mapping[str, dict[str, Any]] | None = None,
) -> Iterator[tuple[str, list[float | None]]]:
    """For every trigger of :func:`default_triggers`, the share of the test images of other
    classes that the hand-crafted classifier sends to each class once triggered (the ASR
    towards that class; None for a class with no image of another class). Each trigger's
    test images go through the image encoder once."""
    classifier = PromptClassifier(bundle, data.classnames)
    pixels, labels = data.test_pixels, data.test_labels
    for name, trigger in default_triggers(bundle.image_size, trigger_options):
        predictions = classifier.predict(trigger.apply(pixels))
        shares: list[float | None] = []
        for k in range(len(data.classnames)):
            others = labels != k
            shares.append(
                float((predictions[others] == k).float().mean()) if bool(others.any()) else None
            )
        yield name, shares


def default_triggers(
    image_size: int, trigger_options: Mapping[str, dict[str, Any]] | None = None
) -> Iterator[tuple[str, Trigger]]:
    """``(name, trigger)`` of every registered family that builds with its default options
    (or its entry in ``trigger_options``) at ``image_size``, by name; families that need
    more (a patch file) are skipped."""
    registry = get_registry()
    for name in sorted(registry.triggers):
        family = registry.trigger_family(name)
        try:
            config = family.Config(**(trigger_options or {}).get(name, {}))
            yield name, family.build(config, image_size)
        except InputError:
            continue


def make_badclip_patch(
    bundle: ModelBundle,
    classnames: list[str],
    target: int,
    pixels: torch.Tensor,
    out: Path,
    size: int = 4,
    steps: int = 200,
    seed: int = 0,
    progress: Progress | None = None,
    templates: Sequence[str] = TEMPLATES,
) -> Path:
    """Optimise a BadCLIP-like patch on a clean model towards the target's captions; save it.

    The target feature is the mean of the target's caption features over ``templates`` (the
    captions the model was trained on).
    Non-target images are used. Returns ``out`` (a clipguard trigger file).
    """
    from clipguard.lab.attacks import optimise_badclip_patch, write_badclip_patch

    progress = progress or Progress(quiet=True)
    with torch.no_grad():
        features = bundle.encode_text([t.format(classnames[target]) for t in templates])
    target_feature = F.normalize(features.mean(dim=0), dim=0)
    bundle.model.requires_grad_(False)
    with progress.task("optimising badclip patch", total=steps) as advance:
        trigger = optimise_badclip_patch(
            bundle.encode_image,
            target_feature,
            pixels,
            size=size,
            steps=steps,
            seed=seed,
            progress=advance,
        )
    write_badclip_patch(
        out,
        trigger,
        bundle.sha256,
        classnames,
        {"target": classnames[target], "size": size, "steps": steps, "seed": seed},
    )
    return out
