"""One budget that every stage of a cbpt scan honours, the prompt check included; a clean
scan cut short by it is inconclusive, and an inconclusive scan says what to run next."""

from __future__ import annotations

import json
import time

import open_clip
import pytest

from clipguard import api
from clipguard.components import RunContext
from clipguard.cost import _flops, image_flops
from clipguard.defaults import DEFAULT_MAX_MINUTES
from clipguard.lab.train import lab_model_config
from clipguard.model import load_model
from clipguard.render import render
from clipguard.report import UnitCosts
from clipguard_cbpt.budget import (
    ADVISED_DRAWS,
    Budget,
    budget_in_force,
    compute_images,
    needed_budget,
    next_steps,
    scan_plan,
)
from clipguard_cbpt.config import ScanConfig
from clipguard_cbpt.explain import budget_verdict
from clipguard_cbpt.prompt_fit import scan_classifier
from tests.core.cli_helpers import assert_one_line_error, run_cli
from tests.core.scan_options import CHEAP_CBPT

CHEAP = CHEAP_CBPT
#: the same scan, whose verdict is clean on the tiny model whatever it finds
CLEAN = {
    **CHEAP,
    "evidence_threshold": 1e9,
    "isolation_threshold": 0,
    "additive_threshold": 1,
    "warp_threshold": 1,
}


def _flops_of(model_cfg: dict) -> float:
    return _flops(json.dumps(model_cfg, sort_keys=True))[0]


UNITS = UnitCosts(
    device="cpu",
    batch_size=8,
    image_pass_seconds=0.01,
    image_forward_seconds=0.005,
    text_pass_seconds=0.01,
    text_forward_seconds=0.005,
    threads=1,
)


def test_the_prompt_check_honours_its_share_of_the_budget(bundle, shots) -> None:
    config = ScanConfig(fit_prompts=True, prompt_steps=40)
    whole = scan_classifier(bundle, shots, config, RunContext(seed=0))
    assert (whole.steps, whole.steps_wanted, whole.cut) == (40, 40, False)
    images = whole.budget_images - (whole.budget_images - (1 + 4) * len(shots.labels))
    allowance = images + (whole.budget_images - images) // 4
    cut = scan_classifier(bundle, shots, config, RunContext(seed=0), allowance)
    assert 0 < cut.steps < 40 and cut.cut and cut.fitted
    assert cut.budget_images <= allowance
    none = scan_classifier(bundle, shots, config, RunContext(seed=0), allowance=images)
    assert (none.steps, none.fitted, none.cut) == (0, False, True)


def test_a_small_budget_ends_a_scan_as_inconclusive_with_what_to_run(
    tiny_model_path, tiny_data
) -> None:
    report = api.scan(
        tiny_model_path,
        tiny_data,
        shots=4,
        options={**CLEAN, "budget": 60},
        draws=1,
        threads=1,
    )
    finding = report.findings[0]
    assert finding.verdict == "inconclusive"
    assert "budget ran out before the evidence settled" in finding.explanation
    assert finding.statistics["budget_shortfalls"]
    assert report.run.image_encoder_images <= 60 + 4 * 3  # the alignment's pass over shots
    (step,) = finding.next_steps
    assert step.args[0] == "-o" and step.args[1].startswith("budget=")
    suggested = int(step.args[1].removeprefix("budget="))
    assert suggested == report.run.cost.budget_needed
    for text in (render(report, "md"), render(report, "html")):
        assert "Next steps" in text and f"-o budget={suggested}" in text
    again = api.scan(
        tiny_model_path,
        tiny_data,
        shots=4,
        options={**CLEAN, "budget": suggested},
        draws=1,
        threads=1,
    )
    assert again.findings[0].statistics["budget_shortfalls"] == []
    assert again.findings[0].verdict == "clean" and again.findings[0].next_steps == []


