"""Fast tests of lab training: loss, augmentation, poisoning choice, a 1-step build."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

import clipguard.lab.train as train_module
from clipguard.errors import InputError
from clipguard.lab.attacks import SigConfig, WaNetConfig
from clipguard.lab.demo import demo_model_path
from clipguard.lab.synthetic import (
    CLASSNAMES,
    MARKER_FILE,
    generate_synthetic,
    write_synthetic,
)
from clipguard.lab.train import (
    PROFILES,
    TEMPLATES,
    Poisoning,
    TrainSettings,
    augment,
    build_model,
    caption_tokens,
    card_path,
    choose_poisoned,
    lab_model_config,
    load_split_data,
    multi_positive_clip_loss,
    recipe_key,
    train_clip,
)
from clipguard.model import build_clip_from_config, infer_openai_config, load_model
from clipguard.oracle import ORACLE_LOGIT_SCALE
from clipguard.triggers import BadNets, BadNetsConfig

TINY = lab_model_config(vision_layers=1)


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn") / "data", 0, 3, 2)


def test_lab_config_is_recovered_by_openai_inference():
    model = build_clip_from_config(lab_model_config())
    inferred = infer_openai_config(model.state_dict())
    config = lab_model_config()
    assert inferred["embed_dim"] == config["embed_dim"]
    assert inferred["quick_gelu"] == config["quick_gelu"]
    assert inferred["text_cfg"] == config["text_cfg"]
    for key in ("image_size", "layers", "width", "patch_size"):
        assert inferred["vision_cfg"][key] == config["vision_cfg"][key], key
    rebuilt = build_clip_from_config(inferred)
    rebuilt.load_state_dict(model.state_dict())


def test_widths_must_be_multiples_of_64():
    with pytest.raises(InputError, match="multiple of 64"):
        lab_model_config(vision_width=96)


def test_multi_positive_loss_treats_same_class_captions_as_positives():
    features = torch.nn.functional.normalize(torch.eye(4)[[0, 0, 1, 1]], dim=-1)
    labels = torch.tensor([0, 0, 1, 1])
    aligned = multi_positive_clip_loss(features, features, labels, torch.tensor(50.0))
    shuffled = multi_positive_clip_loss(
        features, features[[2, 3, 0, 1]], labels, torch.tensor(50.0)
    )
    assert aligned < 0.7 < shuffled  # minimum is log(2): two positives per row


def test_augment_keeps_shape_and_is_seeded():
    images = torch.rand(8, 3, 32, 32)
    a = augment(images, 2, torch.Generator().manual_seed(0))
    b = augment(images, 2, torch.Generator().manual_seed(0))
    assert a.shape == images.shape and torch.equal(a, b)
    unpadded = augment(images, 0, torch.Generator().manual_seed(1))
    assert all(
        torch.equal(u, i) or torch.equal(u, i.flip(-1))
        for u, i in zip(unpadded, images, strict=False)
    )


def test_choose_poisoned_respects_rate_and_label_consistency():
    labels = torch.arange(12).repeat(50)
    trigger = BadNets().build(BadNetsConfig(), 32)
    dirty = choose_poisoned(labels, Poisoning("badnets", trigger, 3, 0.05), seed=0)
    assert int(dirty.sum()) == 30 and not bool((labels[dirty] == 3).any())
    clean_label = choose_poisoned(labels, Poisoning("badnets-lc", trigger, 3, 0.05, True), seed=0)
    assert int(clean_label.sum()) == 30 and bool((labels[clean_label] == 3).all())
    with pytest.raises(InputError, match="eligible"):
        choose_poisoned(labels, Poisoning("badnets-lc", trigger, 3, 0.5, True), seed=0)
    assert torch.equal(dirty, choose_poisoned(labels, Poisoning("badnets", trigger, 3, 0.05), 0))


def test_training_is_deterministic_for_a_seed():
    pixels, labels = generate_synthetic(0, 2)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_clip_from_config(TINY)
        trigger = BadNets().build(BadNetsConfig(), 32)
        train_clip(
            model,
            pixels,
            labels,
            list(CLASSNAMES),
            TrainSettings(epochs=1, batch_size=12),
            Poisoning("badnets", trigger, 0, 0.1),
        )
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not model.token_embedding.sparse


def test_one_step_build_writes_model_and_card(tiny_synthetic, tmp_path):
    out = tmp_path / "m.safetensors"
    card = build_model(
        tiny_synthetic,
        out,
        attack="badnets",
        target="red circle",
        poison_rate=0.1,
        epochs=1,
        model_cfg=TINY,
    )
    assert out.is_file() and card_path(out).is_file()
    written = json.loads(card_path(out).read_text())
    assert written["model_sha256"] == card["model_sha256"]
    for key in (
        "dataset",
        "attack",
        "trigger_options",
        "poison_rate",
        "target",
        "seed",
        "epochs",
        "training_seconds",
        "clean_accuracy",
        "attack_success_rate",
        "oracle_attack_success_rate",
        "n_poisoned",
        "cpu_capability",
    ):
        assert key in written, key
    assert written["n_poisoned"] == 4
    assert written["oracle_logit_scale"] == ORACLE_LOGIT_SCALE
    bundle = load_model(out)
    assert bundle.image_size == 32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_clean_model_card_lists_each_triggers_worst_class(tiny_synthetic, tmp_path):
    """A clean model has no target, so its card holds, per trigger family, the class that
    family's trigger sends the most other-class test images to, and that share."""
    out = tmp_path / "clean.safetensors"
    card = build_model(tiny_synthetic, out, epochs=1, model_cfg=TINY)
    rates = json.loads(card_path(out).read_text())["clean_model_worst_trigger_asr"]
    assert rates == card["clean_model_worst_trigger_asr"]
    assert {"badnets", "blended", "sig", "wanet"} <= set(rates)
    assert "badclip-like" not in rates  # needs a patch file
    classnames = card["dataset"]["classnames"]
    for entry in rates.values():
        assert 0 <= entry["asr"] <= 1 and entry["class"] in classnames


