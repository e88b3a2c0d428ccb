"""Per-class accuracy and prediction share of a model with hand-crafted or learned prompts.

    python -m benchmarks.per_class_accuracy MODEL --dataset CIFAR [--prompts P.safetensors ...]
        [--stride 3]

Uses every ``stride``-th image of the data set's test split; prints one JSON line per prompt
set (``handcrafted`` first): CA, and per class its recall and the share of all predictions
that name it. Shows where a purification costs accuracy (docs/method.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clipguard.lab.train import load_split_data, open_lab_dataset
from clipguard.model import load_model
from clipguard.prompts import PromptClassifier, load_prompt_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--dataset", required=True, help="'synthetic' or a train/ test/ folder")
    parser.add_argument("--prompts", type=Path, nargs="*", default=[])
    parser.add_argument("--stride", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bundle = load_model(args.model)
    data = load_split_data(open_lab_dataset(args.dataset), bundle.image_size)
    pixels, labels = data.test_pixels[:: args.stride], data.test_labels[:: args.stride]
    with torch.no_grad():
        features = torch.cat(
            [bundle.encode_image(pixels[i : i + 500]) for i in range(0, len(labels), 500)]
        )
    for source in [None, *args.prompts]:
        prompts = load_prompt_file(source) if source is not None else None
        classifier = PromptClassifier(bundle, data.classnames, prompts)
        predictions = classifier.logits_from_features(features).argmax(dim=1)
        per_class = {
            name: {
                "recall": round(float((predictions[labels == k] == k).float().mean()), 3),
                "share": round(float((predictions == k).float().mean()), 3),
            }
            for k, name in enumerate(data.classnames)
        }
        accuracy = float((predictions == labels).float().mean())
        print(
            json.dumps(
                {
                    "prompts": str(source) if source else "handcrafted",
                    "clean_accuracy": round(accuracy, 4),
                    "classes": per_class,
                }
            )
        )


if __name__ == "__main__":
    main()
