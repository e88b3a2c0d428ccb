"""Leave-one-family-out calibration: thresholds fitted without the family they are judged on.

    python -m benchmarks.leave_out RESULTS.json[+MORE.json] [RESULTS.json ...] [--out OUT.json]
        [--min-asr 0.5]

Each results file holds the stored cbpt scans of one lab zoo (``benchmarks.run`` or
``benchmarks.calibrate`` wrote them); files joined with ``+`` are one zoo (its families
scanned into separate files). The scan reports keep every class's evidence, so a
verdict under other thresholds is recomputed without scanning again (as
``benchmarks.calibrate`` judges). For every trigger family F of a zoo, one fold:

* fit: the backdoored models of every other family, and the clean models of even seeds;
  the evidence threshold, the isolation threshold and each reach probe's threshold are fitted
  there (coordinate ascent on TPR - FPR, from the scanner's defaults, two rounds);
* test: the models of F, and the clean models of odd seeds, judged with that fold's rule.

The table gives, per held-out family, how many of its backdoors the fold's rule flags and
names right, and, per zoo, the pooled held-out detection rate, the false alarms on the odd
seeds' clean models (each fold's rule: mean and worst fold), beside the in-sample figures
of the same fitting on every family. A family is in the fit or in the test of a fold, never
both (:func:`folds`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks.calibrate import (
    Rule,
    _best_cut,
    fit_isolation_threshold,
    fit_threshold,
    judge,
    top_probe,
)
from clipguard.io import atomic_write_json
from clipguard_cbpt.config import PROBES, ScanConfig

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

#: rounds of coordinate ascent over the thresholds
FIT_ROUNDS = 2


@dataclass(frozen=True)
class Fold:
    """One leave-one-family-out split of a zoo's scans."""

    family: str
    fit: list[dict[str, Any]]
    test: list[dict[str, Any]]


def seed_of(scan: dict[str, Any]) -> int:
    """The seed in a lab model's name (``clean-s3`` -> 3)."""
    match = re.search(r"-s(\d+)$", scan["model"])
    if match is None:
        raise ValueError(f"{scan['model']}: a lab model name ends with -s<seed>")
    return int(match.group(1))


def folds(scans: list[dict[str, Any]]) -> list[Fold]:
    """One fold per trigger family of ``scans``: the family's models and the odd seeds'
    clean models are the test, every other family's models and the even seeds' clean models
    the fit."""
    clean = [s for s in scans if s["attack"] == "none"]
    fit_clean = [s for s in clean if seed_of(s) % 2 == 0]
    test_clean = [s for s in clean if seed_of(s) % 2 == 1]
    families = sorted({s["attack"] for s in scans} - {"none"})
    return [
        Fold(
            family=family,
            fit=[s for s in scans if s["attack"] not in ("none", family)] + fit_clean,
            test=[s for s in scans if s["attack"] == family] + test_clean,
        )
        for family in families
    ]


def default_rule() -> Rule:
    """The scanner's own rule and thresholds (the starting point of every fit)."""
    config = ScanConfig()
    probes = {name: config.probe_threshold(name) for name in PROBES}
    return Rule(config.signals, config.threshold, probes)


def fit_probe_threshold(scans: list[dict[str, Any]], rule: Rule, probe: str) -> float:
    """The threshold of reach probe ``probe`` maximising TPR - FPR on ``scans``, the rule's
    other thresholds held."""
    values = {top[0] for s in scans if (top := top_probe(s, probe)) is not None}
    if not values:
        return rule.probe_thresholds[probe]
    return _best_cut(
        scans,
        values,
        lambda cut: replace(rule, probe_thresholds={**rule.probe_thresholds, probe: cut}),
    )


def fit_rule(scans: list[dict[str, Any]]) -> Rule:
    """Every threshold of the verdict rule fitted on ``scans`` (coordinate ascent)."""
    rule = default_rule()
    for _ in range(FIT_ROUNDS):
        rule = replace(rule, threshold=fit_threshold(scans, rule))
        rule = replace(rule, isolation_threshold=fit_isolation_threshold(scans, rule))
        for probe in PROBES:
            threshold = fit_probe_threshold(scans, rule, probe)
            rule = replace(rule, probe_thresholds={**rule.probe_thresholds, probe: threshold})
    return rule


def judged(scans: list[dict[str, Any]], rule: Rule) -> dict[str, dict[str, Any]]:
    """Per model: whether ``rule`` flags it and whether it names the real target."""
    out = {}
    for scan in scans:
        flagged, suspect = judge(scan, rule)
        out[scan["model"]] = {
            "attack": scan["attack"],
            "flagged": flagged,
            "target_right": flagged and scan["attack"] != "none" and suspect == scan["target"],
        }
    return out


