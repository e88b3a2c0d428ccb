"""Every option the cbpt scanners list changes what they do.

One case per option of ``ScanConfig`` and ``NCScanConfig``: the smallest unit that reads the
option, run with the option at its default and at another value, must give another result.
A test fails when an option has no case, so an option that does nothing cannot be added.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from clipguard.components import RunContext, ShotSet
from clipguard.model import ModelBundle, save_model
from clipguard.prompts import PromptClassifier
from clipguard.triggers import MaskPatternTrigger
from clipguard_cbpt.budget import budget_in_force
from clipguard_cbpt.config import ClassInversionOptions, ScanConfig
from clipguard_cbpt.evidence import (
    Screening,
    corroborate,
    judge_classes,
    probe_ratios,
    suspicion,
    verdict_of,
)
from clipguard_cbpt.inversion import invert_per_class, invert_targeted
from clipguard_cbpt.nc import NCScanConfig, anomaly_verdict
from clipguard_cbpt.probe_families import AdditivePerturbation, SmoothWarp
from clipguard_cbpt.probes import ProbeReach, probe_held_out, run_probe
from clipguard_cbpt.prompt_fit import scan_classifier
from clipguard_cbpt.reference import ReferenceContrast, measure_reference
from clipguard_cbpt.screening import locate_trigger
from tests.cbpt.conftest import TINY

Unit = Callable[[ModelBundle, ShotSet, Any], Any]

#: the ``reference`` option's other value: a file the ``referenced`` unit writes the bundle
#: to (relative: each case runs in its own temporary folder)
REFERENCE_FILE = "reference.safetensors"


def per_class(bundle: ModelBundle, shots: ShotSet, config: ClassInversionOptions) -> Any:
    """Every class's per-class inversion: mask size, steps, success, weight schedule."""
    features = PromptClassifier(bundle, shots.classnames).class_features
    results = invert_per_class(
        bundle, shots.pixels, shots.labels, features, config.inversion(), _generator()
    )
    return [(r.pl1, r.steps, r.reached, r.lambda_history) for r in results]


def refinement(bundle: ModelBundle, shots: ShotSet, config: ScanConfig) -> Any:
    """The refinement of a fixed trigger towards class 1."""
    features = PromptClassifier(bundle, shots.classnames).class_features
    start = MaskPatternTrigger(torch.full((1, 16, 16), 0.3), torch.full((3, 16, 16), 0.5))
    result = invert_targeted(
        bundle,
        shots.pixels,
        shots.labels,
        features,
        1,
        config.inversion(),
        _generator(),
        start=start,
        budget=config.budget,
    )
    return (result.pl1, result.steps, result.reached, result.lambda_history)


def located(bundle: ModelBundle, shots: ShotSet, config: ScanConfig) -> Any:
    """A scan's screening, probes and refinement on one draw: what it kept and cost."""
    start = bundle.image_encoder_images
    classifier = PromptClassifier(bundle, shots.classnames)
    _, _, kept, refined = locate_trigger(bundle, shots, config, RunContext(seed=0), classifier)
    return (kept.pl1, refined is None, bundle.image_encoder_images - start)


def budget_of(bundle: ModelBundle, _shots: ShotSet, config: ScanConfig) -> Any:
    """The budget a scan of ``bundle`` has in force, and where it comes from."""
    return budget_in_force(config, RunContext(seed=0), bundle)


def judged(_bundle: ModelBundle, _shots: ShotSet, config: ScanConfig) -> Any:
    """Fixed per-class indices and additive reach judged under the rule: evidence, ratio."""
    size_index, alignment_index, sizes = [2.5, 0.3, 0.2, 0.1], [1.0, 0, 0, 0], [0.01] * 4
    evidence, suspect = judge_classes(size_index, alignment_index, sizes, config)
    screening = Screening(
        [], torch.zeros(4, 2), sizes, size_index, [0.8] * 4, alignment_index, evidence, suspect
    )
    additive = ProbeReach(AdditivePerturbation(0.02), [0.2, 0.1, 0.1, 0.1], steps=1)
    corroborated = corroborate(screening, additive, config)
    return (corroborated.evidence, suspicion(corroborated, {}, config).ratio)


def verdict(_bundle: ModelBundle, _shots: ShotSet, config: ScanConfig) -> Any:
    """The verdict at 0.8 of the evidence threshold."""
    return verdict_of(0.8, config)


