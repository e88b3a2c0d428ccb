"""The ``cbpt`` scanner: per-class trigger inversion and text alignment, judged by MAD.

Procedure (see ``docs/method.md``):

0. **The prompts read through** (:func:`scan_classifier`): the hand-crafted prompts, or
   class-wise prompts fitted to the first draw's shots when they classify held-out images
   ``fit_prompts_gain`` better (``fit_prompts="auto"``, the default; ``True`` / ``False``
   force one). Every later step classifies, and aligns, through them.
1. **Per-class inversion** (:func:`~clipguard_cbpt.inversion.invert_per_class`): for every
   class ``k`` the smallest trigger that sends the other classes' clean shots to ``k``, all
   classes in one encoder call; its mask size is ``n_k``.
2. **Text alignment** (:func:`~clipguard_cbpt.signals.text_alignment`): ``a_k``, the mean
   cosine between the clean shots of ``k`` and the prompt of ``k``.
3. **Evidence**: the low-side robust anomaly index of ``log n_k`` and of ``a_k`` (Neural
   Cleanse's MAD index, only below the median). With ``signals = "joint"`` (default) a
   class's evidence is the geometric mean of its two indices, so it must stand out on both:
   on the synthetic lab zoo, clean models have classes with a natural trigger (an
   anomalously small ``n_k``) or a drifted prompt (a low ``a_k``), but not both on one
   class. Under ``joint`` the additive probe (3b) corroborates too: a class's additive
   evidence times ``additive_corroboration`` counts in place of its alignment index where
   larger (:func:`corroborate`), since a label-consistent patch backdoor leaves its target's
   prompt aligned but makes the target reachable by a small full-image change. And a size
   index that stands far above every other class's (its *isolation*,
   :func:`class_isolation`, from ``isolation_threshold``) is evidence on its own: a planted
   patch makes one class anomalously easy to reach, natural triggers come to several
   classes (on the CIFAR-10 zoo the patch targets' prompts are not drifted, and isolation is
   what names them). With ``signals = "size"`` the evidence is the size index alone.
   Steps 1-3 run on ``screen_draws`` independent draws of the shots where the caller can
   draw more (``clipguard scan``; :func:`shot_draws`), and a class's evidence is the median
   of its evidence on the draws (:func:`median_screening`): which shots were drawn moves
   near-threshold verdicts (docs/benchmarks.md). The draws after the first are screened
   only when the first is near the threshold (``screen_again``; far from it, the first
   decides alone) and, one by one, only until a reach probe (3b, run after the first draw)
   flags the class the draws so far suspect (``probe_settles``,
   :func:`probe_flags_suspect`); the last draw only when it could change the verdict or the
   suspect (``skip_moot_draw``, :func:`last_draw_moot`). The suspect is the class with the
   most evidence.
3b. **Reach probes** (:func:`~clipguard_cbpt.inversion.probe_reach`): per class, the share
   of held-out shots of the other classes that one small universal transformation, fitted on
   the other shots, sends to it. The *additive* probe (a perturbation bounded per pixel)
   catches full-image triggers (SIG, blended, sample-specific
   noise), which are not small masks but make their target reachable by a small additive
   change far beyond the other classes (its bound starts at ``additive_epsilon`` and is
   doubled or halved, at most ``additive_refits`` times, until the median class's reach lies
   between ``additive_median_low`` and ``additive_median_high``: what a small change is
   differs from model to model); the *warp* probe (a smooth displacement field of at
   most ``warp_pixels`` pixels) catches warping triggers (WaNet), which neither a mask nor an
   additive change expresses. When a probe's reach above the median class reaches its
   threshold, by a larger ratio than the rule's evidence and the other probe's, its class
   becomes the suspect and the verdict is ``backdoor`` (a probe never makes a scan merely
   ``inconclusive``). ``additive_epsilon = 0`` / ``warp_pixels = 0`` turn a probe off.
4. **Refinement** (``refine``, default on): the suspect's trigger is refined towards it with
   augmented shots (:func:`~clipguard_cbpt.inversion.invert_targeted`); that trigger is the
   one written out, drawn, and reused by ``clipguard purify --trigger``. A scan whose
   verdict is clean skips it (``refine_clean``): the purifier's verdict gate leaves a clean
   scan's trigger unused.
5. **Verdict**: ``backdoor`` when the suspect's evidence reaches ``evidence_threshold`` (or
   a probe decided, 3b), ``inconclusive`` from ``inconclusive_fraction`` of it,
   else ``clean``. The threshold is
   fitted on the lab zoo by ``benchmarks/calibrate.py``; the report records the values used.

The contrastive inversion of CBPT's stage 1 (:func:`run_inversion`) stays available to the
purifier (``inversion_method = "contrastive"``); on the lab models it sent the shots to a
class with a natural trigger instead of the backdoor target (docs/method.md), so the verdict
does not rest on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from statistics import median
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field, model_validator

from clipguard.components import RunContext, Scanner, ScanOutcome, ShotSet
from clipguard.metrics import clean_accuracy
from clipguard.model import ModelBundle
from clipguard.progress import Progress
from clipguard.prompts import PromptClassifier, PromptSet
from clipguard.triggers import TriggerFile, trigger_file_bytes
from clipguard_cbpt import __version__
from clipguard_cbpt.inversion import (
    HELD_OUT_IMAGES,
    AdditivePerturbation,
    InversionConfig,
    InversionResult,
    MedianBand,
    ProbeFamily,
    ProbeReach,
    SmoothWarp,
    encode_batched,
    invert_contrastive,
    invert_per_class,
    invert_targeted,
    mean_pairwise_cosine,
    prediction_distribution,
    probe_cost,
    probe_reach_in_band,
    relative_collapse,
)
from clipguard_cbpt.render import render_trigger_png
from clipguard_cbpt.signals import low_side_indices, text_alignment
from clipguard_cbpt.tuning import CoOpConfig, cache_features, tune_prompts

#: the reach probes a scan can run (:meth:`ScanConfig.probes`), in report order
PROBES: tuple[str, ...] = ("additive", "warp")

#: clean/triggered pairs shown in trigger.png
N_PICTURE_PAIRS = 8


Signals = Literal["joint", "size"]
#: why a screening ended before every shot draw on offer (:attr:`Screening.stopped`)
Stopped = Literal["band", "probe", "moot"]

#: the evidence threshold of each rule when none is given (docs/benchmarks.md): joint from
#: the synthetic zoo; size = the middle of the gap between the clean and the detected
#: backdoored models of the CIFAR-10 zoo (the rule of benchmarks/calibrate.py on all of it)
DEFAULT_THRESHOLDS: dict[str, float] = {"joint": 2.0, "size": 1.99}

#: the additive probe's default threshold (fitted on the even seeds of both lab zoos)
DEFAULT_ADDITIVE_THRESHOLD = 0.24

#: the joint rule's default isolation threshold (fitted on the even seeds of both lab zoos)
DEFAULT_ISOLATION_THRESHOLD = 1.86

#: with fit_prompts=auto, the held-out accuracy fitted prompts must add to the hand-crafted
#: prompts' to be read through (between the lab zoos' CoOp gains; docs/benchmarks.md)
FIT_PROMPTS_GAIN = 0.08


#: the band of a probe that keeps its bound: one fit, whatever its median
FIXED_BOUND = MedianBand(0.0, 1.0, refits=0)


@dataclass(frozen=True)
class ProbeSpec:
    """A reach probe as configured: its family at the starting bound, its Adam steps, and
    the band its median class reach is brought into (:data:`FIXED_BOUND`: the bound is
    kept)."""

    family: ProbeFamily
    steps: int
    band: MedianBand = FIXED_BOUND


class ScanConfig(InversionConfig):
    """Options of the ``cbpt`` scanner: the inversion's, plus the verdict rule and thresholds."""

    budget: int = Field(
        240_000,
        ge=1,
        description=(
            "maximum images through the image encoder for the whole scan (per-class "
            "inversion on every shot draw, reach probes, refinement)"
        ),
    )
    screen_draws: int = Field(
        3,
        ge=1,
        description=(
            "shot draws the screening (per-class inversion and text alignment) runs on where "
            "the caller can draw more (clipguard scan: seeds seed .. seed + screen_draws - 1): "
            "a class's evidence is the median of its evidence on the draws, so the verdict "
            "does not hinge on which shots were drawn; the reach probes and the refinement "
            "use the first draw. The draws after the first are screened only when the first "
            "is not decisive (screen_again)"
        ),
    )
    skip_moot_draw: bool = Field(
        True,
        description=(
            "run the reach probes before the last shot draw on offer and skip that draw when "
            "whatever it gave could not change the verdict, nor the suspect of a backdoor or "
            "inconclusive verdict (the median of every class's evidence is bounded by the "
            "draws already screened); false screens it whenever the earlier draws were not "
            "decisive"
        ),
    )
    probe_settles: bool = Field(
        True,
        description=(
            "stop screening shot draws once a reach probe flags the class the draws screened so "
            "far suspect (the strongest probe's ratio reaches 1 and its top class is the "
            "screening's suspect): the verdict is then backdoor whatever more draws give; "
            "false screens the draws the band and skip_moot_draw call for"
        ),
    )
    refine_clean: bool = Field(
        False,
        description=(
            "refine the suspect's trigger (refine) even when the verdict is clean: a clean "
            "scan's trigger is a natural one that the purifier's verdict gate leaves unused, "
            "so by default it is written as the per-class inversion found it"
        ),
    )
    fit_prompts: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "scan through class-wise prompts fitted to the first draw's clean shots (CoOp, "
            "clean cross-entropy only) instead of the hand-crafted ones: for models whose "
            "hand-crafted prompts read their features badly, where a class the prompts "
            "over-predict looks easy to reach (docs/benchmarks.md); every signal, the text "
            "alignment included, then measures the fitted prompts. auto: fit them, and read "
            "through them when they classify the reach probes' held-out images at least "
            "fit_prompts_gain better than the hand-crafted prompts (hand-crafted where the "
            "caller offers no held-out images)"
        ),
    )
    fit_prompts_gain: float = Field(
        FIT_PROMPTS_GAIN,
        ge=0,
        le=1,
        description=(
            "with fit_prompts=auto: the held-out accuracy the fitted prompts must add to the "
            "hand-crafted prompts' for the scan to read through them (the lab zoos: at most "
            "+0.005 on the natural and synthetic profiles, +0.185 and more where the "
            "hand-crafted prompt was never a caption; docs/benchmarks.md)"
        ),
    )
    screen_again: tuple[float, float] = Field(
        (0.5, 1.5),
        description=(
            "[low, high) in multiples of the evidence threshold: the draws after the first "
            "are screened only when the first draw's largest class evidence (before the "
            "additive corroboration) lies in this band; outside it the first draw decides "
            "alone, which no draw of the lab zoos' scans would have overturned "
            "(docs/benchmarks.md). [0, 1e9] screens every draw"
        ),
    )

    signals: Signals = Field(
        "joint",
        description=(
            "evidence of a class: 'joint' = geometric mean of its trigger-size and "
            "text-alignment anomaly indices, or the size index's isolation (robust where "
            "classes have natural triggers, as in the synthetic set, and calibrated on both lab "
            "zoos); 'size' = the trigger-size index alone"
        ),
    )
    evidence_threshold: float | None = Field(
        None,
        gt=0,
        description=(
            "evidence from which the verdict is backdoor (default: the calibrated value of "
            "the rule in `signals`)"
        ),
    )
    inconclusive_fraction: float = Field(
        0.75,
        gt=0,
        le=1,
        description="share of evidence_threshold from which the verdict is at least inconclusive",
    )
    additive_epsilon: float = Field(
        0.02,
        ge=0,
        le=1,
        description=(
            "L-inf bound (pixels in [0, 1]) the additive-reach probe starts from (see "
            "additive_refits); it catches full-image triggers (SIG, blended); 0 turns the "
            "probe off"
        ),
    )
    additive_steps: int = Field(30, ge=1, description="Adam steps of the additive-reach probe")
    additive_refits: int = Field(
        2,
        ge=0,
        description=(
            "most extra fits of the additive probe, its bound doubled while the median "
            "class's reach is below additive_median_low and halved while above "
            "additive_median_high, so the bound suits the model; 0 keeps additive_epsilon"
        ),
    )
    additive_median_low: float = Field(
        0.03, ge=0, le=1, description="median class reach below which the additive bound doubles"
    )
    additive_median_high: float = Field(
        0.35, ge=0, le=1, description="median class reach above which the additive bound halves"
    )
    additive_images: int = Field(
        96, ge=1, description="most shots per class fitted, and measured, by each reach probe"
    )
    probe_held_out: int = Field(
        48,
        ge=0,
        description=(
            "images per class, besides the shots, on which the reach probes also measure "
            "their reach (drawn from the data folder's other images, where a scan offers "
            "them; fewer when the folder has fewer); 0 measures on the held-out half of the "
            "shots alone"
        ),
    )
    probe_held_out_max: int = Field(
        HELD_OUT_IMAGES,
        ge=1,
        description=(
            "most held-out images each class's reach is measured on (evenly spread over the "
            "other classes; with many classes fewer than probe_held_out per class are drawn)"
        ),
    )
    additive_threshold: float = Field(
        DEFAULT_ADDITIVE_THRESHOLD,
        gt=0,
        le=1,
        description=(
            "reach above the median class's from which the additive probe alone makes the "
            "verdict backdoor (fitted on the even seeds of both lab zoos)"
        ),
    )
    additive_corroboration: float = Field(
        DEFAULT_THRESHOLDS["joint"] / DEFAULT_ADDITIVE_THRESHOLD,
        ge=0,
        description=(
            "joint rule: index units per unit of additive evidence, so that a class's "
            "additive reach can corroborate its trigger-size index in place of its text "
            "alignment (default: the additive threshold counts as the joint threshold); "
            "0 = only the alignment corroborates"
        ),
    )
    isolation_threshold: float = Field(
        DEFAULT_ISOLATION_THRESHOLD,
        ge=0,
        description=(
            "joint rule: how far a class's trigger-size index must stand above every other "
            "class's to be evidence on its own, without a corroborating signal (a planted "
            "trigger makes one class anomalously easy to reach; natural triggers come to "
            "several); 0 = the size index always needs corroboration"
        ),
    )
    warp_pixels: float = Field(
        2.0,
        ge=0,
        description=(
            "largest displacement (pixels, per axis) of the warp-reach probe, which catches "
            "warping triggers (WaNet); 0 turns the probe off"
        ),
    )
    warp_grid: int = Field(
        8, ge=2, le=64, description="side of the warp probe's displacement control grid"
    )
    warp_steps: int = Field(20, ge=1, description="Adam steps of the warp-reach probe")
    warp_threshold: float = Field(
        0.2,
        gt=0,
        le=1,
        description=(
            "reach above the median class's from which the warp probe alone makes the "
            "verdict backdoor"
        ),
    )

    def probes(self) -> list[ProbeSpec]:
        """The reach probes switched on, in :data:`PROBES` order."""
        probes: list[ProbeSpec] = []
        if self.additive_epsilon > 0:
            band = MedianBand(
                self.additive_median_low, self.additive_median_high, self.additive_refits
            )
            probes.append(
                ProbeSpec(AdditivePerturbation(self.additive_epsilon), self.additive_steps, band)
            )
        if self.warp_pixels > 0:
            probes.append(ProbeSpec(SmoothWarp(self.warp_grid, self.warp_pixels), self.warp_steps))
        return probes

    def probe_threshold(self, probe: str) -> float:
        """The threshold of the reach probe named ``probe``."""
        return {"additive": self.additive_threshold, "warp": self.warp_threshold}[probe]

    @model_validator(mode="after")
    def _default_threshold(self) -> ScanConfig:
        if self.additive_median_low >= self.additive_median_high:
            raise ValueError("additive_median_low must be below additive_median_high")
        if not 0 <= self.screen_again[0] <= self.screen_again[1]:
            raise ValueError("screen_again must be [low, high] with 0 <= low <= high")
        if self.evidence_threshold is None:
            self.evidence_threshold = DEFAULT_THRESHOLDS[self.signals]
        return self

    @property
    def threshold(self) -> float:
        """The evidence threshold in force (never None once validated)."""
        assert self.evidence_threshold is not None
        return self.evidence_threshold

    @property
    def screen_again_evidence(self) -> tuple[float, float]:
        """The ``screen_again`` band in evidence units (times the threshold in force)."""
        low, high = self.screen_again
        return low * self.threshold, high * self.threshold

    def decisive(self, first_evidence: float) -> bool:
        """Whether a first shot draw whose largest class evidence (before the additive
        corroboration) is ``first_evidence`` decides alone: it lies outside the
        ``screen_again`` band, so no further draw is screened."""
        low, high = self.screen_again_evidence
        return not low <= first_evidence < high


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
    #: "rule" (the size / joint evidence) or the name of the reach probe that decided
    decided_by: str
    #: the reach probes that ran, by name
    probes: dict[str, ProbeReach]

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


