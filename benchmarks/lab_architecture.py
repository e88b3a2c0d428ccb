"""Try a lab architecture and recipe on a data set: train from scratch, print CA, ASR, oracle.

    python -m benchmarks.lab_architecture --dataset CIFAR --epochs 3 \\
        --vision-layers 3 --patch-size 4 [--attack badnets|none] [--rate 0.01] [--target deer]
    python -m benchmarks.lab_architecture --time-steps 30 --vision-layers 3 --patch-size 4

How the ``natural`` profile was chosen (docs/lab.md). Trains ``lab_model_config(...)`` from
scratch on the data set's train split with :func:`clipguard.lab.train.train_clip` (one thread,
seed 0; the trigger stamped after augmentation, as ``clipguard lab build`` does), then prints
one JSON line: training seconds, CA and ASR on the test split, and the oracle ceiling. With
``--time-steps N`` it only times N training steps of batch 64 on random 32 px images.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from clipguard.lab.train import (
    Poisoning,
    TrainSettings,
    lab_model_config,
    load_split_data,
    open_lab_dataset,
    train_clip,
)
from clipguard.metrics import evaluate_zero_shot
from clipguard.model import ModelBundle, build_clip_from_config
from clipguard.oracle import oracle_ceiling
from clipguard.plugins import resolve_trigger

ARCHITECTURE = ("vision_width", "vision_layers", "patch_size", "text_width", "text_layers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--attack", default="badnets", help="trigger family, or none")
    parser.add_argument("--rate", type=float, default=0.01, help="poison rate")
    parser.add_argument("--target", default="deer")
    parser.add_argument("--time-steps", type=int, default=0, help="only time this many steps")
    for name in ARCHITECTURE:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = lab_model_config(
        **{name: getattr(args, name) for name in ARCHITECTURE if getattr(args, name) is not None}
    )
    torch.manual_seed(0)
    model = build_clip_from_config(config)
    row: dict = {**{k: v for k, v in vars(args).items() if v is not None}}
    if args.time_steps:
        pixels = torch.rand(64 * args.time_steps, 3, 32, 32)
        labels = torch.randint(10, (pixels.shape[0],))
        start = time.perf_counter()
        train_clip(model, pixels, labels, [f"class {i}" for i in range(10)], TrainSettings(1))
        row["seconds_per_step"] = round((time.perf_counter() - start) / args.time_steps, 3)
        print(json.dumps(row))
        return
    data = load_split_data(open_lab_dataset(args.dataset), 32)
    poisoning, trigger, target = None, None, data.classnames.index(args.target)
    if args.attack != "none":
        trigger, consistent, options = resolve_trigger(args.attack, {}, 32)
        poisoning = Poisoning(
            args.attack, trigger, target, args.rate, consistent, options, 0.5 if consistent else 0
        )
    result = train_clip(
        model,
        data.train_pixels,
        data.train_labels,
        data.classnames,
        TrainSettings(epochs=args.epochs, lr=args.lr),
        poisoning,
    )
    bundle = ModelBundle.from_model(model, config)
    measured = trigger or resolve_trigger("badnets", {}, 32)[0]
    ca, asr = evaluate_zero_shot(
        bundle, data.classnames, data.test_pixels, data.test_labels, measured, target
    )
    row.update(train_seconds=round(result.seconds), clean_accuracy=ca, attack_success_rate=asr)
    if trigger is not None:
        row.update(
            oracle_ceiling(
                bundle, data.classnames, data.test_pixels, data.test_labels, trigger, target
            )
        )
    print(json.dumps(row))


if __name__ == "__main__":
    main()
