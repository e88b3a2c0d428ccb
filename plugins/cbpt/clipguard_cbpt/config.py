"""The options of the cbpt scanners, in groups: the per-class inversion (``class_*``,
``inversion_*``; shared with ``cbpt-nc``), the refinement (``refine*``), the prompts
(``fit_prompts*``), the shot draws (``screen_again``), the verdict rule (``signals`` and its
thresholds), the reach probes (``probe_*``, ``additive_*``, ``warp_*``) and the reference
contrast (``reference*``).

Every option here changes what a scan does (``tests/cbpt/test_options.py`` proves it per
option). Switches that only turn a part of the method off for a benchmark are not options:
they are :class:`~clipguard_cbpt.screening.ScanAblations`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from clipguard_cbpt.inversion import InversionConfig
from clipguard_cbpt.probe_families import AdditivePerturbation, SmoothWarp
from clipguard_cbpt.probes import HELD_OUT_IMAGES, MedianBand, ProbeSpec

#: the reach probes a scan can run (:meth:`ScanConfig.probes`), in report order
PROBES: tuple[str, ...] = ("additive", "warp")

Signals = Literal["joint", "size"]

#: the evidence threshold of each rule when none is given (docs/benchmarks.md): joint from
#: the synthetic zoo; size = the middle of the gap between the clean and the detected
#: backdoored models of the CIFAR-10 zoo (the rule of benchmarks/calibrate.py on all of it)
DEFAULT_THRESHOLDS: dict[str, float] = {"joint": 2.0, "size": 1.99}

#: the additive probe's default threshold (fitted on the even seeds of both lab zoos)
DEFAULT_ADDITIVE_THRESHOLD = 0.24

#: the joint rule's default isolation threshold (fitted on the even seeds of both lab zoos)
DEFAULT_ISOLATION_THRESHOLD = 1.86

#: the reference contrast's default threshold: the largest contrast between two clean
#: CIFAR-10 lab models of one recipe (182 ordered pairs of 14 models; no trigger family
#: fitted; docs/research.md)
DEFAULT_REFERENCE_THRESHOLD = 0.173

#: with fit_prompts=auto, the held-out accuracy fitted prompts must add to the hand-crafted
#: prompts' to be read through (between the lab zoos' CoOp gains; docs/benchmarks.md)
FIT_PROMPTS_GAIN = 0.08


class ClassInversionOptions(BaseModel):
    """The options of the per-class inversion, which both cbpt scanners run: the smallest
    trigger towards every class, all classes optimised together."""

    model_config = ConfigDict(extra="forbid")

    budget: int = Field(
        60_000,
        ge=1,
        description="maximum images through the image encoder for the whole scan",
    )
    class_steps: int = Field(
        300, ge=1, description="most steps of the per-class inversion (all classes at once)"
    )
    class_batch_size: int = Field(
        8, ge=1, description="shots per class and step of the per-class inversion"
    )
    class_success: float = Field(
        0.95,
        gt=0,
        le=1,
        description="share of a class's batch that must reach the class for its trigger to count",
    )
    class_patience: int = Field(
        60,
        ge=1,
        description="a class stops after this many steps without a 1 % smaller kept mask",
    )
    class_mask_init: float = Field(
        0.02, gt=0, lt=1, description="initial mean mask value of every class's trigger"
    )
    inversion_lr: float = Field(
        0.1, gt=0, description="Adam learning rate on the triggers' tanh parameters"
    )
    inversion_lambda_init: float = Field(
        1.0, gt=0, description="mask-size weight set when a trigger first meets its success share"
    )
    inversion_lambda_up: float = Field(
        1.5, gt=1, description="factor raising the mask-size weight while the success share holds"
    )
    inversion_lambda_down: float = Field(
        1.5**1.5,
        gt=1,
        description="factor lowering the mask-size weight when the success share breaks",
    )
    inversion_window: int = Field(
        10, ge=1, description="steps per window of the mask-size weight's schedule"
    )

    def inversion(self) -> InversionConfig:
        """The inversion settings these options set (the other settings at their defaults)."""
        return InversionConfig(**self._inversion_settings())

    def _inversion_settings(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "class_steps": self.class_steps,
            "class_batch_size": self.class_batch_size,
            "class_success": self.class_success,
            "class_patience": self.class_patience,
            "mask_init": self.class_mask_init,
            "lr": self.inversion_lr,
            "lambda_init": self.inversion_lambda_init,
            "lambda_up": self.inversion_lambda_up,
            "lambda_down": self.inversion_lambda_down,
            "check_every": self.inversion_window,
        }


class ScanConfig(ClassInversionOptions):
    """Options of the ``cbpt`` scanner: the per-class inversion's, the refinement's, the
    prompts', the verdict rule's and the reach probes'."""

    budget: int = Field(
        240_000,
        ge=1,
        description=(
            "maximum images through the image encoder for the whole scan: the prompt check "
            "(its text-encoder steps counted as the images of equal compute; at most a tenth "
            "of the budget), per-class inversion on every shot draw, reach probes, "
            "refinement; compute_budget and clipguard scan --max-minutes lower it. A scan "
            "whose budget cut a stage short is inconclusive"
        ),
    )
    compute_budget: float = Field(
        5_500.0,
        gt=0,
        description=(
            "GFLOPs of image-encoder forward passes the budget may cost: on a dearer model "
            "the budget is cut to the images this buys, so the work scales with what the "
            "model costs (the default buys the whole budget on every lab architecture and "
            "about 620 images of a ViT-B/32)"
        ),
    )

    # ------------------------------------------------------------------ refinement
    refine: bool = Field(
        True,
        description=(
            "refine the suspect's trigger towards it with a targeted inversion (the trigger "
            "the scan writes out); false writes the per-class inversion's trigger"
        ),
    )
    refine_clean: bool = Field(
        False,
        description=(
            "refine the suspect's trigger even when the verdict is clean (by default a clean "
            "scan's trigger is written as the per-class inversion found it)"
        ),
    )
    refine_steps: int = Field(150, ge=0, description="maximum steps of the refinement")
    refine_success: float = Field(
        0.9, gt=0, le=1, description="share of triggered shots the refinement must send to target"
    )
    refine_batch_size: int = Field(32, ge=2, description="shots per step of the refinement")
    refine_augment: bool = Field(
        True, description="refine on randomly cropped and flipped views of the shots"
    )
    refine_crop_scale: float = Field(
        0.7, gt=0, le=1, description="smallest side fraction of the refinement's random crops"
    )
    refine_patience: int = Field(
        8,
        ge=1,
        description="windows without a smaller successful mask after which the refinement stops",
    )

    # ------------------------------------------------------------------ prompts
    fit_prompts: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "scan through class-wise prompts fitted to the first draw's clean shots (CoOp, "
            "clean cross-entropy only) instead of the hand-crafted ones; every signal, the "
            "text alignment included, then measures the fitted prompts. auto: fit them, and "
            "read through them when they classify the reach probes' held-out images at least "
            "fit_prompts_gain better than the hand-crafted prompts (hand-crafted where the "
            "caller offers no held-out images)"
        ),
    )
    prompt_steps: int = Field(
        300,
        ge=1,
        description=(
            "most text-encoder steps of the prompt check's prompt fitting (fewer when its "
            "share of the budget does not allow them)"
        ),
    )
    fit_prompts_gain: float = Field(
        FIT_PROMPTS_GAIN,
        ge=0,
        le=1,
        description=(
            "with fit_prompts=auto: the held-out accuracy the fitted prompts must add to the "
            "hand-crafted prompts' for the scan to read through them"
        ),
    )

    # ------------------------------------------------------------------ shot draws
    screen_again: tuple[float, float] = Field(
        (0.5, 1.5),
        description=(
            "[low, high) in multiples of the evidence threshold: the shot draws after the "
            "first (where the caller offers more) are screened only when the first draw's "
            "largest class evidence (before the additive corroboration) lies in this band; "
            "outside it the first draw decides alone. [0, 1e9] screens every draw"
        ),
    )

    # ------------------------------------------------------------------ verdict rule
    signals: Signals = Field(
        "joint",
        description=(
            "evidence of a class: 'joint' = geometric mean of its trigger-size and "
            "text-alignment anomaly indices, or the size index's isolation (robust where "
            "classes have natural triggers); 'size' = the trigger-size index alone"
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

    # ------------------------------------------------------------------ reach probes
    probe_shots: int = Field(
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
    additive_threshold: float = Field(
        DEFAULT_ADDITIVE_THRESHOLD,
        gt=0,
        le=1,
        description=(
            "reach above the median class's from which the additive probe alone makes the "
            "verdict backdoor"
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

    # ------------------------------------------------------------------ reference contrast
    reference: str | None = Field(
        None,
        description=(
            "a trusted model of the same task (best one trained the same way on clean data; "
            "the checkpoint the suspect was fine-tuned from only for a brief fine-tune), "
            "loaded safely like the suspect: the scan also measures how much further the "
            "additive probe reaches each class on the suspect than on it "
            "(docs/method.md, reference contrast); none by default"
        ),
    )
    reference_threshold: float = Field(
        DEFAULT_REFERENCE_THRESHOLD,
        gt=0,
        le=1,
        description=(
            "reference contrast (largest reach of a class on the suspect less its reach on "
            "the reference, over three bounds) from which the contrast alone makes the "
            "verdict backdoor"
        ),
    )

    def inversion(self) -> InversionConfig:
        """The settings of the per-class inversion and of the refinement these options set."""
        return InversionConfig(
            **self._inversion_settings(),
            refine=self.refine,
            refine_steps=self.refine_steps,
            refine_success=self.refine_success,
            batch_size=self.refine_batch_size,
            augment=self.refine_augment,
            crop_scale=self.refine_crop_scale,
            early_stop_windows=self.refine_patience,
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

    def additive_probe(self) -> ProbeSpec:
        """The additive probe as configured (the reference contrast probes with it);
        ValueError where it is off (``additive_epsilon`` 0, refused with a reference)."""
        for spec in self.probes():
            if spec.family.name == "additive":
                return spec
        raise ValueError("the additive probe is off (additive_epsilon is 0)")

    def probe_threshold(self, probe: str) -> float:
        """The threshold of the reach probe named ``probe``."""
        return {"additive": self.additive_threshold, "warp": self.warp_threshold}[probe]

    @model_validator(mode="after")
    def _default_threshold(self) -> ScanConfig:
        if self.additive_median_low >= self.additive_median_high:
            raise ValueError("additive_median_low must be below additive_median_high")
        if not 0 <= self.screen_again[0] <= self.screen_again[1]:
            raise ValueError("screen_again must be [low, high] with 0 <= low <= high")
        if self.reference is not None and self.additive_epsilon == 0:
            raise ValueError("reference needs the additive probe: additive_epsilon above 0")
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
