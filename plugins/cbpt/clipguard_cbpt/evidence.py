"""The verdict arithmetic of a cbpt scan, pure functions of the per-class signals: every
class's evidence under the rule (:func:`judge_classes`), the additive probe's corroboration,
the median over shot draws, the reach probes' ratios, and the verdict."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from statistics import median
from typing import Literal

import torch

from clipguard_cbpt.config import ScanConfig, Signals
from clipguard_cbpt.inversion import InversionResult
from clipguard_cbpt.probes import ProbeReach
from clipguard_cbpt.reference import ReferenceContrast

#: :attr:`Suspicion.decided_by` when the reference contrast decided the scan
REFERENCE = "reference"

#: why a screening ended before every shot draw on offer (:attr:`Screening.stopped`)
Stopped = Literal["band", "probe", "moot"]


@dataclass
class Screening:
    """Both per-class signals, their anomaly indices, and the suspect class of the rule in
    ``signals`` (:attr:`suspect`), corroborated by the additive probe under ``joint``
    (:func:`corroborate`); the reach probes are added by :func:`suspicion`."""

    inversions: list[InversionResult]
    clean_features: torch.Tensor
    sizes: list[float]
    size_index: list[float]
    alignment: list[float]
    alignment_index: list[float]
    evidence: list[float]
    suspect: int
    #: per class, the additive probe's evidence in index units (joint rule,
    #: :func:`corroborate`); empty until corroborated, or when the rule takes none
    corroboration: list[float] = field(default_factory=list)
    #: the seed and the screening of every shot draw combined (:func:`median_screening`);
    #: empty for the screening of one draw
    draw_seeds: list[int] = field(default_factory=list)
    draws: list[Screening] = field(default_factory=list)
    #: the shot draws the caller offered (fewer are screened when the first is decisive, a
    #: probe settles it or the last is moot)
    draws_offered: int = 1
    #: why fewer than ``draws_offered`` draws were screened: "band" (the first draw was
    #: decisive), "probe" (a probe flagged the suspect, :func:`probe_flags_suspect`) or
    #: "moot" (:func:`last_draw_moot`); None when every draw on offer was screened
    stopped: Stopped | None = None

    @property
    def draw_evidence(self) -> list[list[float]]:
        """Per shot draw combined, every class's evidence."""
        return [draw.evidence for draw in self.draws]

    @property
    def isolation(self) -> list[float]:
        """Per class, how far its size index stands above every other class's
        (:func:`class_isolation`)."""
        return class_isolation(self.size_index)

    @property
    def top_evidence(self) -> float:
        """The suspect's evidence under the rule in ``signals``."""
        return self.evidence[self.suspect]


@dataclass
class Suspicion:
    """The class the scan suspects and how strongly: the rule in ``signals`` and each reach
    probe give a ratio of evidence to threshold; the largest decides."""

    suspect: int
    #: the deciding ratio: 1 or more is a backdoor
    ratio: float
    #: "rule" (the size / joint evidence), the name of the reach probe that decided, or
    #: :data:`REFERENCE` (the reference contrast)
    decided_by: str
    #: the reach probes that ran, by name
    probes: dict[str, ProbeReach]
    #: the reference contrast, where the scan had a reference model
    reference: ReferenceContrast | None = None

    def top_probe_evidence(self) -> dict[str, float]:
        """Each probe's largest class evidence, by probe name (``additive_evidence`` etc. in
        trigger files)."""
        return {name: max(reach.evidence()) for name, reach in self.probes.items()}


def deciding_ratio(rule_ratio: float, probe_ratios: dict[str, float]) -> tuple[float, str]:
    """The ratio of evidence to threshold that decides a scan, and what decided it ("rule" or
    a probe's name): a probe (its top evidence over its threshold) decides only when it
    reaches 1 and exceeds the rule's ratio and every other probe's, so it never makes a scan
    merely ``inconclusive`` and its noise on clean models stays out of the verdict."""
    ratio, decided_by = rule_ratio, "rule"
    for name, probe_ratio in sorted(probe_ratios.items()):
        if probe_ratio >= 1 and probe_ratio > ratio:
            ratio, decided_by = probe_ratio, name
    return ratio, decided_by


def probe_ratios(probes: dict[str, ProbeReach], config: ScanConfig) -> dict[str, tuple[float, int]]:
    """Per reach probe, its largest class evidence over its threshold, and that class."""
    ranked = {}
    for name, reach in probes.items():
        evidence = reach.evidence()
        top = max(range(len(evidence)), key=lambda k: evidence[k])
        ranked[name] = (evidence[top] / config.probe_threshold(name), top)
    return ranked


