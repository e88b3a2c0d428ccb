"""Calibrate the cbpt scanner's verdict thresholds on a zoo, and report held-out rates.

    python -m benchmarks.calibrate --zoo ZOO [--zoo ZOO2] --doc docs/benchmarks.md

Every model is scanned once (resumable, shared with benchmarks/run.py's results). The scan
report holds, per class, the low-side anomaly index of the trigger size and of the text
alignment; the verdict rule (docs/method.md) takes their geometric mean per class, flags a
model when the largest reaches the evidence threshold and names that class. The threshold
is fitted on the models of the *fit* seeds (even seeds) by maximising TPR - FPR
(ties: the middle of the tied range, the widest margin), then reported on the held-out
models (odd seeds) and on all models: true-positive rate on backdoored models, false-positive
rate on clean ones, and how often the suspected target is the real one among the detected.
"""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from statistics import median
from typing import Annotated, Any

import typer

from benchmarks.harness import Harness, ZooModel, find_models, update_docs
from clipguard.config import parse_options
from clipguard.io import atomic_write_json
from clipguard.progress import Progress
from clipguard_cbpt.config import PROBES, ScanConfig, Signals
from clipguard_cbpt.evidence import (
    class_evidence,
    class_isolation,
    deciding_ratio,
    isolation_units,
    last_draw_moot,
    probe_flags_suspect,
)
from clipguard_cbpt.screening import ScanAblations

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def top_evidence(
    scan: dict[str, Any],
    signals: Signals = "joint",
    threshold: float | None = None,
    isolation_threshold: float | None = None,
    screen_again: tuple[float, float] | None = None,
    probes: dict[str, tuple[float, str]] | None = None,
    skip_moot_draw: bool = True,
    probe_settles: bool = True,
) -> tuple[float, str]:
    """The largest class evidence of a scan under the rule ``signals`` and its class,
    recomputed from the per-class indices in the report (so scans made under other rules and
    thresholds are judged alike), the additive probe corroborating as the scan's settings
    say (none for scans made before it did). Under ``joint`` a size index's isolation counts
    as the scanner counts it against the evidence ``threshold`` (default: the rule's) and
    ``isolation_threshold`` (default: the one the scan recorded, none for scans made before
    the scanner used it; 0 = off). A scan screened on several shot draws (its
    ``screen_draws``) gives each class the median of its evidence on the draws, as the
    scanner does; with ``screen_again`` (the scanner's band, in multiples of the threshold)
    the first draw alone where its largest evidence before the additive corroboration lies
    outside the band, as a scanner with that band would have stopped there; with
    ``probes`` too (each reach probe's top evidence over its threshold, and its class), the
    stored draws up to the one after which the scanner stops screening: a probe flags the
    suspect of the draws so far (``probe_settles``, ``probe_flags_suspect``) or the last
    stored draw is moot (``skip_moot_draw``, ``last_draw_moot``)."""
    statistics = scan["statistics"]
    recorded = statistics.get("thresholds", {})
    scale = recorded.get("additive_corroboration") or 0.0
    additive = statistics.get("class_additive_evidence") or {}
    if isolation_threshold is None:
        isolation_threshold = recorded.get("isolation_threshold") or 0.0
    rule = ScanConfig(
        signals=signals,
        evidence_threshold=threshold,
        isolation_threshold=isolation_threshold,
        **({} if screen_again is None else {"screen_again": screen_again}),
    )
    units = isolation_units(rule)
    draws = statistics.get("screen_draws") or [statistics]

    def evidence_of(draw: dict[str, Any], corroboration: float) -> dict[str, float]:
        sizes, alignments = draw["class_size_index"], draw["class_alignment_index"]
        isolation = dict(zip(sizes, class_isolation(list(sizes.values())), strict=True))
        return {
            k: class_evidence(
                sizes[k],
                alignments[k],
                signals,
                corroboration * additive.get(k, 0.0),
                units * isolation[k],
            )
            for k in sizes
        }

    if screen_again is not None and rule.decisive(max(evidence_of(draws[0], 0.0).values())):
        draws = draws[:1]
    per_draw = [evidence_of(draw, scale) for draw in draws]

    def medians(screened: list[dict[str, float]]) -> tuple[dict[str, float], str]:
        evidence = {k: median(draw[k] for draw in screened) for k in screened[0]}
        return evidence, max(sorted(evidence), key=lambda k: evidence[k])

    if screen_again is not None and probes is not None:
        classes = list(per_draw[0])
        indexed = {name: (ratio, classes.index(k)) for name, (ratio, k) in probes.items()}
        screened = 1
        while screened < len(per_draw):
            so_far = per_draw[:screened]
            suspect = classes.index(medians(so_far)[1])
            if probe_settles and probe_flags_suspect(suspect, indexed):
                break
            earlier = [[draw[k] for k in classes] for draw in so_far]
            last = screened == len(per_draw) - 1
            if skip_moot_draw and last and last_draw_moot(earlier, indexed, rule):
                break
            screened += 1
        per_draw = per_draw[:screened]
    evidence, suspect = medians(per_draw)
    return evidence[suspect], suspect


