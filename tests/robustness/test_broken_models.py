"""Broken model files: each gives exit code 2 and one clear line, never a traceback."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_save

from clipguard.model import OPEN_CLIP_CONFIG_KEY, build_clip_from_config
from tests.conftest import TINY_CLASSES, TINY_CONFIG, write_image_folder
from tests.core.cli_helpers import assert_one_line_error, run_cli

TINY_OPENAI_CONFIG = {**TINY_CONFIG, "quick_gelu": True}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), TINY_CLASSES, per_class=2)


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        k: v.clone() for k, v in build_clip_from_config(TINY_OPENAI_CONFIG).state_dict().items()
    }


def _evaluate(model: Path, data_dir: Path, *extra: str):
    return run_cli("evaluate", model, "--data", data_dir, "--quiet", *extra)


def _safetensors_with_header(header: dict | list | str, payload: bytes = b"") -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def _config_metadata(config: dict) -> dict[str, str]:
    return {OPEN_CLIP_CONFIG_KEY: json.dumps({"model_cfg": config})}


# --------------------------------------------------------------------------- paths


def test_missing_model_path(tmp_path: Path, data_dir: Path) -> None:
    assert_one_line_error(_evaluate(tmp_path / "nope.safetensors", data_dir), "not found")


def test_directory_as_model(tmp_path: Path, data_dir: Path) -> None:
    assert_one_line_error(_evaluate(tmp_path, data_dir), "is a directory")


@pytest.mark.parametrize("name", ["empty.safetensors", "empty.pt", "empty.bin"])
def test_empty_model_file(name: str, tmp_path: Path, data_dir: Path) -> None:
    (tmp_path / name).write_bytes(b"")
    assert_one_line_error(_evaluate(tmp_path / name, data_dir), "empty")


def test_unrecognised_format(tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "model.txt"
    path.write_text("this is not a model\n")
    assert_one_line_error(_evaluate(path, data_dir), "unrecognised model file format")


def test_random_bytes_named_bin(tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 4)
    assert_one_line_error(_evaluate(path, data_dir))


# --------------------------------------------------------------------------- safetensors


def test_truncated_safetensors(tiny_model_path: Path, tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "cut.safetensors"
    path.write_bytes(tiny_model_path.read_bytes()[: tiny_model_path.stat().st_size // 2])
    assert_one_line_error(_evaluate(path, data_dir), "corrupt")


def test_safetensors_shorter_than_its_length_field(tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    assert_one_line_error(_evaluate(path, data_dir), "truncated")


def test_safetensors_header_length_past_end_of_file(tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "bad-length.safetensors"
    path.write_bytes(struct.pack("<Q", 4096) + b'{"__metadata__": {}}')
    assert_one_line_error(_evaluate(path, data_dir), "header runs past the end")


def test_safetensors_header_too_large(tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "huge-header.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    assert_one_line_error(_evaluate(path, data_dir), "too large")


@pytest.mark.parametrize("header", ["not json at all", "[1, 2, 3]", '{"a": ', "\udcff"])
def test_safetensors_header_not_a_json_object(header: str, tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "garbled.safetensors"
    raw = header.encode("utf-8", "surrogateescape")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert_one_line_error(_evaluate(path, data_dir), "corrupt safetensors header")


def test_safetensors_overlapping_offsets(tmp_path: Path, data_dir: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(_safetensors_with_header(header, bytes(12)))
    assert_one_line_error(_evaluate(path, data_dir), "corrupt")


def test_safetensors_offsets_out_of_range(tmp_path: Path, data_dir: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}
    path = tmp_path / "out-of-range.safetensors"
    path.write_bytes(_safetensors_with_header(header, bytes(16)))
    assert_one_line_error(_evaluate(path, data_dir), "corrupt")


@pytest.mark.parametrize("dtype", ["F33", "F8_E4M3", "C64", "BOOL"])
def test_safetensors_unsupported_dtype(dtype: str, tmp_path: Path, data_dir: Path) -> None:
    header = {"a": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}
    path = tmp_path / "dtype.safetensors"
    path.write_bytes(_safetensors_with_header(header, bytes(4)))
    assert_one_line_error(_evaluate(path, data_dir), f"unsupported dtype {dtype}")


def test_safetensors_non_string_metadata(tmp_path: Path, data_dir: Path) -> None:
    header = {
        "__metadata__": {"format": 3},
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    path = tmp_path / "meta.safetensors"
    path.write_bytes(_safetensors_with_header(header, bytes(4)))
    assert_one_line_error(_evaluate(path, data_dir), "malformed metadata")


def test_embedded_config_not_json(tiny_state: dict, tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "config.safetensors"
    path.write_bytes(safetensors_save(tiny_state, metadata={OPEN_CLIP_CONFIG_KEY: "{oops"}))
    assert_one_line_error(_evaluate(path, data_dir), "not valid JSON")


def test_embedded_config_deeply_nested_json(
    tiny_state: dict, tmp_path: Path, data_dir: Path
) -> None:
    path = tmp_path / "nested.safetensors"
    nested = "[" * 100_000 + "]" * 100_000
    path.write_bytes(safetensors_save(tiny_state, metadata={OPEN_CLIP_CONFIG_KEY: nested}))
    assert_one_line_error(_evaluate(path, data_dir))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"vision_cfg": {**TINY_CONFIG["vision_cfg"], "layers": 100_000}}, "too many"),
        ({"text_cfg": {**TINY_CONFIG["text_cfg"], "width": 10**9}}, "absurd"),
        ({"vision_cfg": "ViT"}, "lacks vision_cfg"),
        ({"embed_dim": "big"}, "invalid open_clip model config"),
        ({"preprocess_cfg": {"std": [0, 0, 0]}}, "preprocess_cfg.std"),
    ],
    ids=["layers", "width", "vision-cfg-type", "embed-dim-type", "zero-std"],
)
def test_hostile_embedded_config_is_refused_before_building(
    change: dict, fragment: str, tiny_state: dict, tmp_path: Path, data_dir: Path
) -> None:
    path = tmp_path / "config.safetensors"
    metadata = _config_metadata({**TINY_CONFIG, **change})
    path.write_bytes(safetensors_save(tiny_state, metadata=metadata))
    assert_one_line_error(_evaluate(path, data_dir), fragment)


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights(value: float, tiny_state: dict, tmp_path: Path, data_dir: Path) -> None:
    state = dict(tiny_state)
    poisoned = state["visual.proj"].clone()
    poisoned[0, 0] = value
    state["visual.proj"] = poisoned
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    assert_one_line_error(_evaluate(path, data_dir), "visual.proj", "NaN or Inf")


def test_wrong_shape(tiny_state: dict, tmp_path: Path, data_dir: Path) -> None:
    state = {**tiny_state, "visual.proj": torch.zeros(64, 31)}
    path = tmp_path / "shape.pt"
    torch.save(state, path)
    assert_one_line_error(_evaluate(path, data_dir), "visual.proj has shape (64, 31)")


def test_missing_key(tiny_state: dict, tmp_path: Path, data_dir: Path) -> None:
    state = {k: v for k, v in tiny_state.items() if k != "logit_scale"}
    path = tmp_path / "missing.pt"
    torch.save(state, path)
    assert_one_line_error(_evaluate(path, data_dir), "1 missing (e.g. logit_scale)")


def test_unexpected_key(tiny_state: dict, tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "unexpected.pt"
    torch.save({**tiny_state, "backdoor.weight": torch.zeros(3)}, path)
    assert_one_line_error(_evaluate(path, data_dir), "1 unexpected (e.g. backdoor.weight)")


def test_wrong_architecture_by_name(tiny_state: dict, tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny_state, path)
    assert_one_line_error(
        _evaluate(path, data_dir, "--arch", "RN50"), "do not fit architecture RN50"
    )


def test_unknown_architecture_name(tiny_state: dict, tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny_state, path)
    assert_one_line_error(_evaluate(path, data_dir, "--arch", "ViT-Z-99"), "unknown architecture")


def test_state_dict_entry_that_is_not_a_tensor(
    tiny_state: dict, tmp_path: Path, data_dir: Path
) -> None:
    path = tmp_path / "entry.pt"
    torch.save({**tiny_state, "notes": "trained on my laptop"}, path)
    assert_one_line_error(_evaluate(path, data_dir), "'notes' is a str, not a tensor")


def test_state_dict_with_non_string_keys(tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "int-keys.pt"
    torch.save({1: torch.zeros(2)}, path)
    assert_one_line_error(_evaluate(path, data_dir), "is not a string")


def test_checkpoint_holding_a_list(tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    assert_one_line_error(_evaluate(path, data_dir), "holds a list, not a state dict")


def test_checkpoint_without_an_openai_layout_needs_arch(tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    assert_one_line_error(_evaluate(path, data_dir), "cannot infer the architecture", "--arch")


def test_truncated_zip_checkpoint(tiny_state: dict, tmp_path: Path, data_dir: Path) -> None:
    full = tmp_path / "full.pt"
    torch.save(tiny_state, full)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    assert_one_line_error(_evaluate(cut, data_dir), "corrupt")


def test_truncated_legacy_checkpoint(tiny_state: dict, tmp_path: Path, data_dir: Path) -> None:
    full = tmp_path / "legacy.pt"
    torch.save(tiny_state, full, _use_new_zipfile_serialization=False)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert_one_line_error(_evaluate(cut, data_dir), "corrupt")


def test_stride_tricks_cannot_inflate_a_small_file(
    tiny_state: dict, tmp_path: Path, data_dir: Path
) -> None:
    """Every weight a zero-stride view of one float: a few KB that would demand the full model."""
    expanded = {k: torch.zeros(1).expand(v.shape) if v.dim() else v for k, v in tiny_state.items()}
    path = tmp_path / "strided.pt"
    torch.save(expanded, path)
    assert path.stat().st_size < 200_000
    assert_one_line_error(_evaluate(path, data_dir), "cannot come from a file of")


def test_invalid_device(tiny_model_path: Path, data_dir: Path) -> None:
    assert_one_line_error(_evaluate(tiny_model_path, data_dir, "--device", "toaster"), "--device")


def test_hostile_key_names_cannot_break_the_one_line_message(
    tiny_state: dict, tmp_path: Path, data_dir: Path
) -> None:
    state = {k: v for k, v in tiny_state.items() if k != "logit_scale"}
    state["logit_scale\nerror: all clear"] = tiny_state["logit_scale"]
    path = tmp_path / "newline.pt"
    torch.save(state, path)
    message = assert_one_line_error(_evaluate(path, data_dir), "unexpected")
    assert "logit_scale\\nerror: all clear" in message
