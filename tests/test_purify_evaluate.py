"""purify and evaluate through the CLI with a minimal prompt purifier; prompt files end to end."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from clipguard import plugins
from clipguard.cli import app
from clipguard.components import Purifier, PurifyOutcome, RunContext, ShotSet
from clipguard.hookspecs import hookimpl
from clipguard.model import ModelBundle, load_model
from clipguard.prompts import (
    PromptClassifier,
    PromptEncoder,
    PromptSet,
    handcrafted_text_features,
    initial_context,
    load_prompt_file,
    pooled_prefix_length,
)

runner = CliRunner()


class InitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_context: int = 4


class InitialPromptPurifier(Purifier):
    """Returns the untuned class-wise prompts initialised from "a photo of a"."""

    name = "init-prompts"
    version = "0.1"
    Config = InitConfig

    def purify(self, bundle, shots: ShotSet, config, context: RunContext, trigger=None):
        prompts = PromptSet(
            context=initial_context(bundle, shots.n_classes, config.n_context),
            classnames=shots.classnames,
            model_sha256=bundle.sha256,
            architecture=bundle.arch,
            plugin=self.name,
            plugin_version=self.version,
        )
        return PurifyOutcome(
            classifier=PromptClassifier(bundle, shots.classnames, prompts), prompts=prompts
        )


class Plugin:
    @hookimpl
    def clipguard_register_purifiers(self, register):
        register(InitialPromptPurifier())


@pytest.fixture
def purifier_plugin():
    plugin = Plugin()
    plugins.get_plugin_manager().register(plugin, name="init-prompts-plugin")
    yield
    plugins.get_plugin_manager().unregister(plugin)


def test_prompt_encoder_matches_token_path(tiny_model_path):
    """Prompts initialised from "a photo of a" reproduce the hand-crafted text features."""
    bundle: ModelBundle = load_model(tiny_model_path)
    classes = ["red square", "blue circle"]
    encoder = PromptEncoder(bundle, classes, n_context=4)
    learned = encoder(initial_context(bundle, len(classes), 4))
    handcrafted = handcrafted_text_features(bundle, classes)
    torch.testing.assert_close(learned, handcrafted, atol=1e-5, rtol=1e-4)


def test_prompt_encoder_drops_only_padding_after_end_of_text(tiny_model_path):
    """With a causal mask the padding after the last end-of-text token is dropped (features
    unchanged, see the test above); without one the whole context is kept."""
    bundle: ModelBundle = load_model(tiny_model_path)
    classes = ["red square", "a much longer blue circle name"]
    token_ids = bundle.tokenize([f"X X X X {c}." for c in classes])
    longest_end = int(token_ids.argmax(dim=1).max())
    assert pooled_prefix_length(bundle.model, token_ids) == longest_end + 1
    assert longest_end + 1 < bundle.model.context_length
    encoder = PromptEncoder(bundle, classes, n_context=4)
    torch.testing.assert_close(
        encoder(initial_context(bundle, len(classes), 4)),
        handcrafted_text_features(bundle, classes),
        atol=1e-5,
        rtol=1e-4,
    )
    bundle.model.attn_mask = None
    assert pooled_prefix_length(bundle.model, token_ids) == bundle.model.context_length


def test_purify_writes_prompts_and_evaluate_uses_them(
    purifier_plugin, tiny_model_path, tiny_data, tmp_path
):
    out = tmp_path / "purified"
    result = runner.invoke(
        app,
        [
            "purify",
            str(tiny_model_path),
            "--data",
            str(tiny_data),
            "--plugin",
            "init-prompts",
            "--shots",
            "2",
            "--attack",
            "badnets",
            "--target",
            "red square",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    purification = report["purification"]
    assert purification["purifier"] == "init-prompts"
    # untuned prompts equal the hand-crafted ones, so before and after agree
    assert purification["before"] == purification["after"]
    assert purification["before"]["n_images"] == 3 * (6 - 2)
    assert list(purification["before"]["class_recall"]) == report["data"]["classes"]
    assert purification["lost_classes"] == []
    assert purification["classes_judged"] == 0  # 4 evaluation images per class: too few to judge
    prompts = load_prompt_file(out / "prompts.safetensors")
    assert prompts.context.shape[:2] == (3, 4)

    evaluated = runner.invoke(
        app,
        [
            "evaluate",
            str(tiny_model_path),
            "--data",
            str(tiny_data),
            "--prompts",
            str(out / "prompts.safetensors"),
            "--attack",
            "badnets",
            "--target",
            "red square",
            "--json",
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    payload = json.loads(evaluated.output)
    assert 0 <= payload["clean_accuracy"] <= 1
    assert 0 <= payload["attack_success_rate"] <= 1


def test_evaluate_without_attack_reports_null_asr(tiny_model_path, tiny_data):
    result = runner.invoke(
        app, ["evaluate", str(tiny_model_path), "--data", str(tiny_data), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["attack_success_rate"] is None


def test_prompt_file_for_other_classes_is_refused(
    purifier_plugin, tiny_model_path, tiny_data, tmp_path
):
    out = tmp_path / "purified"
    runner.invoke(
        app,
        [
            "purify",
            str(tiny_model_path),
            "--data",
            str(tiny_data),
            "--plugin",
            "init-prompts",
            "--shots",
            "2",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    other = tmp_path / "other"
    for name in ("cat", "dog", "fish"):
        (other / name).mkdir(parents=True)
        shutil.copy(tiny_data / "green_bar" / "0000.png", other / name / "0.png")
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(tiny_model_path),
            "--data",
            str(other),
            "--prompts",
            str(out / "prompts.safetensors"),
        ],
    )
    assert result.exit_code == 2
    assert "another class list" in result.output


def test_attack_without_target_is_exit_2(tiny_model_path, tiny_data):
    result = runner.invoke(
        app, ["evaluate", str(tiny_model_path), "--data", str(tiny_data), "--attack", "badnets"]
    )
    assert result.exit_code == 2
    assert "--attack and --target go together" in result.output


def test_unknown_target_class_is_exit_2(tiny_model_path, tiny_data):
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(tiny_model_path),
            "--data",
            str(tiny_data),
            "--attack",
            "badnets",
            "--target",
            "zebra",
        ],
    )
    assert result.exit_code == 2
    assert "'zebra' is not one of the classes" in result.output