def top_probe(scan: dict[str, Any], probe: str) -> tuple[float, str] | None:
    """The largest evidence of the reach probe ``probe`` ("additive", "warp") in a scan and its
    class (None for a scan made without that probe)."""
    evidence = scan["statistics"].get(f"class_{probe}_evidence")
    if not evidence:
        return None
    suspect = max(sorted(evidence), key=lambda k: evidence[k])
    return evidence[suspect], suspect


@dataclass(frozen=True)
class Rule:
    """A verdict rule: the evidence of ``signals`` against ``threshold``, and each reach probe
    in ``probe_thresholds`` against its threshold (a probe not listed is ignored), as the
    scanner combines them (the largest ratio decides; a probe alone can flag)."""

    signals: Signals
    threshold: float
    probe_thresholds: dict[str, float] = field(default_factory=dict)
    #: the joint rule's isolation threshold (None: as each scan recorded; 0: off)
    isolation_threshold: float | None = None
    #: the first draw decides alone outside this band (the scanner's; None: every draw)
    screen_again: tuple[float, float] | None = ScanConfig().screen_again
    #: a last draw the others made moot is left out (the scanner's skip_moot_draw)
    skip_moot_draw: bool = ScanAblations().skip_moot_draw
    #: the draws after a probe flagged the suspect are left out (the scanner's probe_settles)
    probe_settles: bool = ScanAblations().probe_settles


def _probe_tops(scan: dict[str, Any], rule: Rule) -> dict[str, tuple[float, str]]:
    """Each probe of ``rule`` the scan ran: its top evidence over the rule's threshold for it,
    and its class."""
    tops = {
        name: top for name in rule.probe_thresholds if (top := top_probe(scan, name)) is not None
    }
    return {name: (value / rule.probe_thresholds[name], k) for name, (value, k) in tops.items()}


def _rule_evidence(scan: dict[str, Any], rule: Rule) -> tuple[float, str]:
    """The rule's largest class evidence in ``scan`` and its class, as the scanner judges
    (its band, and its skipping of a moot last draw)."""
    return top_evidence(
        scan,
        rule.signals,
        rule.threshold,
        rule.isolation_threshold,
        rule.screen_again,
        _probe_tops(scan, rule),
        rule.skip_moot_draw,
        rule.probe_settles,
    )


def judge(scan: dict[str, Any], rule: Rule) -> tuple[bool, str]:
    """``(flagged, suspect)`` of a scan under ``rule``."""
    evidence, suspect = _rule_evidence(scan, rule)
    tops = _probe_tops(scan, rule)
    ratios = {name: ratio for name, (ratio, _) in tops.items()}
    _, decided_by = deciding_ratio(evidence / rule.threshold, ratios)
    if decided_by != "rule":
        return True, tops[decided_by][1]
    return evidence >= rule.threshold, suspect


def rates(scans: list[dict[str, Any]], rule: Rule) -> dict[str, Any]:
    """TPR, FPR and target accuracy of ``rule``."""
    backdoored = [s for s in scans if s["attack"] != "none"]
    clean = [s for s in scans if s["attack"] == "none"]
    judged = {s["model"]: judge(s, rule) for s in scans}
    detected = [s for s in backdoored if judged[s["model"]][0]]
    false_alarms = [s for s in clean if judged[s["model"]][0]]
    right_target = [s for s in detected if judged[s["model"]][1] == s["target"]]
    return {
        "n_backdoored": len(backdoored),
        "n_clean": len(clean),
        "tpr": len(detected) / len(backdoored) if backdoored else None,
        "fpr": len(false_alarms) / len(clean) if clean else None,
        "target_accuracy": len(right_target) / len(detected) if detected else None,
        "missed": sorted(s["model"] for s in backdoored if s not in detected),
        "false_alarms": sorted(s["model"] for s in false_alarms),
        "wrong_target": sorted(s["model"] for s in detected if s not in right_target),
    }