def suspicion(screening: Screening, probes: dict[str, ProbeReach], config: ScanConfig) -> Suspicion:
    """Combine the rule's evidence with the reach probes (:func:`deciding_ratio`)."""
    ranked = probe_ratios(probes, config)
    ratios = {name: ratio for name, (ratio, _) in ranked.items()}
    ratio, decided_by = deciding_ratio(screening.top_evidence / config.threshold, ratios)
    suspect = screening.suspect if decided_by == "rule" else ranked[decided_by][1]
    return Suspicion(suspect, ratio, decided_by, probes)


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


def class_triggers(
    bundle: ModelBundle,
    shots: ShotSet,
    config: InversionConfig,
    context: RunContext,
    classifier: PromptClassifier,
    budget: int | None = None,
) -> tuple[list[InversionResult], list[float]]:
    """The per-class inversion of every class (stage "per-class inversion") and the sizes
    ``n_k`` (the mask size, 1.0 where the class's success share was never met)."""
    with context.stage("per-class inversion"):
        inversions = invert_per_class(
            bundle,
            shots.pixels,
            shots.labels,
            classifier.class_features,
            config,
            context.generator(0),
            context.progress,
            budget=budget,
        )
    return inversions, [r.pl1 if r.reached else 1.0 for r in inversions]


