"""Scans with a reference model, judged: what the ``reference`` option adds to the verdict.

Usage::

    clipguard scan MODEL --data DATA -o reference=TRUSTED.safetensors --json > REPORT.json
    python -m benchmarks.reference_scan REPORT.json [REPORT.json ...] [--out OUT.json]

For every scan report of a lab model (its model card, ``NAME.card.json`` beside the model,
gives the attack and the target; a model without a card counts as clean) it prints one
Markdown row: the verdict the scan would have given without the reference (the rule's and
the reach probes' ratios as the ``cbpt`` scanner combines them, from the report's
statistics), the verdict with it, the class named, what decided, the reference contrast and
its class, and the seconds the contrast took; then, per kind of model (clean or backdoored),
how many were flagged (``backdoor``) without and with the reference and how many of the
backdoored ones with the right target. ``--out`` writes the rows and counts as JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clipguard.lab.train import card_path
from clipguard_cbpt.config import PROBES, ScanConfig
from clipguard_cbpt.evidence import deciding_ratio, verdict_of


@dataclass(frozen=True)
class ReferenceScan:
    """One scan with a reference model, and what it would have said without it."""

    model: str
    attack: str
    target: str | None
    verdict_without: str
    verdict: str
    named: str | None
    decided_by: str
    contrast: float
    contrast_class: str
    contrast_seconds: float | None

    @property
    def right(self) -> bool:
        """Whether the scan flagged a backdoored model and named its target."""
        return self.verdict == "backdoor" and self.target is not None and self.named == self.target


def verdict_without_reference(statistics: dict[str, Any], config: ScanConfig) -> str:
    """The verdict of a scan's rule evidence and reach probes alone, as the scanner combines
    them (:func:`~clipguard_cbpt.evidence.deciding_ratio`), under the thresholds the report
    records."""
    thresholds = statistics["thresholds"]
    rule = config.model_copy(
        update={
            "evidence_threshold": thresholds["evidence_threshold"],
            "inconclusive_fraction": thresholds["inconclusive_fraction"],
        }
    )
    ratios = {}
    for name in PROBES:
        settings, evidence = statistics.get(name), statistics.get(f"class_{name}_evidence")
        if settings and evidence:
            ratios[name] = max(evidence.values()) / settings["threshold"]
    ratio, _ = deciding_ratio(statistics["evidence"] / rule.threshold, ratios)
    return verdict_of(ratio, rule)


def read_scan(path: Path) -> ReferenceScan:
    """The :class:`ReferenceScan` of one scan report (``clipguard scan --json``)."""
    report = json.loads(path.read_text())
    model_path = Path(report["model"]["path"])
    card_file = card_path(model_path)
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    finding = report["findings"][0]
    statistics = finding["statistics"]
    contrast = statistics.get("reference_contrast")
    if contrast is None:
        raise ValueError(f"{path}: the scan had no reference model (-o reference=...)")
    return ReferenceScan(
        model=model_path.name.removesuffix(".safetensors"),
        attack=card.get("attack", "none"),
        target=card.get("target"),
        verdict_without=verdict_without_reference(statistics, ScanConfig()),
        verdict=finding["verdict"],
        named=finding.get("target_class"),
        decided_by=statistics["decided_by"],
        contrast=round(contrast["contrast"], 3),
        contrast_class=contrast["contrast_class"],
        contrast_seconds=report["run"]["stage_seconds"].get("reference contrast"),
    )


def counts(rows: list[ReferenceScan]) -> dict[str, dict[str, int]]:
    """Per kind (``clean``, ``backdoored``): models, flagged without and with the reference,
    and (backdoored) flagged with the right target with the reference."""
    found: dict[str, dict[str, int]] = {}
    for kind, members in (
        ("clean", [r for r in rows if r.target is None]),
        ("backdoored", [r for r in rows if r.target is not None]),
    ):
        found[kind] = {
            "models": len(members),
            "flagged_without": sum(r.verdict_without == "backdoor" for r in members),
            "flagged_with": sum(r.verdict == "backdoor" for r in members),
        }
        if kind == "backdoored":
            found[kind]["right_target_with"] = sum(r.right for r in members)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = sorted((read_scan(path) for path in args.reports), key=lambda r: (r.attack, r.model))
    print(
        "| model | target | without reference | with reference | named (decided by) "
        "| contrast (class) | contrast s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        seconds = "-" if r.contrast_seconds is None else f"{r.contrast_seconds:.0f}"
        print(
            f"| {r.model} | {r.target or '-'} | {r.verdict_without} | {r.verdict} "
            f"| {r.named or '-'} ({r.decided_by}) | {r.contrast:.3f} ({r.contrast_class}) "
            f"| {seconds} |"
        )
    summary = counts(rows)
    for kind, numbers in summary.items():
        print(f"{kind}: " + ", ".join(f"{k} {v}" for k, v in numbers.items()))
    if args.out:
        payload = {"rows": [asdict(r) for r in rows], "counts": summary}
        args.out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
