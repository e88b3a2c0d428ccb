"""Exploratory runs of one attack on the in-memory synthetic set (no files written).

    python -m benchmarks.lab_explore ATTACK "{OPTIONS}" POISON_RATE [EPOCHS]

Trains the default lab model (scratch recipe, 400 training images per class, seed 0) with the
trigger of ATTACK built from OPTIONS, target class index 0 ("blue star"), and prints CA, ASR
on 50 test images per class, and the oracle ceiling. Label-consistent attacks use hardening
0.5, as ``clipguard lab build`` does.
"""

from __future__ import annotations

import ast
import sys

import torch

from clipguard.lab.synthetic import CLASSNAMES, generate_synthetic
from clipguard.lab.train import (
    Poisoning,
    TrainSettings,
    lab_model_config,
    train_clip,
)
from clipguard.metrics import evaluate_zero_shot
from clipguard.model import ModelBundle, build_clip_from_config
from clipguard.oracle import oracle_ceiling
from clipguard.plugins import get_registry


def main() -> None:
    torch.set_num_threads(1)
    name, options, rate = sys.argv[1], ast.literal_eval(sys.argv[2]), float(sys.argv[3])
    epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    pixels, labels = generate_synthetic(0, 400, "train")
    test_pixels, test_labels = generate_synthetic(0, 50, "test")
    names = list(CLASSNAMES)
    family = get_registry().trigger_family(name)
    trigger = family.build(family.Config(**options), 32)
    config = lab_model_config()
    torch.manual_seed(0)
    model = build_clip_from_config(config)
    poisoning = Poisoning(name, trigger, 0, rate, family.label_consistent, harden=0.5)
    result = train_clip(model, pixels, labels, names, TrainSettings(epochs=epochs), poisoning)
    bundle = ModelBundle.from_model(model, config)
    ca, asr = evaluate_zero_shot(bundle, names, test_pixels, test_labels, trigger, 0)
    ceiling = oracle_ceiling(bundle, names, test_pixels, test_labels, trigger, 0)
    print(
        name,
        options,
        rate,
        epochs,
        f"sec={result.seconds:.0f} CA={ca:.3f} ASR={asr:.3f}",
        {key: round(value, 3) for key, value in ceiling.items()},
    )


if __name__ == "__main__":
    main()
