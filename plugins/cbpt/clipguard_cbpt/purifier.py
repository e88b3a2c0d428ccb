"""The ``cbpt`` purifier (class-wise prompt tuning against an inverted trigger) and ``coop``."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

import torch
from pydantic import BaseModel, Field

from clipguard.components import Purifier, PurifyOutcome, RunContext, ShotSet
from clipguard.model import ModelBundle
from clipguard.prompts import PromptClassifier, PromptSet
from clipguard.triggers import MaskPatternTrigger, Trigger, TriggerFile
from clipguard_cbpt import __version__
from clipguard_cbpt.budget import locate_within_budget
from clipguard_cbpt.config import DEFAULT_THRESHOLDS, PROBES, ScanConfig
from clipguard_cbpt.contrastive import ContrastiveConfig, run_inversion
from clipguard_cbpt.evidence import REFERENCE, deciding_ratio, verdict_of
from clipguard_cbpt.inversion import InversionConfig, invert_targeted
from clipguard_cbpt.probe_families import (
    ProbeFamily,
    SmoothWarp,
    family_from_settings,
    transform_towards,
)
from clipguard_cbpt.statistics import (
    decision_settings,
    prediction_distribution,
)
from clipguard_cbpt.tuning import (
    CoOpConfig,
    FeatureCache,
    TuningConfig,
    cache_features,
    random_mask_like,
    tune_prompts,
)

TuningConfigT = TypeVar("TuningConfigT", bound=TuningConfig)

#: control-grid side of the purifier's warp trigger: the scanner's warp probe's default
WARP_TRIGGER_GRID: int = ScanConfig.model_fields["warp_grid"].default
#: image-encoder images of the purifier's own inversion: a whole cbpt scan's, since the
#: inversion is the scan's (its prompt reading, shot draws and reach probes)
SCAN_BUDGET: int = ScanConfig.model_fields["budget"].default


class PurifyConfig(TuningConfig):
    """Options of the ``cbpt`` purifier: tuning, plus the inversion it runs without a trigger."""

    inversion_steps: int = Field(
        200, ge=1, description="inversion_method=contrastive: steps of the kept restart"
    )
    inversion_restarts: int = Field(
        3, ge=1, description="inversion_method=contrastive: random restarts probed"
    )
    inversion_budget: int = Field(
        SCAN_BUDGET,
        ge=1,
        description="image-encoder images for the inversion (a whole cbpt scan's by default)",
    )
    refine: bool = Field(True, description="refine the inverted trigger towards its class")
    extra_triggers: int = Field(
        0,
        ge=0,
        description=(
            "further triggers inverted towards the trigger's target class from random starts; "
            "the tuning uses them all (one trigger covers the backdoor's region only in part)"
        ),
    )
    extra_trigger_success: float = Field(
        0.99, gt=0, le=1, description="share of a batch each further trigger must send to target"
    )
    warp_trigger_pixels: float = Field(
        0.0,
        ge=0,
        description=(
            "besides the inverted trigger, tune against a smooth warp (8 x 8 control grid, at "
            "most this many pixels; 8 suits 32-pixel images) fitted to send the other "
            "classes' shots to the target: a warping backdoor (WaNet) is not a mask, and the "
            "mask trigger covers it only in part; it also dilutes the mask trigger's push, so "
            "it is off (0) by default (docs/method.md)"
        ),
    )
    warp_trigger_steps: int = Field(30, ge=1, description="Adam steps fitting the warp trigger")
    probe_trigger: bool = Field(
        False,
        description=(
            "when a reach probe decided the trigger's scan (a full-image change or a warp "
            "reached the target, not the mask), also tune against that probe's transformation "
            "at the scan's bound, fitted to send the other classes' shots to the target: the "
            "purification follows the kind of trigger the scan found; off by default until "
            "measured on every lab zoo (docs/method.md)"
        ),
    )
    probe_trigger_steps: int = Field(
        30, ge=1, description="Adam steps fitting the probe trigger (probe_trigger)"
    )
    gate_on_verdict: bool = Field(
        True,
        description=(
            "drop L_trigger when the trigger's scan found no backdoor (its evidence below the "
            "cbpt scanner's inconclusive level, or a clean verdict): on a clean model the "
            "smallest trigger is a natural feature of a class, and pushing it away costs "
            "clean accuracy (docs/method.md)"
        ),
    )
    gated_distill_weight: float = Field(
        3.0,
        ge=0,
        description=(
            "weight of L_distill (at least; see distill_weight) when L_trigger is gated off: "
            "with no backdoor found, the tuning is held to the hand-crafted prompts' "
            "predictions so that it does not cost clean accuracy (docs/method.md)"
        ),
    )
    inversion_method: Literal["scan", "contrastive"] = Field(
        "scan",
        description=(
            "how to invert a trigger when none is given: scan (the cbpt scanner's suspect "
            "trigger) or contrastive (CBPT stage 1, refined towards its dominant class)"
        ),
    )


class CBPTPurifier(Purifier):
    """Class-wise prompt tuning (CBPT stage 2) with a given or freshly inverted trigger."""

    name: ClassVar[str] = "cbpt"
    version: ClassVar[str] = __version__
    description: ClassVar[str] = (
        "class-wise prompt tuning: clean CE + triggered CE to the true class + anchor to the "
        "hand-crafted prompts, with an inverted trigger; the encoders stay frozen"
    )
    Config: ClassVar[type[BaseModel]] = PurifyConfig

    def purify(
        self,
        bundle: ModelBundle,
        shots: ShotSet,
        config: BaseModel,
        context: RunContext,
        trigger: TriggerFile | None = None,
    ) -> PurifyOutcome:
        """Purify ``bundle`` for ``shots.classnames``; inverts a trigger when none is given."""
        assert isinstance(config, PurifyConfig)
        start_images = bundle.image_encoder_images
        statistics: dict[str, Any] = {}
        baseline = PromptClassifier(bundle, shots.classnames)
        judged: dict[str, Any] = {}
        if trigger is None:
            scan_config = ScanConfig(
                budget=config.inversion_budget,
                refine=config.refine,
                # the purifier tunes against its trigger whatever the verdict when ungated
                refine_clean=True,
            )
            inversion_config: BaseModel = scan_config
            if config.inversion_method == "scan":
                # exactly the scan's localisation: the same prompt reading, draws and probes
                found = locate_within_budget(bundle, shots, scan_config, context)
                inverted_through = found.reading.name
                screening, suspected, kept = found.screening, found.suspected, found.kept
                judged = {
                    "verdict": verdict_of(suspected.ratio, scan_config),
                    "evidence": screening.top_evidence,
                    **decision_settings(suspected),
                }
                statistics["inversion_evidence"] = screening.top_evidence
            else:
                inverted_through = "hand-crafted"
                inversion_config = ContrastiveConfig(
                    steps=config.inversion_steps,
                    restarts=config.inversion_restarts,
                    budget=config.inversion_budget,
                    refine=config.refine,
                )
                contrastive, refined, _, _ = run_inversion(bundle, shots, inversion_config, context)
                kept = refined if refined is not None else contrastive
            trigger = TriggerFile(
                trigger=kept.trigger,
                model_sha256=bundle.sha256,
                classnames=list(shots.classnames),
                settings={
                    "inverted_by": f"{self.name} purifier",
                    "prompts": inverted_through,
                    **judged,
                    "seed": context.seed,
                    "options": inversion_config.model_dump(mode="json"),
                },
                producer=f"clipguard_cbpt {self.name} {self.version}",
            )
            statistics["inversion_pl1"] = kept.pl1
        inversion_images = bundle.image_encoder_images - start_images
        distribution = prediction_distribution(
            baseline.predict, shots.pixels, shots.labels, trigger.trigger, shots.classnames
        )
        target = tuning_target(trigger, list(shots.classnames), int(distribution["dominant_index"]))
        config = resolve_reference(config, trigger)
        statistics["reference_prompts"] = config.reference_prompts
        gated = config.gate_on_verdict and says_clean(trigger.settings)
        if gated:
            config = without_trigger_loss(config, config.gated_distill_weight)
        statistics["trigger_verdict"] = trigger.settings.get("verdict")
        statistics["trigger_loss_gated"] = gated
        masks = [] if config.no_trigger_loss else [trigger.trigger]
        extra_start = bundle.image_encoder_images
        if config.extra_triggers and not config.no_trigger_loss:
            with context.stage("extra triggers"):
                masks += extra_triggers(bundle, shots, baseline, target, config, context)
        statistics["extra_trigger_encoder_images"] = bundle.image_encoder_images - extra_start
        if config.random_mask:
            masks = [
                random_mask_like(each, context.generator(7 + i)) for i, each in enumerate(masks)
            ]
        fitted, fitted_statistics = transform_triggers(
            bundle, shots, baseline.class_features, target, trigger, config, context
        )
        statistics.update(fitted_statistics)
        used: list[Trigger] = [*masks, *fitted]
        cache = shot_features(bundle, shots, used, config, context)
        outcome = _tune(bundle, shots, cache, target, config, context, self)
        outcome.statistics.update(statistics)
        outcome.statistics.update(
            {
                "trigger_target": shots.classnames[target],
                "trigger_share": distribution["dominant_share"],
                "trigger_pl1": float(trigger.trigger.mask.mean().item()),
                "extra_trigger_pl1": [float(each.mask.mean().item()) for each in masks[1:]],
                "inversion_encoder_images": inversion_images,
            }
        )
        outcome.trigger = trigger
        outcome.trigger_target = shots.classnames[target]
        return outcome


def transform_triggers(
    bundle: ModelBundle,
    shots: ShotSet,
    class_features: torch.Tensor,
    target: int,
    trigger: TriggerFile,
    config: PurifyConfig,
    context: RunContext,
) -> tuple[list[Trigger], dict[str, Any]]:
    """The fitted transformations the purifier tunes against besides its mask triggers, each
    sending the other classes' shots to ``target`` (:func:`transform_towards`): the warp of
    ``warp_trigger_pixels`` (stage "warp trigger") and the probe trigger
    (:func:`probe_trigger_family`, stage "probe trigger"). None without ``L_trigger`` or for
    the random-mask ablation (a trigger without content gets no fitted one). Returns them
    and their statistics: ``probe_trigger`` (its family's name and bounds, or None) and each
    one's encoder images (``warp_trigger_encoder_images``, ``probe_trigger_encoder_images``)."""
    ablated = config.no_trigger_loss or config.random_mask
    warp = SmoothWarp(WARP_TRIGGER_GRID, config.warp_trigger_pixels)
    wanted = {
        "warp": (
            None if ablated or config.warp_trigger_pixels <= 0 else warp,
            config.warp_trigger_steps,
        ),
        "probe": (
            None if ablated else probe_trigger_family(trigger, config),
            config.probe_trigger_steps,
        ),
    }
    fitted: list[Trigger] = []
    statistics: dict[str, Any] = {}
    for key, (family, steps) in wanted.items():
        start = bundle.image_encoder_images
        if family is not None:
            with context.stage(f"{key} trigger"):
                fitted.append(
                    transform_towards(
                        bundle, shots.pixels, shots.labels, class_features, family, target, steps
                    )
                )
        statistics[f"{key}_trigger_encoder_images"] = bundle.image_encoder_images - start
    probe = wanted["probe"][0]
    statistics["probe_trigger"] = None if probe is None else probe.record()
    return fitted, statistics


def probe_trigger_family(trigger: TriggerFile, config: PurifyConfig) -> ProbeFamily | None:
    """The reach probe family, at the scan's bound, that the purifier also tunes against
    (``probe_trigger``): the one recorded as ``deciding_probe`` in ``trigger``'s settings when
    a probe decided its scan; None when the option is off, the rule decided, or the file
    records no usable probe (written by another version)."""
    recorded = trigger.settings.get("deciding_probe")
    if not config.probe_trigger or not isinstance(recorded, dict):
        return None
    return family_from_settings(str(recorded.get("name")), recorded)


def shot_features(
    bundle: ModelBundle,
    shots: ShotSet,
    triggers: list[Trigger],
    config: TuningConfig,
    context: RunContext,
) -> FeatureCache:
    """The feature cache a purification tunes on (stage "features"): the shots' clean views
    and, per trigger in ``triggers``, their triggered views; the augmentations are drawn from
    ``context.generator(3)``, so every purifier with one seed sees the same views."""
    with context.stage("features"):
        return cache_features(
            bundle,
            shots.pixels,
            shots.labels,
            triggers or None,
            config.augmentations,
            config.crop_scale,
            context.generator(3),
        )


def scanned_through_fitted_prompts(trigger: TriggerFile) -> bool:
    """Whether ``trigger`` comes from a scan that read the model through prompts fitted to
    its shots (the ``cbpt`` scanner's ``fit_prompts``, which judged or was told that the
    hand-crafted prompts read the model badly): its ``prompts`` setting, or for files
    written before that setting, ``fit_prompts=true`` among its options."""
    settings = trigger.settings
    if "prompts" in settings:
        return settings["prompts"] == "fitted"
    options = settings.get("options")
    return isinstance(options, dict) and options.get("fit_prompts") is True


def tuning_target(trigger: TriggerFile, classnames: list[str], dominant: int) -> int:
    """The class the purifier steers the trigger's images away from: ``dominant``, the class
    the hand-crafted prompts send most triggered shots to, unless the trigger comes from a
    scan that read the model through prompts fitted to its shots (``fit_prompts``); the
    hand-crafted prompts of such a model may send the trigger elsewhere, so that scan's
    suspect (``target_class``) is the target."""
    named = trigger.settings.get("target_class")
    if scanned_through_fitted_prompts(trigger) and named in classnames:
        return classnames.index(named)
    return dominant


def resolve_reference(config: TuningConfigT, trigger: TriggerFile) -> TuningConfigT:
    """``config`` with ``reference_prompts="auto"`` decided for ``trigger``: ``"fitted"`` for
    the trigger of a scan through fitted prompts, else ``"handcrafted"`` (a set value stays)."""
    if config.reference_prompts != "auto":
        return config
    fitted = scanned_through_fitted_prompts(trigger)
    return config.model_copy(update={"reference_prompts": "fitted" if fitted else "handcrafted"})


def without_trigger_loss(config: TuningConfigT, distill_weight: float) -> TuningConfigT:
    """``config`` as the gate leaves it: no ``L_trigger``, and ``L_distill`` weighted at least
    ``distill_weight`` (with no backdoor found, keep the hand-crafted predictions)."""
    return config.model_copy(
        update={
            "no_trigger_loss": True,
            "distill_weight": max(config.distill_weight, distill_weight),
        }
    )


def says_clean(settings: dict[str, Any]) -> bool:
    """Whether a trigger file's scan found no backdoor: its recorded evidence (the rule's,
    each reach probe's that ran, and the reference contrast where the scan had a reference)
    judged as the ``cbpt`` scanner judges it, under the current default thresholds of the rule
    the scan used (so files scanned before a recalibration follow the current one), else its
    recorded verdict; False for a trigger with neither."""
    evidence = settings.get("evidence")
    if isinstance(evidence, int | float):
        options = settings.get("options")
        signals = options.get("signals", "joint") if isinstance(options, dict) else "joint"
        rule = ScanConfig(signals=signals if signals in DEFAULT_THRESHOLDS else "joint")
        probe_ratios = {}
        for name in PROBES:
            recorded = settings.get(f"{name}_evidence")
            if isinstance(recorded, int | float):
                probe_ratios[name] = float(recorded) / rule.probe_threshold(name)
        contrast = settings.get("reference_contrast")
        if isinstance(contrast, int | float):
            probe_ratios[REFERENCE] = float(contrast) / rule.reference_threshold
        ratio, _ = deciding_ratio(float(evidence) / rule.threshold, probe_ratios)
        return verdict_of(ratio, rule) == "clean"
    return settings.get("verdict") == "clean"


def extra_triggers(
    bundle: ModelBundle,
    shots: ShotSet,
    classifier: PromptClassifier,
    target: int,
    config: PurifyConfig,
    context: RunContext,
) -> list[MaskPatternTrigger]:
    """``config.extra_triggers`` triggers towards ``target``, each from its own random start.

    Each is a targeted inversion (augmented shots, mask weight schedule) that must send
    ``config.extra_trigger_success`` of a batch to ``target``; the budget is
    ``config.inversion_budget`` split between them. A trigger whose inversion never met the
    share is dropped (it would teach the prompts nothing about the backdoor).
    """
    inversion = InversionConfig(refine_success=config.extra_trigger_success)
    share = config.inversion_budget // max(config.extra_triggers, 1)
    found = []
    for index in range(config.extra_triggers):
        result = invert_targeted(
            bundle,
            shots.pixels,
            shots.labels,
            classifier.class_features,
            target,
            inversion,
            context.generator(20 + index),
            progress=context.progress,
            budget=share,
        )
        if result.reached:
            found.append(result.trigger)
    return found


class CoOpPurifier(Purifier):
    """CoOp with class-specific context (``L_clean`` only): the prompt-tuning baseline."""

    name: ClassVar[str] = "coop"
    version: ClassVar[str] = __version__
    description: ClassVar[str] = (
        "CoOp-CSC prompt tuning on the clean shots only (baseline that ignores the backdoor)"
    )
    Config: ClassVar[type[BaseModel]] = CoOpConfig

    def purify(
        self,
        bundle: ModelBundle,
        shots: ShotSet,
        config: BaseModel,
        context: RunContext,
        trigger: TriggerFile | None = None,
    ) -> PurifyOutcome:
        """Tune class-wise prompts on the clean shots; ``trigger`` is ignored."""
        assert isinstance(config, CoOpConfig)
        config = config.model_copy(update={"no_trigger_loss": True})
        cache = shot_features(bundle, shots, [], config, context)
        return _tune(bundle, shots, cache, None, config, context, self)


def _tune(
    bundle: ModelBundle,
    shots: ShotSet,
    cache: Any,
    target: int | None,
    config: TuningConfig,
    context: RunContext,
    component: Purifier,
) -> PurifyOutcome:
    with context.stage("tuning"):
        calls_before = bundle.image_encoder_calls
        learned, stats = tune_prompts(
            bundle, list(shots.classnames), cache, target, config, context.progress
        )
        assert bundle.image_encoder_calls == calls_before, "tuning ran the image encoder"
    prompts = PromptSet(
        context=learned,
        classnames=list(shots.classnames),
        model_sha256=bundle.sha256,
        architecture=bundle.arch,
        plugin=component.name,
        plugin_version=component.version,
        settings={"options": config.model_dump(mode="json"), "seed": context.seed},
    )
    stats["feature_encoder_images"] = cache.encoder_images
    stats["tuning_image_encoder_calls"] = 0
    return PurifyOutcome(
        classifier=PromptClassifier(bundle, shots.classnames, prompts),
        prompts=prompts,
        statistics=stats,
    )
