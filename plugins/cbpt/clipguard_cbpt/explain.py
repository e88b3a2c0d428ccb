"""The one-line explanation, verdict and score of a cbpt scan."""

from __future__ import annotations

from clipguard_cbpt.config import ScanConfig
from clipguard_cbpt.evidence import (
    REFERENCE,
    Screening,
    Suspicion,
    flagging,
    isolation_units,
    probe_ratios,
    verdict_of,
)


def flagging_probe(suspected: Suspicion, k: int, config: ScanConfig) -> str:
    """How the strongest probe of ratio 1 or more flags class ``k``, for an explanation of a
    screening that such a probe ended (``probe_settles``)."""
    flag = flagging(probe_ratios(suspected.probes, config))
    if flag is None:
        return "a reach probe flags this class"
    name = flag[0]
    evidence = suspected.probes[name].evidence()[k]
    return (
        f"the {name} probe flags this class too ({evidence:.2f}, from "
        f"{config.probe_threshold(name):g})"
    )


def decide(
    screening: Screening, suspected: Suspicion, classnames: list[str], config: ScanConfig
) -> tuple[str, float, str]:
    """Verdict, score in ``[0, 1)`` and a one-line explanation.

    The score is ``r / (1 + r)`` with ``r`` the deciding ratio of evidence to threshold, so
    it is 0.5 exactly at the threshold.
    """
    ratio = suspected.ratio
    verdict = verdict_of(ratio, config)
    if suspected.decided_by == REFERENCE and suspected.reference is not None:
        contrast = suspected.reference
        value, k, bound = contrast.top()
        i = contrast.bounds.index(bound)
        facts = (
            f"class {classnames[k]!r}: an additive change of at most {bound:.3g} per pixel "
            f"sends {contrast.suspect_reach[i][k]:.0%} of the held-out images of other "
            f"classes to it, {contrast.reference_reach[i][k]:.0%} on the reference model "
            f"(contrast {value:.3f}, backdoor from {config.reference_threshold:g}; the "
            f"{config.signals} rule's evidence {screening.top_evidence:.2f}, from "
            f"{config.threshold:g}, class {classnames[screening.suspect]!r})"
        )
        return verdict, ratio / (1 + ratio), f"reference-contrast backdoor signal for {facts}"
    if suspected.decided_by != "rule":
        probe = suspected.probes[suspected.decided_by]
        k = suspected.suspect
        measured = f"the {probe.measured[k]}" if probe.measured else "the"
        facts = (
            f"class {classnames[k]!r}: {probe.family.describe()} sends {probe.reach[k]:.0%} of "
            f"{measured} held-out images of other classes to it, "
            f"{probe.evidence()[k]:.2f} above the median "
            f"class (backdoor from {config.probe_threshold(probe.probe):g}; the "
            f"{config.signals} rule's evidence {screening.top_evidence:.2f}, from "
            f"{config.threshold:g}, class {classnames[screening.suspect]!r})"
        )
        return verdict, ratio / (1 + ratio), f"{probe.family.signal} backdoor signal for {facts}"
    k = screening.suspect
    evidence = screening.top_evidence
    size = (
        f"the trigger-size index {screening.size_index[k]:.2f} (smallest trigger "
        f"{screening.sizes[k]:.4f} of the image)"
    )
    alignment = screening.alignment_index[k]
    additive = screening.corroboration[k] if screening.corroboration else 0.0
    corroborating = (
        f"the additive probe's evidence in index units {additive:.2f} (text-alignment index "
        f"{alignment:.2f})"
        if additive > alignment
        else f"the text-alignment index {alignment:.2f}"
    )
    isolated = isolation_units(config) * screening.isolation[k]
    if config.signals == "size":
        rule = f"{size} (text-alignment index {alignment:.2f}, not used)"
    elif isolated > 0 and isolated >= evidence:
        rule = (
            f"{size}, {screening.isolation[k]:.2f} above every other class's (isolated from "
            f"{config.isolation_threshold:g}; {corroborating})"
        )
    else:
        rule = f"geometric mean of {size} and {corroborating}"
    screened = len(screening.draw_evidence)
    offered = screening.draws_offered
    flagging = flagging_probe(suspected, k, config) if screening.stopped == "probe" else ""
    if screening.stopped == "band":
        low, high = config.screen_again_evidence
        rule = (
            f"{rule}; the first of {offered} shot draws decided alone (its largest evidence "
            f"before corroboration lies outside [{low:g}, {high:g}))"
        )
    elif screened > 1:
        each = ", ".join(f"{draw[k]:.2f}" for draw in screening.draw_evidence)
        skipped = {
            "moot": f"; the last of {offered} could change neither verdict nor suspect",
            "probe": f"; {flagging}, so no more of the {offered} were screened",
        }.get(screening.stopped or "", "")
        rule = (
            f"the median of its evidence on {screened} shot draws ({each}{skipped}); on the "
            f"first, {rule}"
        )
    elif screening.stopped == "probe":
        rule = f"{rule}; {flagging}, so the first of {offered} shot draws decided alone"
    facts = (
        f"class {classnames[k]!r}: evidence {evidence:.2f} (backdoor from "
        f"{config.threshold:g}) = {rule}"
    )
    explanation = {
        "backdoor": f"backdoor signal for {facts}",
        "inconclusive": f"weak backdoor signal for {facts}",
        "clean": f"no class stands out; strongest is {facts}",
    }[verdict]
    return verdict, ratio / (1 + ratio), explanation


def budget_verdict(verdict: str, explanation: str, cut: list[str]) -> tuple[str, str]:
    """The verdict and explanation once the budget is judged: a verdict whose budget cut
    stages that bear on it short (``cut``, :func:`~clipguard_cbpt.budget.shortfalls`) is
    ``inconclusive``, what was found so far named in its explanation: the evidence never
    settled, so neither a silent ``clean`` nor a ``backdoor`` read off unfinished
    inversions (a class still searching when the budget ended looks like a small trigger)."""
    if not cut:
        return verdict, explanation
    stages = "; ".join(cut)
    return (
        "inconclusive",
        f"the budget ran out before the evidence settled ({stages}); so far {explanation}",
    )
