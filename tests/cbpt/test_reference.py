"""The reference contrast: how much further the additive probe reaches each class on the
suspect than on a trusted reference model, and how it joins the verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from clipguard import api
from clipguard.components import RunContext, ShotSet
from clipguard.errors import InputError
from clipguard.model import ModelBundle, build_clip_from_config
from clipguard_cbpt.budget import scan_plan
from clipguard_cbpt.config import ScanConfig
from clipguard_cbpt.evidence import REFERENCE, Screening, suspicion
from clipguard_cbpt.explain import decide
from clipguard_cbpt.probe_families import AdditivePerturbation
from clipguard_cbpt.probes import MedianBand
from clipguard_cbpt.reference import CONTRAST_FACTORS, ReferenceContrast, reach_contrast
from tests.cbpt.conftest import CLASSES, TINY
from tests.cbpt.test_api import SMALL_SCAN
from tests.core.cli_helpers import assert_one_line_error, run_cli


def _contrast(bundle: ModelBundle, reference: ModelBundle, shots: ShotSet) -> ReferenceContrast:
    return reach_contrast(
        bundle,
        reference,
        shots.pixels,
        shots.labels,
        list(shots.classnames),
        AdditivePerturbation(0.05),
        steps=2,
        band=MedianBand(0.0, 1.0, refits=1),
        max_images=8,
    )


def _screening(n: int) -> Screening:
    """A screening with no rule evidence on any of ``n`` classes."""
    return Screening(
        [], torch.zeros(n, 2), [0.1] * n, [0.0] * n, [0.8] * n, [0.0] * n, [0.0] * n, 0
    )


def test_a_model_has_no_contrast_with_itself(bundle: ModelBundle, shots: ShotSet) -> None:
    contrast = _contrast(bundle, bundle, shots)
    assert contrast.bounds == [0.05 * f for f in CONTRAST_FACTORS]
    assert contrast.per_class() == [0.0] * len(CLASSES)
    assert contrast.top()[0] == 0.0
    assert contrast.reference_sha256 == bundle.sha256
    assert contrast.images > 0


def test_the_contrast_is_the_suspects_reach_less_the_references(
    bundle: ModelBundle, shots: ShotSet
) -> None:
    torch.manual_seed(1)
    other = ModelBundle.from_model(build_clip_from_config(TINY), TINY)
    contrast = _contrast(bundle, other, shots)
    for s, r, bound in zip(
        contrast.suspect_reach, contrast.reference_reach, contrast.bounds, strict=True
    ):
        assert len(s) == len(r) == len(CLASSES)
        assert bound > 0
    value, k, bound = contrast.top()
    i = contrast.bounds.index(bound)
    assert value == contrast.suspect_reach[i][k] - contrast.reference_reach[i][k]
    assert contrast == _contrast(bundle, other, shots), "deterministic"


def test_a_reference_of_another_input_size_is_refused(bundle: ModelBundle, shots: ShotSet) -> None:
    config = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "image_size": 32}}
    other = ModelBundle.from_model(build_clip_from_config(config), config)
    with pytest.raises(InputError, match="same task and input size"):
        _contrast(bundle, other, shots)


reaches = st.lists(
    st.lists(st.floats(0, 1), min_size=3, max_size=3), min_size=len(CONTRAST_FACTORS),
    max_size=len(CONTRAST_FACTORS),
)  # fmt: skip


@given(reaches, reaches)
def test_the_top_contrast_is_the_largest_class_contrast(
    suspect: list[list[float]], reference: list[list[float]]
) -> None:
    contrast = ReferenceContrast("0" * 64, [0.02, 0.04, 0.08], suspect, reference, 0)
    value, k, bound = contrast.top()
    assert value == max(contrast.per_class()) == contrast.per_class()[k]
    i = contrast.bounds.index(bound)
    assert value == suspect[i][k] - reference[i][k]


def test_the_contrast_decides_from_its_threshold() -> None:
    names = list(CLASSES)
    config = ScanConfig()
    above = ReferenceContrast("0" * 64, [0.02], [[0.2, 0.5, 0.2]], [[0.2, 0.2, 0.2]], 0)
    suspected = suspicion(_screening(3), {}, config, above)
    assert (suspected.decided_by, suspected.suspect) == (REFERENCE, 1)
    verdict, score, explanation = decide(_screening(3), suspected, names, config)
    assert verdict == "backdoor" and score > 0.5
    assert "reference" in explanation and names[1] in explanation
    below = ReferenceContrast("0" * 64, [0.02], [[0.2, 0.3, 0.2]], [[0.2, 0.2, 0.2]], 0)
    assert suspicion(_screening(3), {}, config, below).decided_by == "rule"


def test_a_reference_needs_the_additive_probe() -> None:
    with pytest.raises(ValidationError, match="additive probe"):
        ScanConfig(reference="ref.safetensors", additive_epsilon=0)


def test_a_scan_with_a_reference_reports_the_contrast(
    tiny_model_path: Path, tiny_data: Path, tmp_path: Path
) -> None:
    options = {**SMALL_SCAN, "reference": str(tiny_model_path), "additive_steps": 1}
    report = api.scan(tiny_model_path, tiny_data, shots=4, options=options, out_dir=tmp_path)
    statistics = report.findings[0].statistics
    contrast = statistics["reference_contrast"]
    assert contrast["contrast"] == 0.0, "the suspect is its own reference"
    assert contrast["threshold"] == ScanConfig().reference_threshold
    assert len(contrast["bounds"]) == len(CONTRAST_FACTORS)
    assert contrast["images"] > 0
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["findings"][0]["statistics"]["reference_contrast"] == contrast
    assert "reference contrast" in report.run.stage_seconds


def test_a_scan_plans_the_contrast_outside_its_budget(bundle: ModelBundle, shots: ShotSet) -> None:
    without = scan_plan(bundle, shots, ScanConfig(), RunContext(seed=0))
    config = ScanConfig(reference="ref.safetensors")
    plan = scan_plan(bundle, shots, config, RunContext(seed=0))
    (stage,) = [s for s in plan.stages if s.name == "reference contrast"]
    assert stage.image_passes > 0 and stage.image_forwards > 0
    assert plan.budget == without.budget
    assert [s for s in plan.stages if s.name != "reference contrast"] == without.stages


def test_a_missing_reference_is_a_one_line_error(tiny_model_path: Path, tiny_data: Path) -> None:
    result = run_cli(
        "scan", tiny_model_path, "--data", tiny_data, "--shots", "4", "-q",
        "-o", "reference=no-such-model.safetensors",
    )  # fmt: skip
    assert_one_line_error(result, "no-such-model.safetensors")
