"""Stage-2 option grid on a zoo: CBPT's prompt tuning with cached features, many settings fast.

    python -m benchmarks.stage2_grid --zoo ZOO --results RESULTS.json --dataset CIFAR \\
        --split train|test [--only 'GLOB'] [--eval-limit 2000] \\
        --variant default --variant anchor_weight=3,distill_weight=0.5 ...

For every model of ``ZOO`` (matching ``--only``) the scan trigger recorded in
``RESULTS.json`` (a ``benchmarks/run.py`` results file) is reused; the shots are drawn as
``clipguard purify`` draws them (16 per class from ``DATASET/train``, seed 0), their features
are cached once as the purifier caches them, and each variant (``TuningConfig`` options,
``key=value`` joined by commas; ``default`` for none) is tuned on that cache and measured on
``--eval-limit`` images of the chosen split: ``--split train`` takes images of the training
split that are not shots (a validation set, for choosing options), ``--split test`` the
test split (for reporting). ``reference_prompts=auto`` (the default) is decided per model
as the purifier decides it (fitted for the trigger of a ``fit_prompts`` scan). Gated models
(scan verdict clean) tune without the trigger loss and with ``gated_distill_weight``, as the
purifier does; the class the trigger loss steers away from is the purifier's
(``tuning_target``).

Prints, per variant, one JSON line: mean CA change against the hand-crafted prompts (points)
over the backdoored models and over the clean ones,
mean and largest ASR over the models whose scan trigger points at the real target and was
not gated (what the options do with a right trigger; a missed or misdirected scan leaves the
backdoor whatever the options), and the mean change of the target class's recall and of the
other classes' recall (where the CA goes); with ``--per-model`` also each model's figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch

from clipguard.components import RunContext, ShotSet
from clipguard.data import load_pixels, open_image_folder, split_shots, subsample
from clipguard.features import encode_images
from clipguard.lab.train import open_lab_dataset
from clipguard.model import ModelBundle, load_model
from clipguard.plugins import resolve_trigger
from clipguard.prompts import PromptClassifier, PromptEncoder, handcrafted_text_features
from clipguard.triggers import TriggerFile, load_trigger_file
from clipguard_cbpt.purifier import (
    PurifyConfig,
    resolve_reference,
    says_clean,
    shot_features,
    tuning_target,
    without_trigger_loss,
)
from clipguard_cbpt.statistics import prediction_distribution
from clipguard_cbpt.tuning import FeatureCache, TuningConfig, tune_prompts

SHOTS = 16


@dataclass
class Prepared:
    """One model with everything a variant needs, computed once."""

    name: str
    bundle: ModelBundle
    classnames: list[str]
    cache: FeatureCache
    gated: bool
    suspect: int
    eval_features: torch.Tensor
    eval_labels: torch.Tensor
    target: int | None
    triggered_features: torch.Tensor | None
    trigger_file: TriggerFile


def prepare(model: Path, scan: dict, root: Path, split: str, eval_limit: int) -> Prepared:
    """Shots, their feature cache with the scan trigger, and evaluation features of ``model``."""
    card = json.loads(model.with_name(model.stem + ".card.json").read_text())
    bundle = load_model(model)
    train = open_image_folder(root / "train")
    shot_samples, rest = split_shots(train, SHOTS, 0)
    pixels, labels = load_pixels(shot_samples, bundle.pixel_transform)
    trigger_file = load_trigger_file(Path(scan["trigger"]))
    trigger = trigger_file.trigger
    classifier = PromptClassifier(bundle, train.classnames)
    dominant = prediction_distribution(
        classifier.predict, pixels, labels, trigger, train.classnames
    )["dominant_index"]
    suspect = tuning_target(trigger_file, train.classnames, int(dominant))
    gated = says_clean(trigger_file.settings)
    shots = ShotSet(pixels, labels, train.classnames)
    cache = shot_features(bundle, shots, [] if gated else [trigger], TuningConfig(), RunContext())
    pool = rest if split == "train" else open_image_folder(root / "test").samples
    eval_pixels, eval_labels = load_pixels(
        subsample(pool, eval_limit, 1 if split == "train" else 0), bundle.pixel_transform
    )
    eval_features = encode_images(bundle, eval_pixels)
    if card["attack"] == "none":
        target, triggered_features = None, None
    else:
        attack, _, _ = resolve_trigger(card["attack"], card["trigger_options"], bundle.image_size)
        target = train.classnames.index(card["target"])
        triggered_features = encode_images(bundle, attack.apply(eval_pixels[eval_labels != target]))
    return Prepared(
        name=model.stem,
        bundle=bundle,
        classnames=train.classnames,
        cache=cache,
        gated=gated,
        suspect=suspect,
        eval_features=eval_features,
        eval_labels=eval_labels,
        target=target,
        triggered_features=triggered_features,
        trigger_file=trigger_file,
    )


def variant_config(text: str) -> TuningConfig:
    """``default`` or ``key=value,key=value`` over :class:`TuningConfig`'s options."""
    if text == "default":
        return TuningConfig()
    options = dict(pair.split("=", 1) for pair in text.split(","))
    return TuningConfig.model_validate_json(
        json.dumps({k: json.loads(v) if v[:1].isdigit() else v for k, v in options.items()})
    )


