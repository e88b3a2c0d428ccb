"""The built-in synthetic image set: coloured shapes drawn procedurally, no files needed.

Every image is 32 x 32 RGB: one coloured shape (the class) at a random position, scale and
rotation, with colour and shading jitter, over a random textured background (flat, gradient,
stripes or blotches), with a grey distractor shape a third of the time and pixel noise. Each
class has its own colour (twelve hues, neighbours close enough that jitter and shading make
them confusable) and a shape shared with one other class, so colour and shape both carry
the class. Class names read well in a caption ("a photo of a red circle.").

:data:`DATA_VERSION` 2 (2026-11-30) spread the cool colours (green, teal and cyan were
closest; one lab model in twenty confused them and stopped below 85 % accuracy); a set or a
model made from version 1 is not reused (the cache folder and the lab's recipe fingerprint
carry the version).

The set is deterministic for a seed: :func:`generate_synthetic` returns tensors in memory,
:func:`write_synthetic` writes an ImageFolder (``train/`` and ``test/``, PNG) through a
temporary folder renamed into place, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipguard.errors import InputError
from clipguard.progress import Progress

IMAGE_SIZE = 32
#: version of the set's definition (palette, shapes, rendering); bumped whenever the images change
DATA_VERSION = 2
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (0.98, 0.55, 0.05),
    "yellow": (0.95, 0.92, 0.10),
    "lime": (0.60, 0.95, 0.15),
    "green": (0.10, 0.55, 0.05),
    "teal": (0.00, 0.40, 0.50),
    "cyan": (0.45, 0.95, 1.00),
    "blue": (0.10, 0.25, 0.95),
    "purple": (0.50, 0.15, 0.80),
    "magenta": (0.95, 0.10, 0.85),
    "pink": (1.00, 0.60, 0.75),
    "brown": (0.50, 0.28, 0.08),
}
#: the classes, in folder (sorted) order once written; each a ``(colour, shape)`` pair
CLASSES: tuple[tuple[str, str], ...] = (
    ("blue", "star"),
    ("brown", "ring"),
    ("cyan", "triangle"),
    ("green", "cross"),
    ("lime", "circle"),
    ("magenta", "triangle"),
    ("orange", "square"),
    ("pink", "star"),
    ("purple", "ring"),
    ("red", "circle"),
    ("teal", "square"),
    ("yellow", "cross"),
)
CLASSNAMES: tuple[str, ...] = tuple(f"{colour} {shape}" for colour, shape in CLASSES)
#: seeds of the train and test splits are derived from the user's seed with these offsets
_SPLIT_OFFSETS = {"train": 0, "test": 1_000_003}
MARKER_FILE = "synthetic.json"


def _shape_distance(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance-like field of a unit-sized shape (negative inside)."""
    if shape == "circle":
        return torch.sqrt(u**2 + v**2) - 0.9
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) - 0.75
    if shape == "triangle":
        return torch.maximum(u.abs() * 0.866 + v * 0.5, -v) - 0.45
    if shape == "cross":
        arm_a = torch.maximum(u.abs() - 0.3, v.abs() - 0.95)
        arm_b = torch.maximum(u.abs() - 0.95, v.abs() - 0.3)
        return torch.minimum(arm_a, arm_b)
    if shape == "ring":
        return (torch.sqrt(u**2 + v**2) - 0.7).abs() - 0.25
    if shape == "star":
        radius = torch.sqrt(u**2 + v**2)
        angle = torch.atan2(v, u)
        return radius - (0.6 + 0.38 * torch.cos(5 * angle))
    raise ValueError(f"unknown shape {shape!r}")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _background(generator: torch.Generator, size: int) -> torch.Tensor:
    """A ``3 x size x size`` textured background of muted random colours."""
    grey = _uniform(generator, 0.2, 0.8)
    base = (grey + 0.15 * (torch.rand(3, generator=generator) - 0.5)).view(3, 1, 1)
    other = (
        _uniform(generator, 0.2, 0.8) + 0.15 * (torch.rand(3, generator=generator) - 0.5)
    ).view(3, 1, 1)
    coords = torch.linspace(-1, 1, size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    kind = int(torch.randint(4, (), generator=generator))
    angle = _uniform(generator, 0, math.pi)
    along = rows * math.sin(angle) + cols * math.cos(angle)
    if kind == 0:
        weight = torch.zeros(size, size)
    elif kind == 1:
        weight = (along + 1) / 2
    elif kind == 2:
        frequency = _uniform(generator, 2, 6)
        weight = 0.5 + 0.5 * torch.sin(math.pi * frequency * along)
    else:
        coarse = torch.rand(1, 1, 4, 4, generator=generator)
        weight = torch.nn.functional.interpolate(
            coarse, size=(size, size), mode="bilinear", align_corners=False
        )[0, 0]
    return base * (1 - weight) + other * weight


def render_image(label: int, generator: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """One ``3 x size x size`` image in ``[0, 1]`` of class ``label``, drawn from ``generator``."""
    colour_name, shape = CLASSES[label]
    image = _background(generator, size)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def stamp(shape_name: str, colour: torch.Tensor, radius: float, edge: float) -> None:
        nonlocal image
        centre_r = _uniform(generator, radius + 1, size - radius - 1)
        centre_c = _uniform(generator, radius + 1, size - radius - 1)
        angle = _uniform(generator, 0, 2 * math.pi)
        dr, dc = (rows - centre_r) / radius, (cols - centre_c) / radius
        u = dc * math.cos(angle) + dr * math.sin(angle)
        v = -dc * math.sin(angle) + dr * math.cos(angle)
        alpha = torch.sigmoid(-_shape_distance(shape_name, u, v) * radius / edge)
        image = image * (1 - alpha) + colour.view(3, 1, 1) * alpha

    if float(torch.rand((), generator=generator)) < 0.33:
        distractor = ("circle", "square", "triangle", "cross", "ring", "star")[
            int(torch.randint(6, (), generator=generator))
        ]
        grey = _uniform(generator, 0.0, 1.0)
        stamp(distractor, torch.full((3,), grey), _uniform(generator, 2.0, 3.5), 0.6)
    colour = torch.tensor(COLOURS[colour_name]) + 0.12 * (torch.rand(3, generator=generator) - 0.5)
    shade = _uniform(generator, 0.85, 1.05)
    stamp(shape, (colour * shade).clamp(0, 1), _uniform(generator, 6.0, 11.0), 0.6)
    noise = _uniform(generator, 0.0, 0.06)
    image = image + noise * torch.randn(image.shape, generator=generator)
    return image.clamp(0, 1)


def generate_synthetic(
    seed: int, n_per_class: int, split: str = "train", progress: Progress | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` images of every class as ``N x 3 x 32 x 32`` uint8-exact floats, labels.

    The pixels are quantised to 8 bits, so they equal what :func:`write_synthetic` writes.
    """
    if split not in _SPLIT_OFFSETS:
        raise InputError(f"unknown split {split!r} (train or test)")
    if n_per_class < 1:
        raise InputError(f"images per class must be at least 1, got {n_per_class}")
    generator = torch.Generator().manual_seed(seed + _SPLIT_OFFSETS[split])
    images, labels = [], []
    progress = progress or Progress(quiet=True)
    order = [label for _ in range(n_per_class) for label in range(len(CLASSES))]
    for label in progress.track(order, description=f"drawing synthetic {split}"):
        images.append(render_image(label, generator))
        labels.append(label)
    pixels = (torch.stack(images) * 255).round() / 255
    return pixels, torch.tensor(labels, dtype=torch.long)


def _folder_name(label: int) -> str:
    return CLASSNAMES[label].replace(" ", "_")


def write_synthetic(
    out_dir: Path | str,
    seed: int = 0,
    n_train_per_class: int = 400,
    n_test_per_class: int = 100,
    progress: Progress | None = None,
    overwrite: bool = False,
    keep_complete: bool = False,
) -> Path:
    """Write the synthetic set as an ImageFolder ``out_dir/train`` and ``out_dir/test`` (PNG).

    The set is written into a temporary folder beside ``out_dir`` and renamed into place. An
    existing non-empty ``out_dir`` is an :class:`InputError` unless ``overwrite``. A
    ``synthetic.json`` marker records the parameters. With ``keep_complete``, a complete set
    (with its marker) that another process put at ``out_dir`` meanwhile is kept and this
    copy discarded, so concurrent writers of one cache never delete a set being read.
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise InputError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for split, count in (("train", n_train_per_class), ("test", n_test_per_class)):
            pixels, labels = generate_synthetic(seed, count, split, progress)
            for label in range(len(CLASSES)):
                (temporary / split / _folder_name(label)).mkdir(parents=True)
            counters = [0] * len(CLASSES)
            array = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for image, label in zip(array, labels.tolist(), strict=True):
                path = temporary / split / _folder_name(label) / f"{counters[label]:05d}.png"
                Image.fromarray(np.ascontiguousarray(image)).save(path)
                counters[label] += 1
        marker = {
            "dataset": "clipguard-synthetic",
            "version": DATA_VERSION,
            "seed": seed,
            "n_train_per_class": n_train_per_class,
            "n_test_per_class": n_test_per_class,
            "classnames": list(CLASSNAMES),
            "image_size": IMAGE_SIZE,
        }
        (temporary / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        if keep_complete and (out_dir / MARKER_FILE).is_file():
            shutil.rmtree(temporary)
            return out_dir
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(temporary, out_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out_dir


def cache_dir() -> Path:
    """clipguard's cache folder: ``$CLIPGUARD_CACHE`` or ``~/.cache/clipguard``."""
    return Path(os.environ.get("CLIPGUARD_CACHE") or Path.home() / ".cache" / "clipguard")


def cached_synthetic(
    seed: int = 0,
    n_train_per_class: int = 400,
    n_test_per_class: int = 100,
    progress: Progress | None = None,
) -> Path:
    """The synthetic set in the cache folder, written on first use; returns its root."""
    name = f"v{DATA_VERSION}-seed{seed}-{n_train_per_class}-{n_test_per_class}"
    root = cache_dir() / "synthetic" / name
    if (root / MARKER_FILE).is_file():
        return root
    return write_synthetic(
        root,
        seed,
        n_train_per_class,
        n_test_per_class,
        progress=progress,
        overwrite=True,
        keep_complete=True,
    )
