"""Recompute the oracle ceiling of backdoored lab models with the current code.

Usage::

    python -m benchmarks.lab_oracle ZOO/*.safetensors [--update-cards] [--table]

For every backdoored model given (clean models, and files without a card beside them, are
skipped) the oracle ceiling of its model card (:func:`clipguard.lab.train.oracle_ceiling`: a
unit-norm linear probe trained on clean and really-triggered features of half the test
split, measured on the other half) is recomputed, and one JSON line per model prints the
card's figures beside the new ones. With ``--update-cards`` the card's oracle fields are
replaced (atomically), and so are the model's entry in a ``manifest.json`` beside it, so zoos
built before a change to the oracle carry the current figures; the benchmark harness reads
them from the cards. ``--table`` ends with a
Markdown table of the same figures (%), one row per model and their average.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from clipguard.io import atomic_write_json
from clipguard.lab.train import card_path, load_split_data, open_lab_dataset
from clipguard.lab.zoo import MANIFEST
from clipguard.model import load_model
from clipguard.oracle import oracle_ceiling
from clipguard.plugins import resolve_trigger
from clipguard.progress import Progress

ORACLE_FIELDS = ("oracle_clean_accuracy", "oracle_attack_success_rate")


def card_split_data(card: dict[str, Any], data_cache: dict[str, Any]) -> Any:
    """The train and test split of the data set a lab model's ``card`` names, loaded once per
    data set into ``data_cache``."""
    dataset = card["dataset"]
    key = dataset["root"]
    if key not in data_cache:
        synthetic = dataset["name"] == "synthetic"
        root = open_lab_dataset("synthetic" if synthetic else dataset["root"])
        image_size = int(card["model_cfg"]["vision_cfg"]["image_size"])
        data_cache[key] = load_split_data(
            root, image_size, Progress(quiet=True), name="synthetic" if synthetic else None
        )
    return data_cache[key]


def rescore(model_path: Path, card: dict[str, Any], data_cache: dict[str, Any]) -> dict[str, Any]:
    """The recomputed oracle ceiling of the model with this ``card`` (data sets loaded once)."""
    data = card_split_data(card, data_cache)
    bundle = load_model(model_path)
    trigger, _, _ = resolve_trigger(card["attack"], card["trigger_options"], bundle.image_size)
    return oracle_ceiling(
        bundle,
        data.classnames,
        data.test_pixels,
        data.test_labels,
        trigger,
        data.classnames.index(card["target"]),
    )


def update_manifest(model_path: Path, ceiling: dict[str, Any]) -> None:
    """Replace the oracle fields of the model's entry in ``manifest.json`` beside it, if any."""
    manifest_path = model_path.with_name(MANIFEST)
    if not manifest_path.is_file():
        return
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest.get("models", []):
        if entry.get("file") == model_path.name:
            entry.update({field: ceiling[field] for field in ORACLE_FIELDS})
    atomic_write_json(manifest_path, manifest)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Per-model CA, and the card's and the recomputed oracle CA / ASR, in %, with averages."""

    def pair(figures: dict[str, Any]) -> tuple[float, float]:
        return (
            100 * figures["oracle_clean_accuracy"],
            100 * figures["oracle_attack_success_rate"],
        )

    lines = [
        "| model | CA % | oracle CA / ASR %, card | oracle CA / ASR %, now |",
        "|---|---|---|---|",
    ]
    for row in rows:
        before, now = pair(row["card"]), pair(row["now"])
        lines.append(
            f"| {row['model']} | {100 * row['clean_accuracy']:.1f} | "
            f"{before[0]:.1f} / {before[1]:.1f} | {now[0]:.1f} / {now[1]:.1f} |"
        )
    count = len(rows)
    ca = sum(100 * row["clean_accuracy"] for row in rows) / count
    before = [sum(pair(row["card"])[i] for row in rows) / count for i in (0, 1)]
    now = [sum(pair(row["now"])[i] for row in rows) / count for i in (0, 1)]
    lines.append(
        f"| **average** ({count}) | {ca:.1f} | {before[0]:.1f} / {before[1]:.1f} | "
        f"{now[0]:.1f} / {now[1]:.1f} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--update-cards", action="store_true")
    parser.add_argument("--table", action="store_true", help="end with a Markdown table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_cache: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for model_path in args.models:
        if model_path.name.endswith(".badclip-patch.safetensors"):
            continue
        if not card_path(model_path).is_file():
            print(f"{model_path}: no model card beside it, skipped", file=sys.stderr)
            continue
        card = json.loads(card_path(model_path).read_text())
        if card.get("attack", "none") == "none" or card.get("target") is None:
            continue
        ceiling = rescore(model_path, card, data_cache)
        row = {
            "model": model_path.name.removesuffix(".safetensors"),
            "clean_accuracy": card["clean_accuracy"],
            "card": {field: card.get(field) for field in ORACLE_FIELDS},
            "now": ceiling,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.update_cards:
            card.update(ceiling)
            atomic_write_json(card_path(model_path), card)
            update_manifest(model_path, ceiling)
    if args.table and rows:
        print(markdown_table(rows))


if __name__ == "__main__":
    main()
