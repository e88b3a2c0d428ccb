"""A scan's reach probes measure their reach on held-out images besides the shots."""

from __future__ import annotations

import pytest
import torch

from clipguard import api
from clipguard.components import RunContext, ShotSet
from clipguard_cbpt.config import ScanConfig
from clipguard_cbpt.probes import probe_held_out

#: one draw, the additive probe alone at a fixed bound, no refinement
PROBE_ONLY = {
    "class_steps": 2,
    "class_batch_size": 2,
    "additive_steps": 2,
    "additive_refits": 0,
    "warp_pixels": 0,
    "refine": False,
}


@pytest.mark.parametrize(
    ("shots", "held_out", "measured", "images"),
    [(2, 2, 2 + 4, 6 + 6), (2, 0, 2, 6), (2, 48, 2 + 8, 18), (6, 48, 6, 18)],
)
def test_a_scan_measures_reach_on_held_out_images_and_hashes_them(
    tiny_model_path, tiny_data, shots: int, held_out: int, measured: int, images: int
) -> None:
    """3 classes of 6 images: each class's reach is measured on the other classes' odd
    shots (half of ``shots`` each) and on their ``probe_held_out`` other images each (as
    many as are left: 4 with 2 shots, none with 6); the held-out images are counted among
    the scan's images."""
    options = {**PROBE_ONLY, "probe_held_out": held_out}
    report = api.scan(tiny_model_path, tiny_data, shots=shots, seed=1, options=options)
    additive = report.findings[0].statistics["additive"]
    assert set(additive["measured_images"].values()) == {measured}
    assert report.data.n_images == images


def test_with_many_classes_fewer_held_out_images_are_drawn() -> None:
    """Each class's reach is measured on at most ``probe_held_out_max`` held-out images of
    the other classes, so a scan of many classes draws fewer than ``probe_held_out`` per
    class (10 classes: 48 each; 1,000 classes: 1 each) and none when the option is 0."""
    asked: list[int] = []

    def held_out_shots(per_class: int) -> ShotSet:
        asked.append(per_class)
        return ShotSet(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), ["a", "b"])

    context = RunContext(held_out_shots=held_out_shots)
    for n_classes in (10, 1000):
        assert probe_held_out(context, ScanConfig(), n_classes) is not None
    assert asked == [48, 1]
    assert probe_held_out(context, ScanConfig(probe_held_out=0), 10) is None
    assert probe_held_out(RunContext(), ScanConfig(), 10) is None


def test_a_scan_loads_its_held_out_images_once(tiny_model_path, tiny_data, monkeypatch) -> None:
    """The prompt check (fit_prompts=auto) and the reach probes measure on the same
    held-out images; the run loads them from disk once."""
    descriptions: list[str] = []
    loaded = api._Run.loaded

    def counting(self, samples, description):
        descriptions.append(description)
        return loaded(self, samples, description)

    monkeypatch.setattr(api._Run, "loaded", counting)
    options = {**PROBE_ONLY, "probe_held_out": 2, "fit_prompts": "auto"}
    report = api.scan(tiny_model_path, tiny_data, shots=2, seed=1, options=options)
    assert report.findings[0].statistics["prompt_accuracy_images"] == 6
    assert descriptions.count("loading held-out images") == 1
