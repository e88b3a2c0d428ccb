"""The cbpt scanner screens several shot draws and judges each class by its median evidence."""

from __future__ import annotations

from collections.abc import Callable
from statistics import median

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clipguard import api
from clipguard.components import RunContext, ShotSet
from clipguard_cbpt import screening
from clipguard_cbpt.config import ScanConfig
from clipguard_cbpt.evidence import (
    Screening,
    deciding_ratio,
    last_draw_moot,
    median_screening,
    probe_flags_suspect,
    verdict_of,
)
from clipguard_cbpt.scanner import CBPTScanner
from clipguard_cbpt.screening import ScanAblations

#: a scan without the reach probes and the refinement: what is left is the screening alone
SCREEN_ONLY = {
    "class_steps": 6,
    "class_batch_size": 2,
    "additive_epsilon": 0,
    "warp_pixels": 0,
    "refine": False,
}
#: screen every draw on offer, however decisive the first (with :data:`EVERY_DRAW_SCANNER`:
#: however flagged by a probe or moot the last)
EVERY_DRAW = {**SCREEN_ONLY, "screen_again": (0, 1e9)}
#: a scanner that screens every draw the band lets through: no probe settles the screening
#: and no last draw is skipped as moot
EVERY_DRAW_SCANNER = CBPTScanner(ScanAblations(skip_moot_draw=False, probe_settles=False))
#: the first draw always decides alone (an empty band)
FIRST_DRAW_ALONE = {**SCREEN_ONLY, "screen_again": (0, 0)}

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


def _recording_draws(shots: ShotSet, offered: list[int]) -> Callable[[int], ShotSet]:
    """A ``RunContext.draw_shots`` of :func:`_other_draw` that records each index drawn."""

    def draw_shots(index: int) -> ShotSet:
        offered.append(index)
        return _other_draw(shots, index)

    return draw_shots