def _best_cut(
    scans: list[dict[str, Any]], values: set[float], rule_at: Callable[[float], Rule]
) -> float:
    """The cut maximising TPR - FPR of ``rule_at(cut)`` on ``scans``: candidates are the
    midpoints between the sorted ``values``; among the best the middle of the tied range is
    taken (the widest margin)."""
    tops = sorted(values)
    cuts = [(a + b) / 2 for a, b in pairwise(tops)] or [tops[0]]
    scored = []
    for cut in cuts:
        result = rates(scans, rule_at(cut))
        scored.append(((result["tpr"] or 0) - (result["fpr"] or 0), cut))
    best = max(y for y, _ in scored)
    tied = [c for y, c in scored if y == best]
    return (tied[0] + tied[-1]) / 2


def fit_threshold(scans: list[dict[str, Any]], rule: Rule) -> float:
    """The evidence threshold of ``rule`` maximising TPR - FPR on ``scans`` (its reach probes
    and isolation threshold held), among the midpoints of the models' corroborated top
    evidence values (:func:`_best_cut`)."""
    values = {top_evidence(s, rule.signals, isolation_threshold=0)[0] for s in scans}
    return _best_cut(scans, values, lambda cut: replace(rule, threshold=cut))


def fit_isolation_threshold(scans: list[dict[str, Any]], rule: Rule) -> float:
    """The isolation threshold of the joint ``rule`` maximising TPR - FPR on ``scans`` (its
    evidence and probe thresholds held), among the midpoints of the models' largest
    isolation values (:func:`_best_cut`)."""
    values = {
        max(class_isolation(list(s["statistics"]["class_size_index"].values()))) for s in scans
    }
    return _best_cut(scans, values, lambda cut: replace(rule, isolation_threshold=cut))


def _card_asr(model: ZooModel) -> float:
    return float(model.card.get("attack_success_rate") or 0.0)


def per_attack_table(models: list[ZooModel], scans: dict[str, Any], rule: Rule) -> str:
    """Detection and target accuracy per attack, with the top evidence of every model (and
    its top evidence of every reach probe the rule uses)."""
    probes = sorted(rule.probe_thresholds)
    lines = [
        "",
        "| attack | models | detected | target right | top evidence per model (seed: value) |"
        + "".join(f" top {name} evidence (seed: value, class) |" for name in probes),
        "|---|---|---|---|---|" + "---|" * len(probes),
    ]
    for attack in sorted({m.attack for m in models}):
        chosen = [m for m in models if m.attack == attack]
        judged = [(m, *judge(scans[m.name], rule)) for m in chosen]
        detected = [m for m, flagged, _ in judged if flagged]
        right = [m for m, flagged, suspect in judged if flagged and suspect == m.target]
        values = ", ".join(
            f"s{_seed(m)}: {_rule_evidence(scans[m.name], rule)[0]:.2f}" for m in chosen
        )
        row = (
            f"| {attack} | {len(chosen)} | {len(detected)} | "
            f"{len(right) if attack != 'none' else '-'} | {values} |"
        )
        for name in probes:
            cells = []
            for m in chosen:
                top = top_probe(scans[m.name], name)
                cells.append(f"s{_seed(m)}: {top[0]:.2f} {top[1]}" if top else f"s{_seed(m)}: -")
            row += " " + ", ".join(cells) + " |"
        lines.append(row)
    return "\n".join(lines) + "\n"


#: the scanner issue's bound on one scan of a lab model with default settings
SCAN_SECONDS_TARGET = 120.0


