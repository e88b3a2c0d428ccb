"""Differential reach: a universal additive change per class fitted against a suspect model
and a trusted reference model at once, to move images to the class on the suspect only.

Usage::

    python -m benchmarks.differential_reach --dataset CIFAR --reference REF.safetensors
        ZOO/*.safetensors [--held-out 48] [--shots 16] [--factors 1,2,4] [--weight 1]
        [--steps 30] [--epsilon 0.02]
    python -m benchmarks.differential_reach --judge LINES.jsonl [MORE.jsonl ...]
        --fit 'clean-s[0-9]' [--fit ...] [--out OUT.json]

The reference contrast of the ``cbpt`` scanner (docs/method.md) fits the additive probe on the
suspect and on the reference separately and subtracts their reach. Here one change ``d_k``
(``|d_k| <= epsilon`` per pixel) per class ``k`` is fitted to send the even shots of the other
classes to ``k`` on the suspect (cross-entropy) while keeping the reference off ``k``
(``-log(1 - p_ref(k))``, times ``--weight``); the *differential reach* of ``k`` is the share of
the odd shots and ``--held-out`` test images per class of the other classes that the suspect
sends to ``k`` and the reference does not. A backdoor is a change the suspect answers and a
clean model of the same task does not; a natural shortcut moves both.

The bound is settled on the reference as the scanner's additive probe settles it (the
probe's band from ``--epsilon``), and the suspect is fitted at ``--factors`` times it. One
JSON line per suspect: per factor every class's differential reach and the suspect's and
reference's plain reach of the jointly fitted change; the largest differential reach and its
class; the target's (for a backdoored lab model).

``--judge`` reads such lines: the threshold is the largest value over the clean models whose
name matches a ``--fit`` pattern (no trigger family fitted), and every other model is judged
by it (flagged above it; right target or not). Prints a Markdown table; ``--out`` writes it as
JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.probe_reach import fixed_shots, fixed_test_images, frozen, lab_card
from clipguard.lab.train import load_split_data, open_lab_dataset
from clipguard.model import ModelBundle
from clipguard.prompts import PromptClassifier
from clipguard_cbpt.config import ScanConfig
from clipguard_cbpt.probe_families import AdditivePerturbation
from clipguard_cbpt.probes import run_probe


def other_class_rows(labels: torch.Tensor, among: torch.Tensor, k: int) -> torch.Tensor:
    """The rows flagged in ``among`` whose label is not ``k``."""
    return torch.nonzero(among & (labels != k)).flatten()


def differential_fit(
    suspect: ModelBundle,
    reference: ModelBundle,
    pixels: torch.Tensor,
    rows: list[torch.Tensor],
    features: tuple[torch.Tensor, torch.Tensor],
    family: AdditivePerturbation,
    steps: int,
    weight: float,
) -> torch.Tensor:
    """One change of ``family`` per class ``k``, from zero, fitted with Adam for ``steps``
    steps to send ``pixels[rows[k]]`` to ``k`` on ``suspect`` and keep ``reference`` off
    ``k`` (``features``: both models' class features). Returns the changes, one per class."""
    suspect_features, reference_features = features
    parameters = family.initial(len(rows), tuple(pixels.shape[1:])).requires_grad_(True)
    optimizer = torch.optim.Adam([parameters], lr=family.lr)
    goal = torch.cat([torch.full((len(r),), k) for k, r in enumerate(rows)])
    weights = torch.cat([torch.full((len(r),), 1.0 / len(r)) for r in rows])
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        images = torch.cat([family.apply(pixels[r], parameters[k]) for k, r in enumerate(rows)])
        pulled = suspect.logit_scale * suspect.encode_image(images) @ suspect_features.T
        held = reference.logit_scale * reference.encode_image(images) @ reference_features.T
        pull = F.cross_entropy(pulled, goal, reduction="none")
        reference_goal = held.softmax(dim=1).gather(1, goal[:, None])[:, 0]
        hold = -torch.log1p(-reference_goal.clamp(max=1 - 1e-6))
        ((pull + weight * hold) * weights).sum().backward()
        optimizer.step()
        with torch.no_grad():
            family.bound(parameters)
    return parameters.detach()


def measure(
    suspect: ModelBundle,
    reference: ModelBundle,
    images: list[torch.Tensor],
    features: tuple[torch.Tensor, torch.Tensor],
) -> tuple[list[float], list[float], list[float]]:
    """Per class ``k`` (``images[k]``: other classes' images changed towards ``k``): the
    share the suspect sends to ``k`` and the reference does not, and each model's share."""
    differential, suspect_reach, reference_reach = [], [], []
    with torch.no_grad():
        for k, batch in enumerate(images):
            to_suspect = (suspect.encode_image(batch) @ features[0].T).argmax(dim=1) == k
            to_reference = (reference.encode_image(batch) @ features[1].T).argmax(dim=1) == k
            differential.append(round(float((to_suspect & ~to_reference).float().mean()), 3))
            suspect_reach.append(round(float(to_suspect.float().mean()), 3))
            reference_reach.append(round(float(to_reference.float().mean()), 3))
    return differential, suspect_reach, reference_reach


def probe(args: argparse.Namespace) -> None:
    """Print one differential-reach line per suspect of ``args.models``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reference = frozen(args.reference)
    data = load_split_data(open_lab_dataset(args.dataset), reference.image_size)
    names = list(data.classnames)
    pixels, labels = fixed_shots(data, args.shots)
    test_pixels, test_labels = fixed_test_images(data, args.held_out)
    reference_features = PromptClassifier(reference, names).class_features
    spec = ScanConfig(additive_epsilon=args.epsilon).additive_probe()
    spec = replace(spec, steps=args.steps or spec.steps)
    settled = run_probe(
        reference, pixels, labels, reference_features, spec, max_images=len(labels),
        budget=10**9, held_out=(test_pixels, test_labels),
    ).family  # fmt: skip
    assert isinstance(settled, AdditivePerturbation)
    even = torch.arange(len(labels)) % 2 == 0
    fit_rows = [other_class_rows(labels, even, k) for k in range(len(names))]
    everywhere = torch.ones(len(test_labels), dtype=torch.bool)
    measured = [
        torch.cat(
            [
                pixels[other_class_rows(labels, ~even, k)],
                test_pixels[other_class_rows(test_labels, everywhere, k)],
            ]
        )
        for k in range(len(names))
    ]
    for path in args.models:
        if path.resolve() == args.reference.resolve():
            continue
        suspect = frozen(path)
        features = (PromptClassifier(suspect, names).class_features, reference_features)
        per_factor: dict[str, Any] = {}
        for factor in args.factors:
            family = settled.rescaled(factor)
            changes = differential_fit(
                suspect, reference, pixels, fit_rows, features, family, spec.steps, args.weight
            )
            images = [family.apply(measured[k], changes[k]) for k in range(len(names))]
            differential, reach, reference_reach = measure(suspect, reference, images, features)
            per_factor[str(factor)] = {
                "epsilon": family.epsilon,
                "differential": differential,
                "suspect_reach": reach,
                "reference_reach": reference_reach,
            }
        value, k, factor = max(
            (row["differential"][k], k, f)
            for f, row in per_factor.items()
            for k in range(len(names))
        )
        card = lab_card(path)
        target = card.get("target")
        print(
            json.dumps(
                {
                    "model": path.stem,
                    "attack": card.get("attack"),
                    "target": target,
                    "reference": args.reference.stem,
                    "settled_epsilon": settled.epsilon,
                    "top": value,
                    "top_class": names[k],
                    "top_factor": factor,
                    "target_top": None
                    if target is None
                    else max(
                        row["differential"][names.index(target)] for row in per_factor.values()
                    ),
                    "classnames": names,
                    "factors": per_factor,
                }
            ),
            flush=True,
        )


def judge(args: argparse.Namespace) -> None:
    """Judge the lines of ``args.judge`` by the largest value of the ``--fit`` clean models."""
    rows = [
        json.loads(text)
        for path in args.judge
        for text in path.read_text().splitlines()
        if text.strip()
    ]
    fitted = [
        r for r in rows if r["target"] is None and any(fnmatch(r["model"], p) for p in args.fit)
    ]
    if not fitted:
        raise SystemExit("no clean model matches --fit")
    threshold = max(r["top"] for r in fitted)
    judged = []
    for r in rows:
        if r in fitted:
            verdict = "fit"
        elif r["top"] <= threshold:
            verdict = "clean" if r["target"] is None else "no"
        elif r["target"] is None:
            verdict = "false alarm"
        else:
            verdict = "yes, right" if r["top_class"] == r["target"] else "yes, wrong"
        judged.append(
            {key: r[key] for key in ("model", "target", "top", "top_class", "target_top")}
            | {"judged": verdict}
        )
    print(f"threshold {threshold} (the largest of {len(fitted)} clean models; flagged above it)")
    print("| model | target | differential reach (class) | target's | judged |")
    print("|---|---|---|---|---|")
    for row in judged:
        target_top = "-" if row["target_top"] is None else f"{row['target_top']:.3f}"
        print(
            f"| {row['model']} | {row['target'] or '-'} | {row['top']:.3f} ({row['top_class']}) "
            f"| {target_top} | {row['judged']} |"
        )
    if args.out:
        args.out.write_text(
            json.dumps({"threshold": threshold, "fit": args.fit, "rows": judged}, indent=1) + "\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--dataset", help="'synthetic' or a train/ test/ folder")
    parser.add_argument("--reference", type=Path, help="the trusted model")
    parser.add_argument("--held-out", type=int, default=48, help="test images per class")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--epsilon", type=float, default=0.02, help="the band search's start")
    parser.add_argument("--steps", type=int, default=None, help="default: the scanner's")
    parser.add_argument("--weight", type=float, default=1.0, help="weight of the reference")
    parser.add_argument(
        "--factors",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[1.0, 2.0, 4.0],
        help="multiples of the bound settled on the reference",
    )
    parser.add_argument("--judge", nargs="+", type=Path, help="lines to judge")
    parser.add_argument("--fit", action="append", default=[], help="clean models fitted on")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.judge:
        judge(args)
    elif args.dataset and args.reference and args.models:
        probe(args)
    else:
        parser.error("give --dataset, --reference and models, or --judge")


if __name__ == "__main__":
    main()
