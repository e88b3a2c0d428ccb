"""Calibrate the cbpt scanner's verdict thresholds on a zoo, and report held-out rates.

    python benchmarks/calibrate.py --zoo ZOO [--zoo ZOO2] --doc docs/benchmarks.md

Every model is scanned once (resumable, shared with benchmarks/run.py's results). Thresholds
on the dominant-class share and the mask size PL1 are fitted on the models of the *fit* seeds
(even seeds) by maximising TPR - FPR, then reported on the held-out models (odd seeds) and
on all models: true-positive rate on backdoored models, false-positive rate on clean ones,
and how often the suspected target class is the real one among the detected.
"""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Harness, ZooModel, find_models, update_docs

from clipguard.io import atomic_write_json
from clipguard.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _detected(scan: dict[str, Any], share_min: float, pl1_max: float) -> bool:
    return (
        scan["statistics"]["dominant_share"] >= share_min and scan["statistics"]["pl1"] <= pl1_max
    )


def rates(scans: list[dict[str, Any]], share_min: float, pl1_max: float) -> dict[str, Any]:
    """TPR, FPR and target accuracy of the rule ``share >= share_min and pl1 <= pl1_max``."""
    backdoored = [s for s in scans if s["attack"] != "none"]
    clean = [s for s in scans if s["attack"] == "none"]
    detected = [s for s in backdoored if _detected(s, share_min, pl1_max)]
    false_alarms = [s for s in clean if _detected(s, share_min, pl1_max)]
    right_target = [s for s in detected if s["statistics"]["dominant_class"] == s["target"]]
    return {
        "n_backdoored": len(backdoored),
        "n_clean": len(clean),
        "tpr": len(detected) / len(backdoored) if backdoored else None,
        "fpr": len(false_alarms) / len(clean) if clean else None,
        "target_accuracy": len(right_target) / len(detected) if detected else None,
        "missed": sorted(s["model"] for s in backdoored if s not in detected),
        "false_alarms": sorted(s["model"] for s in false_alarms),
    }


def fit_thresholds(scans: list[dict[str, Any]]) -> tuple[float, float]:
    """Thresholds maximising TPR - FPR; ties go to the widest margin (midpoints of values)."""
    shares = sorted({s["statistics"]["dominant_share"] for s in scans})
    pl1s = sorted({s["statistics"]["pl1"] for s in scans})
    share_cuts = [0.0] + [(a + b) / 2 for a, b in pairwise(shares)] + [1.0]
    pl1_cuts = [(a + b) / 2 for a, b in pairwise(pl1s)] + [max(pl1s) * 1.01]
    best: tuple[float, float, float, float] | None = None
    for share_min in share_cuts:
        for pl1_max in pl1_cuts:
            result = rates(scans, share_min, pl1_max)
            youden = (result["tpr"] or 0) - (result["fpr"] or 0)
            # prefer a larger PL1 cut and a smaller share cut among equals: fewer misses later
            key = (youden, pl1_max, -share_min, 0.0)
            if best is None or key > best:
                best = key
    assert best is not None
    return -best[2], best[1]


def _seed(model: ZooModel) -> int:
    return int(model.card.get("seed", 0))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def calibration_table(
    fit: dict[str, Any],
    held_out: dict[str, Any],
    everything: dict[str, Any],
    thresholds: tuple[float, float],
) -> str:
    lines = [
        f"Fitted thresholds: dominant share >= {thresholds[0]:.3f} and PL1 <= {thresholds[1]:.4f}.",
        "",
        "| models | backdoored | clean | TPR | FPR | target right | missed | false alarms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in (
        ("fit (even seeds)", fit),
        ("held out (odd seeds)", held_out),
        ("all", everything),
    ):
        lines.append(
            f"| {name} | {result['n_backdoored']} | {result['n_clean']} | {_fmt(result['tpr'])} | "
            f"{_fmt(result['fpr'])} | {_fmt(result['target_accuracy'])} | "
            f"{', '.join(result['missed']) or '-'} | {', '.join(result['false_alarms']) or '-'} |"
        )
    return "\n".join(lines) + "\n"


@app.command()
def main(
    zoo: Annotated[list[Path], typer.Option(help="zoo folder(s) with lab models and cards")],
    results: Annotated[Path | None, typer.Option(help="scan results JSON (resumable)")] = None,
    doc: Annotated[Path | None, typer.Option(help="markdown file to update")] = None,
    shots: int = 16,
    seed: int = 0,
    quiet: bool = False,
) -> None:
    """Scan every zoo model, fit thresholds on even seeds, report on odd seeds."""
    progress = Progress(quiet=quiet)
    models = [model for folder in zoo for model in find_models(folder)]
    if not models:
        raise typer.BadParameter("no models with cards found")
    date = datetime.date.today().isoformat()
    results = results or ROOT / "benchmarks" / "results" / f"{date}-calibration.json"
    harness = Harness(
        results_path=results, runs_dir=results.with_suffix("") / "runs", shots=shots, seed=seed
    )
    scans = {m.name: harness.scan(m) for m in progress.track(models, description="scanning zoo")}
    fit_scans = [scans[m.name] for m in models if _seed(m) % 2 == 0]
    held_scans = [scans[m.name] for m in models if _seed(m) % 2 == 1]
    thresholds = fit_thresholds(fit_scans)
    summary = {
        "thresholds": {"share_backdoor": thresholds[0], "pl1_backdoor": thresholds[1]},
        "fit": rates(fit_scans, *thresholds),
        "held_out": rates(held_scans, *thresholds),
        "all": rates(list(scans.values()), *thresholds),
    }
    harness.results["calibration"] = summary
    atomic_write_json(results, harness.results)
    table = calibration_table(summary["fit"], summary["held_out"], summary["all"], thresholds)
    typer.echo(table)
    typer.echo(json.dumps(summary["thresholds"]))
    if doc is not None:
        command = shlex.join(["python", "benchmarks/calibrate.py", *sys.argv[1:]])
        update_docs(doc, table, None, command, results, section="scanner-calibration")


if __name__ == "__main__":
    app()
