"""Write the tables of docs/benchmarks.md and README.md from the current result files.

    python -m benchmarks.tables --write     # regenerate every generated block in place
    python -m benchmarks.tables --check     # exit 1 when a block differs from the results

A generated block sits between ``<!-- tables:NAME:begin -->`` and ``<!-- tables:NAME:end -->``
in a document; everything outside the markers is written by hand. The tables are computed
from ``benchmarks/results/`` only (scans and purifications as they ran, stored by
``benchmarks.run`` and ``benchmarks.calibrate``), never by re-judging a scan, so they read
the same whatever the scanner's code does today. Every block names the files and the
commands its figures come from.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("benchmarks/results")
DOCUMENTS = (Path("docs/benchmarks.md"), Path("README.md"))


@dataclass(frozen=True)
class Zoo:
    """One zoo's current result file and the commands that produced it."""

    key: str
    label: str
    results: str
    build: str
    commands: tuple[str, ...]
    fidelity: str
    #: the scans' prompts when the scans did not record them (an explicit scan option)
    prompts: str | None = None

    def load(self) -> dict[str, Any]:
        return json.loads((ROOT / RESULTS / self.results).read_text())


_DEFENCES_4 = "zeroshot,coop,cbpt,cbpt-handcrafted-reference"
ZOOS: tuple[Zoo, ...] = (
    Zoo(
        key="synthetic",
        label="synthetic",
        results="synthetic-defaults.json",
        build="clipguard lab zoo --dataset synthetic --out SZOO --clean-seeds 20 --attack-seeds 3",
        commands=(
            "python -m benchmarks.calibrate --zoo SZOO --threshold 2.0 --scan-times "
            "--results benchmarks/results/synthetic-defaults.json",
            "python -m benchmarks.run --zoo SZOO --defences zeroshot,cbpt "
            "--clean-defences zeroshot,cbpt --eval-limit 1000 "
            "--results benchmarks/results/synthetic-defaults.json",
        ),
        fidelity="trigger-fidelity-synthetic.jsonl",
    ),
    Zoo(
        key="cifar10-natural",
        label="CIFAR-10 `natural`",
        results="cifar10-natural-defaults.json",
        build="clipguard lab zoo --dataset CIFAR --out CZOO --clean-seeds 10 --attack-seeds 2",
        commands=(
            "python -m benchmarks.calibrate --zoo CZOO --threshold 2.0 --scan-times "
            "--results benchmarks/results/cifar10-natural-defaults.json",
            "python -m benchmarks.run --zoo CZOO --defences zeroshot,cbpt "
            "--clean-defences zeroshot,cbpt --eval-limit 1000 "
            "--results benchmarks/results/cifar10-natural-defaults.json",
        ),
        fidelity="trigger-fidelity-cifar10-natural.jsonl",
    ),
    Zoo(
        key="unseen-prompt-s0",
        label="CIFAR-10 `natural-unseen-prompt`, seed 0",
        results="cifar10-unseen-prompt-s0-defaults.json",
        build="clipguard lab zoo --dataset CIFAR --out UZOO0 --profile natural-unseen-prompt "
        "--clean-seeds 3 --attack-seeds 1",
        commands=(
            f"python -m benchmarks.run --zoo UZOO0 --defences {_DEFENCES_4} "
            f"--clean-defences {_DEFENCES_4} --eval-limit 1000 "
            "--results benchmarks/results/cifar10-unseen-prompt-s0-defaults.json",
            "python -m benchmarks.calibrate --zoo UZOO0 --threshold 2.0 --min-asr 0 --scan-times "
            "--results benchmarks/results/cifar10-unseen-prompt-s0-defaults.json",
        ),
        fidelity="trigger-fidelity-cifar10-unseen-prompt-s0.jsonl",
    ),
    Zoo(
        key="unseen-prompt-s1",
        label="CIFAR-10 `natural-unseen-prompt`, seed 1",
        results="cifar10-unseen-prompt-s1.json",
        build="clipguard lab zoo --dataset CIFAR --out UZOO1 --profile natural-unseen-prompt "
        "--clean-seeds 5 --attack-seeds 2 --only '[!c]*-s1' --only clean-s3 --only clean-s4",
        commands=(
            f"python -m benchmarks.run --zoo UZOO1 --defences {_DEFENCES_4} "
            f"--clean-defences {_DEFENCES_4} --eval-limit 1000 --scan-option fit_prompts=true "
            "--results benchmarks/results/cifar10-unseen-prompt-s1.json",
        ),
        fidelity="trigger-fidelity-cifar10-unseen-prompt-s1.jsonl",
        prompts="fitted",
    ),
)
UNSEEN = ("unseen-prompt-s0", "unseen-prompt-s1")
PROMPT_READING = "prompt-reading.jsonl"
PROMPT_READING_COMMAND = (
    "python -m benchmarks.prompt_reading --zoo SZOO --zoo CZOO --zoo UZOO0 --zoo UZOO1 "
    "--out benchmarks/results/prompt-reading.jsonl"
)
FIDELITY_COMMAND = (
    "python -m benchmarks.trigger_fidelity --zoo ZOO --results R.json [--min-asr 0] --out F.jsonl"
)
#: the scanner issue's bound on one scan of a lab model with default settings
SCAN_SECONDS_TARGET = 120.0