def screen(
    bundle: ModelBundle,
    shots: ShotSet,
    config: ScanConfig,
    context: RunContext,
    classifier: PromptClassifier,
    budget: int,
) -> Screening:
    """Per-class inversion and text alignment of every class, and the suspect (steps 1-3)."""
    inversions, sizes = class_triggers(bundle, shots, config, context, classifier, budget)
    with context.stage("text alignment"):
        clean_features = encode_batched(bundle, shots.pixels)
        alignment = text_alignment(clean_features, shots.labels, classifier.class_features)
    size_index = low_side_indices(sizes, log=True)
    alignment_index = low_side_indices(alignment)
    evidence, suspect = judge_classes(size_index, alignment_index, sizes, config)
    return Screening(
        inversions,
        clean_features,
        sizes,
        size_index,
        alignment,
        alignment_index,
        evidence,
        suspect,
    )


def screening_cost(config: ScanConfig, shots: ShotSet) -> int:
    """The most encoder images the screening of one shot draw like ``shots`` takes: every
    class's batch on every step of the per-class inversion, and one pass over the shots for
    the text alignment. What the reach probes leave for the draws still pending."""
    return config.class_steps * config.class_batch_size * len(shots.classnames) + len(shots.labels)


def shot_draws(
    context: RunContext, shots: ShotSet, draws: int
) -> Iterator[tuple[RunContext, ShotSet]]:
    """The shot draws a scan screens, each with a context of its seed: ``shots`` with
    ``context``, then ``draws - 1`` more from :attr:`RunContext.draw_shots` (seeds
    ``context.seed + 1`` ...; their contexts share its timings and progress), none where the
    caller offers no more. Each draw is drawn when the iteration reaches it, so a draw the
    caller stops before is never drawn (nor counted among the run's images)."""
    yield context, shots
    if context.draw_shots is not None:
        for index in range(1, draws):
            yield replace(context, seed=context.seed + index), context.draw_shots(index)


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


