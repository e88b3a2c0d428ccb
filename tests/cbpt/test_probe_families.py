"""The reach probes' families rebuilt from the settings a trigger file records."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from clipguard_cbpt.evidence import Suspicion
from clipguard_cbpt.probe_families import AdditivePerturbation, SmoothWarp, family_from_settings
from clipguard_cbpt.probes import ProbeReach
from clipguard_cbpt.statistics import deciding_probe_settings

BOUNDS = st.floats(min_value=1e-4, max_value=16, allow_nan=False)


@given(epsilon=BOUNDS, grid=st.integers(2, 64), pixels=BOUNDS)
def test_a_family_is_rebuilt_from_its_settings(epsilon: float, grid: int, pixels: float) -> None:
    for family in (AdditivePerturbation(epsilon), SmoothWarp(grid, pixels)):
        assert family_from_settings(family.name, family.settings()) == family
        assert family_from_settings(family.name, family.record()) == family


def test_unknown_or_incomplete_settings_give_no_family() -> None:
    assert family_from_settings("colour", {"strength": 0.1}) is None
    assert family_from_settings("additive", {}) is None
    assert family_from_settings("warp", {"grid": "eight", "max_pixels": 2}) is None


def test_the_deciding_probe_is_recorded_with_its_bound() -> None:
    """A trigger file records the probe that decided a scan, at the bound it settled on, so
    the purifier can fit the same kind of trigger; nothing when the rule decided."""
    reach = ProbeReach(AdditivePerturbation(0.04), [0.9, 0.1, 0.1], steps=3)
    by_probe = Suspicion(0, 3.0, "additive", {"additive": reach})
    assert deciding_probe_settings(by_probe) == {
        "deciding_probe": {"name": "additive", "epsilon": 0.04}
    }
    recorded = deciding_probe_settings(by_probe)["deciding_probe"]
    assert family_from_settings(recorded["name"], recorded) == AdditivePerturbation(0.04)
    by_rule = Suspicion(1, 1.2, "rule", {"additive": reach})
    assert deciding_probe_settings(by_rule) == {"deciding_probe": None}
