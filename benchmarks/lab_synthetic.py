"""Measure lab models: build each (attack, recipe, poison rate) and print CA, ASR, seconds.

Usage (one line per model; results are appended as JSON lines to --results)::

    python -m benchmarks.lab_synthetic --dataset synthetic --out /tmp/lab-bench \\
        --results /tmp/lab-bench/results.jsonl none badnets blended sig wanet \\
        badnets-lc issba-like badclip-like

Each model is built by :func:`clipguard.lab.train.build_model` exactly as
``clipguard lab build`` does; the figures come from its model card.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from clipguard.io import atomic_write_text
from clipguard.lab.train import build_model, get_profile, open_lab_dataset

KEYS = (
    "attack",
    "target",
    "recipe",
    "poison_rate",
    "epochs",
    "seed",
    "clean_accuracy",
    "attack_success_rate",
    "oracle_clean_accuracy",
    "oracle_attack_success_rate",
    "triggered_feature_cosine",
    "clean_feature_cosine",
    "training_seconds",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("attacks", nargs="+", help="attack names, or 'none' for a clean model")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--target", default=None, help="target class (default: the first)")
    parser.add_argument(
        "--poison-rate", type=float, default=None, help="default: the profile's zoo rate"
    )
    parser.add_argument("--profile", default="auto", help="auto, synthetic or natural")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--recipe", default=None, help="default: the profile's")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    profile = get_profile(args.profile, open_lab_dataset(args.dataset))
    recipe = args.recipe or profile.recipe
    for attack in args.attacks:
        rate = profile.zoo_poison_rate(attack, args.poison_rate)
        epochs = args.epochs if args.epochs is not None else profile.zoo_epochs(attack, recipe)
        name = f"{attack}-{recipe}-r{rate}-e{epochs}-lr{args.lr}-s{args.seed}"
        start = time.perf_counter()
        card = build_model(
            args.dataset,
            args.out / f"{name}.safetensors",
            attack=attack,
            target=args.target or _first_class(args.dataset, args.out),
            poison_rate=rate,
            epochs=epochs,
            seed=args.seed,
            recipe=recipe,
            lr=args.lr,
            profile=profile.name,
        )
        row = {key: card.get(key) for key in KEYS}
        row["wall_seconds"] = round(time.perf_counter() - start, 1)
        row["model"] = name
        print(json.dumps(row), flush=True)
        previous = args.results.read_text() if args.results.exists() else ""
        atomic_write_text(args.results, previous + json.dumps(row) + "\n")


def _first_class(dataset: str, out: Path) -> str:
    from clipguard.data import open_image_folder

    return open_image_folder(open_lab_dataset(dataset) / "train").classnames[0]


if __name__ == "__main__":
    main()
