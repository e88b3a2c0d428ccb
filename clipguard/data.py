"""Clean labelled image sets: ImageFolder reading, K-shot sampling, checks and loading.

A data folder holds one sub-folder per class (the ImageFolder layout). Class names come from
the folder names, underscores read as spaces, or from a class-names file (one name per line,
in the sorted order of the folders). Images are loaded in *pixel space* with the model's own
transform (``ModelBundle.pixel_transform``): ``3 x H x W`` tensors in ``[0, 1]``.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from clipguard.errors import InputError
from clipguard.io import sha256_files
from clipguard.progress import Progress

if TYPE_CHECKING:  # torch is imported where pixels are loaded: checking a folder needs none
    import torch

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
)
#: the only decoders Pillow may use, whatever a file's suffix says: formats such as EPS would
#: run Ghostscript on untrusted input
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
#: images with more pixels than this are refused (decompression bombs)
MAX_IMAGE_PIXELS = 50_000_000

Sample = tuple[Path, int]
#: 16-bit and 32-bit greyscale modes, rescaled to 8 bits before conversion to RGB
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


#: whether the platform's paths compare case-insensitively (Windows), as pathlib compares them
_CASE_FOLDED = os.path.normcase("A") != "A"


def path_order(path: Path) -> tuple[str, ...]:
    """The sort key that orders paths as :mod:`pathlib` compares them (part by part, case-folded
    where the platform's paths are case-insensitive), computed once per path: sorting tens of
    thousands of :class:`~pathlib.Path` objects directly costs a Python-level comparison
    each time (about a second for CIFAR-10's 50,000 training images)."""
    return tuple(map(os.path.normcase, path.parts)) if _CASE_FOLDED else path.parts


def _suffix(name: str) -> str:
    """The suffix of a file name, as :attr:`pathlib.PurePath.suffix` gives it."""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def _sample_order(sample: Sample) -> tuple[tuple[str, ...], int]:
    """The sort key of a ``(path, label)`` sample: as the tuple compares (:func:`path_order`)."""
    return path_order(sample[0]), sample[1]


@dataclass(frozen=True)
class ImageFolder:
    """An indexed image folder: class names in folder order and ``(path, label)`` samples."""

    root: Path
    folders: list[str]
    classnames: list[str]
    samples: list[Sample]

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def files_sha256(self, samples: Iterable[Sample] | None = None) -> str:
        """A sha256 over the relative names and contents of ``samples`` (default: all)."""
        chosen = sorted(
            (path for path, _ in (samples if samples is not None else self.samples)),
            key=path_order,
        )
        return sha256_files(chosen, root=self.root)


def read_classnames_file(path: Path) -> list[str]:
    """Class names from a UTF-8 text file, one per line; blank lines and a BOM are ignored."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: class-names file not found")
    if not path.is_file():
        raise InputError(f"{path}: class-names file is not a regular file")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path}: class-names file is not UTF-8 text") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read class-names file ({error.strerror})") from None
    names = [line.strip() for line in lines if line.strip()]
    if len(set(names)) != len(names):
        raise InputError(f"{path}: class-names file repeats a name")
    return names


def folder_to_classname(folder: str) -> str:
    """A folder name as a class name: underscores read as spaces, whitespace runs collapsed.

    ``"great_white__shark "`` gives ``"great white shark"``; control characters (a newline in
    a folder name) count as whitespace, so a class name is always one line.
    """
    return " ".join(
        "".join(" " if not c.isprintable() else c for c in folder).replace("_", " ").split()
    )


def _loose(name: str) -> str:
    """A class or folder name compared loosely: as a class name (:func:`folder_to_classname`),
    case-folded."""
    return folder_to_classname(name).casefold()


def resolve_class(
    name: str, classnames: Sequence[str], folders: Sequence[str], what: str = "target class"
) -> int:
    """The label of the class that ``name`` designates among ``classnames`` (of the class
    ``folders``, in the same order): its class name (``"blue star"``), its folder's name
    (``"blue_star"``) or, failing both, either one written with other case, underscores or
    spaces (``"Blue Star"``).

    Every command that takes a class name (``--target``) resolves it here. Raises
    :class:`InputError` naming ``what`` when no class matches, or when several do (exact
    matches are tried first: a class name and another class's folder name are ambiguous;
    then loose ones).
    """
    pairs = list(zip(classnames, folders, strict=True))
    for matches in (
        [k for k, pair in enumerate(pairs) if name in pair],
        [k for k, pair in enumerate(pairs) if _loose(name) in map(_loose, pair)],
    ):
        if len(matches) == 1:
            return matches[0]
        if matches:
            candidates = ", ".join(f"{classnames[k]!r} (folder {folders[k]})" for k in matches)
            raise InputError(f"{what} {name!r} is ambiguous: it matches {candidates}")
    raise InputError(
        f"{what} {name!r} is not one of the classes: {', '.join(classnames)} "
        "(their folder names are accepted too)"
    )


def class_folders(root: Path | str) -> list[str]:
    """The class sub-folders of an ImageFolder ``root``, sorted (hidden ones left out);
    :class:`InputError` when ``root`` is missing, not a folder or has fewer than 2."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: data folder not found")
    if not root.is_dir():
        raise InputError(f"{root}: data path is not a folder")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise InputError(
            f"{root}: needs at least 2 class sub-folders (ImageFolder layout), found {len(folders)}"
        )
    return folders


def class_names(
    root: Path | str, folders: Sequence[str], classnames_file: Path | None = None
) -> list[str]:
    """The class names of the class ``folders`` of ``root`` (in their order): from
    ``classnames_file`` when given, else the folder names read as class names;
    :class:`InputError` for a file whose length does not match, a folder name that gives an
    empty name, or two folders that give the same name."""
    root = Path(root)
    if classnames_file is not None:
        classnames = read_classnames_file(Path(classnames_file))
        if len(classnames) != len(folders):
            raise InputError(
                f"{classnames_file}: lists {len(classnames)} class names but {root} has "
                f"{len(folders)} class folders"
            )
        return classnames
    classnames = [folder_to_classname(folder) for folder in folders]
    for folder, name in zip(folders, classnames, strict=True):
        if not name:
            raise InputError(f"{root / folder}: folder name gives an empty class name")
    if len(set(classnames)) != len(classnames):
        duplicate = next(n for n in classnames if classnames.count(n) > 1)
        raise InputError(
            f"{root}: two class folders give the same class name {duplicate!r}; "
            "rename one or pass --classnames"
        )
    return classnames


def open_image_folder(root: Path | str, classnames_file: Path | None = None) -> ImageFolder:
    """Index an ImageFolder; :class:`InputError` for every way it can be unusable.

    Errors: missing or non-directory ``root``, fewer than 2 class folders, a class folder
    without images, a class-names file whose length does not match the folders.
    """
    root = Path(root)
    folders = class_folders(root)
    classnames = class_names(root, folders, classnames_file)
    samples: list[Sample] = []
    for label, folder in enumerate(folders):
        directory = root / folder
        with os.scandir(directory) as entries:  # file types without a stat per file
            names = [
                entry.name
                for entry in entries
                if entry.is_file() and _suffix(entry.name).lower() in IMAGE_SUFFIXES
            ]
        # one folder: ordered by name as pathlib orders its paths (path_order)
        files = [directory / name for name in sorted(names, key=os.path.normcase)]
        if not files:
            raise InputError(f"{root / folder}: class folder holds no images")
        samples.extend((path, label) for path in files)
    return ImageFolder(root=root, folders=folders, classnames=classnames, samples=samples)


def split_shots(folder: ImageFolder, shots: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Draw ``shots`` images per class with ``seed``; return ``(shots, the rest)``.

    Raises :class:`InputError` when a class has fewer than ``shots`` images.
    """
    if shots < 1:
        raise InputError(f"--shots must be at least 1, got {shots}")
    by_class: dict[int, list[Path]] = {}
    for path, label in folder.samples:
        by_class.setdefault(label, []).append(path)
    rng = random.Random(seed)
    chosen: list[Sample] = []
    rest: list[Sample] = []
    for label in range(folder.n_classes):
        paths = list(by_class.get(label, []))
        if len(paths) < shots:
            raise InputError(
                f"class {folder.classnames[label]!r} has {len(paths)} images, fewer than "
                f"--shots {shots}"
            )
        rng.shuffle(paths)
        chosen.extend((p, label) for p in sorted(paths[:shots], key=path_order))
        rest.extend((p, label) for p in sorted(paths[shots:], key=path_order))
    return chosen, rest


def subsample(samples: Sequence[Sample], limit: int | None, seed: int) -> list[Sample]:
    """At most ``limit`` samples drawn with ``seed`` (all of them when ``limit`` is None)."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    if limit is None or len(samples) <= limit:
        return list(samples)
    rng = random.Random(seed)
    return sorted(rng.sample(list(samples), limit), key=_sample_order)


def take_per_class(samples: Sequence[Sample], per_class: int, seed: int) -> list[Sample]:
    """At most ``per_class`` samples of each label in ``samples``, drawn with ``seed`` (all of
    a label's when it has fewer), sorted; deterministic for ``seed``."""
    by_label: dict[int, list[Sample]] = {}
    for sample in samples:
        by_label.setdefault(sample[1], []).append(sample)
    rng = random.Random(seed)
    taken: list[Sample] = []
    for label in sorted(by_label):
        members = sorted(by_label[label], key=_sample_order)
        taken.extend(members if len(members) <= per_class else rng.sample(members, per_class))
    return sorted(taken, key=lambda sample: (sample[1], path_order(sample[0])))


def read_image(path: Path) -> Image.Image:
    """Open an image file as 8-bit RGB; :class:`InputError` naming the file if it cannot be read.

    Handling of the less common modes: greyscale, palette, CMYK, YCbCr and the like are
    converted to RGB by Pillow; an alpha channel is dropped (the colour channels are kept as
    they are); 16-bit and 32-bit greyscale is rescaled to 8 bits first. Animated images give
    their first frame. Images over :data:`MAX_IMAGE_PIXELS` pixels are refused before their
    pixels are decoded (decompression bombs). Only the decoders in :data:`IMAGE_FORMATS` are
    used, chosen by content, not by suffix.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # palette transparency notes
            with Image.open(path, formats=IMAGE_FORMATS) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise InputError(
                        f"{path}: image of {image.width}x{image.height} pixels is too large "
                        f"(limit {MAX_IMAGE_PIXELS} pixels)"
                    )
                image.load()
                if image.mode in _WIDE_GREY_MODES:
                    return _wide_grey_to_rgb(image)
                if image.mode == "P" and "transparency" in image.info:
                    image = image.convert("RGBA")
                return image.convert("RGB")
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{path}: image is too large (decompression bomb guard)") from None
    except Exception as error:  # Pillow raises many kinds of errors on hostile files
        raise InputError(f"{path}: unreadable image ({type(error).__name__})") from None


def _wide_grey_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
    else:
        scale = 1 / 257 if np.nanmax(values, initial=0.0) > 255 else 1.0
    grey = np.nan_to_num(values * scale, nan=0.0).clip(0, 255).round().astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def load_pixels(
    samples: Sequence[Sample],
    transform: Callable[[Image.Image], torch.Tensor],
    progress: Progress | None = None,
    description: str = "loading images",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``samples`` as a pixel tensor ``N x 3 x H x W`` in ``[0, 1]`` and labels ``N``."""
    import torch

    if not samples:
        raise InputError("no images to load")
    images = []
    progress = progress or Progress(quiet=True)
    for path, _ in progress.track(samples, description=description):
        images.append(transform(read_image(path)))
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    return torch.stack(images), labels
