"""How much room the lab models leave a prompt-tuning purifier: two experiments.

Usage::

    # a clean base trained under another pre-training recipe, and what 16 shots can add to it
    python -m benchmarks.purifier_headroom pretraining --dataset CIFAR \
        --variant {baseline,long-tail,confusion,unseen-prompt} [--strength S] --out BASE.safetensors
    clipguard purify BASE.safetensors --data CIFAR/train --eval-data CIFAR/test \
        --eval-limit 0 --plugin coop --out OUT          # CoOp-like tuning on it, 16 shots

    # a "backdoor sink": one more class vector at the mean feature of the scan's triggered shots
    python -m benchmarks.purifier_headroom sink --dataset CIFAR --zoo CZOO \
        --scans RUNS MODEL [MODEL ...]

The purifier issue asks that 16 shots of prompt tuning add clean accuracy (CA after >= CA
with the hand-crafted prompts before). On the CIFAR-10 lab models they do not: the clean
base is pre-trained on the very captions "a photo of a {class}." names, so its zero-shot
classifier is already the one its features were trained for (docs/method.md, the oracle).

``pretraining`` trains a clean base of the ``natural`` profile (its architecture, epochs and
learning rate; one thread, seed 0) on the data set's training split under one pre-training
recipe and prints one JSON line: zero-shot CA and per-class recall on the test split, and the
CA of a unit-norm linear probe (initialised from the hand-crafted prompts, logit scale 100,
Adam 0.01) trained on 16 shots per class (the mean of three shot draws, 300 steps) and on
10,000 training images (500 steps): what few-shot and many-shot tuning of one vector per class
can reach on those features. Recipes: ``baseline`` (the profile's own; its base is the cached
one of every CIFAR-10 lab model), ``long-tail`` (class ``c``, in a seeded random order of
rank ``r``, keeps ``strength ** (-r / (C - 1))`` of its images: web data is long-tailed) and
``confusion`` (a caption of class ``i`` names class ``i + 1`` with probability ``strength``:
web captions confuse classes one way) and ``unseen-prompt`` (captions from every template
but the hand-crafted prompt "a photo of a {class}.": a user's prompt is a guess, not one of
the captions the model was trained on). An existing ``--out`` is measured, not retrained.

``sink`` asks whether the target's clean images and triggered images can be told apart by one
more vector: for each backdoored lab model, the mean feature of the scan's inverted trigger on
16 shots per class of the other classes is a sink vector; an image whose cosine to it exceeds
a threshold is classified by the hand-crafted prompts without the target class. Thresholds:
the largest cosine of any clean shot (``max_clean``), its 99th percentile (``p99_clean``) and
the midpoint between that largest cosine and the smallest cosine of a triggered shot
(``mid``). Prints one JSON line per model: CA, ASR with the real trigger and target recall on
the whole test split, and the mean cosines to the sink of the triggered shots, of the
target's clean shots and of really-triggered test images. The scan trigger is
``RUNS/MODEL/scan/trigger.safetensors`` (the layout of ``benchmarks/run.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipguard.features import encode_images
from clipguard.lab.train import (
    PROFILES,
    TEMPLATES,
    SplitData,
    TrainSettings,
    card_path,
    load_split_data,
    open_lab_dataset,
    train_clip,
)
from clipguard.metrics import evaluate_zero_shot
from clipguard.model import ModelBundle, build_clip_from_config, load_model, save_model
from clipguard.plugins import resolve_trigger
from clipguard.prompts import handcrafted_text_features
from clipguard.triggers import load_trigger_file

PROBE_LOGIT_SCALE = 100.0


def draw_shots(labels: torch.Tensor, n_classes: int, shots: int, seed: int) -> torch.Tensor:
    """``shots`` rows per class of ``labels``, drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for k in range(n_classes):
        members = torch.nonzero(labels == k).flatten()
        rows.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(rows)