def flagging_probe(suspected: Suspicion, k: int, config: ScanConfig) -> str:
    """How the strongest probe of ratio 1 or more flags class ``k``, for an explanation of a
    screening that such a probe ended (``probe_settles``)."""
    flag = flagging(probe_ratios(suspected.probes, config))
    if flag is None:
        return "a reach probe flags this class"
    name = flag[0]
    evidence = suspected.probes[name].evidence()[k]
    return (
        f"the {name} probe flags this class too ({evidence:.2f}, from "
        f"{config.probe_threshold(name):g})"
    )


def decide(
    screening: Screening, suspected: Suspicion, classnames: list[str], config: ScanConfig
) -> tuple[str, float, str]:
    """Verdict, score in ``[0, 1)`` and a one-line explanation.

    The score is ``r / (1 + r)`` with ``r`` the deciding ratio of evidence to threshold, so
    it is 0.5 exactly at the threshold.
    """
    ratio = suspected.ratio
    verdict = verdict_of(ratio, config)
    if suspected.decided_by != "rule":
        probe = suspected.probes[suspected.decided_by]
        k = suspected.suspect
        measured = f"the {probe.measured[k]}" if probe.measured else "the"
        facts = (
            f"class {classnames[k]!r}: {probe.family.describe()} sends {probe.reach[k]:.0%} of "
            f"{measured} held-out images of other classes to it, "
            f"{probe.evidence()[k]:.2f} above the median "
            f"class (backdoor from {config.probe_threshold(probe.probe):g}; the "
            f"{config.signals} rule's evidence {screening.top_evidence:.2f}, from "
            f"{config.threshold:g}, class {classnames[screening.suspect]!r})"
        )
        return verdict, ratio / (1 + ratio), f"{probe.family.signal} backdoor signal for {facts}"
    k = screening.suspect
    evidence = screening.top_evidence
    size = (
        f"the trigger-size index {screening.size_index[k]:.2f} (smallest trigger "
        f"{screening.sizes[k]:.4f} of the image)"
    )
    alignment = screening.alignment_index[k]
    additive = screening.corroboration[k] if screening.corroboration else 0.0
    corroborating = (
        f"the additive probe's evidence in index units {additive:.2f} (text-alignment index "
        f"{alignment:.2f})"
        if additive > alignment
        else f"the text-alignment index {alignment:.2f}"
    )
    isolated = isolation_units(config) * screening.isolation[k]
    if config.signals == "size":
        rule = f"{size} (text-alignment index {alignment:.2f}, not used)"
    elif isolated > 0 and isolated >= evidence:
        rule = (
            f"{size}, {screening.isolation[k]:.2f} above every other class's (isolated from "
            f"{config.isolation_threshold:g}; {corroborating})"
        )
    else:
        rule = f"geometric mean of {size} and {corroborating}"
    screened = len(screening.draw_evidence)
    offered = screening.draws_offered
    flagging = flagging_probe(suspected, k, config) if screening.stopped == "probe" else ""
    if screening.stopped == "band":
        low, high = config.screen_again_evidence
        rule = (
            f"{rule}; the first of {offered} shot draws decided alone (its largest evidence "
            f"before corroboration lies outside [{low:g}, {high:g}))"
        )
    elif screened > 1:
        each = ", ".join(f"{draw[k]:.2f}" for draw in screening.draw_evidence)
        skipped = {
            "moot": f"; the last of {offered} could change neither verdict nor suspect",
            "probe": f"; {flagging}, so no more of the {offered} were screened",
        }.get(screening.stopped or "", "")
        rule = (
            f"the median of its evidence on {screened} shot draws ({each}{skipped}); on the "
            f"first, {rule}"
        )
    elif screening.stopped == "probe":
        rule = f"{rule}; {flagging}, so the first of {offered} shot draws decided alone"
    facts = (
        f"class {classnames[k]!r}: evidence {evidence:.2f} (backdoor from "
        f"{config.threshold:g}) = {rule}"
    )
    explanation = {
        "backdoor": f"backdoor signal for {facts}",
        "inconclusive": f"weak backdoor signal for {facts}",
        "clean": f"no class stands out; strongest is {facts}",
    }[verdict]
    return verdict, ratio / (1 + ratio), explanation