def measure(model: Prepared, config: TuningConfig) -> dict[str, float]:
    """CA change, and for a backdoored model ASR and recall changes, of ``model`` tuned with
    ``config``."""
    config = resolve_reference(config, model.trigger_file)
    if model.gated:
        config = without_trigger_loss(config, PurifyConfig().gated_distill_weight)
    context, _ = tune_prompts(model.bundle, model.classnames, model.cache, model.suspect, config)
    with torch.no_grad():
        tuned = PromptEncoder(model.bundle, model.classnames, config.n_context)(context)
    handcrafted = handcrafted_text_features(model.bundle, model.classnames)
    labels = model.eval_labels

    def recall(text: torch.Tensor, classes: list[int]) -> float:
        predictions = (model.eval_features @ text.T).argmax(dim=1)
        return statistics.mean(
            float((predictions[labels == k] == k).float().mean()) for k in classes
        )

    ca = float(((model.eval_features @ tuned.T).argmax(dim=1) == labels).float().mean())
    ca0 = float(((model.eval_features @ handcrafted.T).argmax(dim=1) == labels).float().mean())
    if model.target is None or model.triggered_features is None:
        return {"ca_change": 100 * (ca - ca0)}
    everyone = list(range(len(model.classnames)))
    others = [k for k in everyone if k != model.target]
    asr = float(((model.triggered_features @ tuned.T).argmax(dim=1) == model.target).float().mean())
    return {
        "ca_change": 100 * (ca - ca0),
        "asr": 100 * asr,
        "target_recall_change": 100
        * (recall(tuned, [model.target]) - recall(handcrafted, [model.target])),
        "other_recall_change": 100 * (recall(tuned, others) - recall(handcrafted, others)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", choices=("train", "test"), required=True)
    parser.add_argument("--only", default="*")
    parser.add_argument("--eval-limit", type=int, default=2000)
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--per-model", action="store_true", help="also one line per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = open_lab_dataset(args.dataset)
    scans = {s["model"]: s for s in json.loads(args.results.read_text())["scans"]}
    models = [
        prepare(path, scans[path.stem], root, args.split, args.eval_limit)
        for path in sorted(args.zoo.glob("*.safetensors"))
        if path.stem in scans and fnmatch(path.stem, args.only)
    ]
    for text in args.variant or ["default"]:
        config = variant_config(text)
        measured = [(model, measure(model, config)) for model in models]
        if args.per_model:
            for model, row in measured:
                print(json.dumps({"variant": text, "model": model.name, **row}), flush=True)
        rows = [row for model, row in measured if model.target is not None]
        clean = [row["ca_change"] for model, row in measured if model.target is None]
        flagged = [
            row["asr"]
            for model, row in measured
            if model.target is not None and not model.gated and model.suspect == model.target
        ]
        print(
            json.dumps(
                {
                    "variant": text,
                    "split": args.split,
                    "models": [model.name for model, _ in measured],
                    "ca_change": _mean([r["ca_change"] for r in rows], 2),
                    "clean_models": len(clean),
                    "clean_ca_change": _mean(clean, 2),
                    "asr_right_trigger_models": len(flagged),
                    "asr_right_trigger_mean": _mean(flagged, 2),
                    "asr_right_trigger_max": round(max(flagged), 2) if flagged else None,
                    "target_recall_change": _mean([r["target_recall_change"] for r in rows], 1),
                    "other_recall_change": _mean([r["other_recall_change"] for r in rows], 2),
                }
            ),
            flush=True,
        )


def _mean(values: list[float], digits: int) -> float | None:
    """The rounded mean of ``values``; None for none."""
    return round(statistics.mean(values), digits) if values else None


if __name__ == "__main__":
    main()
