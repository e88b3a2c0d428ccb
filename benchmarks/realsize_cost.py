"""What a scan of a real-size CLIP costs: the estimate against what each stage took.

    python -m benchmarks.realsize_cost --data /tmp/cifar/cifar10/train \\
        --out benchmarks/results/realsize-cost-cpu.json

A ViT-B-32 (open_clip architecture, random weights from ``--seed``: cost only, its verdict
means nothing) is written once to ``--model`` and scanned on the first ``--classes`` classes
of ``--data`` (an ImageFolder, e.g. CIFAR-10's training images). Two records, one JSON file:

* ``uncut``: ``clipguard scan --estimate -o compute_budget=1e9`` (16 shots, 3 draws, the
  whole image budget; the full plan: per stage the image- and text-encoder passes and the
  seconds they project to on this device);
* ``run``: a real scan with ``--shots``, ``--draws``, ``--max-minutes`` and ``--option``
  values (the scan's defaults unless given): its projection when it started and, per
  stage, what it took (seconds and image-encoder images), the verdict, the budget in force
  and the next steps it printed.

The machine's load (``os.getloadavg``) is recorded before and after: timings on a shared
machine move with it. ``benchmarks/tables.py`` renders the table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch

from clipguard import api
from clipguard.config import parse_options
from clipguard.defaults import DEFAULT_DRAWS, DEFAULT_MAX_MINUTES
from clipguard.io import atomic_write_text
from clipguard.model import save_model
from clipguard.report import cpu_model

ARCH = "ViT-B-32"
#: options of the uncut plan: a compute budget that buys the whole image budget
UNCUT = {"compute_budget": 1e9}


def random_checkpoint(path: Path, seed: int) -> Path:
    """A ViT-B-32 of random weights (``seed``) with its open_clip config, written once."""
    if not path.exists():
        torch.manual_seed(seed)
        model = open_clip.create_model(ARCH, pretrained=None)
        save_model(path, model, open_clip.get_model_config(ARCH))
    return path


def class_subset(data: Path, classes: int, out: Path) -> Path:
    """A folder of symbolic links to the first ``classes`` class folders of ``data``."""
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in data.iterdir() if p.is_dir())[:classes]:
        link = out / folder.name
        if not link.exists():
            link.symlink_to(folder.resolve(), target_is_directory=True)
    return out


def _stages(cost: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            key: stage.get(key)
            for key in (
                "stage",
                "image_passes",
                "image_forwards",
                "text_passes",
                "condition",
                "projected_seconds",
                "actual_seconds",
                "actual_image_images",
            )
        }
        for stage in cost["stages"]
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder (CIFAR-10 train)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--model", type=Path, default=Path("/tmp/clipguard-vit-b-32.safetensors"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shots", type=int, default=api.DEFAULT_SHOTS)
    parser.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help="of the real scan")
    parser.add_argument("--max-minutes", type=float, default=DEFAULT_MAX_MINUTES)
    parser.add_argument("--option", "-o", action="append", default=[], help="key=value")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    args = parser.parse_args(argv)

    model = random_checkpoint(args.model, args.seed)
    data = class_subset(args.data, args.classes, args.model.with_suffix(".classes"))
    common = {"device": args.device, "threads": args.threads}
    load_before = os.getloadavg()
    uncut = api.estimate(model, data, options=UNCUT, max_minutes=None, **common)
    options = parse_options(args.option)
    started = time.perf_counter()
    report = api.scan(
        model,
        data,
        shots=args.shots,
        options=options,
        draws=args.draws,
        max_minutes=args.max_minutes,
        **common,
    )
    wall = time.perf_counter() - started
    assert report.run.cost is not None
    finding = report.findings[0]
    result = {
        "command": "python -m benchmarks.realsize_cost "
        + " ".join(
            [
                f"--data {args.data}",
                f"--classes {args.classes}",
                f"--shots {args.shots}",
                f"--draws {args.draws}",
                *([] if args.max_minutes is None else [f"--max-minutes {args.max_minutes:g}"]),
                *[f"-o {o}" for o in args.option],
                f"--device {args.device} --threads {args.threads}",
            ]
        ),
        "architecture": ARCH,
        "parameters": report.model.parameters,
        "classes": args.classes,
        "shots": args.shots,
        "device": args.device,
        "threads": args.threads,
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "uncut": {
            "units": uncut.units.model_dump() if uncut.units else None,
            "budget": uncut.budget,
            "budget_needed": uncut.budget_needed,
            "projected_seconds": uncut.projected_seconds,
            "stages": _stages(uncut.model_dump()),
        },
        "run": {
            "shots": args.shots,
            "draws": args.draws,
            "max_minutes": args.max_minutes,
            "options": options,
            "units": report.run.cost.units.model_dump() if report.run.cost.units else None,
            "budget": report.run.cost.budget,
            "budget_needed": report.run.cost.budget_needed,
            "projected_seconds": report.run.cost.projected_seconds,
            "actual_seconds": report.run.cost.actual_seconds,
            "wall_seconds": round(wall, 1),
            "stage_seconds": report.run.stage_seconds,
            "image_encoder_images": report.run.image_encoder_images,
            "verdict": finding.verdict,
            "explanation": finding.explanation,
            "next_steps": [step.model_dump() for step in finding.next_steps],
            "stages": _stages(report.run.cost.model_dump()),
        },
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
