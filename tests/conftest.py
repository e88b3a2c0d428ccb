"""Shared fixtures: a tiny CLIP model saved as safetensors, and small image folders."""

from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipguard.model import build_clip_from_config, save_model
from clipguard.plugins import reset_plugin_manager
from tests.core.fixed_verdict import fixed_verdict  # noqa: F401  (a fixture for every test)

#: a CLIP small enough to build and run in well under a second
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}
TINY_CLASSES = ["red square", "blue circle", "green bar"]
#: an image tower shaped like the CIFAR-10 lab models' (width 64, patch 4, 3 layers)
LAB_LIKE_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 4, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}
#: skips a test of glibc's malloc settings elsewhere
GLIBC_ONLY = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
    reason="the malloc settings are glibc's",
)
SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True)
def _fresh_plugin_manager():
    """Each test sees a freshly built plugin manager (entry points, allow-list re-read)."""
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_clip_from_config(TINY_CONFIG)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(path, model, TINY_CONFIG)
    return path


def write_image_folder(root: Path, classes: list[str], per_class: int, size: int = 32) -> Path:
    """An ImageFolder of simple coloured images, class folders with underscores for spaces."""
    generator = torch.Generator().manual_seed(0)
    colours = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (200, 200, 30), (200, 30, 200)]
    for index, name in enumerate(classes):
        folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            noise = (torch.rand(size, size, 3, generator=generator) * 60).to(torch.uint8)
            base = torch.tensor(colours[index % len(colours)], dtype=torch.uint8)
            pixels = (base.view(1, 1, 3).to(torch.int16) + noise - 30).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / f"{k:04d}.png")
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "data", TINY_CLASSES, per_class=6)


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-10 unpacked into a cache outside the repository; skipped when the archive is absent."""
    if not SHARED_CIFAR.exists():
        pytest.skip(f"CIFAR-10 archive not found at {SHARED_CIFAR} (../shared/data)")
    cache = Path(os.environ.get("CLIPGUARD_CACHE", Path.home() / ".cache" / "clipguard"))
    root = cache / "cifar10"
    if not (root / "test").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SHARED_CIFAR) as archive:
            archive.extractall(cache, filter="data")
    return root
