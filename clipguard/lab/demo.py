"""The built-in demo: build a backdoored model, measure it, scan it, purify it, compare.

Needs no network and no data: the model is trained here on the built-in synthetic image set
(cached after the first run), poisoned with a BadNets patch aimed at one class.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from clipguard import api
from clipguard.lab.synthetic import CLASSNAMES, cache_dir, cached_synthetic
from clipguard.lab.train import build_model, card_path, recipe_key
from clipguard.progress import Progress
from clipguard.render import lost_class_warnings
from clipguard.report import EvaluationReport, Report

DEMO_ATTACK = "badnets"
DEMO_TARGET = CLASSNAMES[0]
DEMO_POISON_RATE = 0.05


@dataclass
class DemoResult:
    """What the demo measured and the files it wrote."""

    model: Path
    before: EvaluationReport
    scan: Report
    purification: Report
    seconds: float
    files: list[Path] = field(default_factory=list)


def demo_model_path() -> Path:
    """Where the demo's backdoored model is cached; the name carries the build recipe's
    fingerprint, so a model cached under another recipe is not reused."""
    key = recipe_key(
        "synthetic", attack=DEMO_ATTACK, target=DEMO_TARGET, poison_rate=DEMO_POISON_RATE, seed=0
    )
    return cache_dir() / "demo" / f"synthetic-{DEMO_ATTACK}-seed0-{key}.safetensors"


def ensure_demo_model(progress: Progress) -> Path:
    """The demo's backdoored model, built on first use and cached; returns its path."""
    model = demo_model_path()
    if not (model.is_file() and card_path(model).is_file()):
        build_model(
            "synthetic",
            model,
            attack=DEMO_ATTACK,
            target=DEMO_TARGET,
            poison_rate=DEMO_POISON_RATE,
            seed=0,
            progress=progress,
        )
    return model


def run_demo(
    out_dir: Path, seed: int = 0, quiet: bool = False, threads: int | None = None
) -> DemoResult:
    """Run the whole demo, writing scan and purification outputs under ``out_dir``; the
    measurement, scan and purification run with ``threads`` torch threads (None: as many as
    now; the model is built with the lab's default)."""
    start = time.perf_counter()
    console = Console(stderr=True, quiet=quiet)
    progress = Progress(quiet=quiet)
    data_root = cached_synthetic(progress=progress)
    console.print(
        f"[1/4] the backdoored demo model: {DEMO_ATTACK} ({DEMO_POISON_RATE:.0%} of pairs) "
        f"towards {DEMO_TARGET!r}, trained once on the synthetic set and cached",
        highlight=False,
    )
    model = ensure_demo_model(progress)
    console.print("[2/4] measuring the model on the test split", highlight=False)
    before = api.evaluate(
        model,
        data_root / "test",
        attack=DEMO_ATTACK,
        target=DEMO_TARGET,
        seed=seed,
        quiet=quiet,
        threads=threads,
    )
    console.print(
        f"      CA {100 * before.clean_accuracy:.1f} %, ASR "
        f"{100 * (before.attack_success_rate or 0):.1f} % ({DEMO_ATTACK} -> {DEMO_TARGET})",
        highlight=False,
    )
    console.print("[3/4] scanning with cbpt (16 clean shots per class)", highlight=False)
    scan_dir = out_dir / "scan"
    scan = api.scan(
        model,
        data_root / "train",
        scanner="cbpt",
        seed=seed,
        out_dir=scan_dir,
        quiet=quiet,
        threads=threads,
    )
    finding = scan.findings[0]
    console.print(
        f"      verdict: {finding.verdict}, suspected target: {finding.target_class}, "
        f"trigger picture: {finding.artifacts.get('trigger.png', '-')}",
        highlight=False,
    )
    trigger_file = scan_dir / "trigger.safetensors"
    reuse = finding.verdict != "clean" and trigger_file.is_file()
    console.print(
        "[4/4] purifying with cbpt: class-wise prompt tuning against "
        + ("the scan's trigger" if reuse else "a trigger it inverts itself"),
        highlight=False,
    )
    purify_dir = out_dir / "purify"
    purification = api.purify(
        model,
        data_root / "train",
        purifier="cbpt",
        seed=seed,
        eval_data=data_root / "test",
        attack=DEMO_ATTACK,
        target=DEMO_TARGET,
        trigger_path=trigger_file if reuse else None,
        out_dir=purify_dir,
        quiet=quiet,
        threads=threads,
    )
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    return DemoResult(
        model, before, scan, purification, time.perf_counter() - start, [model, *files]
    )


def print_demo(result: DemoResult, console: Console) -> None:
    """The before/after table and every file the demo wrote."""
    purification = result.purification.purification
    assert purification is not None
    table = Table(title="clipguard demo: backdoored CLIP before and after CBPT")
    for column in (
        "",
        "clean accuracy (CA)",
        f"attack success rate (ASR, {DEMO_ATTACK})",
        f"recall of the target, {DEMO_TARGET}",
    ):
        table.add_column(column)
    for name, metrics in (
        ("before (hand-crafted prompts)", purification.before),
        ("after (CBPT prompts)", purification.after),
    ):
        table.add_row(
            name,
            f"{100 * metrics.clean_accuracy:.2f} %",
            f"{100 * (metrics.attack_success_rate or 0):.2f} %",
            f"{100 * (metrics.class_recall.get(DEMO_TARGET) or 0):.2f} %",
        )
    console.print(table)
    for warning in lost_class_warnings(result.purification):
        console.print(f"warning: {warning}", style="yellow", highlight=False)
    finding = result.scan.findings[0]
    console.print(
        f"scan verdict: {finding.verdict} (target {finding.target_class}); "
        f"total {result.seconds:.0f} s",
        highlight=False,
    )
    console.print("files:", highlight=False)
    for path in result.files:
        console.print(f"  {path}", highlight=False)