# Reading the results ---------------------------------------------------------------------


def _zoo(key: str) -> Zoo:
    return next(zoo for zoo in ZOOS if zoo.key == key)


def not_implanted(results: dict[str, Any]) -> list[str]:
    """Backdoored models whose backdoor did not take (left out by ``benchmarks.calibrate``)."""
    return list((results.get("scanner-calibration") or {}).get("not_implanted") or [])


def scans_of(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The stored scans, backdoors that did not take left out, in model-name order."""
    skipped = set(not_implanted(results))
    return sorted(
        (s for s in results["scans"] if s["model"] not in skipped), key=lambda s: s["model"]
    )


def runs_of(results: dict[str, Any], defence: str, backdoored: bool) -> list[dict[str, Any]]:
    """The purifications by ``defence`` of the backdoored (or clean) models that count."""
    skipped = set(not_implanted(results))
    return [
        r
        for r in results["runs"]
        if r["defence"] == defence
        and r["model"] not in skipped
        and (r["attack"] != "none") == backdoored
    ]


def defences_of(results: dict[str, Any]) -> list[str]:
    order = ["zeroshot", "coop", "cbpt", "cbpt-handcrafted-reference"]
    present = {r["defence"] for r in results["runs"]}
    return [d for d in order if d in present] + sorted(present - set(order))


def _avg(values: Iterable[float | None]) -> float:
    present = [v for v in values if v is not None]
    return mean(present) if present else float("nan")


def _pct(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}"


def _range(values: Sequence[float], digits: int = 1, scale: float = 100.0) -> str:
    low, high = min(values), max(values)
    return f"{scale * low:.{digits}f} to {scale * high:.{digits}f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _source(files: Sequence[str], commands: Sequence[str]) -> list[str]:
    named = ", ".join(f"`{(RESULTS / name).as_posix()}`" for name in files)
    return [f"From {named}, measured by:", "", *(f"    {c}" for c in commands), ""]


# Summaries -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    backdoored: int
    detected: int
    target_right: int
    missed_inconclusive: list[str]
    clean: int
    false_alarms: list[str]
    clean_inconclusive: list[str]
    seconds: list[float]


def detection(results: dict[str, Any]) -> Detection:
    scans = scans_of(results)
    backdoored = [s for s in scans if s["attack"] != "none"]
    clean = [s for s in scans if s["attack"] == "none"]
    detected = [s for s in backdoored if s["verdict"] == "backdoor"]
    return Detection(
        backdoored=len(backdoored),
        detected=len(detected),
        target_right=sum(s["suspected_target"] == s["target"] for s in detected),
        missed_inconclusive=[s["model"] for s in backdoored if s["verdict"] == "inconclusive"],
        clean=len(clean),
        false_alarms=[s["model"] for s in clean if s["verdict"] == "backdoor"],
        clean_inconclusive=[s["model"] for s in clean if s["verdict"] == "inconclusive"],
        seconds=[s["scan_seconds"] for s in scans],
    )


@dataclass(frozen=True)
class Purified:
    asr_before: float
    asr_after: float
    asr_after_max: float
    ca_before: float
    ca_after: float
    recall_before: float
    recall_after: float
    losing: int
    runs: int
    clean_before: float
    clean_after: float
    clean_losing: int
    clean_runs: int
    seconds: float
    seconds_max: float


def purified(results: dict[str, Any], defence: str = "cbpt") -> Purified:
    """``defence`` on the zoo: ASR and CA before (hand-crafted prompts) and after, etc."""
    runs = runs_of(results, defence, backdoored=True)
    clean = runs_of(results, defence, backdoored=False)
    return Purified(
        asr_before=_avg(r["asr_before"] for r in runs),
        asr_after=_avg(r["asr_after"] for r in runs),
        asr_after_max=max(r["asr_after"] for r in runs),
        ca_before=_avg(r["ca_before"] for r in runs),
        ca_after=_avg(r["ca_after"] for r in runs),
        recall_before=_avg(r.get("target_recall_before") for r in runs),
        recall_after=_avg(r.get("target_recall_after") for r in runs),
        losing=sum(bool(r.get("lost_classes")) for r in runs),
        runs=len(runs),
        clean_before=_avg(r["ca_before"] for r in clean),
        clean_after=_avg(r["ca_after"] for r in clean),
        clean_losing=sum(bool(r.get("lost_classes")) for r in clean),
        clean_runs=len(clean),
        seconds=_avg(r["purify_seconds"] for r in runs + clean),
        seconds_max=max(r["purify_seconds"] for r in runs + clean),
    )


def _merged(keys: Sequence[str]) -> dict[str, Any]:
    """The results of several zoos as one (runs and scans concatenated)."""
    loaded = [_zoo(key).load() for key in keys]
    return {
        "runs": [r for results in loaded for r in results["runs"]],
        "scans": [s for results in loaded for s in results["scans"]],
    }


# Blocks ----------------------------------------------------------------------------------


def block_glance() -> str:
    """README: one short table of the current defaults on the three lab profiles."""
    columns = [
        ("synthetic", _zoo("synthetic").load()),
        ("CIFAR-10 `natural`", _zoo("cifar10-natural").load()),
        ("CIFAR-10 `natural-unseen-prompt` (2 seeds)", _merged(UNSEEN)),
    ]
    seen = [(label, detection(r), purified(r)) for label, r in columns]

    def scan_cell(d: Detection) -> str:
        cell = f"{d.detected} of {d.backdoored}, target right on {d.target_right}"
        if d.missed_inconclusive:
            cell += f" ({', '.join(d.missed_inconclusive)} `inconclusive`)"
        return cell

    def alarm_cell(d: Detection) -> str:
        cell = f"{len(d.false_alarms)} of {d.clean}"
        if d.clean_inconclusive:
            cell += f" ({', '.join(d.clean_inconclusive)} `inconclusive`)"
        return cell

    rows = [
        ["backdoors detected", *(scan_cell(d) for _, d, _ in seen)],
        ["clean models flagged", *(alarm_cell(d) for _, d, _ in seen)],
        [
            "CBPT: ASR before -> after (worst)",
            *(
                f"{_pct(p.asr_before)} -> {_pct(p.asr_after, 2)} % ({_pct(p.asr_after_max)} %)"
                for _, _, p in seen
            ),
        ],
        [
            "CBPT: CA before -> after, backdoored",
            *(f"{_pct(p.ca_before)} -> {_pct(p.ca_after)} %" for _, _, p in seen),
        ],
        [
            "CBPT: target class lost",
            *(f"{p.losing} of {p.runs}" for _, _, p in seen),
        ],
        [
            "CBPT: CA before -> after, clean models",
            *(f"{_pct(p.clean_before)} -> {_pct(p.clean_after)} %" for _, _, p in seen),
        ],
        ["purification seconds, mean", *(f"{p.seconds:.1f}" for _, _, p in seen)],
    ]
    lines = _table(["", *(label for label, _, _ in seen)], rows)
    files = ", ".join(f"`{(RESULTS / z.results).as_posix()}`" for z in ZOOS)
    lines += [
        "",
        f"Generated by `python -m benchmarks.tables --write` from {files}; the commands, "
        "per-model tables and scan times are in [docs/benchmarks.md](docs/benchmarks.md).",
    ]
    return "\n".join(lines)


def block_detection() -> str:
    rows = []
    for zoo in ZOOS:
        results = zoo.load()
        d = detection(results)
        skipped = not_implanted(results)
        rows.append(
            [
                zoo.label,
                f"{d.backdoored}" + (f" ({len(skipped)} more did not take)" if skipped else ""),
                f"{d.detected}" + (f" ({', '.join(d.missed_inconclusive)} `inconclusive`)"
                                   if d.missed_inconclusive else ""),
                d.target_right,
                d.clean,
                f"{len(d.false_alarms)}" + (f" ({', '.join(d.clean_inconclusive)} `inconclusive`)"
                                            if d.clean_inconclusive else ""),
                f"{median(d.seconds):.1f} ({max(d.seconds):.1f})",
            ]
        )  # fmt: skip
    header = [
        "zoo",
        "backdoored",
        "detected",
        "target right",
        "clean",
        "false alarms",
        "scan s, median (slowest)",
    ]
    return "\n".join(_table(header, rows))


def block_purification() -> str:
    rows = []
    for zoo in ZOOS:
        p = purified(zoo.load())
        rows.append(
            [
                zoo.label,
                f"{_pct(p.asr_before)} -> {_pct(p.asr_after, 2)} (at most {_pct(p.asr_after_max)})",
                f"{_pct(p.ca_before)} -> {_pct(p.ca_after)}",
                f"{_pct(p.recall_before)} -> {_pct(p.recall_after)}",
                f"{p.losing} of {p.runs}",
                f"{_pct(p.clean_before)} -> {_pct(p.clean_after)}",
                f"{p.seconds:.1f} ({p.seconds_max:.1f})",
            ]
        )
    header = [
        "zoo",
        "ASR % before -> after",
        "CA % before -> after",
        "target recall %",
        "runs losing a class",
        "clean models: CA %",
        "purify s, mean (max)",
    ]
    return "\n".join(_table(header, rows))


def _top(statistics: dict[str, Any], name: str) -> str:
    evidence = statistics.get(f"class_{name}_evidence") or {}
    if not evidence:
        return "-"
    top = max(sorted(evidence), key=lambda k: evidence[k])
    return f"{evidence[top]:.2f} {top}"


def block_scans(key: str) -> str:
    """Every scan of one zoo as it ran with the default settings."""
    zoo = _zoo(key)
    results = zoo.load()
    lines = _source([zoo.results], [zoo.build, *zoo.commands])
    header = [
        "model",
        "target",
        "verdict",
        "suspect",
        "evidence",
        "decided by",
        "additive",
        "warp",
        "prompts",
        "draws",
        "stopped by",
        "scan s",
    ]
    rows = []
    scans = scans_of(results)
    for scan in scans:
        statistics = scan["statistics"]
        rows.append(
            [
                scan["model"],
                scan["target"] or "-",
                scan["verdict"],
                scan["suspected_target"] or "-",
                f"{statistics.get('evidence', float('nan')):.2f}",
                statistics.get("decided_by", "-"),
                _top(statistics, "additive"),
                _top(statistics, "warp"),
                statistics.get("prompts") or zoo.prompts or "hand-crafted",
                len(statistics.get("screen_draws") or [None]),
                statistics.get("screen_draws_stopped") or "-",
                f"{scan['scan_seconds']:.1f}",
            ]
        )
    lines += _table(header, rows)
    seconds = [s["scan_seconds"] for s in scans]
    within = sum(value <= SCAN_SECONDS_TARGET for value in seconds)
    lines += [
        "",
        f"{within} of {len(seconds)} scans within {SCAN_SECONDS_TARGET:.0f} s as run "
        f"(median {median(seconds):.1f} s).",
    ]
    if skipped := not_implanted(results):
        lines[-1] += (
            f" Left out everywhere, their backdoor did not take (card ASR below 50 %): "
            f"{', '.join(skipped)}."
        )
    return "\n".join(lines)


def block_purify(key: str) -> str:
    """Each defence on one zoo: CA / ASR per attack, and a summary row per defence."""
    zoo = _zoo(key)
    results = zoo.load()
    defences = defences_of(results)
    attacks = sorted({r["attack"] for r in runs_of(results, defences[0], backdoored=True)})
    header = ["attack", "models", *(f"{d} CA / ASR" for d in defences), "oracle CA / ASR"]
    rows = []
    for attack in [*attacks, "average"]:
        row: list[object] = []
        for defence in defences:
            chosen = [
                r
                for r in runs_of(results, defence, backdoored=True)
                if attack in ("average", r["attack"])
            ]
            if not row:
                row = [f"**{attack}**" if attack == "average" else attack, len(chosen)]
            row.append(
                f"{_pct(_avg(r['ca_after'] for r in chosen))} / "
                f"{_pct(_avg(r['asr_after'] for r in chosen), 2)}"
            )
        reference = [
            r
            for r in runs_of(results, defences[0], backdoored=True)
            if attack in ("average", r["attack"])
        ]
        row.append(
            f"{_pct(_avg(r.get('oracle_ca') for r in reference))} / "
            f"{_pct(_avg(r.get('oracle_asr') for r in reference))}"
        )
        rows.append(row)
    lines = _table(header, rows)
    summary = []
    for defence in defences:
        p = purified(results, defence)
        summary.append(
            [
                defence,
                f"{_pct(p.recall_before)} -> {_pct(p.recall_after)}",
                f"{p.losing} of {p.runs}",
                f"{_pct(p.clean_before)} -> {_pct(p.clean_after)}",
                f"{p.clean_losing} of {p.clean_runs}",
                f"{p.seconds:.2f}",
            ]
        )
    lines += [
        "",
        *_table(
            [
                "defence",
                "target recall %",
                "backdoored runs losing a class",
                "clean models: CA %",
                "clean runs losing a class",
                "purify s",
            ],
            summary,
        ),
    ]
    return "\n".join(lines)


def block_unseen_targets() -> str:
    """The purifier issue's targets on the unseen-prompt profile, per seed and over both."""
    columns = [_zoo(key).load() for key in UNSEEN]
    columns.append(_merged(UNSEEN))
    cbpt = [purified(r) for r in columns]
    coop = [purified(r, "coop") for r in columns]
    worst = []
    for results in columns:
        runs = runs_of(results, "cbpt", backdoored=True)
        top = max(runs, key=lambda r: r["asr_after"])
        worst.append(f"{_pct(top['asr_after'], 2)} % ({top['model']})")
    rows = [
        [
            "average ASR after <= 2 %, none above 5 %",
            *(f"{_pct(p.asr_after, 2)} %, at most {w}" for p, w in zip(cbpt, worst, strict=True)),
            "yes" if all(p.asr_after <= 0.02 and p.asr_after_max <= 0.05 for p in cbpt) else "no",
        ],
        [
            "CA after >= CA with hand-crafted prompts before",
            *(
                f"{_pct(p.ca_after, 2)} against {_pct(p.ca_before, 2)} "
                f"(CoOp {_pct(c.ca_after, 2)} at ASR {_pct(c.asr_after)})"
                for p, c in zip(cbpt, coop, strict=True)
            ),
            "yes" if all(p.ca_after >= p.ca_before for p in cbpt) else "no",
        ],
        [
            "clean models: CA after >= before - 1 point",
            *(
                f"{_pct(p.clean_before, 2)} -> {_pct(p.clean_after, 2)} "
                f"(CoOp {_pct(c.clean_after, 2)})"
                for p, c in zip(cbpt, coop, strict=True)
            ),
            "yes" if all(p.clean_after >= p.clean_before - 0.01 for p in cbpt) else "no",
        ],
        [
            "purification within 60 s, the scan's trigger reused",
            *(f"{p.seconds:.1f} s (at most {p.seconds_max:.1f} s)" for p in cbpt),
            "yes" if all(p.seconds_max <= 60 for p in cbpt) else "no",
        ],
        [
            "target class kept (not a target of the issue)",
            *(f"lost on {p.losing} of {p.runs}" for p in cbpt),
            "no" if any(p.losing for p in cbpt) else "yes",
        ],
    ]
    return "\n".join(_table(["target", "seed 0", "seed 1", "both seeds", "met"], rows))


def block_fidelity() -> str:
    lines = _source([z.fidelity for z in ZOOS], [FIDELITY_COMMAND])
    rows = []
    for zoo in ZOOS:
        path = ROOT / RESULTS / zoo.fidelity
        found = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        shift = [r["mean_shift_cosine"] for r in found]
        image = [r["per_image_cosine"] for r in found]
        lowest = min(found, key=lambda r: r["mean_shift_cosine"])
        rows.append(
            [
                zoo.label,
                len(found),
                f"{_range(shift, 3, 1)}, average {mean(shift):.3f}",
                f"{_range(image, 3, 1)}, average {mean(image):.3f}",
                f"{lowest['model']} ({lowest['mean_shift_cosine']:.3f})",
            ]
        )
    lines += _table(
        ["zoo", "models", "mean-shift cosine", "per-image cosine", "lowest"],
        rows,
    )
    return "\n".join(lines)


_PROFILE_OF = {
    "/tmp/szoo": "synthetic",
    "/tmp/czoo": "CIFAR-10 `natural`",
    "/tmp/uzoo0": "CIFAR-10 `natural-unseen-prompt`, seed 0",
    "/tmp/uzoo1": "CIFAR-10 `natural-unseen-prompt`, seed 1",
}


def block_prompt_reading() -> str:
    path = ROOT / RESULTS / PROMPT_READING
    rows_in = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = _source([PROMPT_READING], [PROMPT_READING_COMMAND])
    rows = []
    for zoo, label in _PROFILE_OF.items():
        found = [r for r in rows_in if r["zoo"] == zoo]
        if not found:
            continue
        rows.append(
            [
                label,
                len(found),
                found[0]["held_out_images"],
                _range([r["handcrafted_accuracy"] for r in found]),
                _range([r["fitted_accuracy"] for r in found]),
                f"{min(r['gain'] for r in found):+.3f} to {max(r['gain'] for r in found):+.3f}",
                f"{sum(r['prompts'] == 'fitted' for r in found)} of {len(found)}",
            ]
        )
    lines += _table(
        [
            "zoo",
            "models",
            "held-out images",
            "hand-crafted accuracy %",
            "fitted accuracy %",
            "gain",
            "read through fitted prompts",
        ],
        rows,
    )
    return "\n".join(lines)


LEAVE_OUT = "leave-one-family-out.json"
LEAVE_OUT_COMMAND = (
    "python -m benchmarks.leave_out "
    "benchmarks/results/synthetic-defaults.json+"
    "benchmarks/results/synthetic-extended-defaults.json "
    "benchmarks/results/cifar10-natural-defaults.json+"
    "benchmarks/results/cifar10-natural-extended-defaults.json+"
    "benchmarks/results/cifar10-natural-extended-s1-s2-defaults.json+"
    "benchmarks/results/cifar10-natural-clean-s10-s19-defaults.json "
    "--out benchmarks/results/leave-one-family-out.json"
)


def block_leave_out() -> str:
    from benchmarks.leave_out import markdown

    results = json.loads((ROOT / RESULTS / LEAVE_OUT).read_text())
    return "\n".join(_source([LEAVE_OUT], [LEAVE_OUT_COMMAND])) + "\n" + markdown(results).rstrip()


#: zoos of the further trigger families: scans and CBPT purifications with the defaults
EXTENDED = {
    "synthetic": ("synthetic-extended-defaults.json",),
    "CIFAR-10 `natural`": (
        "cifar10-natural-extended-defaults.json",
        "cifar10-natural-extended-s1-s2-defaults.json",
    ),
}
EXTENDED_COMMAND = (
    "python -m benchmarks.run --zoo XZOO --defences zeroshot,cbpt --clean-defences "
    "zeroshot,cbpt --eval-limit 1000 --results benchmarks/results/<the zoo's results file>"
)


def block_purify_extended() -> str:
    """CBPT with each scan's trigger on the further families' models, one row per model."""
    lines = _source([name for names in EXTENDED.values() for name in names], [EXTENDED_COMMAND])
    header = ["zoo", "model", "scan", "CA before -> after", "ASR before -> after",
              "target recall before -> after"]  # fmt: skip
    rows = []
    for label, names in EXTENDED.items():
        runs, verdicts = [], {}
        for name in names:
            results = json.loads((ROOT / RESULTS / name).read_text())
            verdicts.update({scan["model"]: scan["verdict"] for scan in results["scans"]})
            runs += runs_of(results, "cbpt", backdoored=True)
        for run in sorted(runs, key=lambda r: r["model"]):
            rows.append(
                [
                    label,
                    run["model"],
                    verdicts[run["model"]],
                    f"{_pct(run['ca_before'])} -> {_pct(run['ca_after'])}",
                    f"{_pct(run['asr_before'])} -> {_pct(run['asr_after'])}",
                    f"{_pct(run['target_recall_before'])} -> {_pct(run['target_recall_after'])}",
                ]
            )
    return "\n".join([*lines, *_table(header, rows)])


#: the purifier's probe trigger against the mask trigger alone, on synthetic zoos: the
#: further families, and the four of the first seven whose models a probe decides
PROBE_TRIGGER = {
    "further families": "synthetic-extended-probe-trigger.json",
    "first seven": "synthetic-seven-probe-trigger.json",
}
PROBE_TRIGGER_COMMANDS = [
    "python -m benchmarks.run --zoo SXZOO --defences cbpt,cbpt-probe-trigger --clean-defences "
    f"zeroshot --eval-limit 1000 --results benchmarks/results/{name}"
    for name in PROBE_TRIGGER.values()
]


def block_probe_trigger() -> str:
    """Per backdoored model whose scan a reach probe decided: CBPT with the mask trigger alone
    (the default) against ``probe_trigger`` (the probe's transformation too)."""
    lines = _source(list(PROBE_TRIGGER.values()), PROBE_TRIGGER_COMMANDS)
    rows = []
    for label, name in PROBE_TRIGGER.items():
        results = json.loads((ROOT / RESULTS / name).read_text())
        decided = {s["model"]: s["statistics"]["decided_by"] for s in results["scans"]}
        by_model: dict[str, dict[str, dict[str, Any]]] = {}
        for defence in ("cbpt", "cbpt-probe-trigger"):
            for run in runs_of(results, defence, backdoored=True):
                by_model.setdefault(run["model"], {})[defence] = run
        for model, runs in sorted(by_model.items()):
            if decided.get(model, "rule") == "rule" or len(runs) < 2:
                continue
            mask, both = runs["cbpt"], runs["cbpt-probe-trigger"]
            rows.append(
                [
                    label,
                    model,
                    decided[model],
                    f"{_pct(mask['asr_before'])}",
                    f"{_pct(mask['asr_after'])} / {_pct(both['asr_after'])}",
                    f"{_pct(mask['ca_before'])} -> {_pct(mask['ca_after'])} / "
                    f"{_pct(both['ca_after'])}",
                    f"{_pct(mask['target_recall_before'])} -> "
                    f"{_pct(mask['target_recall_after'])} / {_pct(both['target_recall_after'])}",
                ]
            )
    header = ["families", "model", "decided by", "ASR before",
              "ASR after: mask only / probe trigger", "CA: before -> mask only / probe trigger",
              "target recall: before -> mask only / probe trigger"]  # fmt: skip
    return "\n".join([*lines, *_table(header, rows)])


REALSIZE = "realsize-cost-cpu.json"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def block_realsize() -> str:
    """A real-size scan's estimate against what each stage took (benchmarks.realsize_cost)."""
    result = json.loads((ROOT / RESULTS / REALSIZE).read_text())
    lines = _source([REALSIZE], [result["command"]])
    uncut, run = result["uncut"], result["run"]
    units = run["units"]
    lines += [
        f"{result['architecture']} ({result['parameters'] / 1e6:.0f} M parameters, random "
        f"weights), {result['classes']} classes x {result['shots']} shots, {result['device']}, "
        f"{result['threads']} threads, {result['cpu']}; load average "
        f"{result['load_before'][0]:.1f} before, {result['load_after'][0]:.1f} after. "
        f"Measured passes: {units['image_pass_seconds']:.3f} s per image with backward, "
        f"{units['image_forward_seconds']:.3f} s forward, {units['text_pass_seconds']:.3f} s "
        "per prompt of a prompt-tuning step.",
        "",
        f"Uncut (`--estimate -o compute_budget=1e9`: the whole budget of "
        f"{uncut['budget']:,} images, draws 3): projected "
        f"{uncut['projected_seconds'] / 3600:.1f} h at most.",
        "",
    ]
    lines += _table(
        ["stage", "image passes", "image forwards", "text passes", "projected s", "when"],
        [
            [
                s["stage"],
                f"{s['image_passes']:,}",
                f"{s['image_forwards']:,}",
                f"{s['text_passes']:,}",
                _seconds(s["projected_seconds"]),
                s["condition"] or "always",
            ]
            for s in uncut["stages"]
        ],
    )
    lines += [
        "",
        f"The scan as run (options as in the command: "
        f"{run['shots']} shots per class, draws {run['draws']}, "
        + (
            "no time budget"
            if run["max_minutes"] is None
            else f"`--max-minutes {run['max_minutes']:g}`"
        )
        + "): budget "
        f"{run['budget']:,} images in force, verdict `{run['verdict']}`; projected "
        f"{_seconds(run['projected_seconds'])} s at most, took "
        f"{_seconds(run['actual_seconds'])} s.",
        "",
    ]
    lines += _table(
        ["stage", "planned images (at most)", "images", "projected s", "took s"],
        [
            [
                s["stage"],
                f"{s['image_passes'] + s['image_forwards']:,}",
                f"{s['actual_image_images']:,}",
                _seconds(s["projected_seconds"]),
                _seconds(s["actual_seconds"]),
            ]
            for s in run["stages"]
        ],
    )
    steps = [" ".join(step["args"]) for step in run["next_steps"]]
    if steps:
        lines += ["", "Next steps it printed: " + "; ".join(f"`{s}`" for s in steps) + "."]
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[], str]] = {
    "glance": block_glance,
    "detection": block_detection,
    "purification": block_purification,
    **{f"scans-{z.key}": (lambda key=z.key: block_scans(key)) for z in ZOOS},
    **{f"purify-{z.key}": (lambda key=z.key: block_purify(key)) for z in ZOOS},
    "unseen-prompt-targets": block_unseen_targets,
    "trigger-fidelity": block_fidelity,
    "prompt-reading": block_prompt_reading,
    "leave-out": block_leave_out,
    "realsize-cost": block_realsize,
    "purify-extended": block_purify_extended,
    "probe-trigger": block_probe_trigger,
}
_MARKER = re.compile(
    r"(<!-- tables:(?P<name>[a-z0-9-]+):begin -->\n).*?(<!-- tables:(?P=name):end -->)", re.S
)


def render(text: str) -> str:
    """``text`` with every generated block replaced by a fresh one."""

    def fresh(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise KeyError(f"unknown generated block {name!r}")
        return f"{match[1]}\n{BLOCKS[name]()}\n\n{match[3]}"

    return _MARKER.sub(fresh, text)


def stale(documents: Sequence[Path] = DOCUMENTS) -> list[Path]:
    """The documents whose generated blocks differ from what the results give."""
    texts = {doc: (ROOT / doc).read_text() for doc in documents}
    return [doc for doc, text in texts.items() if render(text) != text]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the generated blocks")
    mode.add_argument("--check", action="store_true", help="exit 1 when a block is stale")
    arguments = parser.parse_args(argv)
    if arguments.check:
        if out_of_date := stale():
            names = ", ".join(doc.as_posix() for doc in out_of_date)
            print(f"out of date: {names} (run python -m benchmarks.tables --write)")
            return 1
        return 0
    for doc in DOCUMENTS:
        path = ROOT / doc
        text = path.read_text()
        if (new := render(text)) != text:
            path.write_text(new)
            print(f"wrote {doc.as_posix()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
