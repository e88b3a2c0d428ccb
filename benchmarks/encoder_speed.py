"""Image-encoder passes with and without clipguard's two speed-ups, measured as ratios.

    python -m benchmarks.encoder_speed MODEL [MODEL ...] [--batch 720] [--rounds 30] [--processes 3]

What a scan's trigger inversion and reach probes do thousands of times: encode a batch of
pixel images with gradients on the pixels and back-propagate. Per model, one JSON line each:

* ``"attention"``: in one process (the model loaded with :func:`clipguard.model.load_model`,
  whose image tower uses :class:`clipguard.attention.PackedSelfAttention`) the pass
  alternates, round by round, between torch's :class:`torch.nn.MultiheadAttention` and the
  packed module (the class is switched on the same weights), so both see the same machine
  load: images per second of each (median round), the speed-up, and whether features and
  pixel gradients were bit-identical in every round.
* ``"allocator"``: malloc settings hold for a whole process, so ``--processes`` fresh
  processes each with glibc's defaults and with
  :func:`clipguard.allocator.reuse_freed_memory` run alternately, ``--rounds`` passes each:
  images per second (median over the processes of each one's median pass), page faults per
  pass and kernel (system) CPU seconds per pass after the first three, peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from clipguard.allocator import reuse_freed_memory
from clipguard.attention import PackedSelfAttention
from clipguard.model import ModelBundle, load_model

#: passes not counted in a process's page faults and system time (its memory warming up)
WARM_UP_PASSES = 3


def _pass(bundle: ModelBundle, pixels: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Seconds of one forward and backward pass, the features and the pixel gradient."""
    pixels = pixels.clone().requires_grad_(True)
    start = time.perf_counter()
    features = bundle.encode_image(pixels)
    (features * torch.linspace(-1, 1, features.shape[-1])).sum().backward()
    return time.perf_counter() - start, features.detach(), pixels.grad


def compare_attention(path: Path, batch: int, rounds: int) -> dict[str, object]:
    """Alternate torch's and the packed attention for ``rounds`` rounds on one model."""
    bundle = load_model(path)
    attention = [m for m in bundle.model.visual.modules() if isinstance(m, PackedSelfAttention)]
    pixels = torch.rand(batch, 3, bundle.image_size, bundle.image_size)
    seconds: dict[str, list[float]] = {"torch": [], "packed": []}
    identical = True
    _pass(bundle, pixels)  # warm-up
    for _ in range(rounds):
        results = {}
        for kind, cls in (("torch", torch.nn.MultiheadAttention), ("packed", PackedSelfAttention)):
            for module in attention:
                module.__class__ = cls
            took, features, gradient = _pass(bundle, pixels)
            seconds[kind].append(took)
            results[kind] = (features, gradient)
        identical &= all(
            torch.equal(a, b) for a, b in zip(results["torch"], results["packed"], strict=True)
        )
    median = {kind: statistics.median(values) for kind, values in seconds.items()}
    return {
        "comparison": "attention",
        "model": str(path),
        "batch": batch,
        "rounds": rounds,
        "attention_modules": len(attention),
        "torch_images_per_second": round(batch / median["torch"], 1),
        "packed_images_per_second": round(batch / median["packed"], 1),
        "speedup": round(median["torch"] / median["packed"], 3),
        "bit_identical": identical,
    }


def measure_process(path: Path, batch: int, rounds: int, allocator: str) -> dict[str, float]:
    """One process's passes (this process; ``allocator`` "reuse" applies the settings first,
    so call it in a fresh interpreter): median seconds per pass, and page faults and system
    seconds per pass after the warm-up, and the peak resident memory."""
    if allocator == "reuse" and not reuse_freed_memory():
        raise SystemExit("the malloc settings could not be applied here (not glibc?)")
    bundle = load_model(path)
    pixels = torch.rand(batch, 3, bundle.image_size, bundle.image_size)
    for _ in range(WARM_UP_PASSES):
        _pass(bundle, pixels)
    warm = resource.getrusage(resource.RUSAGE_SELF)
    seconds = [_pass(bundle, pixels)[0] for _ in range(rounds)]
    done = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds_per_pass": statistics.median(seconds),
        "page_faults_per_pass": (done.ru_minflt - warm.ru_minflt) / rounds,
        "system_seconds_per_pass": (done.ru_stime - warm.ru_stime) / rounds,
        "peak_resident_mb": done.ru_maxrss / 1024,
    }


def compare_allocator(path: Path, batch: int, rounds: int, processes: int) -> dict[str, object]:
    """Fresh processes with glibc's defaults and with the settings, alternately."""
    runs: dict[str, list[dict[str, float]]] = {"system": [], "reuse": []}
    for _ in range(processes):
        for allocator in runs:
            command = [sys.executable, __file__, str(path), "--batch", str(batch)]
            command += ["--rounds", str(rounds), "--child-allocator", allocator]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[allocator].append(json.loads(output))
    row: dict[str, object] = {
        "comparison": "allocator",
        "model": str(path),
        "batch": batch,
        "rounds": rounds,
        "processes": processes,
    }
    for allocator, measured in runs.items():
        median = {key: statistics.median(m[key] for m in measured) for key in measured[0]}
        row[f"{allocator}_images_per_second"] = round(batch / median["seconds_per_pass"], 1)
        row[f"{allocator}_page_faults_per_pass"] = round(median["page_faults_per_pass"])
        row[f"{allocator}_system_seconds_per_pass"] = round(median["system_seconds_per_pass"], 3)
        row[f"{allocator}_peak_resident_mb"] = round(median["peak_resident_mb"])
    row["speedup"] = round(
        float(row["reuse_images_per_second"]) / float(row["system_images_per_second"]), 3
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--batch", type=int, default=720, help="images per pass (a probe step)")
    parser.add_argument("--rounds", type=int, default=30, help="passes per comparison")
    parser.add_argument("--processes", type=int, default=3, help="processes per allocator")
    parser.add_argument("--child-allocator", choices=["system", "reuse"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_allocator:
        row = measure_process(args.models[0], args.batch, args.rounds, args.child_allocator)
        print(json.dumps(row))
        return
    for path in args.models:
        print(json.dumps(compare_attention(path, args.batch, args.rounds)), flush=True)
        row = compare_allocator(path, args.batch, args.rounds, args.processes)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
