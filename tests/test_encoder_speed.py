"""benchmarks/encoder_speed.py: the two comparisons run and report what they measured."""

from __future__ import annotations

from benchmarks import encoder_speed
from tests.conftest import GLIBC_ONLY


def test_attention_comparison_reports_a_ratio_and_bit_identity(tiny_model_path) -> None:
    row = encoder_speed.compare_attention(tiny_model_path, batch=4, rounds=2)
    assert row["comparison"] == "attention" and row["attention_modules"] == 1
    assert row["bit_identical"] is True
    assert row["speedup"] > 0 and row["packed_images_per_second"] > 0


@GLIBC_ONLY
def test_allocator_comparison_runs_each_setting_in_fresh_processes(tiny_model_path) -> None:
    row = encoder_speed.compare_allocator(tiny_model_path, batch=4, rounds=2, processes=1)
    assert row["comparison"] == "allocator"
    for allocator in ("system", "reuse"):
        assert row[f"{allocator}_images_per_second"] > 0
        assert row[f"{allocator}_peak_resident_mb"] > 0