def ratios(_bundle: ModelBundle, _shots: ShotSet, config: ScanConfig) -> Any:
    """Both reach probes' ratios of evidence to threshold for fixed reaches."""
    probes = {
        "additive": ProbeReach(AdditivePerturbation(0.02), [0.5, 0.1, 0.1], steps=1),
        "warp": ProbeReach(SmoothWarp(8, 2.0), [0.1, 0.6, 0.1], steps=1),
    }
    return probe_ratios(probes, config)


def decisive(_bundle: ModelBundle, _shots: ShotSet, config: ScanConfig) -> Any:
    """Whether a first draw with evidence at the threshold decides alone."""
    return config.decisive(config.threshold)


def held_out(_bundle: ModelBundle, shots: ShotSet, config: ScanConfig) -> Any:
    """How many held-out images per class the reach probes ask for (of 3 classes)."""
    asked: list[int] = []

    def offer(n: int) -> ShotSet:
        asked.append(n)
        return shots

    probe_held_out(RunContext(held_out_shots=offer), config, 3)
    return asked


def probes(bundle: ModelBundle, shots: ShotSet, config: ScanConfig) -> Any:
    """Every reach probe switched on, fitted on the shots: settings, steps, reach, fits."""
    features = PromptClassifier(bundle, shots.classnames).class_features
    found = []
    for spec in config.probes():
        reach = run_probe(
            bundle,
            shots.pixels,
            shots.labels,
            features,
            spec,
            config.probe_shots,
            budget=100_000,
        )
        tried = [(family.settings(), median) for family, median in reach.tried]
        found.append((reach.family.settings(), reach.steps, reach.reach, reach.measured, tried))
    return found


def prompts(bundle: ModelBundle, shots: ShotSet, config: ScanConfig) -> Any:
    """Which prompts a scan reads through, its held-out images being its own shots."""
    context = RunContext(seed=0, held_out_shots=lambda _: shots)
    return scan_classifier(bundle, shots, config, context).name


def prompt_fitting(bundle: ModelBundle, shots: ShotSet, config: ScanConfig) -> Any:
    """The text-encoder steps of the prompt check's fitting and what they cost."""
    reading = scan_classifier(bundle, shots, config, RunContext(seed=0))
    return (reading.steps, reading.budget_images)


def contrast_ratio(_bundle: ModelBundle, _shots: ShotSet, config: ScanConfig) -> Any:
    """The deciding ratio of a scan whose reference contrast is 0.3 on class 1."""
    screening = Screening(
        [], torch.zeros(3, 2), [0.1] * 3, [0.0] * 3, [0.8] * 3, [0.0] * 3, [0.0] * 3, 0
    )
    contrast = ReferenceContrast("0" * 64, [0.02], [[0.2, 0.5, 0.2]], [[0.2, 0.2, 0.2]], 0)
    return suspicion(screening, {}, config, contrast).ratio


def referenced(bundle: ModelBundle, shots: ShotSet, config: ScanConfig) -> Any:
    """The reference contrast a scan measures (None without a reference): its reach."""
    if config.reference is not None:
        save_model(config.reference, bundle.model, TINY)
    contrast = measure_reference(bundle, shots, config, RunContext(seed=0))
    return None if contrast is None else (contrast.suspect_reach, contrast.reference_reach)


def nc_verdict(_bundle: ModelBundle, _shots: ShotSet, config: NCScanConfig) -> Any:
    """The cbpt-nc verdict and score of a suspect of anomaly index 3.5."""
    return anomaly_verdict(3.5, config)


#: a per-class inversion whose schedules rise and fall within a few steps
PER_CLASS = {"class_steps": 24, "class_batch_size": 2, "class_success": 0.5, "inversion_window": 2}
#: a refinement long enough to adapt its weight and to stop early
REFINING = {
    "refine_steps": 40,
    "refine_batch_size": 4,
    "refine_success": 0.3,
    "inversion_window": 2,
}
#: a cheap scan on one draw, its trigger refined
LOCATING = {
    "class_steps": 4,
    "class_batch_size": 2,
    "additive_epsilon": 0,
    "warp_pixels": 0,
    "refine_steps": 4,
    "refine_batch_size": 4,
    "refine_clean": True,
    "budget": 2_000,
}
#: the same scan with a clean verdict, its trigger unrefined
CLEAN_VERDICT = {
    **LOCATING,
    "refine_clean": False,
    "evidence_threshold": 1e9,
    "isolation_threshold": 0,
}
#: cheap probes on the shots
PROBING = {"additive_steps": 2, "warp_steps": 2}