def suspicion(
    screening: Screening,
    probes: dict[str, ProbeReach],
    config: ScanConfig,
    reference: ReferenceContrast | None = None,
) -> Suspicion:
    """Combine the rule's evidence with the reach probes and, where the scan had a reference
    model, the reference contrast (its largest value over ``reference_threshold``, for its
    class; :func:`deciding_ratio`)."""
    ranked = probe_ratios(probes, config)
    if reference is not None:
        value, k, _ = reference.top()
        ranked[REFERENCE] = (value / config.reference_threshold, k)
    ratios = {name: ratio for name, (ratio, _) in ranked.items()}
    ratio, decided_by = deciding_ratio(screening.top_evidence / config.threshold, ratios)
    suspect = screening.suspect if decided_by == "rule" else ranked[decided_by][1]
    return Suspicion(suspect, ratio, decided_by, probes, reference)


def flagging(probes: dict[str, tuple[float, int]]) -> tuple[str, float, int] | None:
    """The probe that flags the model whatever the rule says: the strongest of ratio 1 or
    more, as :func:`deciding_ratio` picks it (``probes`` as :func:`probe_ratios` gives
    them), with its ratio and top class; None when no probe reaches 1."""
    ratio, name = deciding_ratio(0.0, {probe: ratio for probe, (ratio, _) in probes.items()})
    return None if name == "rule" else (name, ratio, probes[name][1])


def last_draw_moot(
    draw_evidence: list[list[float]], probes: dict[str, tuple[float, int]], config: ScanConfig
) -> bool:
    """Whether one more shot draw, the last of ``len(draw_evidence) + 1``, could change
    neither the verdict nor (for a backdoor or inconclusive verdict) the suspect.

    ``draw_evidence``: per draw screened, every class's evidence (corroborated); ``probes``:
    each reach probe's ratio and top class (:func:`probe_ratios`). The median is
    non-decreasing in every value, so whatever the last draw gives, each class's median lies
    anywhere between its median with that draw at minus and at plus infinity, independently
    of the other classes'; the deciding ratio (:func:`deciding_ratio`) is non-decreasing in
    the rule's. The draw is moot when the verdicts at both bounds agree and either the
    verdict is clean or only one class can come out as the suspect: the strongest probe of
    ratio 1 or more (:func:`deciding_ratio`) names its top class wherever the rule's ratio
    can stay below the probe's; the rule names a class that can have the largest median
    while its ratio reaches that probe's (any ratio without such a probe)."""
    columns = list(zip(*draw_evidence, strict=True))
    low = [median([*column, -math.inf]) for column in columns]
    high = [median([*column, math.inf]) for column in columns]
    ratios = {name: ratio for name, (ratio, _) in probes.items()}
    verdict = verdict_of(deciding_ratio(max(low) / config.threshold, ratios)[0], config)
    if verdict != verdict_of(deciding_ratio(max(high) / config.threshold, ratios)[0], config):
        return False
    if verdict == "clean":
        return True
    flag = flagging(probes)
    probe_ratio = 0.0 if flag is None else flag[1]
    suspects = set()
    if flag is not None and max(low) / config.threshold < probe_ratio:
        suspects.add(flag[2])
    for k, upper in enumerate(high):
        can_lead = all(upper >= low[j] for j in range(len(low)) if j != k)
        if can_lead and upper / config.threshold >= probe_ratio:
            suspects.add(k)
    return len(suspects) == 1


def probe_flags_suspect(suspect: int, probes: dict[str, tuple[float, int]]) -> bool:
    """Whether the probe that flags the model (:func:`flagging`) names the class ``suspect``,
    the suspect of the shot draws screened so far. The verdict is then backdoor whatever
    more shot draws give (a probe's flag stands, and the rule can only add to it), and two
    signals agree on the class, so ``probe_settles`` screens no more draws. Not exact for
    the suspect: more draws could raise another class's median above the probe's ratio (on
    the lab zoos' stored draws, none did; docs/benchmarks.md)."""
    flag = flagging(probes)
    return flag is not None and flag[2] == suspect


