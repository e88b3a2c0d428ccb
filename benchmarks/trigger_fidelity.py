"""How faithfully each scan's inverted trigger reproduces the real one, in feature space.

    python -m benchmarks.trigger_fidelity --zoo ZOO --results R.json [--images 500] [--min-asr 0.5]
        [--out F.jsonl]

For every backdoored model of ``ZOO`` whose ``cbpt`` scan is stored in the results file ``R``
(``benchmarks/run.py`` or ``benchmarks/calibrate.py``), the purifier issue's trigger-fidelity
figure (:func:`clipguard_cbpt.oracle.trigger_fidelity`): on the first ``--images`` test
images of the model's data set, the cosine between the mean feature shifts ``f(T(x)) - f(x)``
of the real trigger (the card's attack and options) and of the scan's inverted trigger, and
the mean over images of the cosine of the two shifts of each image. Beside them the model's
oracle ceiling (card) and, where ``R`` holds a ``cbpt`` purification, its ASR after. Models
whose card ASR lies below ``--min-asr`` (their backdoor did not take, as
``benchmarks/calibrate.py`` leaves them out) are skipped; on a profile whose cards measure ASR
through prompts the backdoor does not show in (``natural-unseen-prompt``), pass 0. Prints a
Markdown table (one row per model, then the average); ``--out`` also writes one JSON line per
model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.harness import ZooModel, find_models
from benchmarks.lab_oracle import card_split_data
from clipguard.io import atomic_write_text
from clipguard.model import load_model
from clipguard.plugins import resolve_trigger
from clipguard.progress import Progress
from clipguard.triggers import load_trigger_file
from clipguard_cbpt.oracle import trigger_fidelity


def fidelity_row(
    model: ZooModel, scan: dict[str, Any], images: int, data_cache: dict[str, Any]
) -> dict[str, Any]:
    """The fidelity of ``scan``'s inverted trigger on ``model`` (test images loaded once per
    data set into ``data_cache``)."""
    pixels = card_split_data(model.card, data_cache).test_pixels[:images]
    bundle = load_model(model.path)
    real, _, _ = resolve_trigger(model.attack, model.trigger_options, bundle.image_size)
    inverted = load_trigger_file(Path(scan["trigger"])).trigger
    return {
        "model": model.name,
        "attack": model.attack,
        "verdict": scan["verdict"],
        "images": len(pixels),
        **trigger_fidelity(bundle, pixels, real, inverted),
        "oracle_attack_success_rate": model.card.get("oracle_attack_success_rate"),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per model (cosines, the scan's verdict, the card's oracle ASR and CBPT's ASR
    after, in %), then the average of the cosines."""
    lines = [
        "| model | verdict | mean-shift cosine | per-image cosine | oracle ASR % "
        "| cbpt ASR after % |",
        "|---|---|---|---|---|---|",
    ]

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    for row in rows:
        lines.append(
            f"| {row['model']} | {row['verdict']} | {row['mean_shift_cosine']:.3f} | "
            f"{row['per_image_cosine']:.3f} | {percent(row['oracle_attack_success_rate'])} | "
            f"{percent(row.get('cbpt_asr_after'))} |"
        )
    count = len(rows)
    mean = sum(row["mean_shift_cosine"] for row in rows) / count
    per_image = sum(row["per_image_cosine"] for row in rows) / count
    lines.append(f"| **average** ({count}) | | {mean:.3f} | {per_image:.3f} | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--min-asr", type=float, default=0.5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    scans = {entry["model"]: entry for entry in results.get("scans", [])}
    cbpt_asr = {
        entry["model"]: entry.get("asr_after")
        for entry in results.get("runs", [])
        if entry["defence"] == "cbpt"
    }
    models = [
        m
        for m in find_models(args.zoo)
        if m.backdoored
        and m.name in scans
        and float(m.card.get("attack_success_rate") or 0.0) >= args.min_asr
    ]
    if not models:
        raise SystemExit(f"no backdoored model of {args.zoo} has a scan in {args.results}")
    data_cache: dict[str, Any] = {}
    rows = []
    for model in Progress().track(models, description="trigger fidelity"):
        row = fidelity_row(model, scans[model.name], args.images, data_cache)
        row["cbpt_asr_after"] = cbpt_asr.get(model.name)
        rows.append(row)
    if args.out is not None:
        atomic_write_text(args.out, "".join(json.dumps(row) + "\n" for row in rows))
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
