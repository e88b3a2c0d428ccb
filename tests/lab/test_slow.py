"""End to end: train one small poisoned model on the synthetic set, check CA and ASR."""

from __future__ import annotations

import pytest

from clipguard.api import evaluate
from clipguard.lab.synthetic import write_synthetic
from clipguard.lab.train import PROFILES, build_model
from clipguard.lab.zoo import EXTENDED_ATTACKS


@pytest.mark.slow
def test_poisoned_synthetic_model_has_a_working_backdoor(tmp_path):
    data = write_synthetic(tmp_path / "syn", seed=0, n_train_per_class=150, n_test_per_class=30)
    out = tmp_path / "badnets.safetensors"
    card = build_model(
        data, out, attack="badnets", target="red circle", poison_rate=0.1, epochs=5, seed=0
    )
    assert card["clean_accuracy"] >= 0.75, card
    assert card["attack_success_rate"] >= 0.8, card
    report = evaluate(out, data / "test", attack="badnets", target="red circle")
    assert abs(report.clean_accuracy - card["clean_accuracy"]) < 1e-6
    assert abs(report.attack_success_rate - card["attack_success_rate"]) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("family", EXTENDED_ATTACKS)
def test_every_extended_family_implants_a_backdoor(family, synthetic_150):
    """Each further family, with the synthetic profile's options, implants a backdoor in a
    small model (150 images per class, a fifth of them poisoned, 8 epochs)."""
    profile = PROFILES["synthetic"]
    card = build_model(
        synthetic_150,
        synthetic_150.parent / f"{family}.safetensors",
        attack=family,
        target="green cross",
        poison_rate=0.2,
        epochs=8,
        attack_options=profile.trigger_options(family),
        seed=0,
    )
    assert card["clean_accuracy"] >= 0.75, card
    assert card["attack_success_rate"] >= 0.8, card


@pytest.fixture(scope="module")
def synthetic_150(tmp_path_factory):
    return write_synthetic(
        tmp_path_factory.mktemp("syn150") / "data",
        seed=0,
        n_train_per_class=150,
        n_test_per_class=30,
    )
