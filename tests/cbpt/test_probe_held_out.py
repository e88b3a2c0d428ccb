"""A scan's reach probes measure their reach on held-out images besides the shots."""

from __future__ import annotations

import pytest

from clipguard import api

#: one draw, the additive probe alone at a fixed bound, no refinement
PROBE_ONLY = {
    "class_steps": 2,
    "class_batch_size": 2,
    "screen_draws": 1,
    "additive_steps": 2,
    "additive_refits": 0,
    "warp_pixels": 0,
    "refine": False,
}


@pytest.mark.parametrize(("held_out", "measured", "images"), [(2, 2 + 4, 6 + 6), (0, 2, 6)])
def test_a_scan_measures_reach_on_held_out_images_and_hashes_them(
    tiny_model_path, tiny_data, held_out: int, measured: int, images: int
) -> None:
    """2 shots per class (3 classes): each class's reach is measured on the other classes'
    odd shots (2) and their ``probe_held_out`` images each (2 x 2); the held-out images
    are counted among the scan's images (6 per class in the folder, 2 of them shots)."""
    options = {**PROBE_ONLY, "probe_held_out": held_out}
    report = api.scan(tiny_model_path, tiny_data, shots=2, seed=1, options=options)
    additive = report.findings[0].statistics["additive"]
    assert set(additive["measured_images"].values()) == {measured}
    assert report.data.n_images == images
