"""The plugin registers its components, and the scanner runs end to end on tiny models."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from clipguard.components import RunContext, ShotSet
from clipguard.model import ModelBundle, build_clip_from_name
from clipguard.plugins import get_registry
from clipguard_cbpt.config import DEFAULT_THRESHOLDS, ScanConfig
from clipguard_cbpt.evidence import (
    Screening,
    class_evidence,
    class_isolation,
    corroborate,
    judge_classes,
    suspicion,
)
from clipguard_cbpt.explain import decide
from clipguard_cbpt.probe_families import AdditivePerturbation, SmoothWarp
from clipguard_cbpt.probes import FIXED_BOUND, ProbeReach
from clipguard_cbpt.scanner import CBPTScanner
from clipguard_cbpt.signals import low_side_indices


def test_plugin_registers_scanner_and_purifiers() -> None:
    registry = get_registry()
    assert registry.scanner("cbpt").name == "cbpt"
    assert "cbpt" in registry.purifiers and "coop" in registry.purifiers


def _screening(
    size_index: list[float], alignment_index: list[float], signals: str = "joint"
) -> Screening:
    """A screening as :func:`screen` judges these indices under the default thresholds."""
    n = len(size_index)
    config = ScanConfig(signals=signals)  # type: ignore[arg-type]
    evidence, suspect = judge_classes(size_index, alignment_index, [0.01] * n, config)
    return Screening(
        [],
        torch.zeros(n, 4),
        [0.01] * n,
        size_index,
        [0.8] * n,
        alignment_index,
        evidence,
        suspect,
    )


ADDITIVE = AdditivePerturbation(0.02)
WARP = SmoothWarp(8, 2.0)


def _decide(
    screening: Screening,
    names: list[str],
    config: ScanConfig,
    *probes: ProbeReach,
) -> tuple[str, float, str]:
    found = {probe.probe: probe for probe in probes}
    return decide(screening, suspicion(screening, found, config), names, config)


def test_decide_needs_both_signals_on_one_class() -> None:
    config = ScanConfig()
    names = ["a", "b", "c"]
    both = config.evidence_threshold * 1.1
    verdict, score, explanation = _decide(_screening([both, 0, 0], [both, 0, 0]), names, config)
    assert verdict == "backdoor" and score > 0.5 and "'a'" in explanation
    exact = _screening([config.evidence_threshold] * 3, [0, config.evidence_threshold, 0])
    assert _decide(exact, names, config)[:2] == ("backdoor", pytest.approx(0.5))
    # natural triggers on two classes and a drifted prompt on a third: no backdoor
    split = _screening([10.0, 9.0, 0], [0, 0, 10.0])
    assert _decide(split, names, config)[0] == "clean"
    weak = config.evidence_threshold * 0.8
    assert _decide(_screening([weak, 0, 0], [weak, 0, 0]), names, config)[0] == "inconclusive"
    verdict, score, _ = _decide(_screening([0.1, 0.2, 0], [0.3, 0, 0]), names, config)
    assert verdict == "clean" and 0 <= score < 0.5


def test_the_size_rule_judges_the_trigger_size_alone() -> None:
    config = ScanConfig(signals="size")
    assert config.evidence_threshold == DEFAULT_THRESHOLDS["size"]
    assert ScanConfig(signals="size", evidence_threshold=9.0).evidence_threshold == 9.0
    names = ["a", "b", "c"]
    high = config.threshold * 1.1
    # small triggers on two classes, no drifted prompt: backdoor under "size", clean under
    # "joint" (the smallest is not isolated)
    two = [high, high * 0.8, 0]
    verdict, _, explanation = _decide(_screening(two, [0, 0, 0], "size"), names, config)
    assert verdict == "backdoor" and "'a'" in explanation and "not used" in explanation
    assert _decide(_screening(two, [0, 0, 0]), names, ScanConfig())[0] == "clean"


def test_an_isolated_trigger_size_is_evidence_on_its_own_under_the_joint_rule() -> None:
    """One class far easier to reach than every other (a planted patch) is a backdoor under
    ``joint`` without a drifted prompt, its isolation counting in evidence units (the
    isolation threshold counts as the evidence threshold); a runner-up close behind (natural
    triggers on several classes) takes that away; ``isolation_threshold = 0`` turns it off."""
    assert class_isolation([5.0, 2.0, 0.0]) == pytest.approx([3.0, 0.0, 0.0])
    assert class_isolation([2.0, 2.0]) == [0.0, 0.0]
    assert class_isolation([1.5]) == [1.5]
    config = ScanConfig()
    names = ["a", "b", "c"]
    gap = config.isolation_threshold * 1.2
    isolated = _screening([gap + 0.5, 0.5, 0.0], [0, 0, 0])
    verdict, score, explanation = _decide(isolated, names, config)
    assert verdict == "backdoor" and score == pytest.approx(1.2 / 2.2)
    assert "'a'" in explanation and "above every other class's" in explanation
    crowded = _screening([gap + 0.5, gap, 0.0], [0, 0, 0])
    assert _decide(crowded, names, config)[0] == "clean"
    evidence, _ = judge_classes(
        [gap + 0.5, 0.5, 0.0],
        [0, 0, 0],
        [0.01] * 3,
        ScanConfig(isolation_threshold=0),
    )
    assert evidence == [0.0, 0.0, 0.0]
    # a corroborated class keeps the geometric mean where it is larger
    assert class_evidence(4.0, 9.0, "joint", isolation=1.0) == pytest.approx(6.0)
    assert class_evidence(4.0, 0.0, "joint", isolation=1.0) == pytest.approx(1.0)
    assert class_evidence(4.0, 0.0, "size", isolation=9.0) == pytest.approx(4.0)


def test_the_additive_probe_corroborates_the_size_index_under_the_joint_rule() -> None:
    """A small trigger whose class's prompt is not drifted, but which a small full-image
    change reaches beyond the median class (a label-consistent patch backdoor): the additive
    evidence in index units stands in for the alignment index under ``joint``; the size rule,
    and ``additive_corroboration = 0``, leave the screening as it was."""
    config = ScanConfig()
    names = ["a", "b", "c", "d"]
    small_trigger = _screening([3.0, 2.0, 0, 0], [0, 0.2, 0, 0])  # not isolated
    assert _decide(small_trigger, names, config)[0] == "clean"
    reach = ProbeReach(ADDITIVE, [0.3, 0.1, 0.1, 0.1], steps=30)  # evidence 0.2 for "a"
    corroborated = corroborate(small_trigger, reach, config)
    units = config.additive_corroboration * 0.2
    assert corroborated.corroboration == pytest.approx([units, 0, 0, 0])
    assert corroborated.suspect == 0
    assert corroborated.top_evidence == pytest.approx((3.0 * units) ** 0.5)
    assert config.additive_threshold > 0.2  # the probe alone would not flag it
    verdict, _, explanation = _decide(corroborated, names, config, reach)
    assert verdict == "backdoor" and "'a'" in explanation and "additive probe" in explanation
    # an alignment index above the additive units keeps counting
    aligned = corroborate(_screening([3.0, 0, 0, 0], [9.0, 0, 0, 0]), reach, config)
    assert aligned.top_evidence == pytest.approx((3.0 * 9.0) ** 0.5)
    assert corroborate(small_trigger, reach, ScanConfig(additive_corroboration=0)) is small_trigger
    size_rule = ScanConfig(signals="size")
    assert corroborate(small_trigger, reach, size_rule) is small_trigger
    assert corroborate(small_trigger, None, config) is small_trigger
    # the default scale makes additive evidence at its threshold count as the joint threshold
    assert config.additive_corroboration * config.additive_threshold == pytest.approx(
        config.threshold
    )


def test_a_reach_probe_decides_only_above_its_own_threshold() -> None:
    """A class that a small additive perturbation reaches far beyond the median class makes
    the verdict backdoor and names that class; below its threshold the probe stays out of
    the verdict (never merely inconclusive); a stronger rule signal keeps its own class."""
    config = ScanConfig(signals="size")
    names = ["a", "b", "c", "d"]
    quiet = _screening([0.2, 0.1, 0.0, 0.0], [0, 0, 0, 0], "size")
    far = ProbeReach(ADDITIVE, [0.1, 0.12, 0.55, 0.1], steps=30)
    assert far.evidence() == pytest.approx([0.0, 0.01, 0.44, 0.0])  # median 0.11
    verdict, score, explanation = _decide(quiet, names, config, far)
    ratio = 0.44 / config.additive_threshold
    assert verdict == "backdoor" and score == pytest.approx(ratio / (1 + ratio))
    assert "'c'" in explanation and "full-image" in explanation
    near = ProbeReach(ADDITIVE, [0.1, 0.12, 0.11 + 0.9 * config.additive_threshold, 0.1], 30)
    assert _decide(quiet, names, config, near)[0] == "clean"
    strong = _screening([0.0, config.threshold * 3, 0.0, 0.0], [0, 0, 0, 0], "size")
    chosen = suspicion(strong, {"additive": far}, config)
    assert (chosen.suspect, chosen.decided_by) == (1, "rule")
    skipped = ProbeReach(ADDITIVE, [0.9, 0.0, 0.0, 0.0], steps=0, skipped="budget too small")
    assert skipped.evidence() == [0.0] * 4
    assert _decide(quiet, names, config, skipped)[0] == "clean"


def test_the_strongest_probe_names_the_class() -> None:
    """With both probes above their thresholds, the larger ratio decides and names its class;
    a warp verdict says so."""
    config = ScanConfig(signals="size")
    names = ["a", "b", "c", "d"]
    quiet = _screening([0.2, 0.1, 0.0, 0.0], [0, 0, 0, 0], "size")
    additive = ProbeReach(ADDITIVE, [0.1, 0.1, 0.4, 0.1], steps=30)  # evidence 0.3
    warp = ProbeReach(WARP, [0.8, 0.1, 0.1, 0.1], steps=20)  # evidence 0.7
    chosen = suspicion(quiet, {"additive": additive, "warp": warp}, config)
    assert (chosen.suspect, chosen.decided_by) == (0, "warp")
    assert chosen.ratio == pytest.approx(0.7 / config.warp_threshold)
    assert chosen.top_probe_evidence() == pytest.approx({"additive": 0.3, "warp": 0.7})
    verdict, _, explanation = _decide(quiet, names, config, additive, warp)
    assert verdict == "backdoor" and "'a'" in explanation and "warp" in explanation
    assert [spec.family.name for spec in config.probes()] == ["additive", "warp"]
    assert ScanConfig(warp_pixels=0, additive_epsilon=0).probes() == []


def test_only_the_additive_probe_adapts_its_bound() -> None:
    """The additive probe carries the band its bound is adapted to; the warp probe keeps its
    bound; a band whose low end is not below its high end is refused."""
    additive, warp = ScanConfig().probes()
    assert additive.band.refits > 0 and warp.band == FIXED_BOUND
    assert additive.band.refits == ScanConfig().additive_refits
    assert additive.band.low < additive.band.high
    with pytest.raises(ValueError, match="additive_median_low"):
        ScanConfig(additive_median_low=0.4, additive_median_high=0.3)


def test_low_side_indices_are_scale_free_and_one_sided() -> None:
    sizes = [0.004, 0.03, 0.035, 0.04, 0.032, 0.038]
    indices = low_side_indices(sizes, log=True)
    assert max(range(6), key=lambda k: indices[k]) == 0 and indices[0] > 3
    assert low_side_indices([10 * v for v in sizes], log=True) == pytest.approx(indices)
    assert low_side_indices([0.5, 0.5, 0.9])[2] == 0.0  # above the median: no evidence
    assert low_side_indices([0.1, 0.1, 0.1]) == [0.0, 0.0, 0.0]


TINY_SCAN = {
    "refine_batch_size": 4,
    "inversion_window": 2,
    "refine_steps": 4,
    "class_steps": 4,
}


def test_scan_outcome_and_artifacts(bundle, shots) -> None:
    outcome = CBPTScanner().scan(
        bundle, shots, ScanConfig(**TINY_SCAN, budget=500), RunContext(seed=0)
    )
    assert outcome.verdict in ("backdoor", "clean", "inconclusive")
    assert 0 <= outcome.score <= 1
    stats = outcome.statistics
    assert stats["image_encoder_images"] <= 500 + 4 * len(shots.labels)
    for key in (
        "pl1",
        "collapse_score",
        "dominant_class",
        "dominant_share",
        "thresholds",
        "suspect_class",
        "class_distribution",
        "class_pl1",
        "class_alignment",
        "class_size_index",
        "class_alignment_index",
        "image_encoder_images",
    ):
        assert key in stats
    assert set(outcome.artifacts) == {"trigger.safetensors", "trigger.png"}
    picture = Image.open(io.BytesIO(outcome.artifacts["trigger.png"]))
    assert picture.width >= 3 * 128
    assert outcome.trigger is not None and outcome.trigger.model_sha256 == bundle.sha256


def test_a_scan_reports_both_reach_probes(bundle, shots) -> None:
    """Both probes run within the budget and are reported per class, with their settings, in
    the report and (their top evidence) in the trigger file the purifier's gate reads."""
    config = ScanConfig(**TINY_SCAN, budget=2_000, additive_steps=3, warp_steps=3)
    context = RunContext(seed=0)
    outcome = CBPTScanner().scan(bundle, shots, config, context)
    stats = outcome.statistics
    for probe in ("additive", "warp"):
        assert set(stats[f"class_{probe}_reach"]) == set(shots.classnames)
        assert set(stats[f"class_{probe}_evidence"]) == set(shots.classnames)
        assert stats[probe]["steps"] == 3 and stats[probe]["skipped"] is None
        assert f"{probe} reach" in context.stage_seconds
        assert outcome.trigger is not None
        assert isinstance(outcome.trigger.settings[f"{probe}_evidence"], float)
    assert stats["warp"]["max_pixels"] == config.warp_pixels
    # the additive probe records each bound it tried and the median reach there
    tried = stats["additive"]["tried"]
    assert 1 <= len(tried) <= 1 + config.additive_refits
    assert tried[0]["epsilon"] == config.additive_epsilon
    assert stats["additive"]["epsilon"] in [t["epsilon"] for t in tried]
    assert [t["max_pixels"] for t in stats["warp"]["tried"]] == [config.warp_pixels]
    assert stats["decided_by"] in ("rule", "additive", "warp")
    off = CBPTScanner().scan(
        bundle, shots, ScanConfig(**TINY_SCAN, budget=2_000, warp_pixels=0), RunContext(seed=0)
    )
    assert off.statistics["warp"] is None and off.statistics["class_warp_reach"] is None
    assert off.trigger is not None and off.trigger.settings["warp_evidence"] is None


