"""benchmarks/lab_oracle.py: recompute a zoo's oracle ceilings and rewrite its cards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import lab_oracle
from clipguard.io import atomic_write_json
from clipguard.lab.synthetic import write_synthetic
from clipguard.lab.train import build_model, card_path, lab_model_config
from clipguard.oracle import ORACLE_LOGIT_SCALE

TINY = lab_model_config(vision_layers=1)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> Path:
    """A backdoored and a clean one-epoch model on a tiny synthetic set, with a manifest."""
    root = tmp_path_factory.mktemp("oracle")
    data = write_synthetic(root / "data", 0, 3, 2)
    zoo = root / "zoo"
    zoo.mkdir()
    build_model(
        data,
        zoo / "badnets-s0.safetensors",
        attack="badnets",
        target="red circle",
        poison_rate=0.1,
        epochs=1,
        model_cfg=TINY,
    )
    build_model(data, zoo / "clean-s0.safetensors", epochs=1, model_cfg=TINY)
    manifest = {
        "models": [
            {"file": "badnets-s0.safetensors", "oracle_attack_success_rate": 0.5},
            {"file": "clean-s0.safetensors", "oracle_attack_success_rate": None},
        ]
    }
    atomic_write_json(zoo / "manifest.json", manifest)
    return zoo


def test_update_cards_rewrites_stale_oracle_figures(tiny_zoo, monkeypatch, capsys) -> None:
    """A card written by an older probe (stale figures, no `oracle_logit_scale`) gets the
    current probe's figures, and so does its manifest entry; clean models are skipped."""
    backdoored = tiny_zoo / "badnets-s0.safetensors"
    fresh = json.loads(card_path(backdoored).read_text())
    stale = {k: v for k, v in fresh.items() if k != "oracle_logit_scale"}
    stale.update(oracle_clean_accuracy=0.25, oracle_attack_success_rate=0.5)
    atomic_write_json(card_path(backdoored), stale)
    clean_card = card_path(tiny_zoo / "clean-s0.safetensors").read_text()

    models = [str(p) for p in sorted(tiny_zoo.glob("*.safetensors"))]
    cardless = tiny_zoo / "foreign.safetensors"
    models.append(str(cardless))
    monkeypatch.setattr(sys, "argv", ["lab_oracle.py", *models, "--update-cards", "--table"])
    lab_oracle.main()

    output = capsys.readouterr()
    assert f"{cardless}: no model card beside it, skipped" in output.err
    lines = output.out.splitlines()
    row = json.loads(lines[0])
    assert row["model"] == "badnets-s0"
    assert row["card"]["oracle_attack_success_rate"] == 0.5
    rewritten = json.loads(card_path(backdoored).read_text())
    assert rewritten["oracle_logit_scale"] == ORACLE_LOGIT_SCALE
    for field in lab_oracle.ORACLE_FIELDS:
        assert rewritten[field] == pytest.approx(fresh[field])
        assert rewritten[field] == row["now"][field]
    manifest = json.loads((tiny_zoo / "manifest.json").read_text())
    entry = manifest["models"][0]
    assert entry["oracle_attack_success_rate"] == rewritten["oracle_attack_success_rate"]
    assert manifest["models"][1]["oracle_attack_success_rate"] is None
    assert card_path(tiny_zoo / "clean-s0.safetensors").read_text() == clean_card
    assert lines[1].startswith("| model |") and lines[-1].startswith("| **average** (1) |")
