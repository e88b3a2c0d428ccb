"""ASR of every trigger family on clean models, towards the class each trigger favours most.

Usage::

    python benchmarks/lab_clean_triggers.py --dataset CIFAR ZOO/clean-s0.safetensors ...

For each model and each registered trigger family (default options; families that need a
file, such as badclip-like, are skipped) the test split is triggered once and the share of
non-class images sent to each class is computed; the largest share and its class are
printed, one JSON line per model. A clean model has no backdoor, so these are the false
"success" rates a trigger reaches by distorting the image alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clipguard.lab.train import default_triggers, load_split_data, open_lab_dataset
from clipguard.model import load_model
from clipguard.prompts import PromptClassifier


def worst_class_rates(model: Path, dataset: str, chunk: int = 500) -> dict[str, list]:
    """``{family: [asr_percent, class]}`` for the class each trigger sends most images to."""
    bundle = load_model(model)
    data = load_split_data(open_lab_dataset(dataset), bundle.image_size)
    classifier = PromptClassifier(bundle, data.classnames)
    pixels, labels = data.test_pixels, data.test_labels
    rates: dict[str, list] = {}
    for name, trigger in default_triggers(bundle.image_size):
        predictions = torch.cat(
            [
                classifier.logits(trigger.apply(pixels[i : i + chunk])).argmax(dim=1)
                for i in range(0, len(labels), chunk)
            ]
        )
        shares = [
            float(((predictions == k) & (labels != k)).sum() / (labels != k).sum())
            for k in range(len(data.classnames))
        ]
        worst = max(range(len(shares)), key=shares.__getitem__)
        rates[name] = [round(100 * shares[worst], 1), data.classnames[worst]]
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--dataset", required=True, help="'synthetic' or a train/ test/ folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for model in args.models:
        print(json.dumps({"model": model.stem, **worst_class_rates(model, args.dataset)}))


if __name__ == "__main__":
    main()
