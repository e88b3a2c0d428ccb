"""The leave-one-family-out protocol: no family is both fitted on and judged in one fold."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.leave_out import folds, seed_of

FAMILIES = st.sampled_from(["none", "badnets", "blended", "sig", "wanet", "ftrojan", "bpp"])


def _scans(entries: list[tuple[str, int]]) -> list[dict[str, object]]:
    name = {"none": "clean"}
    return [
        {"model": f"{name.get(family, family)}-s{seed}", "attack": family, "target": "cat"}
        for family, seed in dict.fromkeys(entries)
    ]


@given(st.lists(st.tuples(FAMILIES, st.integers(0, 9)), min_size=1, max_size=40))
def test_every_fold_keeps_its_family_and_odd_clean_seeds_out_of_the_fit(entries) -> None:
    scans = _scans(entries)
    families = {s["attack"] for s in scans} - {"none"}
    made = folds(scans)
    assert [fold.family for fold in made] == sorted(families)
    for fold in made:
        fitted = {s["attack"] for s in fold.fit}
        judged = {s["attack"] for s in fold.test} - {"none"}
        assert judged <= {fold.family}
        assert fold.family not in fitted
        assert not {s["model"] for s in fold.fit} & {s["model"] for s in fold.test}
        assert all(seed_of(s) % 2 == 0 for s in fold.fit if s["attack"] == "none")
        assert all(seed_of(s) % 2 == 1 for s in fold.test if s["attack"] == "none")
        others = [s for s in scans if s["attack"] not in ("none", fold.family)]
        assert all(s in fold.fit for s in others)


def test_a_model_name_without_a_seed_is_refused() -> None:
    with pytest.raises(ValueError, match="-s<seed>"):
        seed_of({"model": "clean"})