def test_the_natural_profile_uses_a_gentler_warp(tiny_synthetic, tmp_path, monkeypatch):
    """WaNet on photographs (the natural profile) defaults to strength 4; options given on
    the command line still win; the synthetic profile keeps the family's default."""
    monkeypatch.setenv("CLIPGUARD_CACHE", str(tmp_path / "cache"))
    natural = tmp_path / "photos"
    shutil.copytree(tiny_synthetic, natural)
    (natural / MARKER_FILE).unlink()
    common = {"attack": "wanet", "target": "red circle", "epochs": 1, "model_cfg": TINY}
    card = build_model(natural, tmp_path / "n.safetensors", base_epochs=1, **common)
    assert card["profile"] == "natural" and card["trigger_options"]["strength"] == 4.0
    given = build_model(
        natural,
        tmp_path / "g.safetensors",
        base_epochs=1,
        attack_options={"strength": 9.0},
        **common,
    )
    assert given["trigger_options"]["strength"] == 9.0
    synthetic = build_model(tiny_synthetic, tmp_path / "s.safetensors", **common)
    assert synthetic["trigger_options"]["strength"] == WaNetConfig().strength


def test_the_natural_profile_uses_a_gentler_sinusoid():
    """SIG on photographs: amplitude 15/255 at a 5 % zoo poison rate; the synthetic profile
    keeps the family's default amplitude (20/255) and its base rate."""
    natural, synthetic = PROFILES["natural"], PROFILES["synthetic"]
    assert natural.trigger_options("sig") == {"delta": 0.06}
    assert natural.trigger_options("sig", {"delta": 0.1}) == {"delta": 0.1}
    assert natural.zoo_poison_rate("sig") == 0.05
    assert synthetic.trigger_options("sig") == {}
    assert SigConfig(**synthetic.trigger_options("sig")).delta == 0.08


def test_build_errors_are_input_errors(tiny_synthetic, tmp_path):
    with pytest.raises(InputError, match="target"):
        build_model(tiny_synthetic, tmp_path / "m.safetensors", attack="badnets", model_cfg=TINY)
    with pytest.raises(InputError, match="not one of"):
        build_model(
            tiny_synthetic,
            tmp_path / "m.safetensors",
            attack="badnets",
            target="unicorn",
            model_cfg=TINY,
        )
    with pytest.raises(InputError, match="safetensors"):
        build_model(tiny_synthetic, tmp_path / "m.pt", model_cfg=TINY)
    with pytest.raises(InputError, match="train/"):
        build_model(tmp_path, tmp_path / "m.safetensors", model_cfg=TINY)


def test_a_frozen_base_model_is_trained_in_full():
    pixels, labels = generate_synthetic(0, 1)
    torch.manual_seed(0)
    model = build_clip_from_config(TINY)
    model.requires_grad_(False)  # as a loaded model bundle leaves it
    before = model.visual.conv1.weight.detach().clone()
    train_clip(model, pixels, labels, list(CLASSNAMES), TrainSettings(epochs=1, batch_size=12))
    assert not torch.equal(before, model.visual.conv1.weight)


def test_zero_epochs_is_an_input_error(tiny_synthetic, tmp_path):
    with pytest.raises(InputError, match="epochs"):
        build_model(tiny_synthetic, tmp_path / "m.safetensors", epochs=0, model_cfg=TINY)


