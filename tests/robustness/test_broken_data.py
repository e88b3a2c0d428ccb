"""Broken and unusual data folders: a clear one-line error naming the culprit, or a handling."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipguard.data import MAX_IMAGE_PIXELS, open_image_folder, read_image
from clipguard.errors import InputError
from tests.conftest import TINY_CLASSES, write_image_folder
from tests.core.cli_helpers import assert_one_line_error, run_cli


def _evaluate(model: Path, data: Path, *extra: str):
    return run_cli("evaluate", model, "--data", data, "--quiet", *extra)


def _png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims ``width`` x ``height`` (a decompression-bomb header)."""
    from io import BytesIO

    buffer = BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _replace_first_image(data: Path, content: bytes, name: str = "0000.png") -> Path:
    folder = data / TINY_CLASSES[0].replace(" ", "_")
    (folder / "0000.png").unlink()
    target = folder / name
    target.write_bytes(content)
    return target


# --------------------------------------------------------------------------- folders


def test_missing_data_folder(tiny_model_path: Path, tmp_path: Path) -> None:
    assert_one_line_error(_evaluate(tiny_model_path, tmp_path / "nope"), "data folder not found")


def test_data_path_is_a_file(tiny_model_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "images.zip"
    path.write_bytes(b"PK")
    assert_one_line_error(_evaluate(tiny_model_path, path), "not a folder")


def test_empty_data_folder(tiny_model_path: Path, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    assert_one_line_error(_evaluate(tiny_model_path, tmp_path / "data"), "found 0")


def test_one_class_data_folder(tiny_model_path: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", ["only class"], per_class=3)
    assert_one_line_error(_evaluate(tiny_model_path, data), "at least 2 class", "found 1")


def test_class_folder_without_images(tiny_model_path: Path, tiny_data: Path) -> None:
    empty = tiny_data / "zebra"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert_one_line_error(_evaluate(tiny_model_path, tiny_data), "zebra", "holds no images")


def test_hidden_folders_and_stray_files_are_ignored(tiny_data: Path) -> None:
    (tiny_data / ".cache").mkdir()
    (tiny_data / "README.txt").write_text("readme")
    (tiny_data / "red_square" / "Thumbs.db").write_bytes(b"\0")
    folder = open_image_folder(tiny_data)
    assert folder.classnames == sorted(TINY_CLASSES)


# --------------------------------------------------------------------------- images


def test_zero_byte_image_is_named(tiny_model_path: Path, tiny_data: Path) -> None:
    bad = _replace_first_image(tiny_data, b"")
    assert_one_line_error(_evaluate(tiny_model_path, tiny_data), str(bad), "unreadable image")


def test_corrupt_image_is_named(tiny_model_path: Path, tiny_data: Path) -> None:
    bad = _replace_first_image(tiny_data, os.urandom(512), name="noise.jpg")
    assert_one_line_error(_evaluate(tiny_model_path, tiny_data), str(bad), "unreadable image")


def test_truncated_image_is_named(tiny_model_path: Path, tiny_data: Path) -> None:
    good = (tiny_data / "red_square" / "0001.png").read_bytes()
    bad = _replace_first_image(tiny_data, good[: len(good) // 2])
    assert_one_line_error(_evaluate(tiny_model_path, tiny_data), str(bad), "unreadable image")


def test_image_with_a_wrong_suffix_content_is_named(tiny_model_path: Path, tiny_data: Path) -> None:
    bad = _replace_first_image(tiny_data, b'{"not": "an image"}', name="data.webp")
    assert_one_line_error(_evaluate(tiny_model_path, tiny_data), str(bad))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_image_without_read_permission_is_named(tiny_model_path: Path, tiny_data: Path) -> None:
    bad = tiny_data / "red_square" / "0001.png"
    bad.chmod(0)
    assert_one_line_error(_evaluate(tiny_model_path, tiny_data), str(bad))


@pytest.mark.parametrize("side", [10_000, 20_000], ids=["over-clipguard-limit", "over-pil-limit"])
def test_decompression_bomb_is_refused_by_its_header(
    side: int, tiny_model_path: Path, tiny_data: Path
) -> None:
    assert side * side > MAX_IMAGE_PIXELS
    bad = _replace_first_image(tiny_data, _png_claiming_size(side, side))
    assert_one_line_error(_evaluate(tiny_model_path, tiny_data), str(bad), "too large")


def test_documented_modes_are_converted_to_rgb(tmp_path: Path) -> None:
    """CMYK, greyscale, RGBA, palette (with transparency) and 16-bit greyscale all load as RGB."""
    images = {
        "cmyk.jpg": Image.new("CMYK", (8, 8), (0, 255, 255, 0)),
        "grey.png": Image.new("L", (8, 8), 128),
        "rgba.png": Image.new("RGBA", (8, 8), (10, 20, 30, 0)),
        "palette.gif": Image.new("P", (8, 8), 3),
        "bilevel.png": Image.new("1", (8, 8), 1),
    }
    for name, image in images.items():
        extra = {"transparency": 3} if name == "palette.gif" else {}
        image.save(tmp_path / name, **extra)
    for name in images:
        loaded = read_image(tmp_path / name)
        assert loaded.mode == "RGB", name
        assert loaded.size == (8, 8), name


def test_cmyk_red_stays_red(tmp_path: Path) -> None:
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "red.jpg", quality=100)
    red, green, blue = read_image(tmp_path / "red.jpg").getpixel((1, 1))
    assert red > 200 and green < 60 and blue < 60


def test_alpha_channel_is_dropped_keeping_the_colours(tmp_path: Path) -> None:
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "clear.png")
    assert read_image(tmp_path / "clear.png").getpixel((0, 0)) == (10, 20, 30)


def test_sixteen_bit_greyscale_is_rescaled_not_clipped(tmp_path: Path) -> None:
    ramp = (np.arange(16, dtype=np.uint16) * 4369).reshape(4, 4)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    loaded = np.asarray(read_image(tmp_path / "ramp16.png"))[..., 0]
    assert loaded.min() == 0 and loaded.max() == 255
    assert len(np.unique(loaded)) == 16


def test_folder_of_mixed_modes_evaluates(tiny_model_path: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for index, mode in enumerate(["L", "RGBA", "CMYK"]):
        folder = data / f"class_{index}"
        folder.mkdir(parents=True)
        suffix = ".jpg" if mode == "CMYK" else ".png"
        Image.new(mode, (40, 30)).save(folder / f"image{suffix}")
    result = _evaluate(tiny_model_path, data, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_images"] == 3


# --------------------------------------------------------------------------- class names


def test_unicode_class_names_from_folders(tiny_model_path: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", ["café au lait", "日本 犬", "Ωmega"], per_class=2)
    assert open_image_folder(data).classnames == ["café au lait", "Ωmega", "日本 犬"]
    result = _evaluate(tiny_model_path, data, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"]["classes"] == ["café au lait", "Ωmega", "日本 犬"]


def test_odd_folder_names_are_normalised(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name in ["__leading", "many___underscores_", "tab\there", "new\nline", "-dash-"]:
        (data / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(data / name / "a.png")
    names = open_image_folder(data).classnames
    assert sorted(names) == sorted(
        ["leading", "many underscores", "tab here", "new line", "-dash-"]
    )
    assert all("\n" not in name and name == name.strip() for name in names)


def test_folders_giving_the_same_class_name(tiny_model_path: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", ["red square", "blue"], per_class=1)
    (data / "red__square").mkdir()
    Image.new("RGB", (4, 4)).save(data / "red__square" / "a.png")
    assert_one_line_error(_evaluate(tiny_model_path, data), "same class name 'red square'")


def test_folder_name_giving_an_empty_class_name(tiny_model_path: Path, tiny_data: Path) -> None:
    (tiny_data / "___").mkdir()
    Image.new("RGB", (4, 4)).save(tiny_data / "___" / "a.png")
    assert_one_line_error(_evaluate(tiny_model_path, tiny_data), "empty class name")


def test_classnames_file_with_the_wrong_count(tiny_model_path: Path, tiny_data: Path) -> None:
    names = tiny_data.parent / "classes.txt"
    names.write_text("one\ntwo\n")
    result = _evaluate(tiny_model_path, tiny_data, "--classnames", names)
    assert_one_line_error(result, "lists 2 class names", "3 class folders")


def test_classnames_file_that_is_not_utf8(tiny_model_path: Path, tiny_data: Path) -> None:
    names = tiny_data.parent / "classes.txt"
    names.write_bytes("caf\u00e9\nb\nc\n".encode("latin-1"))
    result = _evaluate(tiny_model_path, tiny_data, "--classnames", names)
    assert_one_line_error(result, "not UTF-8")


def test_classnames_file_missing(tiny_model_path: Path, tiny_data: Path) -> None:
    result = _evaluate(tiny_model_path, tiny_data, "--classnames", tiny_data.parent / "nope.txt")
    assert_one_line_error(result, "class-names file not found")


def test_classnames_file_that_is_a_folder(tiny_model_path: Path, tiny_data: Path) -> None:
    result = _evaluate(tiny_model_path, tiny_data, "--classnames", tiny_data)
    assert_one_line_error(result, "not a regular file")


def test_classnames_file_repeating_a_name(tiny_model_path: Path, tiny_data: Path) -> None:
    names = tiny_data.parent / "classes.txt"
    names.write_text("cat\ndog\ncat\n")
    result = _evaluate(tiny_model_path, tiny_data, "--classnames", names)
    assert_one_line_error(result, "repeats a name")


def test_classnames_file_with_bom_and_blank_lines(tiny_data: Path) -> None:
    names = tiny_data.parent / "classes.txt"
    names.write_bytes("\ufeffa cat\n\n  a dog  \r\na bird\n".encode())
    folder = open_image_folder(tiny_data, names)
    assert folder.classnames == ["a cat", "a dog", "a bird"]


def test_open_image_folder_raises_input_error_for_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        open_image_folder(tmp_path / "file")


def test_postscript_disguised_as_png_is_never_handed_to_ghostscript(
    tiny_model_path: Path, tiny_data: Path
) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    bad = _replace_first_image(tiny_data, eps)
    with Image.open(bad) as unrestricted:  # Pillow alone would pick its EPS decoder
        assert unrestricted.format == "EPS"
    assert_one_line_error(_evaluate(tiny_model_path, tiny_data), str(bad), "unreadable image")
