"""The cbpt scanner screens several shot draws and judges each class by its median evidence."""

from __future__ import annotations

from statistics import median

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clipguard import api
from clipguard.components import RunContext, ShotSet
from clipguard_cbpt.scanner import CBPTScanner, ScanConfig, Screening, median_screening

#: a scan without the reach probes and the refinement: what is left is the screening alone
SCREEN_ONLY = {
    "class_steps": 6,
    "class_batch_size": 2,
    "additive_epsilon": 0,
    "warp_pixels": 0,
    "refine": False,
}

EVIDENCE = st.floats(min_value=0, max_value=10, allow_nan=False)


def _screening(evidence: list[float]) -> Screening:
    n = len(evidence)
    suspect = max(range(n), key=lambda k: evidence[k])
    return Screening([], torch.zeros(n, 2), [0.01] * n, [0.0] * n, [0.8] * n, [0.0] * n,
                     evidence, suspect)  # fmt: skip


@given(st.integers(2, 6).flatmap(lambda n: st.lists(st.lists(EVIDENCE, min_size=n, max_size=n),
                                                    min_size=1, max_size=5)))  # fmt: skip
def test_a_class_is_judged_by_the_median_of_its_evidence_on_the_draws(draws) -> None:
    screenings = [_screening(evidence) for evidence in draws]
    combined = median_screening(screenings, list(range(len(draws))))
    expected = [median(column) for column in zip(*draws, strict=True)]
    assert combined.evidence == expected
    assert combined.top_evidence == max(expected)
    assert combined.draw_evidence == draws and combined.draw_seeds == list(range(len(draws)))
    # the first draw's signals are kept: its shots are the ones the probes and refinement use
    assert combined.sizes is screenings[0].sizes
    if len(draws) == 1:
        assert (combined.evidence, combined.suspect) == (draws[0], screenings[0].suspect)


def _other_draw(shots: ShotSet, index: int) -> ShotSet:
    """A stand-in for another draw of the shots: the same classes, other pixels."""
    generator = torch.Generator().manual_seed(100 + index)
    return ShotSet(torch.rand(shots.pixels.shape, generator=generator), shots.labels,
                   shots.classnames)  # fmt: skip


def test_each_draw_is_screened_as_a_scan_of_its_seed_would_be(bundle, shots) -> None:
    offered: list[int] = []

    def draw_shots(index: int) -> ShotSet:
        offered.append(index)
        return _other_draw(shots, index)

    context = RunContext(seed=7, draw_shots=draw_shots)
    outcome = CBPTScanner().scan(bundle, shots, ScanConfig(**SCREEN_ONLY), context)
    draws = outcome.statistics["screen_draws"]
    assert offered == [1, 2] and [d["seed"] for d in draws] == [7, 8, 9]
    names = list(shots.classnames)
    for index, draw in enumerate(draws):
        alone = CBPTScanner().scan(
            bundle,
            shots if index == 0 else _other_draw(shots, index),
            ScanConfig(**SCREEN_ONLY, screen_draws=1),
            RunContext(seed=7 + index),
        )
        assert alone.statistics["screen_draws"][0]["class_evidence"] == draw["class_evidence"]
        assert alone.statistics["class_size_index"] == draw["class_size_index"]
    for name in names:
        assert outcome.statistics["class_evidence"][name] == median(
            d["class_evidence"][name] for d in draws
        )
    assert outcome.statistics["evidence"] == max(outcome.statistics["class_evidence"].values())
    assert "median of its evidence on 3 shot draws" in outcome.explanation
    # the report's per-class signals are the first draw's
    assert outcome.statistics["class_size_index"] == draws[0]["class_size_index"]


def test_without_more_shots_on_offer_one_draw_is_screened(bundle, shots) -> None:
    """A plugin called directly, or the purifier's own inversion, screens its shots alone."""
    outcome = CBPTScanner().scan(bundle, shots, ScanConfig(**SCREEN_ONLY), RunContext(seed=2))
    [draw] = outcome.statistics["screen_draws"]
    assert draw["seed"] == 2 and draw["class_evidence"] == outcome.statistics["class_evidence"]
    assert "shot draws" not in outcome.explanation


@pytest.mark.parametrize("screen_draws", [1, 3])
def test_a_scan_hashes_every_image_its_draws_screened(
    tiny_model_path, tiny_data, screen_draws
) -> None:
    options = {**SCREEN_ONLY, "screen_draws": screen_draws}
    report = api.scan(tiny_model_path, tiny_data, shots=2, seed=4, options=options)
    draws = report.findings[0].statistics["screen_draws"]
    assert [d["seed"] for d in draws] == list(range(4, 4 + screen_draws))
    # 2 shots of each of 3 classes per draw; other draws add images unless they repeat them
    assert report.data.n_images == 6 if screen_draws == 1 else 6 < report.data.n_images <= 18