def leave_out(scans: list[dict[str, Any]]) -> dict[str, Any]:
    """The leave-one-family-out result of one zoo's scans, and the in-sample one."""
    per_family = {}
    false_alarm_rates = []
    for fold in folds(scans):
        rule = fit_rule(fold.fit)
        verdicts = judged(fold.test, rule)
        backdoored = [v for v in verdicts.values() if v["attack"] != "none"]
        clean = [v for v in verdicts.values() if v["attack"] == "none"]
        false_alarm_rates.append(sum(v["flagged"] for v in clean) / len(clean) if clean else 0)
        per_family[fold.family] = {
            "models": len(backdoored),
            "detected": sum(v["flagged"] for v in backdoored),
            "target_right": sum(v["target_right"] for v in backdoored),
            "clean_flagged": sum(v["flagged"] for v in clean),
            "clean": len(clean),
            "rule": _rule_json(rule),
        }
    in_sample_fit = [s for s in scans if s["attack"] != "none" or seed_of(s) % 2 == 0]
    rule = fit_rule(in_sample_fit)
    everything = judged(scans, rule)
    backdoored = [v for v in everything.values() if v["attack"] != "none"]
    clean = [v for v in everything.values() if v["attack"] == "none"]
    models = sum(f["models"] for f in per_family.values())
    return {
        "families": per_family,
        "held_out": {
            "models": models,
            "detected": sum(f["detected"] for f in per_family.values()),
            "target_right": sum(f["target_right"] for f in per_family.values()),
            "false_alarm_rate_mean": sum(false_alarm_rates) / len(false_alarm_rates),
            "false_alarm_rate_worst": max(false_alarm_rates),
            "clean": per_family[next(iter(per_family))]["clean"] if per_family else 0,
        },
        "in_sample": {
            "models": len(backdoored),
            "detected": sum(v["flagged"] for v in backdoored),
            "target_right": sum(v["target_right"] for v in backdoored),
            "clean": len(clean),
            "clean_flagged": sum(v["flagged"] for v in clean),
            "rule": _rule_json(rule),
        },
    }


def _rule_json(rule: Rule) -> dict[str, float | None]:
    return {
        "evidence_threshold": round(rule.threshold, 4),
        "isolation_threshold": (
            None if rule.isolation_threshold is None else round(rule.isolation_threshold, 4)
        ),
        **{f"{name}_threshold": round(value, 4) for name, value in rule.probe_thresholds.items()},
    }


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """The per-family and per-zoo tables of :func:`leave_out` results keyed by zoo name."""
    lines = [
        "| zoo | held-out family | detected | target right | clean flagged (odd seeds) |",
        "|---|---|---|---|---|",
    ]
    for zoo, result in results.items():
        for family, row in result["families"].items():
            lines.append(
                f"| {zoo} | {family} | {row['detected']} of {row['models']} | "
                f"{row['target_right']} | {row['clean_flagged']} of {row['clean']} |"
            )
    lines += [
        "",
        "| zoo | held out: detected | target right | false alarms, mean (worst) fold "
        "| in sample: detected | false alarms |",
        "|---|---|---|---|---|---|",
    ]
    for zoo, result in results.items():
        held, inside = result["held_out"], result["in_sample"]
        lines.append(
            f"| {zoo} | {held['detected']} of {held['models']} | {held['target_right']} | "
            f"{100 * held['false_alarm_rate_mean']:.0f} % "
            f"({100 * held['false_alarm_rate_worst']:.0f} %) of {held['clean']} | "
            f"{inside['detected']} of {inside['models']} | "
            f"{inside['clean_flagged']} of {inside['clean']} |"
        )
    return "\n".join(lines) + "\n"


def implanted(payload: dict[str, Any], min_asr: float) -> list[dict[str, Any]]:
    """The stored scans of clean models and of backdoored models whose implant took: neither
    listed as not implanted by the calibration nor measured below ``min_asr`` ASR."""
    failed = set(payload.get("scanner-calibration", {}).get("not_implanted", []))
    failed |= {
        run["model"]
        for run in payload.get("runs", [])
        if run.get("asr_before") is not None and run["asr_before"] < min_asr
    }
    return [s for s in payload["scans"] if s["attack"] == "none" or s["model"] not in failed]


def joined_scans(joined: str, min_asr: float) -> tuple[str, list[dict[str, Any]]]:
    """One zoo's name (its first file's stem) and its implanted scans (:func:`implanted`)
    from ``joined``: results files separated by ``+``. A model scanned in two of the files
    is refused (ValueError): its folds would count it twice."""
    paths = [Path(part) for part in joined.split("+")]
    scans = [scan for path in paths for scan in implanted(json.loads(path.read_text()), min_asr)]
    names = [scan["model"] for scan in scans]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"{joined}: models scanned in more than one file: {duplicated}")
    return paths[0].stem, scans


@app.command()
def main(
    results: Annotated[
        list[str],
        typer.Argument(
            help="results files holding stored scans, one zoo each; A.json+B.json joins "
            "the scans of several files (one zoo's families scanned separately) as one zoo"
        ),
    ],
    out: Annotated[Path | None, typer.Option(help="write the result JSON here")] = None,
    min_asr: Annotated[
        float, typer.Option(help="leave out backdoored models whose stored ASR is lower")
    ] = 0.5,
) -> None:
    """Fit the scanner's thresholds leaving one trigger family out at a time; report on it."""
    outcome = {
        name: leave_out(scans)
        for name, scans in (joined_scans(joined, min_asr) for joined in results)
    }
    typer.echo(markdown(outcome))
    if out is not None:
        atomic_write_json(out, outcome)


if __name__ == "__main__":
    app()
