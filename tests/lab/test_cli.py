"""The `clipguard lab` commands: data, build (1 step), zoo, and their one-line errors."""

from __future__ import annotations

import json

import pytest

from clipguard.errors import InputError
from clipguard.lab.train import PROFILES, lab_model_config
from clipguard.lab.zoo import ATTACKS, EXTENDED_ATTACKS, build_zoo, plan_zoo, resolve_attacks
from tests.core.cli_helpers import assert_one_line_error, run_cli


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPGUARD_CACHE", str(tmp_path / "cache"))


def test_data_synthetic_writes_image_folders(tmp_path):
    result = run_cli(
        "lab",
        "data",
        "synthetic",
        "--out",
        tmp_path / "syn",
        "--train-per-class",
        "2",
        "--test-per-class",
        "1",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "syn" / "train" / "red_circle").is_dir()
    again = run_cli("lab", "data", "synthetic", "--out", tmp_path / "syn", "--quiet")
    assert_one_line_error(again, "not empty")


def test_build_one_epoch_json(tmp_path):
    data = tmp_path / "syn"
    assert (
        run_cli(
            "lab",
            "data",
            "synthetic",
            "--out",
            data,
            "--train-per-class",
            "3",
            "--test-per-class",
            "1",
            "-q",
        ).exit_code
        == 0
    )
    out = tmp_path / "model.safetensors"
    result = run_cli(
        "lab",
        "build",
        "--dataset",
        data,
        "--attack",
        "sig",
        "--target",
        "blue star",
        "--poison-rate",
        "0.1",
        "--epochs",
        "1",
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)
    assert card["attack"] == "sig" and card["target"] == "blue star"
    assert card["trigger_options"]["frequency"] == 6.0
    assert out.is_file()
    evaluated = run_cli(
        "evaluate",
        out,
        "--data",
        data / "test",
        "--attack",
        "sig",
        "--target",
        "blue star",
        "--json",
    )
    assert evaluated.exit_code == 0, evaluated.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--attack", "badnets", "--target", "unicorn"], "unicorn"),
        (["--attack", "badnets"], "--target"),
        (["--attack", "no-such-attack", "--target", "red circle"], "no-such-attack"),
        (["--attack", "sig", "--target", "red circle", "--attack-option", "delta=-1"], "delta"),
        (["--attack", "sig", "--target", "red circle", "--attack-option", "nonsense"], "key=value"),
    ],
)
def test_build_user_errors(tmp_path, args, fragment):
    data = tmp_path / "syn"
    run_cli(
        "lab",
        "data",
        "synthetic",
        "--out",
        data,
        "--train-per-class",
        "1",
        "--test-per-class",
        "1",
        "-q",
    )
    result = run_cli(
        "lab",
        "build",
        "--dataset",
        data,
        "--out",
        tmp_path / "m.safetensors",
        "--epochs",
        "1",
        "-q",
        *args,
    )
    assert_one_line_error(result, fragment)


def test_build_missing_dataset(tmp_path):
    result = run_cli(
        "lab", "build", "--dataset", tmp_path / "nope", "--out", tmp_path / "m.safetensors", "-q"
    )
    assert_one_line_error(result, "not found")


def test_zoo_plan_covers_every_attack_with_varied_targets():
    names = [f"class {i}" for i in range(10)]
    plan = plan_zoo(names, PROFILES["synthetic"], clean_seeds=3, attack_seeds=2)
    assert [e.attack for e in plan[:3]] == ["none"] * 3
    assert {e.attack for e in plan[3:]} == set(ATTACKS)
    assert len({e.target for e in plan[3:]}) > 3
    assert len({e.name for e in plan}) == len(plan)
    rates = {e.attack: e.poison_rate for e in plan}
    assert rates["badnets"] == 0.07 and rates["blended"] == 0.05 and rates["wanet"] == 0.1


def test_zoo_attacks_are_families_or_groups_in_order_without_repeats():
    assert resolve_attacks(()) == ATTACKS
    assert resolve_attacks(["extended"]) == EXTENDED_ATTACKS
    assert resolve_attacks(["all"]) == ATTACKS + EXTENDED_ATTACKS
    assert resolve_attacks(["ftrojan", "seven", "ftrojan"]) == ("ftrojan", *ATTACKS)
    with pytest.raises(InputError, match="no trigger family"):
        resolve_attacks(["no-such-family"])


def test_a_zoo_of_the_extended_families_plans_each_with_the_profile_settings():
    names = [f"class {i}" for i in range(10)]
    synthetic = PROFILES["synthetic"]
    plan = plan_zoo(names, synthetic, clean_seeds=0, attacks=EXTENDED_ATTACKS)
    assert [e.attack for e in plan] == list(EXTENDED_ATTACKS)
    for entry in plan:
        assert entry.poison_rate == synthetic.zoo_poison_rate(entry.attack)
    assert synthetic.trigger_options("badnets-random") == {"size": 6, "pattern": "checkerboard"}


