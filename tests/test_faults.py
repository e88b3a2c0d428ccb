"""Faults: interrupted runs leave no partial output; the same seed gives the same files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipguard import api

#: cbpt options small enough for the tiny test model
FAST_SCAN = {"class_steps": 20, "refine_steps": 10, "refine_batch_size": 8}
FAST_PURIFY = {"steps": 20, "augmentations": 1}
#: run fields that hold wall-clock times (the cost record: measured and projected seconds)
VOLATILE = {"started_at", "finished_at", "seconds", "stage_seconds", "cost"}


def _stable(report: dict) -> dict:
    """A report without its wall-clock fields."""
    report = json.loads(json.dumps(report))
    for key in VOLATILE:
        report["run"].pop(key, None)
    return report


def _without_run_folder(report) -> dict:
    """The report as a dict, with the run folders a/ and b/ named alike."""
    return json.loads(report.model_dump_json().replace("/a/", "/x/").replace("/b/", "/x/"))


def test_same_seed_gives_identical_scan_and_purify_outputs(tiny_model_path, tiny_data, tmp_path):
    outputs = []
    for run in ("a", "b"):
        scan_dir, purify_dir = tmp_path / run / "scan", tmp_path / run / "purify"
        scan = api.scan(
            tiny_model_path, tiny_data, shots=4, seed=3, options=FAST_SCAN, out_dir=scan_dir
        )
        purified = api.purify(
            tiny_model_path,
            tiny_data,
            shots=4,
            seed=3,
            options=FAST_PURIFY,
            trigger_path=scan_dir / "trigger.safetensors",
            out_dir=purify_dir,
        )
        outputs.append((scan, purified, scan_dir, purify_dir))
    (scan_a, purify_a, scan_dir_a, purify_dir_a), (scan_b, purify_b, scan_dir_b, purify_dir_b) = (
        outputs
    )
    assert (scan_dir_a / "trigger.safetensors").read_bytes() == (
        scan_dir_b / "trigger.safetensors"
    ).read_bytes()
    assert (purify_dir_a / "prompts.safetensors").read_bytes() == (
        purify_dir_b / "prompts.safetensors"
    ).read_bytes()
    assert _stable(_without_run_folder(scan_a)) == _stable(_without_run_folder(scan_b))
    assert _stable(_without_run_folder(purify_a)) == _stable(_without_run_folder(purify_b))


def _default_signals() -> None:
    # as from an interactive terminal: a test runner started in the background inherits an
    # ignored SIGINT, and Python keeps ignoring it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(arguments: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "clipguard", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_signals,
    )


def _interrupt_after(process: subprocess.Popen, signal_number: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(signal_number)
    process.communicate(timeout=60)
    return process.returncode


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_scan_leaves_nothing_and_rerun_completes(
    signal_number, tiny_model_path, tiny_data, tmp_path
):
    out = tmp_path / "out"
    endless = [
        *("-o", "class_steps=100000000", "-o", "class_patience=100000000"),
        *("-o", "budget=1000000000000"),
    ]
    process = _start(
        [
            "scan",
            str(tiny_model_path),
            "--data",
            str(tiny_data),
            "--shots",
            "4",
            "--out",
            str(out),
            "--quiet",
            *endless,
        ]
    )
    code = _interrupt_after(process, signal_number, seconds=12)
    assert code == 130
    assert not out.exists() or list(out.iterdir()) == []
    rerun = _start(
        [
            "scan",
            str(tiny_model_path),
            "--data",
            str(tiny_data),
            "--shots",
            "4",
            "--out",
            str(out),
            "--quiet",
            *[f"-o{k}={v}" for k, v in FAST_SCAN.items()],
        ]
    )
    rerun.communicate(timeout=300)
    assert rerun.returncode in (0, 1, 3)
    assert {p.name for p in out.iterdir()} == {"report.json", "trigger.safetensors", "trigger.png"}


@pytest.mark.slow
def test_interrupted_purify_leaves_nothing(tiny_model_path, tiny_data, tmp_path):
    out = tmp_path / "out"
    process = _start(
        [
            "purify",
            str(tiny_model_path),
            "--data",
            str(tiny_data),
            "--shots",
            "4",
            "--out",
            str(out),
            "--quiet",
            "-o",
            "steps=10000000",
            "-o",
            "inversion_steps=20",
            "-o",
            "inversion_restarts=1",
        ]
    )
    code = _interrupt_after(process, signal.SIGINT, seconds=10)
    assert code == 130
    assert not out.exists() or list(out.iterdir()) == []


def test_atomic_write_leaves_no_temporary_on_failure(tmp_path, monkeypatch):
    from clipguard import io

    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def broken_replace(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        io.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    assert Path(target).exists()


@pytest.mark.slow
def test_interrupted_lab_build_leaves_no_model(tmp_path):
    from tests.conftest import TINY_CLASSES, write_image_folder

    dataset = tmp_path / "dataset"
    write_image_folder(dataset / "train", TINY_CLASSES, per_class=20)
    write_image_folder(dataset / "test", TINY_CLASSES, per_class=5)
    out = tmp_path / "out"
    out.mkdir()
    process = _start(
        ["lab", "build", "--dataset", str(dataset), "--attack", "badnets", "--target",
         TINY_CLASSES[0], "--epochs", "100000", "--out", str(out / "model.safetensors"),
         "--quiet"]
    )  # fmt: skip
    code = _interrupt_after(process, signal.SIGTERM, seconds=15)
    assert code == 130
    assert list(out.iterdir()) == []


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    from clipguard import io

    target = tmp_path / "report.json"
    io.atomic_write_bytes(target, b"{}")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
