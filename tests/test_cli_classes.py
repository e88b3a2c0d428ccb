"""Class names: a folder name is accepted wherever a class name is (`--target blue_star`)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clipguard.data import folder_to_classname, resolve_class
from clipguard.errors import InputError
from tests.conftest import write_image_folder
from tests.core.cli_helpers import assert_one_line_error, run_cli

FOLDERS = ["blue_star", "green_circle", "red_square"]
NAMES = [folder_to_classname(folder) for folder in FOLDERS]


@pytest.mark.parametrize(
    ("given_name", "label"),
    [
        ("blue star", 0),  # the class name
        ("blue_star", 0),  # its folder's name
        ("Blue Star", 0),  # loosely: case, spaces and underscores
        ("RED__square", 2),
        ("green  circle ", 1),
    ],
)
def test_a_class_is_named_by_class_or_folder(given_name, label):
    assert resolve_class(given_name, NAMES, FOLDERS) == label


def test_an_unknown_class_lists_the_classes():
    with pytest.raises(InputError, match="'zebra' is not one of the classes: blue star, green"):
        resolve_class("zebra", NAMES, FOLDERS)


def test_an_exact_match_wins_over_a_loose_one():
    names, folders = ["Cat", "cat"], ["Cat", "cat"]
    assert resolve_class("cat", names, folders) == 1
    assert resolve_class("Cat", names, folders) == 0


def test_ambiguous_names_are_refused():
    # a class-names file can give a folder's name to another class
    names, folders = ["dog", "cat"], ["cat", "dog"]
    with pytest.raises(InputError, match=r"'cat' is ambiguous: it matches 'dog' .*'cat'"):
        resolve_class("cat", names, folders)
    with pytest.raises(InputError, match="ambiguous"):
        resolve_class("CAT", ["Cat", "cat"], ["a", "b"])


FOLDER_NAMES = st.from_regex(r"[a-z]{1,6}(_[a-z]{1,6})?", fullmatch=True)


@given(st.lists(FOLDER_NAMES, min_size=2, unique=True))
def test_every_folder_and_class_name_designates_its_own_class(folders):
    names = [folder_to_classname(folder) for folder in folders]
    if len(set(names)) != len(names):
        return  # such a folder cannot be opened without a class-names file
    for label, (folder, name) in enumerate(zip(folders, names, strict=True)):
        assert resolve_class(folder, names, folders) == label
        assert resolve_class(name, names, folders) == label


@pytest.fixture
def star_data(tmp_path):
    return write_image_folder(tmp_path / "stars", ["blue star", "red square"], per_class=4)


def test_evaluate_takes_a_folder_name_as_target(tiny_model_path, star_data):
    result = run_cli(
        "evaluate", tiny_model_path, "--data", star_data, "--attack", "badnets",
        "--target", "blue_star", "--json", "--limit", "4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["attack"]["target_class"] == "blue star"


def test_an_unknown_target_is_refused_before_the_model(tmp_path, star_data):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"never loaded")
    result = run_cli("evaluate", model, "--data", star_data, "--attack", "badnets", "--target", "x")
    assert_one_line_error(result, "target class 'x' is not one of the classes: blue star")
