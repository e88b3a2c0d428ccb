"""Additive reach: how far a small universal additive perturbation moves shots to each class.

Usage::

    python benchmarks/additive_reach.py --dataset CIFAR ZOO/*.safetensors [--epsilon 0.02]
        [--steps 30] [--shots 16]

The ``cbpt`` scanner's signal for full-image triggers (SIG, blended), which a
mask-and-pattern trigger does not express (docs/method.md). For every model and every class ``k``: a
perturbation ``d`` with ``|d| <= epsilon`` everywhere (pixels in [0, 1]) is fitted with Adam
to send half of the other classes' shots to ``k`` (``clamp(x + d)``), and its *reach* is the
share of the other half of those shots it sends to ``k`` (the ``cbpt`` scanner's probe,
:func:`clipguard_cbpt.inversion.additive_reach`, on fixed shots, without a budget). The
shots are ``--shots`` training images per class, drawn with a fixed seed. Prints one JSON
line per model: the reach of every class, the top class, ``top - median`` (the probe's
evidence) and, for a backdoored lab model, the reach of its target.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clipguard.lab.train import SplitData, card_path, load_split_data, open_lab_dataset
from clipguard.model import load_model
from clipguard.prompts import PromptClassifier
from clipguard_cbpt.inversion import additive_reach


def fixed_shots(data: SplitData, shots: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``shots`` training images per class (pixels, labels), drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for k in range(len(data.classnames)):
        members = torch.nonzero(data.train_labels == k).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    index = torch.cat(chosen)
    return data.train_pixels[index], data.train_labels[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--dataset", required=True, help="'synthetic' or a train/ test/ folder")
    parser.add_argument("--epsilon", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--shots", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = open_lab_dataset(args.dataset)
    data_by_size: dict[int, tuple[SplitData, torch.Tensor, torch.Tensor]] = {}
    for path in args.models:
        bundle = load_model(path)
        if bundle.image_size not in data_by_size:
            data = load_split_data(root, bundle.image_size)
            data_by_size[bundle.image_size] = (data, *fixed_shots(data, args.shots))
        data, pixels, labels = data_by_size[bundle.image_size]
        names = list(data.classnames)
        for parameter in bundle.model.parameters():
            parameter.requires_grad_(False)
        probe = additive_reach(
            bundle,
            pixels,
            labels,
            PromptClassifier(bundle, names).class_features,
            args.epsilon,
            args.steps,
            max_images=len(labels),
            budget=10**9,
        )
        reach, evidence = probe.reach, probe.evidence()
        top = max(range(len(reach)), key=lambda k: evidence[k])
        card = json.loads(card_path(path).read_text()) if card_path(path).is_file() else {}
        target = card.get("target")
        print(
            json.dumps(
                {
                    "model": path.stem,
                    "attack": card.get("attack"),
                    "target": target,
                    "top": names[top],
                    "top_minus_median": round(evidence[top], 3),
                    "target_reach": None if target is None else reach[names.index(target)],
                    "reach": dict(zip(names, [round(r, 3) for r in reach], strict=True)),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