def test_each_draw_is_screened_as_a_scan_of_its_seed_would_be(bundle, shots) -> None:
    offered: list[int] = []
    context = RunContext(seed=7, draw_shots=_recording_draws(shots, offered), draws=3)
    outcome = EVERY_DRAW_SCANNER.scan(bundle, shots, ScanConfig(**EVERY_DRAW), context)
    draws = outcome.statistics["screen_draws"]
    assert offered == [1, 2] and [d["seed"] for d in draws] == [7, 8, 9]
    assert outcome.statistics["screen_draws_offered"] == 3
    names = list(shots.classnames)
    for index, draw in enumerate(draws):
        alone = CBPTScanner().scan(
            bundle,
            shots if index == 0 else _other_draw(shots, index),
            ScanConfig(**SCREEN_ONLY),
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
    context = RunContext(seed=2, draws=3)  # draws on offer, but no draw_shots to draw them
    outcome = EVERY_DRAW_SCANNER.scan(bundle, shots, ScanConfig(**EVERY_DRAW), context)
    [draw] = outcome.statistics["screen_draws"]
    assert draw["seed"] == 2 and draw["class_evidence"] == outcome.statistics["class_evidence"]
    assert outcome.statistics["screen_draws_offered"] == 1
    assert "shot draws" not in outcome.explanation


def test_a_decisive_first_draw_decides_alone_and_no_other_is_drawn(bundle, shots) -> None:
    offered: list[int] = []
    context = RunContext(seed=3, draw_shots=_recording_draws(shots, offered), draws=3)
    outcome = CBPTScanner().scan(bundle, shots, ScanConfig(**FIRST_DRAW_ALONE), context)
    [draw] = outcome.statistics["screen_draws"]
    assert offered == [] and draw["seed"] == 3
    assert outcome.statistics["screen_draws_offered"] == 3
    assert "the first of 3 shot draws decided alone" in outcome.explanation
    alone = CBPTScanner().scan(bundle, shots, ScanConfig(**SCREEN_ONLY), RunContext(seed=3))
    assert alone.statistics["class_evidence"] == outcome.statistics["class_evidence"]
    assert (alone.verdict, alone.score) == (outcome.verdict, outcome.score)


@given(
    evidence=st.floats(min_value=0, max_value=20, allow_nan=False),
    low=st.floats(min_value=0, max_value=3, allow_nan=False),
    width=st.floats(min_value=0, max_value=3, allow_nan=False),
    threshold=st.floats(min_value=0.1, max_value=5, allow_nan=False),
)
def test_the_first_draw_is_decisive_exactly_outside_the_band(
    evidence: float, low: float, width: float, threshold: float
) -> None:
    config = ScanConfig(screen_again=(low, low + width), evidence_threshold=threshold)
    inside = low * threshold <= evidence < (low + width) * threshold
    assert config.decisive(evidence) is not inside


def test_the_default_band_is_half_to_one_and_a_half_thresholds() -> None:
    config = ScanConfig()
    assert config.screen_again == (0.5, 1.5)
    assert config.decisive(0.99 * config.threshold / 2)
    assert not config.decisive(config.threshold / 2)
    assert not config.decisive(1.49 * config.threshold)
    assert config.decisive(1.5 * config.threshold)


@pytest.mark.parametrize(
    ("options", "draws", "screened"),
    [(EVERY_DRAW, 1, 1), (EVERY_DRAW, 3, 3), (FIRST_DRAW_ALONE, 3, 1)],
)
def test_a_scan_hashes_every_image_its_draws_screened(
    tiny_model_path, tiny_data, monkeypatch, options, draws, screened
) -> None:
    offer = api._Run.offer_more_draws

    def offering(run: api._Run) -> None:  # as ``clipguard scan --draws`` offers them
        offer(run)
        run.context.draws = draws

    monkeypatch.setattr(api._Run, "offer_more_draws", offering)
    # the registered scanner's own ablations: no last draw may be skipped as moot
    monkeypatch.setattr(screening, "last_draw_moot", lambda *_: False)
    report = api.scan(tiny_model_path, tiny_data, shots=2, seed=4, options=options)
    statistics = report.findings[0].statistics
    draws = statistics["screen_draws"]
    assert [d["seed"] for d in draws] == list(range(4, 4 + screened))
    # 2 shots of each of 3 classes per draw; other draws add images unless they repeat them;
    # the held-out images that chose the prompts (fit_prompts=auto) count too (the tiny set's
    # later draws may repeat them)
    held_out = statistics["prompt_accuracy_images"]
    assert held_out > 0
    if screened == 1:
        assert report.data.n_images == 6 + held_out
    else:
        assert 6 < report.data.n_images <= 18 + held_out


def _verdict_and_suspect(
    draws: list[list[float]], probes: dict[str, tuple[float, int]], config: ScanConfig
) -> tuple[str, int | None]:
    """What a scan concludes from the median of ``draws`` and its probes (ratio, top class):
    the verdict, and the suspect unless the verdict is clean (as :func:`suspicion`)."""
    evidence = [median(column) for column in zip(*draws, strict=True)]
    top = max(range(len(evidence)), key=lambda k: evidence[k])
    ratios = {name: ratio for name, (ratio, _) in probes.items()}
    ratio, decided_by = deciding_ratio(evidence[top] / config.threshold, ratios)
    verdict = verdict_of(ratio, config)
    if verdict == "clean":
        return verdict, None
    return verdict, top if decided_by == "rule" else probes[decided_by][1]


PROBES = st.dictionaries(
    st.sampled_from(["additive", "warp"]),
    st.tuples(st.floats(min_value=0, max_value=3, allow_nan=False), st.integers(0, 3)),
)


@given(
    draws=st.lists(st.lists(EVIDENCE, min_size=4, max_size=4), min_size=2, max_size=2),
    last=st.lists(EVIDENCE, min_size=4, max_size=4),
    probes=PROBES,
)
def test_a_moot_last_draw_changes_neither_verdict_nor_suspect(draws, last, probes) -> None:
    """Whatever the skipped draw would have given, the median of all three draws concludes
    what the median of the two screened does."""
    config = ScanConfig()
    if last_draw_moot(draws, probes, config):
        expected = _verdict_and_suspect([*draws, last], probes, config)
        assert _verdict_and_suspect(draws, probes, config) == expected


def test_a_last_draw_that_could_tip_the_verdict_or_the_suspect_is_not_moot() -> None:
    config = ScanConfig()  # backdoor from 2.0, inconclusive from 1.5
    assert last_draw_moot([[0.2, 0.4], [0.3, 1.2]], {}, config)  # clean either way
    assert not last_draw_moot([[0.2, 2.4], [0.3, 1.2]], {}, config)  # 1.2 .. 2.4
    assert last_draw_moot([[0.2, 2.4], [0.3, 3.0]], {}, config)  # class 1 above all
    assert not last_draw_moot([[2.2, 2.4], [2.5, 3.0]], {}, config)  # which class?
    assert last_draw_moot([[2.2, 2.4], [2.5, 3.0]], {"warp": (5.0, 0)}, config)  # warp decides
    # the additive probe decides at the lower bound (1.45), the rule at the upper (1.875):
    # moot when both name class 1, not when the probe names class 0
    assert last_draw_moot([[0.2, 2.9], [0.3, 3.75]], {"additive": (1.56, 1)}, config)
    assert not last_draw_moot([[0.2, 2.9], [0.3, 3.75]], {"additive": (1.56, 0)}, config)
    # the probe (1.07, class 1) flags it whatever the last draw gives; class 0 may overtake
    # class 1's median (up to 1.6 against 1.4) but never reach the probe's ratio, so only
    # class 1 can be named (CIFAR-10 sig-s1's case: its third draw is skipped)
    assert last_draw_moot([[1.2, 2.9], [1.6, 1.4]], {"additive": (1.07, 1)}, config)
    assert not last_draw_moot([[1.2, 2.9], [2.2, 1.4]], {"additive": (1.07, 1)}, config)
    assert not last_draw_moot([[0.2, 0.3]], {}, config)  # one draw bounds nothing


@pytest.mark.parametrize(("skip", "screened"), [(True, 2), (False, 3)])
def test_a_moot_last_draw_is_not_drawn(bundle, shots, skip, screened) -> None:
    """With a threshold no evidence reaches (isolation off), two draws settle the verdict."""
    offered: list[int] = []
    context = RunContext(seed=5, draw_shots=_recording_draws(shots, offered), draws=3)
    options = {**EVERY_DRAW, "evidence_threshold": 1e6, "isolation_threshold": 0}
    scanner = CBPTScanner(ScanAblations(skip_moot_draw=skip, probe_settles=False))
    outcome = scanner.scan(bundle, shots, ScanConfig(**options), context)
    assert outcome.verdict == "clean"
    assert offered == list(range(1, screened))
    assert [d["seed"] for d in outcome.statistics["screen_draws"]] == list(range(5, 5 + screened))
    assert outcome.statistics["screen_draws_offered"] == 3
    moot_words = "the last of 3 could change neither verdict nor suspect"
    assert (moot_words in outcome.explanation) is skip


def test_a_probe_settles_the_screening_only_by_flagging_its_suspect() -> None:
    assert probe_flags_suspect(1, {"additive": (1.07, 1)})
    assert not probe_flags_suspect(0, {"additive": (1.07, 1)})  # another class
    assert not probe_flags_suspect(1, {"additive": (0.99, 1)})  # below its threshold
    assert not probe_flags_suspect(1, {})
    # the strongest probe is the one that would decide: here the warp probe, on class 2
    assert not probe_flags_suspect(1, {"additive": (1.5, 1), "warp": (2.0, 2)})
    assert probe_flags_suspect(2, {"additive": (1.5, 1), "warp": (2.0, 2)})


@given(
    draws=st.lists(st.lists(EVIDENCE, min_size=4, max_size=4), min_size=1, max_size=2),
    more=st.lists(st.lists(EVIDENCE, min_size=4, max_size=4), min_size=1, max_size=2),
    probes=PROBES,
)
def test_once_a_probe_flags_the_suspect_more_draws_leave_the_verdict_backdoor(
    draws, more, probes
) -> None:
    """The verdict part of ``probe_settles`` is exact (the suspect part is not: docs)."""
    config = ScanConfig()
    evidence = [median(column) for column in zip(*draws, strict=True)]
    suspect = max(range(len(evidence)), key=lambda k: evidence[k])
    if probe_flags_suspect(suspect, probes):
        assert _verdict_and_suspect(draws, probes, config)[0] == "backdoor"
        assert _verdict_and_suspect([*draws, *more], probes, config)[0] == "backdoor"


@pytest.mark.parametrize("settles", [True, False])
def test_a_probe_that_flags_the_suspect_ends_the_screening(
    bundle, shots, monkeypatch, settles
) -> None:
    """With ``probe_settles`` no draw after the first is drawn once a probe flags the first
    draw's suspect; without it the draws are screened as the band asks."""
    flagged: list[int] = []

    def flags(suspect: int, probes: dict[str, tuple[float, int]]) -> bool:
        flagged.append(suspect)
        return True

    monkeypatch.setattr(screening, "probe_flags_suspect", flags)
    offered: list[int] = []
    context = RunContext(seed=6, draw_shots=_recording_draws(shots, offered), draws=3)
    scanner = CBPTScanner(ScanAblations(skip_moot_draw=False, probe_settles=settles))
    outcome = scanner.scan(bundle, shots, ScanConfig(**EVERY_DRAW), context)
    draws = outcome.statistics["screen_draws"]
    if settles:
        assert offered == [] and [d["seed"] for d in draws] == [6]
        [suspect] = flagged
        assert shots.classnames[suspect] == draws[0]["suspect_class"]
        assert outcome.statistics["screen_draws_stopped"] == "probe"
        assert "a reach probe flags this class, so the first of 3 shot draws" in outcome.explanation
    else:
        assert offered == [1, 2] and flagged == []
        assert outcome.statistics["screen_draws_stopped"] is None


def test_the_probes_get_all_but_what_the_pending_draws_can_take(bundle, shots, monkeypatch):
    """With draws pending, the reach probes are left the budget less what those draws can
    use at most (screening_cost each) and the refinement's share, not the draws' whole share
    of the budget, which had left the additive probe no room to adapt its bound."""
    seen: list[tuple[int, int]] = []
    run_probe = screening.run_probe

    def recording(*args, **kwargs):
        seen.append((kwargs["budget"], bundle.image_encoder_images))
        return run_probe(*args, **kwargs)

    monkeypatch.setattr(screening, "run_probe", recording)
    config = ScanConfig(**{**EVERY_DRAW, "additive_epsilon": 0.02})  # no refinement
    context = RunContext(seed=1, draw_shots=lambda index: _other_draw(shots, index), draws=3)
    start = bundle.image_encoder_images
    EVERY_DRAW_SCANNER.scan(bundle, shots, config, context)
    [(budget, used)] = seen
    pending = 2 * screening.screening_cost(config, shots)
    assert pending < config.budget - (used - start)  # the draws' share: the rest of it
    assert budget == config.budget - (used - start) - pending
    assert screening.screening_cost(config, shots) == (
        config.class_steps * config.class_batch_size * len(shots.classnames) + len(shots.labels)
    )
