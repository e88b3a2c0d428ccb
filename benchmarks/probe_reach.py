"""Reach probes: how far one small universal transformation moves shots to each class.

Usage::

    python -m benchmarks.probe_reach --dataset CIFAR ZOO/*.safetensors
        [--probe additive|warp|colour] [--epsilon 0.02] [--colour-strength 0.1] [--fixed]
        [--warp-pixels 2] [--warp-grid 8] [--steps 30] [--shots 16] [--held-out 48]
        [--sweep 2,4]

The ``cbpt`` scanner's signals for triggers that a small mask does not express
(docs/method.md): full-image additive ones (SIG, blended; ``--probe additive``, a perturbation
``d`` with ``|d| <= epsilon`` everywhere, pixels in [0, 1]) and warps (WaNet; ``--probe
warp``, a smooth displacement field of at most ``--warp-pixels`` pixels from a
``--warp-grid`` control grid); for research, also colour filters (``--probe colour``, not a
scanner probe, docs/research.md: a change of the 3 x 3 channel mix and a per-channel offset,
every entry at most ``--colour-strength``, its bound adapted in the additive probe's band with
its steps). For every model and every class ``k`` one transformation is
fitted with Adam to send half of the other classes' shots to ``k``, and its *reach* is the
share of the other half of those shots it sends to ``k`` (the scanner's probe,
:func:`clipguard_cbpt.scanner.run_probe`, on fixed shots, without a budget; the additive
probe's bound starts at ``--epsilon`` and is adapted to the model as the scanner does, unless
``--fixed``). The shots
are ``--shots`` training images per class, drawn with a fixed seed; ``--held-out N`` also
measures the reach on ``N`` test images per class (as the scanner measures it on images besides
the shots). Prints one JSON line per model: the reach of every class, the top class, ``top -
median`` (the probe's evidence) and, for a backdoored lab model, the target's evidence.

``--sweep`` measures the reach of every class as a function of the bound (the budget sweep of
docs/research.md): after the probe settles its bound, it is fitted again at each of the listed
multiples of that bound, and the line gains ``sweep``: per multiple, every class's reach.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch

from clipguard.lab.train import SplitData, card_path, load_split_data, open_lab_dataset
from clipguard.model import ModelBundle, load_model
from clipguard.prompts import PromptClassifier
from clipguard_cbpt.config import ScanConfig
from clipguard_cbpt.probe_families import ProbeFamily
from clipguard_cbpt.probes import FIXED_BOUND, ProbeSpec, run_probe


@dataclass(frozen=True)
class ColourMix(ProbeFamily):
    """``clamp(x + D x + b, 0, 1)`` at every pixel, with a ``3 x 3`` change ``D`` of the
    channel mix and a per-channel offset ``b``, every entry at most ``strength``: colour
    filters (a photo app's filter, a channel swap, a tint), which no small additive change
    expresses. Not one of the scanner's probes (docs/research.md)."""

    strength: float
    name: ClassVar[str] = "colour"
    signal: ClassVar[str] = "colour-filter"

    def initial(self, n_classes: int, image_shape: tuple[int, ...]) -> torch.Tensor:
        channels = int(image_shape[0])
        return torch.zeros(n_classes, channels, channels + 1)

    def apply(self, images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        mix, offset = parameters[:, :-1], parameters[:, -1]
        changed = torch.einsum("oc,bchw->bohw", mix, images) + offset[:, None, None]
        return (images + changed).clamp(0, 1)

    def bound(self, parameters: torch.Tensor) -> None:
        parameters.clamp_(-self.strength, self.strength)

    @property
    def lr(self) -> float:
        return self.strength / 10

    def settings(self) -> dict[str, float]:
        return {"strength": self.strength}

    def describe(self) -> str:
        return f"a colour filter changing each channel-mix entry by at most {self.strength:g}"

    def rescaled(self, factor: float) -> ColourMix:
        return replace(self, strength=self.strength * factor)


def frozen(path: Path) -> ModelBundle:
    """The model at ``path``, loaded safely, its parameters without gradients."""
    bundle = load_model(path)
    for parameter in bundle.model.parameters():
        parameter.requires_grad_(False)
    return bundle


def lab_card(path: Path) -> dict[str, Any]:
    """The lab card beside the model at ``path`` (empty for a model without one)."""
    card = card_path(path)
    return json.loads(card.read_text()) if card.is_file() else {}


def fixed_shots(data: SplitData, shots: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``shots`` training images per class (pixels, labels), drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for k in range(len(data.classnames)):
        members = torch.nonzero(data.train_labels == k).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    index = torch.cat(chosen)
    return data.train_pixels[index], data.train_labels[index]


def fixed_test_images(data: SplitData, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` test images of every class (pixels, labels)."""
    index = torch.cat(
        [
            torch.nonzero(data.test_labels == k).flatten()[:per_class]
            for k in range(len(data.classnames))
        ]
    )
    return data.test_pixels[index], data.test_labels[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--dataset", required=True, help="'synthetic' or a train/ test/ folder")
    parser.add_argument("--probe", choices=("additive", "warp", "colour"), default="additive")
    parser.add_argument("--epsilon", type=float, default=0.02)
    parser.add_argument(
        "--colour-strength",
        type=float,
        default=0.1,
        help="bound of every channel-mix entry the colour probe starts from",
    )
    parser.add_argument("--warp-pixels", type=float, default=2.0)
    parser.add_argument("--warp-grid", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="default: the scanner's")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument(
        "--held-out", type=int, default=0, help="test images per class the reach is measured on"
    )
    parser.add_argument(
        "--sweep",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[],
        help="comma-separated multiples of the settled bound to fit the probe again at",
    )
    parser.add_argument(
        "--fixed",
        action="store_true",
        help="keep the starting bound (the scanner adapts the additive one to the model)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # the scanner's probes with these bounds, and its default steps
    scan = ScanConfig(
        additive_epsilon=args.epsilon, warp_pixels=args.warp_pixels, warp_grid=args.warp_grid
    )
    probes = {spec.family.name: spec for spec in scan.probes()}
    additive = scan.additive_probe()
    # the colour probe adapts its bound within the additive probe's band, with its steps
    probes[ColourMix.name] = replace(additive, family=ColourMix(args.colour_strength))
    if args.probe not in probes:
        parser.error(f"the {args.probe} probe is off: its bound must be above 0")
    spec = probes[args.probe]
    spec = replace(
        spec, steps=args.steps or spec.steps, band=FIXED_BOUND if args.fixed else spec.band
    )
    root = open_lab_dataset(args.dataset)
    data_by_size: dict[int, tuple[SplitData, torch.Tensor, torch.Tensor]] = {}
    for path in args.models:
        bundle = frozen(path)
        if bundle.image_size not in data_by_size:
            data = load_split_data(root, bundle.image_size)
            data_by_size[bundle.image_size] = (data, *fixed_shots(data, args.shots))
        data, pixels, labels = data_by_size[bundle.image_size]
        names = list(data.classnames)
        class_features = PromptClassifier(bundle, names).class_features
        held_out = fixed_test_images(data, args.held_out) if args.held_out else None

        fit = partial(
            run_probe,
            bundle,
            pixels,
            labels,
            class_features,
            max_images=len(labels),
            budget=10**9,
            held_out=held_out,
        )
        probe = fit(spec)
        sweep = {
            factor: fit(ProbeSpec(probe.family.rescaled(factor), spec.steps)).reach
            for factor in args.sweep
        }
        reach, evidence = probe.reach, probe.evidence()
        top = max(range(len(reach)), key=lambda k: evidence[k])
        card = lab_card(path)
        target = card.get("target")
        print(
            json.dumps(
                {
                    "model": path.stem,
                    "attack": card.get("attack"),
                    "target": target,
                    "top": names[top],
                    "top_minus_median": round(evidence[top], 3),
                    "probe": probe.probe,
                    "settings": probe.family.settings(),
                    "tried": [{**f.settings(), "median": round(m, 3)} for f, m in probe.tried],
                    "target_reach": None if target is None else reach[names.index(target)],
                    "target_evidence": None
                    if target is None
                    else round(evidence[names.index(target)], 3),
                    "reach": dict(zip(names, [round(r, 3) for r in reach], strict=True)),
                    "sweep": {
                        str(factor): [round(r, 3) for r in values]
                        for factor, values in sweep.items()
                    },
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