def probe_accuracy(
    initial: torch.Tensor,
    fit_features: torch.Tensor,
    fit_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    steps: int,
) -> float:
    """Test CA of unit-norm class vectors trained from ``initial`` on the fitting features."""
    weights = initial.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([weights], lr=0.01)
    with torch.enable_grad():
        for _ in range(steps):
            logits = PROBE_LOGIT_SCALE * fit_features @ F.normalize(weights, dim=-1).T
            loss = F.cross_entropy(logits, fit_labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        predictions = (test_features @ F.normalize(weights, dim=-1).T).argmax(dim=1)
        return float((predictions == test_labels).float().mean())


def pretraining_templates(variant: str) -> tuple[str, ...]:
    """The caption templates of the pre-training recipe ``variant``."""
    return TEMPLATES[1:] if variant == "unseen-prompt" else TEMPLATES


def pretraining_pairs(
    data: SplitData, variant: str, strength: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-training images and the labels their captions name."""
    pixels, labels = data.train_pixels, data.train_labels
    n_classes = len(data.classnames)
    generator = torch.Generator().manual_seed(123)
    if variant == "long-tail":
        order = torch.randperm(n_classes, generator=generator)
        kept = []
        for rank, k in enumerate(order.tolist()):
            members = torch.nonzero(labels == k).flatten()
            count = max(1, round(len(members) * strength ** (-rank / (n_classes - 1))))
            kept.append(members[torch.randperm(len(members), generator=generator)[:count]])
        rows = torch.cat(kept).sort().values
        return pixels[rows], labels[rows]
    if variant == "confusion":
        confused = torch.rand(labels.numel(), generator=generator) < strength
        return pixels, torch.where(confused, (labels + 1) % n_classes, labels)
    return pixels, labels


def pretraining(args: argparse.Namespace) -> None:
    """The ``pretraining`` experiment (module docstring)."""
    torch.set_num_threads(1)
    data = load_split_data(open_lab_dataset(args.dataset), 32)
    profile = PROFILES["natural"]
    model_cfg = profile.model_cfg
    if args.out.is_file():
        bundle = load_model(args.out)
        n_pairs = None
    else:
        pixels, captions = pretraining_pairs(data, args.variant, args.strength)
        n_pairs = int(captions.numel())
        torch.manual_seed(0)
        model = build_clip_from_config(model_cfg)
        train_clip(
            model,
            pixels,
            captions,
            data.classnames,
            TrainSettings(epochs=profile.epochs, seed=0),
            templates=pretraining_templates(args.variant),
        )
        save_model(args.out, model, model_cfg, {"lab": f"pretraining {args.variant}"})
        bundle = ModelBundle.from_model(model, model_cfg)
    n_classes = len(data.classnames)
    zero_shot, _ = evaluate_zero_shot(bundle, data.classnames, data.test_pixels, data.test_labels)
    test_features = encode_images(bundle, data.test_pixels)
    initial = handcrafted_text_features(bundle, data.classnames)
    predictions = (test_features @ initial.T).argmax(dim=1)
    recall = {
        name: round(float((predictions[data.test_labels == k] == k).float().mean()), 3)
        for k, name in enumerate(data.classnames)
    }

    def probe_on(rows: torch.Tensor, steps: int) -> float:
        return probe_accuracy(
            initial,
            encode_images(bundle, data.train_pixels[rows]),
            data.train_labels[rows],
            test_features,
            data.test_labels,
            steps,
        )

    few_shot = [
        probe_on(draw_shots(data.train_labels, n_classes, 16, seed), steps=300) for seed in range(3)
    ]
    many = torch.randperm(data.train_labels.numel(), generator=torch.Generator().manual_seed(9))
    many_shot = probe_on(many[:10_000], steps=500)
    print(
        json.dumps(
            {
                "variant": args.variant,
                "strength": args.strength,
                "pretraining_pairs": n_pairs,
                "zero_shot_ca": round(zero_shot, 4),
                "probe_16_shots_ca": round(sum(few_shot) / len(few_shot), 4),
                "probe_10000_images_ca": round(many_shot, 4),
                "zero_shot_recall": recall,
                "model": str(args.out),
            }
        ),
        flush=True,
    )


def sink_result(
    bundle: ModelBundle,
    data: SplitData,
    card: dict[str, Any],
    trigger_path: Path,
) -> dict[str, Any]:
    """The ``sink`` experiment on one backdoored model (module docstring)."""
    target = data.classnames.index(card["target"])
    real, _, _ = resolve_trigger(card["attack"], card["trigger_options"], bundle.image_size)
    inverted = load_trigger_file(trigger_path).trigger
    class_features = handcrafted_text_features(bundle, data.classnames)
    rows = draw_shots(data.train_labels, len(data.classnames), 16, 0)
    shots, shot_labels = data.train_pixels[rows], data.train_labels[rows]
    clean_shots = encode_images(bundle, shots)
    triggered_shots = encode_images(bundle, inverted.apply(shots[shot_labels != target]))
    sink = F.normalize(triggered_shots.mean(dim=0), dim=-1)
    test, test_labels = data.test_pixels, data.test_labels
    clean_test = encode_images(bundle, test)
    triggered_test = encode_images(bundle, real.apply(test[test_labels != target]))

    def classify(image_features: torch.Tensor, threshold: float) -> torch.Tensor:
        scores = image_features @ class_features.T
        without_target = scores.clone()
        without_target[:, target] = float("-inf")
        sunk = image_features @ sink > threshold
        return torch.where(sunk, without_target.argmax(dim=1), scores.argmax(dim=1))

    clean_cosine = clean_shots @ sink
    thresholds = {
        "max_clean": float(clean_cosine.max()),
        "p99_clean": float(clean_cosine.quantile(0.99)),
        "mid": float((clean_cosine.max() + (triggered_shots @ sink).min()) / 2),
    }
    zero_shot = (clean_test @ class_features.T).argmax(dim=1)
    result: dict[str, Any] = {
        "model": card["model_file"].removesuffix(".safetensors"),
        "zero_shot_ca": round(float((zero_shot == test_labels).float().mean()), 4),
        "zero_shot_asr": round(
            float(((triggered_test @ class_features.T).argmax(dim=1) == target).float().mean()), 4
        ),
        "sink_cosine_triggered_shots": round(float((triggered_shots @ sink).mean()), 3),
        "sink_cosine_target_clean_shots": round(
            float((clean_shots[shot_labels == target] @ sink).mean()), 3
        ),
        "sink_cosine_really_triggered": round(float((triggered_test @ sink).mean()), 3),
    }
    for name, threshold in thresholds.items():
        clean_predictions = classify(clean_test, threshold)
        result[name] = {
            "threshold": round(threshold, 3),
            "ca": round(float((clean_predictions == test_labels).float().mean()), 4),
            "asr": round(float((classify(triggered_test, threshold) == target).float().mean()), 4),
            "target_recall": round(
                float((clean_predictions[test_labels == target] == target).float().mean()), 3
            ),
        }
    return result


def sink(args: argparse.Namespace) -> None:
    """The ``sink`` experiment on every model named (module docstring)."""
    data = load_split_data(open_lab_dataset(args.dataset), 32)
    for name in args.models:
        model_path = args.zoo / f"{name}.safetensors"
        card = json.loads(card_path(model_path).read_text())
        trigger_path = args.scans / name / "scan" / "trigger.safetensors"
        print(json.dumps(sink_result(load_model(model_path), data, card, trigger_path)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    pre = commands.add_parser("pretraining", help="a base under another pre-training recipe")
    pre.add_argument("--dataset", required=True, help="a folder with train/ and test/")
    pre.add_argument(
        "--variant",
        choices=("baseline", "long-tail", "confusion", "unseen-prompt"),
        required=True,
    )
    pre.add_argument("--strength", type=float, default=0.0)
    pre.add_argument("--out", type=Path, required=True)
    pre.set_defaults(run=pretraining)
    sunk = commands.add_parser("sink", help="a backdoor sink vector beside the class vectors")
    sunk.add_argument("--dataset", required=True, help="a folder with train/ and test/")
    sunk.add_argument("--zoo", type=Path, required=True)
    sunk.add_argument("--scans", type=Path, required=True, help="runs folder of benchmarks/run.py")
    sunk.add_argument("models", nargs="+")
    sunk.set_defaults(run=sink)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