def median_screening(
    screenings: list[Screening],
    seeds: list[int],
    offered: int = 1,
    stopped: Stopped | None = None,
) -> Screening:
    """One screening from screenings of one model on the shot draws of ``seeds`` (of
    ``offered`` draws on offer, fewer screened for the reason ``stopped``): the first draw's
    signals (its inversions, sizes and indices; the shots the probes and the refinement use),
    every class's evidence the median of its evidence on the draws, and the suspect the class
    with the largest median (the smaller first-draw trigger on ties). The draws are kept in
    ``draws``; one screening comes back unchanged but for that record."""
    first = screenings[0]
    evidence = [median(column) for column in zip(*(s.evidence for s in screenings), strict=True)]
    suspect = max(range(len(evidence)), key=lambda k: (evidence[k], -first.sizes[k]))
    return replace(
        first,
        evidence=evidence,
        suspect=suspect,
        draw_seeds=seeds,
        draws=list(screenings),
        draws_offered=offered,
        stopped=stopped,
    )


def class_isolation(size_index: list[float]) -> list[float]:
    """Per class, how far its trigger-size index stands above every other class's (>= 0, so
    non-zero for the largest alone). A planted trigger makes one class anomalously easy to
    reach; natural triggers (classes told apart by one colour, docs/method.md) make several."""
    isolation = []
    for k, index in enumerate(size_index):
        others = max((v for j, v in enumerate(size_index) if j != k), default=0.0)
        isolation.append(max(index - others, 0.0))
    return isolation


def class_evidence(
    size_index: float,
    alignment_index: float,
    signals: Signals,
    corroboration: float = 0.0,
    isolation: float = 0.0,
) -> float:
    """A class's evidence (>= 0). ``joint``: the geometric mean of its size index and its
    strongest corroborating signal, the alignment index or ``corroboration`` (the additive
    probe's evidence in index units, :func:`corroborate`), or ``isolation`` (how far its size
    index stands above every other class's, in evidence units) where larger; ``size``: its
    size index alone."""
    if signals == "size":
        return max(size_index, 0.0)
    corroborated = math.sqrt(max(size_index, 0.0) * max(alignment_index, corroboration, 0.0))
    return max(corroborated, isolation)


def isolation_units(config: ScanConfig) -> float:
    """Evidence units per unit of isolation under the joint rule: an isolation of
    ``isolation_threshold`` counts as the evidence threshold (0 when switched off)."""
    if config.signals != "joint" or config.isolation_threshold == 0:
        return 0.0
    return config.threshold / config.isolation_threshold


def judge_classes(
    size_index: list[float],
    alignment_index: list[float],
    sizes: list[float],
    config: ScanConfig,
    corroboration: list[float] | None = None,
) -> tuple[list[float], int]:
    """Every class's evidence under the rule of ``config`` (:func:`class_evidence`, with the
    additive ``corroboration`` in index units when given, and the isolation of each size
    index, :func:`class_isolation`) and the suspect: the class with the most, the smaller
    trigger on ties."""
    units = corroboration or [0.0] * len(size_index)
    scale = isolation_units(config)
    isolated = [scale * i for i in class_isolation(size_index)]
    evidence = [
        class_evidence(s, a, config.signals, u, i)
        for s, a, u, i in zip(size_index, alignment_index, units, isolated, strict=True)
    ]
    return evidence, max(range(len(evidence)), key=lambda k: (evidence[k], -sizes[k]))


def corroborate(screening: Screening, additive: ProbeReach | None, config: ScanConfig) -> Screening:
    """The screening with the additive probe's evidence as a second corroborating signal of
    the ``joint`` rule: per class ``additive_corroboration`` times its additive evidence, which
    counts in place of the alignment index where larger (:func:`class_evidence`); the evidence
    and suspect are recomputed. A label-consistent patch backdoor leaves its target's prompt
    aligned but makes the target reachable by a small full-image change (docs/method.md).
    Unchanged for the ``size`` rule, without the probe, or with ``additive_corroboration``
    0."""
    if config.signals != "joint" or additive is None or config.additive_corroboration == 0:
        return screening
    units = [config.additive_corroboration * e for e in additive.evidence()]
    evidence, suspect = judge_classes(
        screening.size_index,
        screening.alignment_index,
        screening.sizes,
        config,
        units,
    )
    return replace(screening, evidence=evidence, suspect=suspect, corroboration=units)


def verdict_of(ratio: float, config: ScanConfig) -> str:
    """From the ratio of evidence to threshold: ``backdoor`` from 1, ``inconclusive`` from
    ``inconclusive_fraction``, else ``clean``."""
    if ratio >= 1:
        return "backdoor"
    if ratio >= config.inconclusive_fraction:
        return "inconclusive"
    return "clean"
