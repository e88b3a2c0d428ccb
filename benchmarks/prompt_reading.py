"""Which prompts a `fit_prompts=auto` scan reads each zoo model through, and why.

    python -m benchmarks.prompt_reading --zoo ZOO [--zoo ZOO2 ...] --out READINGS.jsonl

For every model of every zoo, the first step of a ``clipguard scan MODEL --data
DATA/train --option fit_prompts=auto`` (seed 0, 16 shots per class): class-wise prompts
fitted to the shots, then the hand-crafted and the fitted prompts classify the reach
probes' held-out images (:func:`clipguard_cbpt.scanner.scan_classifier`, the same shots and
images as the scan). One JSON line per model: both accuracies, their difference, the
prompts the scan would read through, the seconds it took; beside them the model card's
zoo, attack and CA. Resumable: models already in ``--out`` are skipped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.harness import find_models
from clipguard.api import _Run
from clipguard.plugins import get_registry
from clipguard_cbpt.config import ScanConfig
from clipguard_cbpt.prompt_fit import scan_classifier


def reading_of(model_path: Path, data_root: Path, config: ScanConfig) -> dict[str, object]:
    """The auto prompt reading of one model, as a scan with seed 0 and 16 shots makes it."""
    run = _Run(
        command=f"prompt reading {model_path}",
        model_path=model_path,
        data_dir=data_root / "train",
        shots=16,
        seed=0,
        device="cpu",
        classnames_file=None,
        arch=None,
        allow_torchscript=False,
        quiet=True,
        registry=get_registry(),
    )
    run.offer_more_draws()
    start = time.perf_counter()
    reading = scan_classifier(run.bundle, run.shots, config, run.context)
    accuracy = reading.accuracy or {}
    return {
        "handcrafted_accuracy": accuracy.get("hand-crafted"),
        "fitted_accuracy": accuracy.get("fitted"),
        "gain": (accuracy["fitted"] - accuracy["hand-crafted"]) if accuracy else None,
        "held_out_images": reading.held_out_images,
        "prompts": reading.name,
        "seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zoo", type=Path, action="append", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = ScanConfig(fit_prompts="auto")
    done = set()
    if args.out.is_file():
        done = {
            (row["zoo"], row["model"]) for row in map(json.loads, args.out.read_text().splitlines())
        }
    for zoo in args.zoo:
        for model in find_models(zoo):
            if (str(zoo), model.name) in done:
                continue
            row = {
                "zoo": str(zoo),
                "profile": model.card.get("profile"),
                "model": model.name,
                "attack": model.attack,
                "card_clean_accuracy": model.card.get("clean_accuracy"),
                **reading_of(model.path, model.data_root, config),
            }
            with args.out.open("a") as stream:
                stream.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