def locate_trigger(
    bundle: ModelBundle,
    shots: ShotSet,
    config: ScanConfig,
    context: RunContext,
    classifier: PromptClassifier,
) -> tuple[Screening, Suspicion, InversionResult, InversionResult | None]:
    """Steps 1-4: screen every class on the first shot draw, run the reach probes on
    ``shots`` (their reach measured on ``probe_held_out`` more images per class too, where
    the context offers them), then, unless the first draw is decisive
    (:meth:`ScanConfig.decisive`), screen the other draws on offer (:func:`shot_draws`) one
    by one until a probe flags the suspect of the draws screened so far
    (:func:`probe_flags_suspect`, with ``probe_settles``) or the last is moot
    (:func:`last_draw_moot`, with ``skip_moot_draw``); judge the median screening
    (:func:`median_screening`), then refine the suspect's trigger within the budget.

    Returns the screening, the suspicion, the kept trigger (the refined one when its
    refinement met the success share, else the suspect's per-class trigger on ``shots``) and
    the refinement (None when ``refine`` is off, when the verdict is clean and
    ``refine_clean`` off, or when no budget is left). The screenings share
    70 % of the budget (all of it without refinement), each draw taking at most an even share
    of what the earlier ones left; the probes, in turn, get the rest less what the pending
    draws can take (:func:`screening_cost` each, within their share) and the refinement's
    share (``refine_steps`` batches).
    """
    start_images = bundle.image_encoder_images
    refining = config.refine and config.refine_steps > 0
    screen_budget = int(config.budget * 0.7) if refining else config.budget
    on_offer = config.screen_draws if context.draw_shots is not None else 1
    draws = shot_draws(context, shots, on_offer)
    screenings: list[Screening] = []
    seeds: list[int] = []
    screened_images = 0

    def screen_next() -> None:
        nonlocal screened_images
        draw_context, draw = next(draws)
        share = (screen_budget - screened_images) // (on_offer - len(screenings))
        before = bundle.image_encoder_images
        screenings.append(screen(bundle, draw, config, draw_context, classifier, budget=share))
        seeds.append(draw_context.seed)
        screened_images += bundle.image_encoder_images - before

    screen_next()
    decisive = config.decisive(screenings[0].top_evidence)
    probes: dict[str, ProbeReach] = {}
    reserve = config.refine_steps * config.batch_size if refining else 0
    pending = 0 if decisive else on_offer - len(screenings)
    reserve += min(screen_budget - screened_images, pending * screening_cost(config, shots))
    specs = config.probes()
    n_classes = len(shots.classnames)
    held_out = probe_held_out(context, config, n_classes) if specs else None
    held_out_labels = None if held_out is None else held_out[1]
    for i, spec in enumerate(specs):
        left = config.budget - (bundle.image_encoder_images - start_images) - reserve
        # an adapted probe's extra fits leave room for one fit of every later probe
        later = sum(
            probe_cost(
                shots.labels,
                n_classes,
                config.additive_images,
                s.steps,
                held_out_labels,
                config.probe_held_out_max,
            )
            for s in specs[i + 1 :]
        )
        with context.stage(f"{spec.family.name} reach"):
            probes[spec.family.name] = run_probe(
                bundle,
                shots.pixels,
                shots.labels,
                classifier.class_features,
                spec,
                config.additive_images,
                budget=max(left, 0),
                keep=later,
                progress=context.progress,
                held_out=held_out,
                max_held_out=config.probe_held_out_max,
            )
    ranked = probe_ratios(probes, config)
    corroborated = [corroborate(screenings[0], probes.get("additive"), config)]
    stopped: Stopped | None = None
    if decisive and on_offer > 1:
        stopped = "band"
    while stopped is None and len(screenings) < on_offer:
        if config.probe_settles and probe_flags_suspect(
            median_screening(corroborated, seeds).suspect, ranked
        ):
            stopped = "probe"
        elif (
            config.skip_moot_draw
            and len(screenings) == on_offer - 1
            and last_draw_moot([s.evidence for s in corroborated], ranked, config)
        ):
            stopped = "moot"
        else:
            screen_next()
            corroborated.append(corroborate(screenings[-1], probes.get("additive"), config))
    screening = median_screening(corroborated, seeds, on_offer, stopped)
    suspected = suspicion(screening, probes, config)
    kept = screening.inversions[suspected.suspect]
    left = config.budget - (bundle.image_encoder_images - start_images)
    refined: InversionResult | None = None
    wanted = config.refine_clean or verdict_of(suspected.ratio, config) != "clean"
    if refining and wanted and left > config.batch_size:
        with context.stage("refinement"):
            refined = invert_targeted(
                bundle,
                shots.pixels,
                shots.labels,
                classifier.class_features,
                suspected.suspect,
                config,
                context.generator(1),
                start=kept.trigger,
                progress=context.progress,
                budget=left,
            )
        if refined.reached:
            kept = refined
    return screening, suspected, kept, refined