def test_scan_writes_a_loadable_trigger_file(bundle, shots, tmp_path) -> None:
    from clipguard.triggers import load_trigger_file

    outcome = CBPTScanner().scan(
        bundle, shots, ScanConfig(**TINY_SCAN, budget=300), RunContext(seed=1)
    )
    path = tmp_path / "trigger.safetensors"
    path.write_bytes(outcome.artifacts["trigger.safetensors"])
    loaded = load_trigger_file(path)
    loaded.check_fits(bundle.sha256, shots.classnames, bundle.image_size)
    assert torch.allclose(loaded.trigger.mask, outcome.trigger.trigger.mask)
    assert loaded.settings["options"]["budget"] == 300


@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50"])
def test_scan_runs_on_real_architectures(arch: str) -> None:
    torch.manual_seed(0)
    model, cfg = build_clip_from_name(arch)
    bundle = ModelBundle.from_model(model, cfg, arch=arch)
    size = bundle.image_size
    generator = torch.Generator().manual_seed(0)
    shots = ShotSet(
        torch.rand(2, 3, size, size, generator=generator), torch.tensor([0, 1]), ["cat", "dog"]
    )
    config = ScanConfig(
        refine_batch_size=2,
        inversion_window=1,
        refine_augment=False,
        refine_steps=1,
        class_steps=1,
        class_batch_size=2,
        budget=8,
    )
    outcome = CBPTScanner().scan(bundle, shots, config, RunContext(seed=0))
    assert outcome.verdict in ("backdoor", "clean", "inconclusive")
    assert outcome.trigger.trigger.mask.shape == (1, size, size)
    # 8 images of budget plus the measurement passes over the 2 shots
    assert outcome.statistics["image_encoder_images"] <= 8 + 6 * 2


