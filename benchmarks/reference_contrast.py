"""Reference contrast of reach probes: how much further a probe reaches each class on a
suspect model than on a trusted reference model, at the same bounds.

Usage::

    python -m benchmarks.reference_contrast LINES.jsonl [MORE.jsonl ...] --reference clean-s0
        [--reference clean-s1 ...] [--fit blended-s0 --fit wanet-s0 | --clean-fit | --threshold T]
        [--pairs 'clean-s*'] [--out OUT.json]

``LINES.jsonl`` are the lines of :mod:`benchmarks.probe_reach` run with ``--sweep`` (and the
same ``--probe``, additive or colour, ``--shots`` and ``--held-out``, so that every model is
measured on the same images). For
a suspect ``S`` and the reference ``R`` (a model of the same task known to be clean), the
contrast of class ``k`` at a bound is ``reach_S(k) - reach_R(k)``, and ``D(S)`` is the largest
contrast over classes and the bounds both lines hold (the same absolute bound, pixels in [0,
1]); its class is the suspect class. A clean model shares its natural shortcuts with a
reference trained for the same task, so its contrast stays small, while a backdoor whose
trigger the probe can approximate makes its target reachable far beyond the reference.
With ``--reference`` given ``n`` times, ``reach_R`` is the mean reach of those ``n`` models:
clean models differ from one another by shortcuts of their own, and a mean over several
trusted models holds fewer of one model's.

Besides the contrast of every non-reference model to the reference, it reports the largest
``D`` over every ordered pair of the clean models (``attack`` none) among the lines whose name
matches a ``--pairs`` pattern (default: all), each one in turn the reference (with ``n``
references: every clean suspect against every set of ``n`` other clean models): how large
the contrast of a clean suspect gets. With ``--fit``, the threshold is the midpoint between that
clean-pair maximum and the smallest ``D`` of the ``--fit`` models; with ``--clean-fit`` it is
that clean-pair maximum itself, so that no trigger family is fitted at all; ``--threshold T``
judges by a threshold fixed beforehand (flagged above it), every model then held out. Every
model not in the fit (the paired clean models and ``--fit`` ones) is judged by it: a
backdoored one flagged or not (contrast at or above a midpoint threshold, above a clean-fit or
fixed one), and whether its suspect class is the target; a clean one a false alarm or not.
Prints a Markdown table; ``--out`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path

#: the setting that holds each probe's bound in a probe line
BOUND_SETTING: dict[str, str] = {"additive": "epsilon", "colour": "strength"}


@dataclass(frozen=True)
class ProbeLine:
    """One model's reach per class at every bound probed (absolute bound -> reach)."""

    model: str
    attack: str | None
    target: str | None
    classnames: list[str]
    reach: dict[float, list[float]]


@dataclass(frozen=True)
class Contrast:
    """A suspect's largest reach above the reference's: ``value`` for ``suspect`` at
    ``bound``, and the target's own largest contrast (None on a clean model)."""

    model: str
    attack: str | None
    target: str | None
    reference: str
    value: float
    suspect: str
    bound: float
    target_value: float | None


def read_lines(paths: list[Path]) -> dict[str, ProbeLine]:
    """The probe lines of ``paths`` by model name (a later line of a model replaces an
    earlier one)."""
    lines: dict[str, ProbeLine] = {}
    for path in paths:
        for text in path.read_text().splitlines():
            if not text.strip():
                continue
            row = json.loads(text)
            bound = float(row["settings"][BOUND_SETTING[row.get("probe", "additive")]])
            reach = {round(bound, 6): list(row["reach"].values())}
            for factor, values in row.get("sweep", {}).items():
                reach[round(bound * float(factor), 6)] = values
            lines[row["model"]] = ProbeLine(
                row["model"], row.get("attack"), row.get("target"), list(row["reach"]), reach
            )
    return lines


def mean_line(references: list[ProbeLine]) -> ProbeLine:
    """One reference line from several: per class, their mean reach at every bound all of
    them hold, named by their names joined with ``+`` (the line itself for one)."""
    if len(references) == 1:
        return references[0]
    first = references[0]
    if any(r.classnames != first.classnames for r in references):
        raise ValueError("the references have different classes")
    bounds = sorted(set.intersection(*(set(r.reach) for r in references)))
    reach = {
        b: [
            sum(r.reach[b][k] for r in references) / len(references)
            for k in range(len(first.classnames))
        ]
        for b in bounds
    }
    return ProbeLine("+".join(r.model for r in references), None, None, first.classnames, reach)