def test_zoo_plan_takes_rates_and_epochs_from_the_profile():
    names = [f"class {i}" for i in range(10)]
    natural = PROFILES["natural"]
    plan = plan_zoo(names, natural, clean_seeds=1, attack_seeds=1)
    for entry in plan[1:]:
        assert entry.poison_rate == natural.zoo_poison_rate(entry.attack)
        assert entry.epochs == natural.zoo_epochs(entry.attack, natural.recipe)
    epochs = {e.attack: e.epochs for e in plan}
    assert epochs["badnets"] == natural.finetune_epochs
    assert epochs["wanet"] == natural.epoch_overrides["wanet"]
    # an explicit base rate replaces the profile's, not an attack's own rate
    synthetic = PROFILES["synthetic"]
    plan = plan_zoo(names, synthetic, clean_seeds=0, poison_rate=0.2)
    rates = {e.attack: e.poison_rate for e in plan}
    assert (
        rates["blended"] == 0.2
        and rates["badnets"] == 0.07
        and rates["wanet"] == synthetic.poison_rate_overrides["wanet"]
    )


def test_zoo_is_resumable(tmp_path, monkeypatch):
    from clipguard.lab import zoo as zoo_module
    from clipguard.lab.synthetic import write_synthetic

    data = write_synthetic(tmp_path / "syn", 0, 2, 1)
    calls = []
    real = zoo_module.build_model

    def tiny_build(*args, **kwargs):
        calls.append(kwargs["attack"])
        return real(*args, **kwargs, model_cfg=lab_model_config(vision_layers=1))

    monkeypatch.setattr(zoo_module, "build_model", tiny_build)

    def zoo(**kwargs):
        return build_zoo(
            data, tmp_path / "zoo", clean_seeds=1, epochs=1, attacks=("badnets", "sig"), **kwargs
        )

    # two shards share the plan; each manifest lists every finished model in plan order
    assert [m["attack"] for m in zoo(shard=(0, 2))["models"]] == ["none", "sig"]
    manifest = zoo(shard=(1, 2))
    assert calls == ["none", "sig", "badnets"]
    assert [m["attack"] for m in manifest["models"]] == ["none", "badnets", "sig"]
    assert json.loads((tmp_path / "zoo" / "manifest.json").read_text()) == manifest
    assert zoo() == manifest
    assert calls == ["none", "sig", "badnets"]
    with pytest.raises(InputError, match="shard"):
        zoo(shard=(2, 2))


def test_zoo_only_builds_the_models_named(tmp_path, monkeypatch):
    from clipguard.lab import zoo as zoo_module
    from clipguard.lab.synthetic import write_synthetic

    data = write_synthetic(tmp_path / "syn", 0, 2, 1)
    built = []
    real = zoo_module.build_model

    def tiny_build(*args, **kwargs):
        built.append(args[1].name)
        return real(*args, **kwargs, model_cfg=lab_model_config(vision_layers=1))

    monkeypatch.setattr(zoo_module, "build_model", tiny_build)

    def zoo(*only: str) -> dict:
        return build_zoo(
            data,
            tmp_path / "zoo",
            clean_seeds=2,
            attack_seeds=2,
            epochs=1,
            attacks=("sig",),
            only=only,
        )

    manifest = zoo("*-s1")
    assert built == ["clean-s1.safetensors", "sig-s1.safetensors"]
    assert [m["name"] for m in manifest["models"]] == ["clean-s1", "sig-s1"]
    # a later run for other models keeps the earlier ones in the manifest
    manifest = zoo("clean-s0")
    assert built[2:] == ["clean-s0.safetensors"]
    assert [m["name"] for m in manifest["models"]] == ["clean-s0", "clean-s1", "sig-s1"]
    with pytest.raises(InputError, match="no planned model matches"):
        build_zoo(data, tmp_path / "zoo", clean_seeds=1, attacks=("sig",), only=("*-s7",))
    assert len(built) == 3


def test_badclip_patch_command_then_evaluate(tmp_path, tiny_model_path):
    data = tmp_path / "syn"
    run_cli(
        "lab",
        "data",
        "synthetic",
        "--out",
        data,
        "--train-per-class",
        "2",
        "--test-per-class",
        "1",
        "-q",
    )
    patch = tmp_path / "patch.safetensors"
    result = run_cli(
        "lab",
        "badclip-patch",
        tiny_model_path,
        "--dataset",
        data,
        "--target",
        "red circle",
        "--out",
        patch,
        "--steps",
        "3",
        "-q",
    )
    assert result.exit_code == 0, result.output
    evaluated = run_cli(
        "evaluate",
        tiny_model_path,
        "--data",
        data / "test",
        "--attack",
        "badclip-like",
        "--attack-option",
        f"patch_file={patch}",
        "--target",
        "red circle",
        "--json",
    )
    assert evaluated.exit_code == 0, evaluated.output
    missing = run_cli(
        "evaluate",
        tiny_model_path,
        "--data",
        data / "test",
        "--attack",
        "badclip-like",
        "--target",
        "red circle",
    )
    assert_one_line_error(missing, "patch_file")
