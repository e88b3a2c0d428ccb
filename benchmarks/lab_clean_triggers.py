"""ASR of every trigger family on clean models, towards the class each trigger favours most.

Usage::

    python -m benchmarks.lab_clean_triggers --dataset CIFAR ZOO/clean-s0.safetensors ...

For each model and each registered trigger family (default options, or the data set's lab
profile's, as its zoo uses them; families that need a file, such as badclip-like, are
skipped) the test split is triggered once and the share of
non-class images sent to each class is computed; the largest share and its class are
printed, one JSON line per model. A clean model has no backdoor, so these are the false
"success" rates a trigger reaches by distorting the image alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clipguard.lab.train import (
    SplitData,
    detect_profile,
    load_split_data,
    open_lab_dataset,
    worst_class_trigger_asr,
)
from clipguard.model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--dataset", required=True, help="'synthetic' or a train/ test/ folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = open_lab_dataset(args.dataset)
    trigger_options = detect_profile(root).trigger_option_overrides
    data_by_size: dict[int, SplitData] = {}
    for model in args.models:
        bundle = load_model(model)
        if bundle.image_size not in data_by_size:
            data_by_size[bundle.image_size] = load_split_data(root, bundle.image_size)
        rates = worst_class_trigger_asr(bundle, data_by_size[bundle.image_size], trigger_options)
        print(
            json.dumps(
                {
                    "model": model.stem,
                    **{k: [round(100 * float(v["asr"]), 1), v["class"]] for k, v in rates.items()},
                }
            )
        )


if __name__ == "__main__":
    main()