#: option -> (the unit that reads it, the base options, the other value)
SCAN_CASES: dict[str, tuple[Unit, dict[str, Any], Any]] = {
    "budget": (located, LOCATING, 30),
    "compute_budget": (budget_of, {}, 1e-6),
    "class_steps": (per_class, PER_CLASS, 6),
    "class_batch_size": (per_class, PER_CLASS, 3),
    "class_success": (per_class, PER_CLASS, 0.9),
    "class_patience": (per_class, PER_CLASS, 1),
    "class_mask_init": (per_class, PER_CLASS, 0.2),
    "inversion_lr": (per_class, PER_CLASS, 0.3),
    "inversion_lambda_init": (per_class, PER_CLASS, 5.0),
    "inversion_lambda_up": (per_class, PER_CLASS, 3.0),
    "inversion_lambda_down": (per_class, {**PER_CLASS, "inversion_lambda_init": 50.0}, 9.0),
    "inversion_window": (per_class, PER_CLASS, 3),
    "refine": (located, LOCATING, False),
    "refine_clean": (located, CLEAN_VERDICT, True),
    "refine_steps": (refinement, REFINING, 5),
    "refine_success": (refinement, REFINING, 0.99),
    "refine_batch_size": (refinement, REFINING, 3),
    "refine_augment": (refinement, REFINING, False),
    "refine_crop_scale": (refinement, REFINING, 0.3),
    "refine_patience": (refinement, REFINING, 1),
    "fit_prompts": (prompts, {"fit_prompts": "auto"}, False),
    "fit_prompts_gain": (prompts, {}, 1.0),
    "prompt_steps": (prompt_fitting, {"fit_prompts": True, "prompt_steps": 3}, 2),
    "screen_again": (decisive, {}, (0.0, 0.0)),
    "signals": (judged, {}, "size"),
    "evidence_threshold": (judged, {}, 3.0),
    "inconclusive_fraction": (verdict, {}, 0.9),
    "isolation_threshold": (judged, {}, 0.0),
    "additive_corroboration": (judged, {}, 100.0),
    "probe_shots": (probes, PROBING, 1),
    "probe_held_out": (held_out, {}, 10),
    "probe_held_out_max": (held_out, {}, 20),
    "additive_epsilon": (probes, PROBING, 0.0),
    "additive_steps": (probes, PROBING, 3),
    "additive_refits": (probes, PROBING, 0),
    "additive_median_low": (probes, PROBING, 0.0),
    "additive_median_high": (probes, {**PROBING, "additive_epsilon": 0.5}, 0.99),
    "additive_threshold": (ratios, {}, 0.5),
    "warp_pixels": (probes, PROBING, 0.0),
    "warp_grid": (probes, PROBING, 4),
    "warp_steps": (probes, PROBING, 3),
    "warp_threshold": (ratios, {}, 0.9),
    "reference": (referenced, PROBING, REFERENCE_FILE),
    "reference_threshold": (contrast_ratio, {}, 0.25),
}

NC_CASES: dict[str, tuple[Unit, dict[str, Any], Any]] = {
    "budget": (per_class, PER_CLASS, 20),
    **{name: case for name, case in SCAN_CASES.items() if case[0] is per_class},
    "anomaly_threshold": (nc_verdict, {}, 3.2),
    "inconclusive_threshold": (nc_verdict, {}, 3.9),
}

CASES = [
    pytest.param(config, name, case, id=f"{config.__name__}.{name}")
    for config, cases in ((ScanConfig, SCAN_CASES), (NCScanConfig, NC_CASES))
    for name, case in cases.items()
]


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize(("config", "cases"), [(ScanConfig, SCAN_CASES), (NCScanConfig, NC_CASES)])
def test_every_option_has_a_case(config: type[Any], cases: dict[str, Any]) -> None:
    assert sorted(cases) == sorted(config.model_fields), "an option without a case, or a stale one"


@pytest.mark.parametrize(("config", "name", "case"), CASES)
def test_an_option_changes_what_its_unit_does(
    bundle: ModelBundle,
    shots: ShotSet,
    config: type[Any],
    name: str,
    case: tuple[Any, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # where a unit writes files (REFERENCE_FILE)
    unit, base, other = case
    baseline = config(**base)
    assert getattr(baseline, name) != other, "the other value is the baseline's"
    changed = config(**{**base, name: other})
    assert unit(bundle, shots, baseline) != unit(bundle, shots, changed)