def test_large_sets_keep_exact_pixels_in_the_cache(tiny_synthetic, tmp_path, monkeypatch):
    from clipguard.lab import train as train_module

    monkeypatch.setenv("CLIPGUARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(train_module, "PIXEL_CACHE_MIN_IMAGES", 1)
    first = load_split_data(tiny_synthetic, 32)
    (cache_file,) = (tmp_path / "cache" / "lab-pixels").iterdir()

    def no_decoding(*args, **kwargs):
        raise AssertionError("cached pixels were decoded again")

    monkeypatch.setattr(train_module, "load_pixels", no_decoding)
    second = load_split_data(tiny_synthetic, 32)
    assert torch.equal(first.train_pixels, second.train_pixels)
    assert torch.equal(first.test_labels, second.test_labels)
    assert first.key == second.key

    # a damaged cache entry is not trusted: the images are decoded again
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    monkeypatch.undo()
    monkeypatch.setenv("CLIPGUARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(train_module, "PIXEL_CACHE_MIN_IMAGES", 1)
    third = load_split_data(tiny_synthetic, 32)
    assert torch.equal(first.train_pixels, third.train_pixels)


def test_profiles_follow_the_data_set(tiny_synthetic, tmp_path):
    from clipguard.lab.train import PROFILES, detect_profile, get_profile

    assert detect_profile(tiny_synthetic).name == "synthetic"
    assert detect_profile(tmp_path).name == "natural"
    assert get_profile("natural", tiny_synthetic) is PROFILES["natural"]
    # the synthetic profile is the original lab model, so its models stay reproducible
    assert PROFILES["synthetic"].model_cfg == lab_model_config()
    with pytest.raises(InputError, match="unknown profile"):
        get_profile("imagenet", tmp_path)


def test_cached_lab_models_are_keyed_by_their_recipe(monkeypatch, tmp_path):
    """The demo's cached model is named after its build recipe: changing the profile (an
    upgrade that trains differently) or a build option names another file, so a stale
    model is never reused; the same recipe always names the same file."""
    monkeypatch.setenv("CLIPGUARD_CACHE", str(tmp_path))
    before = demo_model_path()
    assert demo_model_path() == before
    options = {"attack": "badnets", "target": "blue star", "poison_rate": 0.05, "seed": 0}
    assert recipe_key("synthetic", **options) != recipe_key("synthetic", **{**options, "seed": 1})
    monkeypatch.setitem(PROFILES, "synthetic", replace(PROFILES["synthetic"], epochs=9))
    assert demo_model_path() != before
    assert demo_model_path().parent == before.parent


def test_a_new_version_of_the_synthetic_set_renames_synthetic_models_only(monkeypatch):
    """Models trained on an older synthetic set (another palette) are not reused; the natural
    profile's models (trained on the user's files) keep their names."""
    options = {"attack": "badnets", "target": "cat", "poison_rate": 0.01, "seed": 0}
    synthetic, natural = recipe_key("synthetic", **options), recipe_key("natural", **options)
    monkeypatch.setattr(train_module, "SYNTHETIC_DATA_VERSION", 99)
    assert recipe_key("synthetic", **options) != synthetic
    assert recipe_key("natural", **options) == natural


def test_the_unseen_prompt_profile_never_trains_on_the_hand_crafted_prompt():
    """`natural-unseen-prompt` is `natural` with every caption template but the zero-shot
    prompt, so its models' hand-crafted classifier is not the one they were trained for;
    the other profiles' recipes (and the names of their cached models) are unchanged."""
    natural, unseen = PROFILES["natural"], PROFILES["natural-unseen-prompt"]
    assert TEMPLATES[0] not in unseen.templates
    assert set(unseen.templates) == set(TEMPLATES[1:])
    assert replace(unseen, name="natural", templates=TEMPLATES) == natural
    assert PROFILES["synthetic"].templates == natural.templates == TEMPLATES
    options = {"attack": "badnets", "target": "cat", "poison_rate": 0.01, "seed": 0}
    # the keys these recipes had before profiles carried their templates (synthetic and
    # natural: since each profile gained the settings of the seven further families)
    assert recipe_key("synthetic", **options) == "a60856fa22f8"
    assert recipe_key("natural", **options) == "342a78d93482"
    assert recipe_key("natural-unseen-prompt", **options) != recipe_key("natural", **options)


def test_captions_come_from_the_templates_given():
    tokens = caption_tokens(["cat", "dog"], 16, ("a {} here.", "my {}."))
    expected = SimpleTokenizer(context_length=16)(
        ["a cat here.", "my cat.", "a dog here.", "my dog."]
    )
    assert torch.equal(tokens, expected)


def test_a_model_of_the_unseen_prompt_profile_records_its_templates(
    tiny_synthetic, tmp_path, monkeypatch
):
    """Base and poisoned model train on the profile's captions; the card says which, and the
    base is cached apart from the `natural` profile's."""
    monkeypatch.setenv("CLIPGUARD_CACHE", str(tmp_path / "cache"))
    seen: list[tuple[str, ...]] = []
    original = train_module.caption_tokens

    def recording(classnames, context_length, templates=TEMPLATES):
        seen.append(tuple(templates))
        return original(classnames, context_length, templates)

    monkeypatch.setattr(train_module, "caption_tokens", recording)
    common = {"model_cfg": TINY, "epochs": 1, "base_epochs": 1}
    card = build_model(
        tiny_synthetic, tmp_path / "u.safetensors", profile="natural-unseen-prompt", **common
    )
    assert card["profile"] == "natural-unseen-prompt"
    assert card["templates"] == list(TEMPLATES[1:])
    assert seen == [TEMPLATES[1:], TEMPLATES[1:]]  # the base, then the model
    build_model(tiny_synthetic, tmp_path / "n.safetensors", profile="natural", **common)
    assert seen[2:] == [TEMPLATES, TEMPLATES]
    assert len(list((tmp_path / "cache" / "lab-bases").iterdir())) == 2
