"""The cost of a scan is known before it starts: ``clipguard scan --estimate``, the projection
every scan records, and an unknown (never guessed) cost for a scanner without a plan."""

from __future__ import annotations

import json
import time

import pytest
import torch

from clipguard import api, cost
from clipguard.components import RunContext
from clipguard.cost import ScanPlan, StagePlan, measure_unit_costs, text_image_equivalents
from clipguard.model import load_model
from clipguard.report import Report, UnitCosts
from tests.core.cli_helpers import run_cli
from tests.core.fixed_verdict import FixedVerdictScanner
from tests.core.scan_options import CHEAP_CBPT

CHEAP = CHEAP_CBPT
UNITS = UnitCosts(
    device="cpu",
    batch_size=8,
    image_pass_seconds=0.5,
    image_forward_seconds=0.1,
    text_pass_seconds=0.2,
    text_forward_seconds=0.05,
    threads=1,
)


def test_the_estimate_plans_every_stage_without_scanning(tiny_model_path, tiny_data) -> None:
    record = api.estimate(tiny_model_path, tiny_data, shots=4, options=CHEAP, draws=2, threads=1)
    assert record.known and record.units is not None
    names = [stage.stage for stage in record.stages]
    assert names == [
        "prompt fitting",
        "per-class inversion",
        "text alignment",
        "additive reach",
        "warp reach",
        "refinement",
    ]
    stages = {stage.stage: stage for stage in record.stages}
    # 2 draws x 3 steps x 2 shots x 3 classes; prompt fitting: 5 steps x 3 prompts
    assert stages["per-class inversion"].image_passes == 2 * 3 * 2 * 3
    assert stages["prompt fitting"].text_passes == 5 * 3
    assert stages["refinement"].image_passes == 2 * 4
    assert all(stage.projected_seconds is not None for stage in record.stages)
    assert record.projected_seconds > sum(s.projected_seconds for s in record.stages)
    assert all(stage.actual_seconds is None for stage in record.stages)
    assert record.budget == 240_000 and record.budget_needed < record.budget


def test_scan_estimate_prints_the_plan_as_json_and_exits_0(tiny_model_path, tiny_data) -> None:
    options = [part for key, value in CHEAP.items() for part in ("-o", f"{key}={value}")]
    result = run_cli(
        "scan", tiny_model_path, "--data", tiny_data, "--shots", "4", "--estimate", "--json",
        *options,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["known"] is True
    assert printed["stages"][1]["stage"] == "per-class inversion"
    table = run_cli(
        "scan", tiny_model_path, "--data", tiny_data, "--shots", "4", "--estimate", *options
    )  # fmt: skip
    assert table.exit_code == 0
    assert "refinement" in table.stdout and "projected cost" in table.stdout


def test_a_scan_records_projected_and_actual_cost_per_stage(
    tiny_model_path, tiny_data, tmp_path
) -> None:
    seen = []
    report = api.scan(
        tiny_model_path,
        tiny_data,
        shots=4,
        options=CHEAP,
        draws=1,
        out_dir=tmp_path,
        threads=1,
        on_plan=seen.append,
    )
    assert len(seen) == 1 and seen[0].stages[0].actual_seconds is None
    recorded = report.run.cost
    assert recorded is not None and recorded.known
    assert recorded.actual_seconds == pytest.approx(report.run.seconds, abs=0.5)
    stages = {stage.stage: stage for stage in recorded.stages}
    inversion = stages["per-class inversion"]
    assert 0 < inversion.actual_image_images <= inversion.image_passes
    assert inversion.actual_seconds > 0
    stored = Report.model_validate_json((tmp_path / "report.json").read_text())
    assert stored.schema_version == "1.2"
    assert stored.run.cost == recorded


def test_a_scanner_without_a_plan_has_an_unknown_cost(
    fixed_verdict,
    tiny_model_path,
    tiny_data,
    tmp_path,
) -> None:
    result = run_cli(
        "scan", tiny_model_path, "--data", tiny_data, "--plugin", "fixed-verdict", "--shots",
        "2", "--draws", "1", "--out", tmp_path / "o", "--fail-on", "none",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "projected cost: unknown" in result.output
    stored = json.loads((tmp_path / "o" / "report.json").read_text())
    assert stored["run"]["cost"]["known"] is False
    assert "declares no plan" in stored["run"]["cost"]["reason"]


def test_a_failing_plan_leaves_the_cost_unknown(tiny_model_path, tiny_data) -> None:
    class Broken(FixedVerdictScanner):
        def plan(self, bundle, shots, config, context):
            raise RuntimeError("no idea")

    bundle = load_model(tiny_model_path)
    from clipguard.components import ShotSet

    shots = ShotSet(torch.rand(3, 3, 32, 32), torch.arange(3), ["a", "b", "c"])
    record = cost.plan_scan(Broken(), bundle, shots, Broken.Config(), RunContext())
    assert not record.known and "no idea" in (record.reason or "")
    assert record.units is not None


def test_the_measurement_leaves_counters_and_random_state_alone(tiny_model_path) -> None:
    bundle = load_model(tiny_model_path)
    state = torch.random.get_rng_state()
    units = measure_unit_costs(bundle, ["a", "b"], batch_size=2)
    assert torch.equal(state, torch.random.get_rng_state())
    assert bundle.image_encoder_images == 0 and bundle.text_encoder_prompts == 0
    assert units.image_pass_seconds > 0 and units.text_pass_seconds > 0
    assert units.image_pass_seconds >= 0.5 * units.image_forward_seconds


def test_projection_is_the_passes_at_the_unit_costs() -> None:
    plan = ScanPlan(
        [
            StagePlan("a", image_passes=10, image_forwards=10),
            StagePlan("b", text_passes=5, text_forwards=4),
        ],
        budget=100,
    )
    record = cost.project("x", plan, UNITS, overhead_seconds=1.0)
    assert [s.projected_seconds for s in record.stages] == [6.0, 1.2]
    assert record.projected_seconds == pytest.approx(8.2)
    assert not cost.project("x", None, UNITS).known


def test_text_work_counts_as_images_of_equal_compute(tiny_model_path) -> None:
    bundle = load_model(tiny_model_path)
    one = text_image_equivalents(bundle, 1, 8)
    assert one > 0
    assert text_image_equivalents(bundle, 3, 8) == pytest.approx(3 * one)
    assert text_image_equivalents(bundle, 1, 4) < one


def test_a_deadline_turns_into_images() -> None:
    assert cost.affordable_images(RunContext()) is None
    context = RunContext(unit_costs=UNITS, deadline=time.perf_counter() + 10)
    assert 18 <= cost.affordable_images(context) <= 20
    context.deadline = time.perf_counter() - 1
    assert cost.affordable_images(context) == 0


def test_minutes_for_people() -> None:
    assert cost.minutes(None) == "unknown"
    assert cost.minutes(42) == "42 s"
    assert cost.minutes(600) == "10.0 min"
    assert cost.minutes(7200) == "2.0 h"
