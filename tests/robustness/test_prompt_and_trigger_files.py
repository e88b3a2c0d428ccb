"""Prompt and trigger files made for another model or class list are refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipguard.errors import InputError
from clipguard.model import load_model
from clipguard.prompts import PromptSet, load_prompt_file, save_prompt_file
from clipguard.triggers import (
    MaskPatternTrigger,
    TriggerFile,
    load_trigger_file,
    save_trigger_file,
)
from tests.conftest import TINY_CLASSES, TINY_CONFIG
from tests.core.cli_helpers import assert_one_line_error, run_cli

WIDTH = TINY_CONFIG["text_cfg"]["width"]
CLASSES = sorted(TINY_CLASSES)  # folder order of the tiny_data fixture


def _prompts(sha256: str, classnames: list[str] = CLASSES, width: int = WIDTH) -> PromptSet:
    context = torch.zeros(len(classnames), 2, width)
    return PromptSet(context=context, classnames=list(classnames), model_sha256=sha256)


def _trigger(sha256: str, classnames: list[str] = CLASSES, size: int = 32) -> TriggerFile:
    trigger = MaskPatternTrigger(mask=torch.zeros(1, size, size), pattern=torch.ones(3, size, size))
    return TriggerFile(trigger=trigger, model_sha256=sha256, classnames=list(classnames))


@pytest.fixture(scope="module")
def bundle(tiny_model_path: Path):
    return load_model(tiny_model_path)


# --------------------------------------------------------------------------- prompt files


def test_fitting_prompt_file_is_accepted_by_evaluate(
    bundle, tiny_model_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    path = tmp_path / "prompts.safetensors"
    save_prompt_file(path, _prompts(bundle.sha256))
    result = run_cli("evaluate", tiny_model_path, "--data", tiny_data, "--prompts", path, "-q")
    assert result.exit_code == 0, result.output


def test_prompt_file_for_another_model(
    tiny_model_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    path = tmp_path / "prompts.safetensors"
    save_prompt_file(path, _prompts("0" * 64))
    result = run_cli("evaluate", tiny_model_path, "--data", tiny_data, "--prompts", path, "-q")
    assert_one_line_error(result, "made for model sha256 000000000000")


def test_prompt_file_for_another_class_list(
    bundle, tiny_model_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    path = tmp_path / "prompts.safetensors"
    save_prompt_file(path, _prompts(bundle.sha256, ["cat", "dog", "bird"]))
    result = run_cli("evaluate", tiny_model_path, "--data", tiny_data, "--prompts", path, "-q")
    assert_one_line_error(result, "another class list")


def test_prompt_set_for_another_text_width(bundle) -> None:
    with pytest.raises(InputError, match="context width 48"):
        _prompts(bundle.sha256, width=48).check_fits(bundle, CLASSES)


def test_trigger_file_passed_as_prompt_file(
    bundle, tiny_model_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    path = tmp_path / "trigger.safetensors"
    save_trigger_file(path, _trigger(bundle.sha256))
    result = run_cli("evaluate", tiny_model_path, "--data", tiny_data, "--prompts", path, "-q")
    assert_one_line_error(result, "not a clipguard prompt file")


def test_prompt_file_with_nan_context(tmp_path: Path) -> None:
    prompts = _prompts("a" * 64)
    prompts.context[0, 0, 0] = float("nan")
    save_prompt_file(tmp_path / "p.safetensors", prompts)
    with pytest.raises(InputError, match="NaN or Inf"):
        load_prompt_file(tmp_path / "p.safetensors")


def test_prompt_file_with_float8_context(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    metadata = {"format": "clipguard.prompts/1", "classnames": '["a"]'}
    context = torch.zeros(1, 1, 4, dtype=torch.float8_e4m3fn)
    save_file({"context": context}, tmp_path / "p.safetensors", metadata=metadata)
    with pytest.raises(InputError, match="unsupported dtype F8_E4M3"):
        load_prompt_file(tmp_path / "p.safetensors")


def test_missing_prompt_file(tiny_model_path: Path, tiny_data: Path, tmp_path: Path) -> None:
    result = run_cli(
        "evaluate", tiny_model_path, "--data", tiny_data, "--prompts", tmp_path / "no", "-q"
    )
    assert_one_line_error(result, "prompt file not found")


# --------------------------------------------------------------------------- trigger files


def test_fitting_trigger_file_passes(bundle, tmp_path: Path) -> None:
    save_trigger_file(tmp_path / "t.safetensors", _trigger(bundle.sha256))
    load_trigger_file(tmp_path / "t.safetensors").check_fits(bundle.sha256, CLASSES, 32)


def test_trigger_file_for_another_model(bundle, tmp_path: Path) -> None:
    save_trigger_file(tmp_path / "t.safetensors", _trigger("f" * 64))
    loaded = load_trigger_file(tmp_path / "t.safetensors")
    with pytest.raises(InputError, match="made for model sha256 ffffffffffff"):
        loaded.check_fits(bundle.sha256, CLASSES, 32)


def test_trigger_file_for_another_class_list(bundle, tmp_path: Path) -> None:
    save_trigger_file(tmp_path / "t.safetensors", _trigger(bundle.sha256, ["cat", "dog"]))
    loaded = load_trigger_file(tmp_path / "t.safetensors")
    with pytest.raises(InputError, match="another class list"):
        loaded.check_fits(bundle.sha256, CLASSES, 32)


def test_trigger_file_for_another_image_size(bundle, tmp_path: Path) -> None:
    save_trigger_file(tmp_path / "t.safetensors", _trigger(bundle.sha256, size=224))
    loaded = load_trigger_file(tmp_path / "t.safetensors")
    with pytest.raises(InputError, match="224 px, the model takes 32 px"):
        loaded.check_fits(bundle.sha256, CLASSES, 32)


def test_prompt_file_passed_as_trigger_file(bundle, tmp_path: Path) -> None:
    save_prompt_file(tmp_path / "p.safetensors", _prompts(bundle.sha256))
    with pytest.raises(InputError, match="not a clipguard trigger file"):
        load_trigger_file(tmp_path / "p.safetensors")


def test_trigger_mask_outside_unit_range(bundle, tmp_path: Path) -> None:
    trigger_file = _trigger(bundle.sha256)
    trigger_file.trigger.mask[0, 0, 0] = 2.0
    save_trigger_file(tmp_path / "t.safetensors", trigger_file)
    with pytest.raises(InputError, match="finite values in \\[0, 1\\]"):
        load_trigger_file(tmp_path / "t.safetensors")


def test_model_file_passed_as_trigger_file(tiny_model_path: Path) -> None:
    with pytest.raises(InputError, match="not a clipguard trigger file"):
        load_trigger_file(tiny_model_path)