def scan_time_table(models: list[ZooModel], scans: dict[str, Any]) -> str:
    """Per model, the stored scan as it ran: its verdict and suspect, the prompts it read the
    model through, what decided it, the shot draws it screened and why it stopped, its
    seconds (the report's ``scan`` stage and the process's wall clock) and image-encoder
    images; then how many scans kept within :data:`SCAN_SECONDS_TARGET`."""
    lines = [
        "",
        "| model | verdict | suspected target | prompts | decided by | draws | stopped by "
        "| scan s | wall s | encoder images |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    seconds = []
    for model in models:
        scan = scans[model.name]
        statistics = scan["statistics"]
        seconds.append((scan["scan_seconds"], model.name))
        lines.append(
            f"| {model.name} | {scan['verdict']} | {scan['suspected_target'] or '-'} | "
            f"{statistics.get('prompts', '-')} | {statistics.get('decided_by', '-')} | "
            f"{len(statistics.get('screen_draws') or [None])} | "
            f"{statistics.get('screen_draws_stopped') or '-'} | {scan['scan_seconds']:.1f} | "
            f"{scan['wall_seconds']:.1f} | {scan['image_encoder_images']:,} |"
        )
    within = sum(value <= SCAN_SECONDS_TARGET for value, _ in seconds)
    slowest = max(seconds)
    lines += [
        "",
        f"{within} of {len(seconds)} scans within {SCAN_SECONDS_TARGET:.0f} s (report seconds; "
        f"median {median(value for value, _ in seconds):.1f} s, slowest {slowest[0]:.1f} s, "
        f"{slowest[1]}).",
    ]
    return "\n".join(lines) + "\n"


def _seed(model: ZooModel) -> int:
    return int(model.card.get("seed", 0))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def calibration_table(
    fit: dict[str, Any] | None,
    held_out: dict[str, Any],
    everything: dict[str, Any],
    rule: Rule,
    fitted: bool = True,
) -> str:
    how = "Fitted on the even seeds" if fitted else "Given (not fitted here)"
    probe = (
        "; ".join(
            f"{name} probe from {value:g}" for name, value in sorted(rule.probe_thresholds.items())
        )
        or "reach probes ignored"
    )
    isolation = (
        ""
        if rule.signals != "joint"
        else "; isolation as each scan recorded"
        if rule.isolation_threshold is None
        else f"; isolation from {rule.isolation_threshold:.2f}"
        if rule.isolation_threshold
        else "; isolation off"
    )
    lines = [
        f"{how}: evidence threshold {rule.threshold:.2f}, rule `signals = {rule.signals}`"
        f"{isolation}; {probe}.",
        "",
        "| models | backdoored | clean | TPR | FPR | target right | missed | false alarms "
        "| wrong target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in (
        ("fit (even seeds)" if fitted else "even seeds", fit),
        ("held out (odd seeds)" if fitted else "odd seeds", held_out),
        ("all", everything),
    ):
        if result is None:
            continue
        lines.append(
            f"| {name} | {result['n_backdoored']} | {result['n_clean']} | {_fmt(result['tpr'])} | "
            f"{_fmt(result['fpr'])} | {_fmt(result['target_accuracy'])} | "
            f"{', '.join(result['missed']) or '-'} | {', '.join(result['false_alarms']) or '-'} | "
            f"{', '.join(result['wrong_target']) or '-'} |"
        )
    return "\n".join(lines) + "\n"


@app.command()
def main(
    zoo: Annotated[list[Path], typer.Option(help="zoo folder(s) with lab models and cards")],
    results: Annotated[Path | None, typer.Option(help="scan results JSON (resumable)")] = None,
    doc: Annotated[Path | None, typer.Option(help="markdown file to update")] = None,
    shots: int = 16,
    seed: int = 0,
    threshold: Annotated[
        float | None,
        typer.Option(help="evaluate this evidence threshold instead of fitting one"),
    ] = None,
    section: Annotated[
        str, typer.Option(help="marker name of the section of --doc to regenerate")
    ] = "scanner-calibration",
    min_asr: Annotated[
        float,
        typer.Option(help="backdoored models whose card ASR is lower did not take the implant"),
    ] = 0.5,
    signals: Annotated[
        str, typer.Option(help="verdict rule: joint (size and alignment) or size")
    ] = "joint",
    scan_option: Annotated[
        list[str] | None,
        typer.Option(help="option of every cbpt scan, key=value (as benchmarks/run.py)"),
    ] = None,
    additive_threshold: Annotated[
        float | None,
        typer.Option(
            help="additive-probe threshold (default: the scanner's); ignored for scans "
            "without the probe"
        ),
    ] = None,
    warp_threshold: Annotated[
        float | None,
        typer.Option(
            help="warp-probe threshold (default: the scanner's); ignored for scans without "
            "the probe"
        ),
    ] = None,
    isolation_threshold: Annotated[
        float | None,
        typer.Option(
            help="joint rule: isolation threshold (default: as each scan recorded; 0 = off)"
        ),
    ] = None,
    fit_isolation: Annotated[
        bool,
        typer.Option(help="fit the isolation threshold on the even seeds first (joint rule)"),
    ] = False,
    no_additive: Annotated[bool, typer.Option(help="ignore the additive probe")] = False,
    no_warp: Annotated[bool, typer.Option(help="ignore the warp probe")] = False,
    every_draw: Annotated[
        bool,
        typer.Option(
            help="judge a scan of several shot draws by the median of all it screened, not "
            "as the scanner's screen_again band would have stopped at a decisive first draw, "
            "its probe_settles at a probe's flag of the suspect or its skip_moot_draw at a "
            "moot last one"
        ),
    ] = False,
    scan_times: Annotated[
        bool,
        typer.Option(
            help="add a table of every scan as it ran (draws, what stopped it, seconds, "
            "encoder images) and how many kept within two minutes"
        ),
    ] = False,
    quiet: bool = False,
) -> None:
    """Scan every zoo model, fit thresholds on even seeds, report on odd seeds."""
    if signals not in ("joint", "size"):
        raise typer.BadParameter(f"--signals {signals!r}: joint or size")
    signals_rule: Signals = "size" if signals == "size" else "joint"
    progress = Progress(quiet=quiet)
    found = [model for folder in zoo for model in find_models(folder)]
    if not found:
        raise typer.BadParameter("no models with cards found")
    names = Counter(m.name for m in found)
    if repeated := sorted(name for name, count in names.items() if count > 1):
        # scans, run folders and results entries are keyed by model name
        raise typer.BadParameter(
            f"model names repeat across the --zoo folders ({', '.join(repeated[:4])}"
            f"{', ...' if len(repeated) > 4 else ''}): judge each zoo on its own"
        )
    failed = [m.name for m in found if m.backdoored and _card_asr(m) < min_asr]
    models = [m for m in found if m.name not in failed]
    date = datetime.date.today().isoformat()
    results = results or ROOT / "benchmarks" / "results" / f"{date}-calibration.json"
    harness = Harness(
        results_path=results,
        runs_dir=results.with_suffix("") / "runs",
        shots=shots,
        seed=seed,
        scan_options=parse_options(scan_option or []),
    )
    scans = {m.name: harness.scan(m) for m in progress.track(models, description="scanning zoo")}
    fit_scans = [scans[m.name] for m in models if _seed(m) % 2 == 0]
    held_scans = [scans[m.name] for m in models if _seed(m) % 2 == 1]
    defaults = ScanConfig()
    given = {"additive": additive_threshold, "warp": warp_threshold}
    ignored = {"additive": no_additive, "warp": no_warp}
    probes = {
        name: given[name] or defaults.probe_threshold(name) for name in PROBES if not ignored[name]
    }
    fitted = threshold is None
    rule = Rule(signals_rule, threshold or defaults.threshold, probes, isolation_threshold)
    if every_draw:
        rule = replace(rule, screen_again=None)
    if fit_isolation:
        rule = replace(rule, isolation_threshold=fit_isolation_threshold(fit_scans, rule))
    if threshold is None:
        rule = replace(rule, threshold=fit_threshold(fit_scans, rule))
    summary = {
        "fitted": fitted,
        "signals": signals_rule,
        "thresholds": {
            "evidence_threshold": rule.threshold,
            "isolation_threshold": rule.isolation_threshold,
            **{f"{name}_threshold": probes.get(name) for name in PROBES},
        },
        "fit": rates(fit_scans, rule) if fit_scans else None,
        "held_out": rates(held_scans, rule),
        "all": rates(list(scans.values()), rule),
    }
    summary["not_implanted"] = failed
    harness.results[section] = summary
    atomic_write_json(results, harness.results)
    table = calibration_table(summary["fit"], summary["held_out"], summary["all"], rule, fitted)
    table += per_attack_table(models, scans, rule)
    if scan_times:
        table += scan_time_table(models, scans)
    if failed:
        table += (
            f"\nLeft out, their backdoor did not take (card ASR below {min_asr:.0%}): "
            f"{', '.join(failed)}.\n"
        )
    typer.echo(table)
    typer.echo(json.dumps(summary["thresholds"]))
    if doc is not None:
        command = shlex.join(["python", "-m", "benchmarks.calibrate", *sys.argv[1:]])
        update_docs(doc, table, None, command, results, section=section)


if __name__ == "__main__":
    app()