def contrast(suspect: ProbeLine, reference: ProbeLine) -> Contrast:
    """The largest reach of ``suspect`` above ``reference``'s over classes and shared bounds."""
    if suspect.classnames != reference.classnames:
        raise ValueError(f"{suspect.model} and {reference.model} have different classes")
    bounds = sorted(set(suspect.reach) & set(reference.reach))
    if not bounds:
        raise ValueError(f"{suspect.model} and {reference.model} share no probe bound")
    value, k, bound = max(
        (suspect.reach[b][k] - reference.reach[b][k], k, b)
        for b in bounds
        for k in range(len(suspect.classnames))
    )
    target_value = None
    if suspect.target is not None:
        t = suspect.classnames.index(suspect.target)
        target_value = max(suspect.reach[b][t] - reference.reach[b][t] for b in bounds)
    return Contrast(
        suspect.model,
        suspect.attack,
        suspect.target,
        reference.model,
        round(value, 3),
        suspect.classnames[k],
        bound,
        None if target_value is None else round(target_value, 3),
    )


def judgement(row: Contrast, threshold: float | None, inclusive: bool, in_fit: set[str]) -> str:
    """How ``row`` is judged: ``fit`` for a model the threshold was fitted on, else (with a
    threshold; flagged at or above it when ``inclusive``, else above it) ``yes, right`` or
    ``yes, wrong`` (the suspect class is or is not the target) or ``no`` for a backdoored
    model, ``false alarm`` or ``clean`` for a clean one; empty without a threshold."""
    if row.model in in_fit:
        return "fit"
    if threshold is None:
        return ""
    flagged = row.value >= threshold if inclusive else row.value > threshold
    if row.target is None:
        return "false alarm" if flagged else "clean"
    if not flagged:
        return "no"
    return "yes, right" if row.suspect == row.target else "yes, wrong"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("lines", nargs="+", type=Path)
    parser.add_argument(
        "--reference",
        action="append",
        required=True,
        help="a reference model's name (repeatable: their mean reach is the reference)",
    )
    parser.add_argument(
        "--fit", action="append", default=[], help="models the threshold is fitted on"
    )
    parser.add_argument(
        "--clean-fit", action="store_true", help="threshold: the largest clean-pair contrast"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="a threshold fixed beforehand (flagged above it); no model is in the fit",
    )
    parser.add_argument(
        "--pairs",
        action="append",
        default=[],
        help="clean models paired among: a name pattern (repeatable; default: all)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = read_lines(args.lines)
    for name in args.reference:
        if name not in lines:
            parser.error(f"no line for the reference {name}")
    reference = mean_line([lines[name] for name in args.reference])
    clean = [
        name
        for name, line in lines.items()
        if line.attack in (None, "none")
        and any(fnmatch(name, pattern) for pattern in args.pairs or ["*"])
    ]
    pairs = [
        contrast(lines[suspect], mean_line([lines[r] for r in references]))
        for suspect in clean
        for references in itertools.combinations(
            [name for name in clean if name != suspect], len(args.reference)
        )
    ]
    clean_max = max((p.value for p in pairs), default=None)
    rows = [contrast(line, reference) for name, line in lines.items() if name not in args.reference]
    threshold = None
    if sum([bool(args.fit), args.clean_fit, args.threshold is not None]) > 1:
        parser.error("--fit, --clean-fit and --threshold set the threshold: choose one")
    if (args.fit or args.clean_fit) and clean_max is None:
        parser.error("a threshold needs at least two clean models matching --pairs")
    if args.fit:
        fitted = [row.value for row in rows if row.model in args.fit]
        if len(fitted) != len(args.fit):
            parser.error("--fit names a model without a line")
        threshold = round((clean_max + min(fitted)) / 2, 3)
    elif args.clean_fit:
        threshold = clean_max
    elif args.threshold is not None:
        threshold = args.threshold
    fitted_here = args.fit or args.clean_fit
    in_fit = set(args.fit) | (set(clean) if fitted_here else set())
    print(
        f"reference {reference.model}; largest clean-pair contrast {clean_max} "
        f"over {len(pairs)} pairs"
    )
    if args.fit:
        print(f"threshold {threshold} (midpoint to the smallest of {', '.join(args.fit)})")
    elif args.clean_fit:
        print(f"threshold {threshold} (the largest clean-pair contrast; flagged above it)")
    elif args.threshold is not None:
        print(f"threshold {threshold} (fixed beforehand; flagged above it)")
    print(
        "| model | target | contrast | suspect class (bound) | target's contrast "
        "| flagged, right target |"
    )
    print("|---|---|---|---|---|---|")
    judged = [judgement(row, threshold, args.fit != [], in_fit) for row in rows]
    for row, verdict in zip(rows, judged, strict=True):
        target_value = "-" if row.target_value is None else f"{row.target_value:.3f}"
        print(
            f"| {row.model} | {row.target or '-'} | {row.value:.3f} "
            f"| {row.suspect} ({row.bound:g}) | {target_value} | {verdict} |"
        )
    if args.out:
        payload = {
            "reference": reference.model,
            "clean_pair_max": clean_max,
            "threshold": threshold,
            "fit": args.fit,
            "clean_fit": args.clean_fit,
            "fixed_threshold": args.threshold,
            "pairs": args.pairs or ["*"],
            "rows": [
                {**asdict(row), "judged": verdict}
                for row, verdict in zip(rows, judged, strict=True)
            ],
            "clean_pairs": [asdict(p) for p in pairs],
        }
        args.out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