def test_anomaly_index_flags_the_small_outlier_and_guards_mad_zero() -> None:
    from clipguard_cbpt.nc import anomaly_indices

    indices = anomaly_indices([0.004, 0.03, 0.035, 0.04, 0.032, 0.038])
    assert indices[0] > 2 and max(indices[1:]) < 2
    assert anomaly_indices([0.1, 0.1, 0.1]) == [0.0, 0.0, 0.0]


def test_nc_scanner_runs_and_is_registered(bundle, shots) -> None:
    from clipguard_cbpt.nc import NCScanConfig, NCScanner

    assert get_registry().scanner("cbpt-nc").name == "cbpt-nc"
    config = NCScanConfig(class_batch_size=4, inversion_window=1, budget=60)
    outcome = NCScanner().scan(bundle, shots, config, RunContext(seed=0))
    assert outcome.verdict in ("backdoor", "clean", "inconclusive")
    assert set(outcome.statistics["class_pl1"]) == set(shots.classnames)
    assert set(outcome.artifacts) == {"trigger.safetensors", "trigger.png"}


def test_text_alignment_is_the_mean_cosine_of_each_class_with_its_prompt() -> None:
    from clipguard_cbpt.signals import text_alignment

    prompts = torch.eye(3)
    features = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0, 1.0, 0], [0, 0.8, 0.6]])
    labels = torch.tensor([0, 0, 1, 1])
    # class 2 has no shot: 0
    assert text_alignment(features, labels, prompts) == pytest.approx([0.8, 0.9, 0.0])


