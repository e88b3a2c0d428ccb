"""The built-in synthetic set: determinism, class names, the written ImageFolder."""

from __future__ import annotations

import json

import pytest
import torch

from clipguard.data import load_pixels, open_image_folder
from clipguard.errors import InputError
from clipguard.lab.synthetic import (
    CLASSNAMES,
    DATA_VERSION,
    MARKER_FILE,
    cached_synthetic,
    generate_synthetic,
    write_synthetic,
)
from clipguard.model import make_pixel_transform


def test_generation_is_deterministic_and_seeded():
    a, labels_a = generate_synthetic(3, 2)
    b, labels_b = generate_synthetic(3, 2)
    c, _ = generate_synthetic(4, 2)
    assert torch.equal(a, b) and torch.equal(labels_a, labels_b)
    assert not torch.equal(a, c)
    assert a.shape == (2 * len(CLASSNAMES), 3, 32, 32)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.bincount(labels_a).tolist() == [2] * len(CLASSNAMES)


def test_train_and_test_splits_differ():
    train, _ = generate_synthetic(0, 1, "train")
    test, _ = generate_synthetic(0, 1, "test")
    assert not torch.equal(train, test)


def test_at_least_ten_caption_ready_classes():
    assert len(CLASSNAMES) >= 10
    assert len(set(CLASSNAMES)) == len(CLASSNAMES)
    assert all(name.replace(" ", "").isalpha() for name in CLASSNAMES)


def test_images_of_a_class_vary():
    pixels, labels = generate_synthetic(0, 4)
    same = pixels[labels == 0]
    assert (same[0] - same[1]).abs().mean() > 0.05


def test_write_synthetic_round_trips(tmp_path):
    root = write_synthetic(tmp_path / "syn", seed=5, n_train_per_class=2, n_test_per_class=1)
    train = open_image_folder(root / "train")
    test = open_image_folder(root / "test")
    assert train.classnames == sorted(CLASSNAMES) == list(CLASSNAMES)
    assert len(train.samples) == 2 * len(CLASSNAMES) and len(test.samples) == len(CLASSNAMES)
    pixels, labels = load_pixels(train.samples, make_pixel_transform(32))
    expected, expected_labels = generate_synthetic(5, 2, "train")
    order = torch.argsort(expected_labels, stable=True)
    assert torch.equal(labels, expected_labels[order])
    assert torch.allclose(pixels, expected[order], atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "syn").mkdir()
    (tmp_path / "syn" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        write_synthetic(tmp_path / "syn", n_train_per_class=1, n_test_per_class=1)
    write_synthetic(tmp_path / "syn", n_train_per_class=1, n_test_per_class=1, overwrite=True)
    assert not (tmp_path / "syn" / "keep.txt").exists()


def test_a_complete_set_written_meanwhile_is_kept_for_its_readers(tmp_path):
    """Two shards of a zoo build filling one cache at once: the second to finish keeps the
    first's complete set (a reader may be using it) and leaves no temporary folder; an
    incomplete folder (no marker) is still replaced."""
    first = write_synthetic(tmp_path / "syn", n_train_per_class=1, n_test_per_class=1)
    reader_file = next((first / "train").rglob("*.png"))
    inode = reader_file.stat().st_ino
    again = write_synthetic(
        first, n_train_per_class=1, n_test_per_class=1, overwrite=True, keep_complete=True
    )
    assert again == first and reader_file.stat().st_ino == inode
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "keep.txt").write_text("x")
    write_synthetic(
        tmp_path / "partial",
        n_train_per_class=1,
        n_test_per_class=1,
        overwrite=True,
        keep_complete=True,
    )
    assert (tmp_path / "partial" / MARKER_FILE).is_file()
    assert not (tmp_path / "partial" / "keep.txt").exists()


def test_the_cached_set_is_named_and_marked_with_its_version(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPGUARD_CACHE", str(tmp_path))
    root = cached_synthetic(seed=3, n_train_per_class=1, n_test_per_class=1)
    assert root.name == f"v{DATA_VERSION}-seed3-1-1"
    assert json.loads((root / MARKER_FILE).read_text())["version"] == DATA_VERSION
