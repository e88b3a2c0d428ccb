"""Fixtures of the CBPT tests: a tiny in-memory CLIP bundle and random shots."""

from __future__ import annotations

import pytest
import torch

from clipguard.components import ShotSet
from clipguard.model import ModelBundle, build_clip_from_config

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 64, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}
CLASSES = ["red square", "blue circle", "green bar"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one torch thread (no thread hand-off on tiny ops)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def bundle() -> ModelBundle:
    """A randomly initialised tiny CLIP (16 px images), frozen, fresh counters."""
    torch.manual_seed(0)
    return ModelBundle.from_model(build_clip_from_config(TINY), TINY)


@pytest.fixture
def shots() -> ShotSet:
    """Four random 16 px shots for each of three classes."""
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(12, 3, 16, 16, generator=generator)
    return ShotSet(pixels, torch.arange(3).repeat(4), list(CLASSES))