#: a tiny scan with the reach probes off, so the rule's threshold alone sets the verdict
RULE_ONLY = {**TINY_SCAN, "additive_epsilon": 0, "warp_pixels": 0}


def test_a_clean_verdict_writes_the_per_class_trigger_unrefined(bundle, shots) -> None:
    """A clean scan's trigger is a natural one nothing uses, so it is not refined (it
    costs about 10 s of a CIFAR-10 lab scan); ``refine_clean`` refines it anyway."""
    clean = ScanConfig(**RULE_ONLY, evidence_threshold=1e9, isolation_threshold=0)
    plain = CBPTScanner().scan(bundle, shots, clean, RunContext(seed=0))
    assert plain.verdict == "clean" and plain.statistics["refined"] is None
    stats = plain.statistics
    assert stats["pl1"] == pytest.approx(stats["class_pl1"][stats["suspect_class"]])
    refining = clean.model_copy(update={"refine_clean": True})
    refined = CBPTScanner().scan(bundle, shots, refining, RunContext(seed=0))
    assert refined.statistics["refined"] is not None
    # the same screening either way: only the written trigger differs
    assert refined.statistics["class_evidence"] == stats["class_evidence"]
    assert refined.statistics["image_encoder_images"] > stats["image_encoder_images"]


def test_the_purifiers_own_inversion_refines_whatever_the_verdict(bundle, shots, monkeypatch):
    import clipguard_cbpt.budget as budget_module
    import clipguard_cbpt.purifier as purifier_module

    seen: list[ScanConfig] = []
    real = budget_module.locate_trigger

    def spy(bundle, shots, config, context, classifier, *rest):  # type: ignore[no-untyped-def]
        seen.append(config)
        return real(bundle, shots, config, context, classifier, *rest)

    monkeypatch.setattr(budget_module, "locate_trigger", spy)
    config = purifier_module.PurifyConfig(steps=2, augmentations=1, inversion_budget=400)
    purifier_module.CBPTPurifier().purify(bundle, shots, config, RunContext(seed=0))
    assert [c.refine_clean for c in seen] == [True]
