"""Data: ImageFolder indexing, K-shot splits, subsampling and the files hash."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipguard.data import (
    _suffix,
    load_pixels,
    open_image_folder,
    path_order,
    split_shots,
    subsample,
    take_per_class,
)
from clipguard.errors import InputError
from clipguard.model import load_model
from tests.conftest import TINY_CLASSES, write_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    root = write_image_folder(tmp_path_factory.mktemp("data"), TINY_CLASSES, per_class=6)
    return open_image_folder(root)


def test_class_names_come_from_folders_with_underscores_as_spaces(folder) -> None:
    assert folder.folders == ["blue_circle", "green_bar", "red_square"]
    assert folder.classnames == ["blue circle", "green bar", "red square"]
    assert len(folder.samples) == 18


PATH_PART = st.text(st.sampled_from("aAbB._-0z"), min_size=1, max_size=6).filter(
    lambda part: part not in (".", "..")
)


@given(st.lists(st.lists(PATH_PART, min_size=1, max_size=4), max_size=30), st.booleans())
def test_path_order_sorts_paths_as_pathlib_compares_them(parts, absolute) -> None:
    """The data folder's listings, shot draws and hashes are sorted by this key instead of by
    Path comparisons; the order (so every draw of a seed) must not change."""
    paths = [Path("/" if absolute else ".", *p) for p in parts]
    assert sorted(paths, key=path_order) == sorted(paths)


@given(st.text(st.sampled_from("ab.JPG"), max_size=8).filter(lambda n: n not in ("", ".", "..")))
def test_file_suffixes_are_read_as_pathlib_reads_them(name) -> None:
    assert _suffix(name) == Path(name).suffix


def test_split_shots_is_deterministic_for_a_seed(folder) -> None:
    assert split_shots(folder, 2, seed=7) == split_shots(folder, 2, seed=7)


def test_split_shots_depends_on_the_seed(folder) -> None:
    splits = {tuple(split_shots(folder, 2, seed=seed)[0]) for seed in range(5)}
    assert len(splits) > 1


@settings(max_examples=30, deadline=None)
@given(shots=st.integers(1, 6), seed=st.integers(0, 2**32))
def test_split_shots_draws_k_per_class_disjoint_from_the_rest(
    folder, shots: int, seed: int
) -> None:
    chosen, rest = split_shots(folder, shots, seed)
    assert not set(chosen) & set(rest)
    assert sorted(chosen + rest) == sorted(folder.samples)
    for label in range(folder.n_classes):
        assert sum(1 for _, lab in chosen if lab == label) == shots


def test_split_shots_refuses_more_shots_than_a_class_has(folder) -> None:
    with pytest.raises(InputError, match="has 6 images, fewer than --shots 7"):
        split_shots(folder, 7, seed=0)


def test_split_shots_refuses_zero_shots(folder) -> None:
    with pytest.raises(InputError, match="at least 1"):
        split_shots(folder, 0, seed=0)


def test_subsample_is_seeded_and_bounded(folder) -> None:
    first = subsample(folder.samples, 5, seed=3)
    assert first == subsample(folder.samples, 5, seed=3)
    assert len(first) == 5 and set(first) <= set(folder.samples)
    assert subsample(folder.samples, None, seed=3) == folder.samples


@pytest.mark.parametrize("limit", [0, -3])
def test_subsample_refuses_a_limit_below_one(folder, limit: int) -> None:
    with pytest.raises(InputError, match="--limit must be at least 1"):
        subsample(folder.samples, limit, seed=0)


def test_evaluate_with_limit_zero_is_a_clear_error(tiny_model_path: Path, tiny_data: Path) -> None:
    from tests.core.cli_helpers import assert_one_line_error, run_cli

    result = run_cli("evaluate", tiny_model_path, "--data", tiny_data, "--limit", "0")
    assert_one_line_error(result, "--limit must be at least 1")


def test_files_sha256_is_stable(folder) -> None:
    assert folder.files_sha256() == folder.files_sha256()
    shots, _ = split_shots(folder, 2, seed=1)
    assert folder.files_sha256(shots) == folder.files_sha256(list(reversed(shots)))
    assert folder.files_sha256(shots) != folder.files_sha256()


def test_files_sha256_does_not_depend_on_where_the_folder_lives(folder, tmp_path: Path) -> None:
    copy = open_image_folder(shutil.copytree(folder.root, tmp_path / "elsewhere"))
    assert copy.files_sha256() == folder.files_sha256()


def test_files_sha256_changes_with_file_content(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data", TINY_CLASSES, per_class=2)
    before = open_image_folder(root).files_sha256()
    (root / "red_square" / "0000.png").write_bytes((root / "red_square" / "0001.png").read_bytes())
    assert open_image_folder(root).files_sha256() != before


def test_load_pixels_uses_the_model_transform(folder, tiny_model_path: Path) -> None:
    bundle = load_model(tiny_model_path)
    pixels, labels = load_pixels(folder.samples[:4], bundle.pixel_transform)
    assert pixels.shape == (4, 3, 32, 32)
    assert float(pixels.min()) >= 0 and float(pixels.max()) <= 1
    assert labels.dtype == torch.long


def test_load_pixels_of_nothing_is_an_error() -> None:
    with pytest.raises(InputError, match="no images"):
        load_pixels([], lambda image: torch.zeros(3, 2, 2))


@settings(max_examples=30, deadline=None)
@given(shots=st.integers(1, 5), per_class=st.integers(0, 7), seed=st.integers(0, 2**32))
def test_take_per_class_draws_held_out_images_apart_from_the_shots(
    folder, shots: int, per_class: int, seed: int
) -> None:
    """What a scan's reach probes measure on besides the shots: at most ``per_class`` of each
    class's other images (all of them when fewer), never a shot, the same for a seed."""
    chosen, rest = split_shots(folder, shots, seed)
    taken = take_per_class(rest, per_class, seed)
    assert taken == take_per_class(rest, per_class, seed)
    assert set(taken) <= set(rest) and not set(taken) & set(chosen)
    for label in range(folder.n_classes):
        assert sum(1 for _, lab in taken if lab == label) == min(per_class, 6 - shots)
