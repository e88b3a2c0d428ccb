"""`clipguard scan --draws N`: one verdict from scans on independent shot draws."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from clipguard import api
from clipguard.api import combine_draws, majority_verdict
from clipguard.components import ScanOutcome
from tests.core.cli_helpers import assert_one_line_error, run_cli

FAST_SCAN = {"class_steps": 20, "refine_steps": 10, "refine_batch_size": 8}
VERDICTS = st.sampled_from(["backdoor", "clean", "inconclusive"])


@given(st.lists(VERDICTS, min_size=1, max_size=9), st.randoms())
def test_the_majority_verdict_needs_more_than_half_and_ignores_order(verdicts, rng) -> None:
    combined = majority_verdict(verdicts)
    shuffled = list(verdicts)
    rng.shuffle(shuffled)
    assert majority_verdict(shuffled) == combined
    for verdict in ("backdoor", "clean"):
        assert (combined == verdict) == (2 * verdicts.count(verdict) > len(verdicts))
    assert majority_verdict(verdicts[:1]) == verdicts[0]


def _outcome(verdict: str, score: float, target: str | None) -> ScanOutcome:
    return ScanOutcome(
        verdict=verdict,
        score=score,
        target_class=target,
        explanation=f"{verdict} at {score}",
        statistics={"score_seen": score},
        artifacts={"trigger.safetensors": str(score).encode()},
    )


def test_combined_draws_show_the_median_draw_of_the_majority_and_its_target() -> None:
    outcomes = [
        _outcome("backdoor", 0.9, "cat"),
        _outcome("clean", 0.1, None),
        _outcome("backdoor", 0.6, "dog"),
        _outcome("backdoor", 0.7, "dog"),
        _outcome("backdoor", 0.8, "dog"),
    ]
    combined = combine_draws(outcomes, first_seed=10)
    assert combined.verdict == "backdoor" and combined.target_class == "dog"
    assert combined.score == 0.7  # the median of all five scores
    assert combined.statistics["shown_draw"] == 13  # median of the "dog" draws 0.6, 0.7, 0.8
    assert combined.statistics["score_seen"] == 0.7
    assert combined.artifacts == {"trigger.safetensors": b"0.7"}
    assert [d["seed"] for d in combined.statistics["draws"]] == [10, 11, 12, 13, 14]
    assert [d["verdict"] for d in combined.statistics["draws"]][:2] == ["backdoor", "clean"]
    assert "4 backdoor, 0 inconclusive, 1 clean" in combined.explanation


def test_a_split_vote_is_inconclusive_and_a_clean_majority_names_no_target() -> None:
    split = combine_draws([_outcome("backdoor", 0.9, "cat"), _outcome("clean", 0.1, None)], 0)
    assert split.verdict == "inconclusive"
    assert split.statistics["shown_draw"] == 0  # the backdoor draw: its trigger is the suspect
    assert split.target_class == "cat" and split.score == 0.5
    clean = combine_draws(
        [_outcome("inconclusive", 0.4, "cat"), _outcome("clean", 0.2, None)] * 2
        + [_outcome("clean", 0.3, None)],
        0,
    )
    assert clean.verdict == "clean" and clean.target_class is None


def test_a_scan_on_three_draws_reports_each_draw_as_its_own_scan(
    tiny_model_path, tiny_data, tmp_path
) -> None:
    combined = api.scan(
        tiny_model_path, tiny_data, shots=4, seed=3, options=FAST_SCAN, draws=3,
        out_dir=tmp_path / "draws",
    )  # fmt: skip
    finding = combined.findings[0]
    draws = finding.statistics["draws"]
    assert [d["seed"] for d in draws] == [3, 4, 5]
    for draw in draws:
        single = api.scan(tiny_model_path, tiny_data, shots=4, seed=draw["seed"], options=FAST_SCAN)
        alone = single.findings[0]
        assert (draw["verdict"], draw["score"], draw["target_class"]) == (
            alone.verdict,
            alone.score,
            alone.target_class,
        )
        assert "draws" not in alone.statistics
    assert finding.verdict == majority_verdict([d["verdict"] for d in draws])
    assert finding.statistics["shown_draw"] in (3, 4, 5)
    assert (tmp_path / "draws" / "trigger.safetensors").is_file()
    # every image drawn is counted and hashed: more than one draw's 4 shots of 3 classes
    assert 12 < combined.data.n_images <= 18
    assert combined.run.seed == 3


def test_draws_below_one_is_a_one_line_error(tiny_model_path, tiny_data) -> None:
    result = run_cli("scan", tiny_model_path, "--data", tiny_data, "--draws", "0")
    assert_one_line_error(result, "--draws must be at least 1")
