"""The example third-party plugin (plugins/example-scanner, ``neural-cleanse``).

* It installs into the environment like any outside package (pip, editable, offline) and
  runs through the real ``clipguard`` command line.
* Its MAD anomaly index and verdict rule hold their properties (hypothesis).
* Its scanner keeps the contract in-process: deterministic for a seed, inside its image
  budget, artefacts in the documented formats.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipguard.components import RunContext, ShotSet
from clipguard.model import load_model
from clipguard.triggers import MaskPatternTrigger, TriggerFile, load_trigger_file

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "plugins" / "example-scanner"
if str(PLUGIN_DIR) not in sys.path:  # the unit tests import the plugin from its source tree
    sys.path.insert(0, str(PLUGIN_DIR))

from clipguard_nc.anomaly import anomaly_indices, decide, robust_scale  # noqa: E402
from clipguard_nc.inversion import InversionSettings, invert_classes, plan_steps  # noqa: E402
from clipguard_nc.scanner import (  # noqa: E402
    CLASSES_ARTIFACT,
    NeuralCleanseConfig,
    NeuralCleanseScanner,
    trigger_file_bytes,
)

# --------------------------------------------------------------------------- install + CLI


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("CLIPGUARD_PLUGINS", None)  # an installed plugin must load with no configuration
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, check=False
    )


def _clipguard(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "clipguard", *args], timeout)


def test_example_plugin_installs_and_scans_through_the_cli(tiny_model_path, tiny_data, tmp_path):
    install = _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "-e", str(PLUGIN_DIR)],
        timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr

    listing = _clipguard("plugins", "--json")
    assert listing.returncode == 0, listing.stderr
    scanners = {s["name"]: s for s in json.loads(listing.stdout)["scanners"]}
    assert "neural-cleanse" in scanners, listing.stdout
    assert scanners["neural-cleanse"]["package"] == "clipguard-neural-cleanse"
    assert scanners["neural-cleanse"]["plugin"] == "neural-cleanse"

    out = tmp_path / "out"
    scan = _clipguard(
        "scan", str(tiny_model_path), "--data", str(tiny_data), "--plugin", "neural-cleanse",
        "--shots", "3", "--option", "steps=4", "--option", "batch_size=4", "--out", str(out),
        "--quiet",
    )  # fmt: skip
    assert scan.returncode in (0, 1, 3), scan.stderr
    report = json.loads((out / "report.json").read_text())
    finding = report["findings"][0]
    assert finding["scanner"] == "neural-cleanse"
    assert finding["config"]["steps"] == 4
    exit_codes = {"clean": 0, "backdoor": 1, "inconclusive": 3}
    assert scan.returncode == exit_codes[finding["verdict"]]
    table = json.loads((out / CLASSES_ARTIFACT).read_text())
    assert [row["class"] for row in table] == report["data"]["classes"]


# --------------------------------------------------------------------------- anomaly index

# sizes on a 1e-4 grid: scaling by any factor keeps distinct sizes distinct (no rounding ties)
sizes_strategy = st.lists(
    st.integers(min_value=1, max_value=10_000).map(lambda v: v / 10_000), min_size=1, max_size=25
)


@given(sizes=sizes_strategy, factor=st.floats(min_value=1e-3, max_value=1e3))
@settings(max_examples=200, deadline=None)
def test_anomaly_index_is_scale_invariant(sizes, factor):
    scaled = anomaly_indices([factor * s for s in sizes])
    assert scaled == pytest.approx(anomaly_indices(sizes), rel=1e-6, abs=1e-9)


@given(sizes=sizes_strategy, shift=st.integers(min_value=-5_000, max_value=5_000))
@settings(max_examples=100, deadline=None)
def test_anomaly_index_is_shift_invariant(sizes, shift):
    shifted = anomaly_indices([s + shift / 10_000 for s in sizes])
    assert shifted == pytest.approx(anomaly_indices(sizes), rel=1e-6, abs=1e-6)


@given(sizes=sizes_strategy)
@settings(max_examples=200, deadline=None)
def test_anomaly_index_is_finite_non_negative_and_zero_at_the_median(sizes):
    indices = anomaly_indices(sizes)
    centre, _, _ = robust_scale(sizes)
    assert all(0 <= a < float("inf") for a in indices)
    assert all(a == 0 for s, a in zip(sizes, indices, strict=True) if s == centre)


@given(
    common=st.integers(min_value=1, max_value=10_000).map(lambda v: v / 10_000),
    repeats=st.integers(min_value=3, max_value=12),
    outliers=st.lists(st.integers(min_value=1, max_value=10_000).map(lambda v: v / 10_000),
                      max_size=2),
)  # fmt: skip
@settings(max_examples=200, deadline=None)
def test_mad_zero_guard(common, repeats, outliers):
    """More than half the sizes equal: MAD is 0, yet the index stays finite and meaningful."""
    sizes = [common] * repeats + outliers
    _, scale, kind = robust_scale(sizes)
    indices = anomaly_indices(sizes)
    assert kind in ("mean-ad", "zero")
    assert indices[:repeats] == [0.0] * repeats
    for size, index in zip(outliers, indices[repeats:], strict=True):
        assert (index > 0) == (size != common)
        assert index < float("inf")
    if all(size == common for size in outliers):
        assert kind == "zero" and scale == 0


def test_anomaly_index_matches_the_formula():
    sizes = [0.04, 0.05, 0.03, 0.045, 0.002, 0.035, 0.05, 0.06, 0.04, 0.038]
    median = 0.04  # mean of the 5th and 6th smallest, both 0.04
    mad = 0.0075  # median of |n - 0.04|: mean of the 5th and 6th smallest, 0.005 and 0.01
    expected = [abs(s - median) / (1.4826 * mad) for s in sizes]
    assert anomaly_indices(sizes) == pytest.approx(expected)
    with pytest.raises(ValueError):
        anomaly_indices([])
    with pytest.raises(ValueError):
        anomaly_indices([0.1, float("nan")])


def test_decide_flags_the_small_class_only():
    sizes = [0.04, 0.05, 0.03, 0.045, 0.002, 0.035, 0.05, 0.6, 0.04, 0.038]
    decision = decide(sizes, [True] * 10)
    assert decision.verdict == "backdoor" and decision.target == 4
    assert decision.flagged == [4]  # class 7 is anomalous too, but above the median
    assert decision.score == pytest.approx(decision.indices[4])

    unreached = decide(sizes, [k != 4 for k in range(10)])
    assert unreached.verdict != "backdoor" and 4 not in unreached.flagged


def test_decide_band_and_population_rules():
    base = [0.04, 0.05, 0.03, 0.045, 0.035, 0.05, 0.06, 0.04, 0.038]
    clean = decide([*base, 0.036], [True] * 10)
    assert clean.verdict == "clean" and clean.target is None
    # choose the tenth size so that its index falls inside [1.5, 2]
    centre, scale, _ = robust_scale([*base, 0.02])
    band = decide([*base, 0.02], [True] * 10)
    assert 1.5 <= (centre - 0.02) / scale <= 2.0
    assert band.verdict == "inconclusive" and band.target is None
    assert decide([0.001, 0.05, 0.05], [True] * 3).verdict == "inconclusive"  # too few classes
    assert decide(base, [True, True] + [False] * 7).verdict == "inconclusive"  # not converged
    with pytest.raises(ValueError):
        decide(base, [True] * 9, threshold=1.0, inconclusive_from=2.0)


# --------------------------------------------------------------------------- scanner contract


def test_config_forbids_unknown_options_and_a_reversed_band():
    with pytest.raises(ValueError):
        NeuralCleanseConfig(stepz=3)
    with pytest.raises(ValueError):
        NeuralCleanseConfig(threshold=1.0, inconclusive_from=1.5)
    assert NeuralCleanseConfig().threshold == 2.0


def _shots(n_classes: int = 5, per_class: int = 3) -> ShotSet:
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(n_classes * per_class, 3, 32, 32, generator=generator)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return ShotSet(
        pixels=pixels, labels=labels, classnames=[f"thing {k}" for k in range(n_classes)]
    )


def test_scanner_is_deterministic_and_keeps_its_budget(tiny_model_path):
    shots = _shots()
    config = NeuralCleanseConfig(steps=6, batch_size=4, image_budget=150)
    planned, limited = plan_steps(config.inversion_settings(), shots.labels, shots.n_classes)
    assert limited and planned == (150 - 5 * 12) // (5 * 4)
    outcomes, used = [], []
    for _ in range(2):
        bundle = load_model(tiny_model_path)
        context = RunContext(seed=3)
        outcomes.append(NeuralCleanseScanner().scan(bundle, shots, config, context))
        used.append(bundle.image_encoder_images)
        assert "inversion" in context.stage_seconds
    first, second = outcomes
    assert first.artifacts[CLASSES_ARTIFACT] == second.artifacts[CLASSES_ARTIFACT]
    assert (first.verdict, first.score) == (second.verdict, second.score)
    assert used[0] == used[1] <= 150
    assert first.statistics["steps_run"] <= planned
    table = json.loads(first.artifacts[CLASSES_ARTIFACT])
    assert all(0 <= row["mask_size"] <= 1 for row in table)
    if first.verdict == "backdoor":
        assert first.trigger is not None and "trigger.safetensors" in first.artifacts
    else:
        assert first.trigger is None and first.target_class is None


def test_inversion_returns_a_trigger_per_class(tiny_model_path):
    bundle = load_model(tiny_model_path)
    shots = _shots(n_classes=3, per_class=2)
    from clipguard.prompts import handcrafted_text_features

    features = handcrafted_text_features(bundle, shots.classnames)
    result = invert_classes(
        bundle, shots.pixels, shots.labels, features,
        InversionSettings(steps=3, batch_size=2), torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert [c.class_index for c in result.classes] == [0, 1, 2]
    for found in result.classes:
        assert found.mask.shape == (1, 32, 32) and found.pattern.shape == (3, 32, 32)
        assert float(found.mask.min()) >= 0 and float(found.mask.max()) <= 1
        assert found.success is not None and 0 <= found.success <= 1
    assert result.image_encoder_images == bundle.image_encoder_images


def test_trigger_artefact_is_a_clipguard_trigger_file(tmp_path):
    mask = torch.zeros(1, 8, 8)
    mask[:, 5:8, 5:8] = 1
    original = TriggerFile(
        trigger=MaskPatternTrigger(mask=mask, pattern=torch.rand(3, 8, 8)),
        model_sha256="ab" * 32,
        classnames=["cat", "dog"],
        settings={"target_class": "dog"},
        producer="neural-cleanse test",
    )
    path = tmp_path / "trigger.safetensors"
    path.write_bytes(trigger_file_bytes(original))
    loaded = load_trigger_file(path)
    assert torch.equal(loaded.trigger.mask, original.trigger.mask)
    assert torch.equal(loaded.trigger.pattern, original.trigger.pattern)
    assert loaded.classnames == ["cat", "dog"] and loaded.settings == {"target_class": "dog"}
    assert loaded.model_sha256 == original.model_sha256 and loaded.producer.startswith("neural")


# --------------------------------------------------------------------------- a real backdoor


@pytest.mark.slow
def test_singles_out_the_badnets_target_of_the_demo_lab_model(monkeypatch, tmp_path):
    """On the demo's BadNets lab model the scanner singles out the true target.

    Uses the model ``clipguard demo`` builds and caches (synthetic set, BadNets towards
    ``clipguard.lab.demo.DEMO_TARGET``); skipped when it has not been built, or when its card
    shows no working backdoor. The target needs the smallest trigger by far (1.3 % of the
    image against a median of 5.2 % on the version-2 demo model), but Neural Cleanse's MAD
    index over twelve classes puts it at 1.29 only (1.93 on the version-1 model), under the
    plugin's inconclusive level of 1.5, so its verdict is ``clean``: Neural Cleanse is the
    example plugin, not the product's detector (cbpt says ``backdoor`` here with evidence
    4.2, tests/cbpt/test_slow.py). What must hold is that the candidate is the target and
    its trigger the smallest; a ``backdoor`` verdict must name the target and come with its
    trigger file. The scan itself must stay under 90 s.
    """
    from clipguard import api, plugins
    from clipguard.lab.demo import DEMO_TARGET, demo_model_path
    from clipguard.lab.synthetic import cached_synthetic
    from clipguard.lab.train import card_path

    model = demo_model_path()
    if not (model.is_file() and card_path(model).is_file()):
        pytest.skip(f"no cached demo model at {model}: run `clipguard demo` once")
    card = json.loads(card_path(model).read_text())
    if (card.get("attack_success_rate") or 0) < 0.9:
        pytest.skip(f"the demo model carries no working backdoor (card: {card})")

    monkeypatch.setenv("CLIPGUARD_PLUGINS", "")  # the source tree's plugin, installed or not
    import clipguard_nc.plugin

    plugins.get_plugin_manager().register(clipguard_nc.plugin, name="neural-cleanse-source")
    report = api.scan(
        model, cached_synthetic() / "train", scanner="neural-cleanse", out_dir=tmp_path
    )
    finding = report.findings[0]
    assert finding.statistics["candidate_class"] == DEMO_TARGET, finding.explanation
    sizes = finding.statistics["mask_sizes"]
    assert min(sizes, key=sizes.get) == DEMO_TARGET
    assert sizes[DEMO_TARGET] < 0.5 * statistics.median(sizes.values())
    assert report.run.stage_seconds["inversion"] < 90
    if finding.verdict == "backdoor":
        assert finding.target_class == DEMO_TARGET
        trigger = load_trigger_file(tmp_path / "trigger.safetensors")
        assert trigger.model_sha256 == report.model.sha256