def probe_held_out(
    context: RunContext, config: ScanConfig, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The images (pixels, labels) besides the shots that the reach probes also measure on:
    ``config.probe_held_out`` per class from :attr:`RunContext.held_out_shots`, fewer where
    ``n_classes - 1`` classes of them would exceed ``config.probe_held_out_max``; None where
    the run offers none (a purify run, a plugin called directly) or the option is 0."""
    if context.held_out_shots is None or config.probe_held_out == 0:
        return None
    needed = math.ceil(config.probe_held_out_max / max(n_classes - 1, 1))
    images = context.held_out_shots(min(config.probe_held_out, needed))
    return None if images is None else (images.pixels, images.labels)


def run_probe(
    bundle: ModelBundle,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_features: torch.Tensor,
    spec: ProbeSpec,
    max_images: int,
    budget: int,
    keep: int = 0,
    progress: Progress | None = None,
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_held_out: int = HELD_OUT_IMAGES,
) -> ProbeReach:
    """The reach probe of ``spec`` on the shots
    (:func:`~clipguard_cbpt.inversion.probe_reach_in_band`), its reach measured on the
    held-out shots and ``held_out`` images: fits until the median class's reach lies in its
    band, the extra fits leaving ``keep`` images of ``budget`` unspent (one fit for
    :data:`FIXED_BOUND`)."""
    return probe_reach_in_band(
        bundle,
        pixels,
        labels,
        class_features,
        spec.family,
        spec.steps,
        max_images,
        budget,
        spec.band,
        keep,
        progress=progress,
        held_out=held_out,
        max_held_out=max_held_out,
    )


def run_inversion(
    bundle: ModelBundle, shots: ShotSet, config: InversionConfig, context: RunContext
) -> tuple[InversionResult, InversionResult | None, dict[str, Any], dict[str, Any]]:
    """Contrastive inversion plus optional targeted refinement on ``shots``.

    Returns the contrastive result, the refined result (None when ``refine`` is off or no
    budget is left), the prediction statistics of the contrastive trigger, and those of the
    refined one (empty without refinement). Deterministic for ``context.seed``.
    """
    classifier = PromptClassifier(bundle, shots.classnames)
    start_images = bundle.image_encoder_images
    with context.stage("inversion"):
        generator = context.generator(0)
        contrastive = invert_contrastive(
            bundle,
            shots.pixels,
            config,
            generator,
            context.progress,
            budget=config.budget if not config.refine else int(config.budget * 0.75),
        )
        stats = prediction_distribution(
            classifier.predict, shots.pixels, shots.labels, contrastive.trigger, shots.classnames
        )
    refined: InversionResult | None = None
    refined_stats: dict[str, Any] = {}
    left = config.budget - (bundle.image_encoder_images - start_images)
    if config.refine and config.refine_steps > 0 and left > config.batch_size:
        with context.stage("refinement"):
            refined = invert_targeted(
                bundle,
                shots.pixels,
                shots.labels,
                classifier.class_features,
                int(stats["dominant_index"]),
                config,
                context.generator(1),
                start=contrastive.trigger,
                progress=context.progress,
                budget=left,
            )
            refined_stats = prediction_distribution(
                classifier.predict,
                shots.pixels,
                shots.labels,
                refined.trigger,
                shots.classnames,
            )
    return contrastive, refined, stats, refined_stats


class CBPTScanner(Scanner):
    """Per-class trigger inversion and text alignment with a calibrated verdict and a picture."""

    name: ClassVar[str] = "cbpt"
    version: ClassVar[str] = __version__
    description: ClassVar[str] = (
        "per-class trigger inversion + text alignment + additive and warp reach; flags a "
        "class whose trigger is anomalously small or whose prompt drifted from its images "
        "(calibrated MAD indices), or that a small full-image change or warp reaches far "
        "beyond the others"
    )
    Config: ClassVar[type[BaseModel]] = ScanConfig

    def scan(
        self, bundle: ModelBundle, shots: ShotSet, config: BaseModel, context: RunContext
    ) -> ScanOutcome:
        """Scan ``bundle`` with the clean ``shots``; see the module docstring."""
        assert isinstance(config, ScanConfig)
        torch.set_num_threads(min(torch.get_num_threads(), 2))
        start_images = bundle.image_encoder_images
        reading = scan_classifier(bundle, shots, config, context)
        classifier = reading.classifier
        screening, suspected, kept, refined = locate_trigger(
            bundle, shots, config, context, classifier
        )
        verdict, score, explanation = decide(screening, suspected, list(shots.classnames), config)
        suspect = shots.classnames[suspected.suspect]
        stats = prediction_distribution(
            classifier.predict, shots.pixels, shots.labels, kept.trigger, shots.classnames
        )
        clean_cos = mean_pairwise_cosine(screening.clean_features)
        others = shots.pixels[shots.labels != suspected.suspect]
        collapse = relative_collapse(
            mean_pairwise_cosine(encode_batched(bundle, kept.trigger.apply(others))), clean_cos
        )
        names = list(shots.classnames)
        trigger_file = TriggerFile(
            trigger=kept.trigger,
            model_sha256=bundle.sha256,
            classnames=names,
            settings={
                "scanner": self.name,
                "version": self.version,
                "seed": context.seed,
                "target_class": suspect,
                "verdict": verdict,
                "evidence": screening.top_evidence,
                **probe_evidence_settings(suspected),
                "decided_by": suspected.decided_by,
                "dominant_class": stats["dominant_class"],
                "prompts": reading.name,
                "options": config.model_dump(mode="json"),
            },
            producer=f"clipguard_cbpt {self.name} {self.version}",
        )
        statistics: dict[str, Any] = {
            "prompts": reading.name,
            "prompt_accuracy": reading.accuracy,
            "prompt_accuracy_images": reading.held_out_images,
            "suspect_class": suspect,
            "decided_by": suspected.decided_by,
            "evidence": screening.top_evidence,
            "size_index": screening.size_index[suspected.suspect],
            "alignment_index": screening.alignment_index[suspected.suspect],
            "pl1": kept.pl1,
            "collapse_score": collapse,
            "dominant_class": stats["dominant_class"],
            "dominant_share": stats["dominant_share"],
            "dominant_share_others": stats["dominant_share_others"],
            "class_distribution": stats["distribution"],
            "class_pl1": dict(zip(names, screening.sizes, strict=True)),
            "class_reached": {
                c: r.reached for c, r in zip(names, screening.inversions, strict=True)
            },
            "class_size_index": dict(zip(names, screening.size_index, strict=True)),
            "class_alignment": dict(zip(names, screening.alignment, strict=True)),
            "class_alignment_index": dict(zip(names, screening.alignment_index, strict=True)),
            "class_isolation": dict(zip(names, screening.isolation, strict=True)),
            "class_evidence": dict(zip(names, screening.evidence, strict=True)),
            "class_additive_corroboration": dict(zip(names, screening.corroboration, strict=True))
            if screening.corroboration
            else None,
            "screen_draws_offered": screening.draws_offered,
            "screen_draws_stopped": screening.stopped,
            "screen_draws": [
                {
                    "seed": seed,
                    "suspect_class": names[draw.suspect],
                    "evidence": draw.top_evidence,
                    "class_evidence": dict(zip(names, draw.evidence, strict=True)),
                    "class_pl1": dict(zip(names, draw.sizes, strict=True)),
                    "class_size_index": dict(zip(names, draw.size_index, strict=True)),
                    "class_alignment_index": dict(zip(names, draw.alignment_index, strict=True)),
                }
                for seed, draw in zip(screening.draw_seeds, screening.draws, strict=True)
            ],
            **probe_statistics(suspected, names, config),
            "refined": None
            if refined is None
            else {"pl1": refined.pl1, "reached": refined.reached, "steps": refined.steps},
            "signals": config.signals,
            "thresholds": {
                "evidence_threshold": config.threshold,
                "inconclusive_fraction": config.inconclusive_fraction,
                "additive_corroboration": config.additive_corroboration,
                "isolation_threshold": config.isolation_threshold,
            },
            "image_encoder_images": bundle.image_encoder_images - start_images,
            "budget": config.budget,
            "seed": context.seed,
        }
        picture = picture_bytes(classifier, shots, kept.trigger, verdict, stats["dominant_class"])
        return ScanOutcome(
            verdict=verdict,  # type: ignore[arg-type]
            score=score,
            target_class=suspect if verdict != "clean" else None,
            explanation=explanation,
            statistics=statistics,
            artifacts={
                "trigger.safetensors": trigger_file_bytes(trigger_file),
                "trigger.png": picture,
            },
            trigger=trigger_file,
        )


@dataclass
class PromptReading:
    """The prompts a scan reads the model through (:func:`scan_classifier`).

    ``fitted``: whether they are prompts fitted to the shots; ``accuracy``: with
    ``fit_prompts="auto"``, the held-out accuracy of the ``"hand-crafted"`` and the
    ``"fitted"`` prompts that decided it, on ``held_out_images`` images (None otherwise).
    """

    classifier: PromptClassifier
    fitted: bool
    accuracy: dict[str, float] | None = None
    held_out_images: int = 0

    @property
    def name(self) -> str:
        """``"fitted"`` or ``"hand-crafted"`` (the trigger file's ``prompts`` setting)."""
        return "fitted" if self.fitted else "hand-crafted"


def scan_classifier(
    bundle: ModelBundle, shots: ShotSet, config: ScanConfig, context: RunContext
) -> PromptReading:
    """The classifier a scan inverts and probes through: the hand-crafted prompts, or with
    ``fit_prompts`` class-wise prompts tuned on ``shots`` (stage "prompt fitting": the
    ``coop`` purifier's tuning, its augmented views drawn from ``context.generator(5)``).
    With ``fit_prompts="auto"`` both classify the reach probes' held-out images
    (:func:`probe_held_out`) and the fitted prompts are read through when they are at least
    ``config.fit_prompts_gain`` more accurate; without held-out images, the hand-crafted."""
    if config.fit_prompts is True:
        return PromptReading(fitted_classifier(bundle, shots, context), fitted=True)
    handcrafted = PromptClassifier(bundle, shots.classnames)
    held_out = None
    if config.fit_prompts == "auto":
        held_out = probe_held_out(context, config, len(shots.classnames))
    if held_out is None:
        return PromptReading(handcrafted, fitted=False)
    fitted = fitted_classifier(bundle, shots, context)
    pixels, labels = held_out
    with context.stage("prompt fitting"):
        features = encode_batched(bundle, pixels)
    accuracy = {
        name: clean_accuracy(each.logits_from_features(features).argmax(dim=1), labels)
        for name, each in (("hand-crafted", handcrafted), ("fitted", fitted))
    }
    use_fitted = accuracy["fitted"] - accuracy["hand-crafted"] >= config.fit_prompts_gain
    return PromptReading(
        fitted if use_fitted else handcrafted,
        fitted=use_fitted,
        accuracy=accuracy,
        held_out_images=int(labels.numel()),
    )


def fitted_classifier(bundle: ModelBundle, shots: ShotSet, context: RunContext) -> PromptClassifier:
    """Class-wise prompts tuned on ``shots`` by the ``coop`` purifier's tuning (stage
    "prompt fitting", augmented views from ``context.generator(5)``)."""
    tuning = CoOpConfig(no_trigger_loss=True)  # as the coop purifier tunes
    with context.stage("prompt fitting"):
        cache = cache_features(
            bundle,
            shots.pixels,
            shots.labels,
            None,
            tuning.augmentations,
            tuning.crop_scale,
            context.generator(5),
        )
        learned, _ = tune_prompts(
            bundle, list(shots.classnames), cache, None, tuning, context.progress
        )
    prompts = PromptSet(
        context=learned,
        classnames=list(shots.classnames),
        model_sha256=bundle.sha256,
        architecture=bundle.arch,
    )
    return PromptClassifier(bundle, shots.classnames, prompts)


def probe_evidence_settings(suspected: Suspicion) -> dict[str, float | None]:
    """Each probe's top evidence as trigger-file settings (``additive_evidence``,
    ``warp_evidence``; None for a probe that did not run), which the purifier's gate
    re-judges."""
    tops = suspected.top_probe_evidence()
    return {f"{name}_evidence": tops.get(name) for name in PROBES}


def probe_statistics(suspected: Suspicion, names: list[str], config: ScanConfig) -> dict[str, Any]:
    """The reach probes' part of the report, per probe ``P`` in :data:`PROBES`: the suspect's
    evidence (``P_evidence``), every class's reach and evidence (``class_P_reach``,
    ``class_P_evidence``) and the probe's settings (``P``); all None for a probe that did not
    run."""
    report: dict[str, Any] = {}
    for name in PROBES:
        keys = (f"{name}_evidence", f"class_{name}_reach", f"class_{name}_evidence", name)
        probe = suspected.probes.get(name)
        if probe is None:
            report.update(dict.fromkeys(keys))
            continue
        evidence = probe.evidence()
        report.update(
            {
                keys[0]: evidence[suspected.suspect],
                keys[1]: dict(zip(names, probe.reach, strict=True)),
                keys[2]: dict(zip(names, evidence, strict=True)),
                keys[3]: {
                    **probe.family.settings(),
                    "steps": probe.steps,
                    "skipped": probe.skipped,
                    "threshold": config.probe_threshold(name),
                    "median_reach": probe.median,
                    "shot_median_reach": probe.shot_median,
                    "measured_images": dict(zip(names, probe.measured, strict=True))
                    if probe.measured
                    else None,
                    "tried": [
                        {**family.settings(), "median_reach": median}
                        for family, median in probe.tried
                    ],
                },
            }
        )
    return report


def picture_bytes(
    classifier: PromptClassifier,
    shots: ShotSet,
    trigger: Any,
    verdict: str,
    dominant: str,
    scanner: str = "cbpt",
) -> bytes:
    """``trigger.png`` with up to :data:`N_PICTURE_PAIRS` shots of different classes, labelled
    with ``classifier``'s predictions."""
    chosen: list[int] = []
    seen: set[int] = set()
    for index, label in enumerate(shots.labels.tolist()):
        if label not in seen:
            seen.add(label)
            chosen.append(index)
        if len(chosen) == N_PICTURE_PAIRS:
            break
    clean = shots.pixels[chosen]
    clean_pred = classifier.predict(clean).tolist()
    trig_pred = classifier.predict(trigger.apply(clean)).tolist()
    names = shots.classnames
    return render_trigger_png(
        trigger,
        clean,
        [names[k] for k in clean_pred],
        [names[k] for k in trig_pred],
        title=f"{scanner} scan: {verdict}; triggered shots go to '{dominant}'",
    )
