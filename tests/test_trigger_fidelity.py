"""The trigger-fidelity benchmark's table: one row per model, then the average cosines."""

from __future__ import annotations

from benchmarks.trigger_fidelity import markdown_table


def test_the_table_lists_each_model_and_averages_the_cosines() -> None:
    rows = [
        {
            "model": "badnets-s0",
            "verdict": "backdoor",
            "mean_shift_cosine": 0.998,
            "per_image_cosine": 0.99,
            "oracle_attack_success_rate": 0.0631,
            "cbpt_asr_after": 0.0,
        },
        {
            "model": "wanet-s0",
            "verdict": "backdoor",
            "mean_shift_cosine": 0.94,
            "per_image_cosine": 0.80,
            "oracle_attack_success_rate": None,
            "cbpt_asr_after": None,
        },
    ]
    table = markdown_table(rows)
    assert "| badnets-s0 | backdoor | 0.998 | 0.990 | 6.31 | 0.00 |" in table
    assert "| wanet-s0 | backdoor | 0.940 | 0.800 | - | - |" in table
    assert "| **average** (2) | | 0.969 | 0.895 | | |" in table