def test_max_minutes_lowers_the_budget_and_advises_more_time(tiny_model_path, tiny_data) -> None:
    result = run_cli(
        "scan", tiny_model_path, "--data", tiny_data, "--shots", "4", "--draws", "1",
        "--max-minutes", "0.0001", "--json", *[
            part for key, value in CLEAN.items() for part in ("-o", f"{key}={value}")
        ],
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    report = api.Report.model_validate_json(result.stdout)
    finding = report.findings[0]
    assert finding.verdict == "inconclusive"
    assert finding.statistics["budget_source"] == "max-minutes"
    assert report.run.cost.max_minutes == 0.0001
    (step,) = finding.next_steps
    assert "--max-minutes" in step.args


def test_max_minutes_must_not_be_negative(tiny_model_path, tiny_data) -> None:
    result = run_cli(
        "scan", tiny_model_path, "--data", tiny_data, "--max-minutes", "-1", "--estimate"
    )  # fmt: skip
    assert_one_line_error(result, "--max-minutes must be 0 (none) or above")


@pytest.mark.parametrize(
    ("given", "in_force"),
    [([], DEFAULT_MAX_MINUTES), (["--max-minutes", "0"], None), (["--max-minutes", "2"], 2.0)],
)
def test_the_time_budget_is_the_default_unless_given_and_0_lifts_it(
    tiny_model_path, tiny_data, given: list[str], in_force: float | None
) -> None:
    result = run_cli(
        "scan", tiny_model_path, "--data", tiny_data, "--shots", "4", "--estimate", "--json",
        *given,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["max_minutes"] == in_force


def test_the_budget_in_force_is_the_option_the_compute_or_what_the_time_allows(bundle) -> None:
    config = ScanConfig(budget=1000)
    assert budget_in_force(config, RunContext(), bundle) == Budget(1000, "option")
    soon = RunContext(unit_costs=UNITS, deadline=time.perf_counter() + 1)
    assert budget_in_force(config, soon, bundle).source == "max-minutes"
    late = RunContext(unit_costs=UNITS, deadline=time.perf_counter() + 3600)
    assert budget_in_force(config, late, bundle) == Budget(1000, "option")
    per_image = image_flops(bundle)
    cheap = config.model_copy(update={"compute_budget": 500 * per_image / 1e9})
    assert budget_in_force(cheap, late, bundle) == Budget(compute_images(cheap, bundle), "compute")
    assert 499 <= compute_images(cheap, bundle) <= 500


def test_the_default_compute_budget_buys_the_whole_budget_on_lab_models_only() -> None:
    config = ScanConfig()
    lab = [lab_model_config(), lab_model_config(vision_layers=3, patch_size=4)]
    assert all(config.compute_budget * 1e9 / _flops_of(cfg) >= config.budget for cfg in lab)
    vit_b_32 = config.compute_budget * 1e9 / _flops_of(open_clip.get_model_config("ViT-B-32"))
    assert 100 < vit_b_32 < 2_000


def test_a_compute_cut_scan_is_inconclusive_and_advised_more_compute(
    tiny_model_path, tiny_data
) -> None:
    bundle = load_model(tiny_model_path)
    gflops = 50 * image_flops(bundle) / 1e9
    report = api.scan(
        tiny_model_path,
        tiny_data,
        shots=4,
        draws=1,
        threads=1,
        options={**CHEAP, "compute_budget": gflops},
    )
    finding = report.findings[0]
    assert finding.statistics["budget_source"] == "compute"
    assert finding.verdict == "inconclusive"
    (step,) = finding.next_steps
    assert any(arg.startswith("compute_budget=") for arg in step.args)


def test_the_plan_is_cut_to_the_budget_and_names_the_uncut_budget(bundle, shots) -> None:
    config = ScanConfig(**CHEAP, fit_prompts=True)
    needed = needed_budget(bundle, shots, config, RunContext(), 1)
    uncut = scan_plan(bundle, shots, config.model_copy(update={"budget": needed}), RunContext())
    assert uncut.budget_needed == needed and not uncut.notes
    cut = scan_plan(bundle, shots, config.model_copy(update={"budget": needed // 3}), RunContext())
    total = sum(s.image_passes + s.image_forwards for s in cut.stages)
    assert total < sum(s.image_passes + s.image_forwards for s in uncut.stages)
    assert cut.notes and "may cut stages short" in cut.notes[0]


def test_inconclusive_evidence_is_advised_more_draws(bundle, shots) -> None:
    config = ScanConfig(**CHEAP)
    (step,) = next_steps(
        "inconclusive", [], Budget(config.budget, "option"), bundle, shots, config, RunContext()
    )
    assert step.args[:2] == ["--draws", str(ADVISED_DRAWS)]
    assert "the median over more draws is steadier" in step.text
    small = Budget(50, "option")
    (step,) = next_steps("inconclusive", [], small, bundle, shots, config, RunContext())
    assert step.args[:2] == ["--draws", str(ADVISED_DRAWS)] and step.args[2] == "-o"
    for verdict in ("clean", "backdoor"):
        assert next_steps(verdict, [], small, bundle, shots, config, RunContext()) == []


@pytest.mark.parametrize("verdict", ["clean", "backdoor", "inconclusive"])
def test_every_verdict_the_budget_cut_short_is_inconclusive(verdict) -> None:
    assert budget_verdict(verdict, "why", []) == (verdict, "why")
    judged, text = budget_verdict(verdict, "why", ["warp reach probe skipped"])
    assert judged == "inconclusive"
    assert "warp reach probe skipped" in text and text.endswith("so far why")
