"""One prepared check of the GPU path: scan and purify a lab model and a ViT-B/32 on ``cuda``.

    python -m benchmarks.gpu_check --cifar /path/to/cifar10/train --out /tmp/gpu-check

Runs the ``clipguard`` command line as a user would (``--device cuda`` by default):

1. a lab model (``clipguard lab build --dataset synthetic --attack badnets``) on the built-in
   synthetic set: ``scan --estimate``, ``scan``, ``purify --trigger`` with the scan's trigger;
2. a ViT-B-32 of random weights (:func:`benchmarks.realsize_cost.random_checkpoint`; cost
   only, its verdict means nothing) on 10 classes of ``--cifar``: ``scan --estimate``,
   ``scan`` with the defaults, ``purify --trigger``.

Prints one JSON object: per step the command, its exit code and wall seconds, the verdict,
the projected and actual cost of each scan, CA and ASR before and after each purification,
and the device's name. ``--quick`` cuts every budget (a smoke test of the
script itself, e.g. on ``--device cpu``); ``--skip-vit`` leaves the ViT-B/32 out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.realsize_cost import class_subset, random_checkpoint

#: options of --quick: a few steps of every stage
QUICK = [
    "-o", "budget=400", "-o", "class_steps=3", "-o", "prompt_steps=5", "-o", "additive_steps=2",
    "-o", "warp_steps=2", "-o", "refine_steps=2", "-o", "probe_held_out=4",
]  # fmt: skip
QUICK_PURIFY = ["-o", "steps=5", "-o", "augmentations=1"]


def _run(step: str, args: list[str], results: dict[str, Any]) -> dict[str, Any]:
    """Run ``clipguard ARGS``; record its exit code, seconds and the tail of its stderr."""
    command = [sys.executable, "-m", "clipguard", *args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    record = {
        "command": " ".join(["clipguard", *args]),
        "exit_code": done.returncode,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if done.returncode not in (0, 1, 3):
        record["stderr"] = done.stderr[-2000:]
    if "--estimate" in args and done.returncode == 0:
        estimate = json.loads(done.stdout)
        record["projected_seconds"] = estimate["projected_seconds"]
        record["units"] = estimate["units"]
    results[step] = record
    print(f"{step}: exit {done.returncode}, {record['seconds']} s", file=sys.stderr, flush=True)
    return record


def _scan_figures(out: Path) -> dict[str, Any]:
    report = json.loads((out / "report.json").read_text())
    cost = report["run"]["cost"] or {}
    return {
        "verdict": report["verdict"],
        "target_class": report["target_class"],
        "run_seconds": round(report["run"]["seconds"], 1),
        "projected_seconds": cost.get("projected_seconds"),
        "stages": {
            s["stage"]: {"projected": s["projected_seconds"], "actual": s["actual_seconds"]}
            for s in cost.get("stages", [])
        },
        "next_steps": report["findings"][0]["next_steps"],
    }


def _purify_figures(out: Path) -> dict[str, Any]:
    purification = json.loads((out / "report.json").read_text())["purification"]
    return {
        key: {
            "CA": purification[key]["clean_accuracy"],
            "ASR": purification[key]["attack_success_rate"],
        }
        for key in ("before", "after", "inverted_trigger_before", "inverted_trigger_after")
        if purification.get(key)
    }


def check(
    name: str,
    model: Path,
    data: Path,
    out: Path,
    device: str,
    extra: list[str],
    purify_extra: list[str],
    results: dict[str, Any],
    attack: list[str] | None = None,
) -> None:
    """Estimate, scan and purify ``model`` on ``data``; figures into ``results[name]``."""
    figures: dict[str, Any] = {}
    common = [str(model), "--data", str(data), "--device", device]
    estimate = _run(f"{name} estimate", ["scan", *common, "--estimate", "--json", *extra], {})
    figures["estimate"] = estimate
    scan_out = out / f"{name}-scan"
    figures["scan"] = _run(
        f"{name} scan", ["scan", *common, "--out", str(scan_out), "-q", *extra], {}
    )
    if (scan_out / "report.json").exists():
        figures["scan"].update(_scan_figures(scan_out))
    trigger = scan_out / "trigger.safetensors"
    if trigger.exists():
        purify_out = out / f"{name}-purify"
        figures["purify"] = _run(
            f"{name} purify",
            [
                "purify", *common, "--trigger", str(trigger), "--out", str(purify_out), "-q",
                "--eval-limit", "500", *(attack or []), *purify_extra,
            ],
            {},
        )  # fmt: skip
        if (purify_out / "report.json").exists():
            figures["purify"].update(_purify_figures(purify_out))
    results[name] = figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder")
    parser.add_argument("--cifar", type=Path, help="CIFAR-10 ImageFolder (train)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: test the script")
    parser.add_argument("--skip-vit", action="store_true", help="only the lab model")
    args = parser.parse_args(argv)
    if not args.skip_vit and args.cifar is None:
        parser.error("--cifar is needed for the ViT-B/32 check (or pass --skip-vit)")
    args.out.mkdir(parents=True, exist_ok=True)
    extra = QUICK if args.quick else []
    purify_extra = QUICK_PURIFY if args.quick else []
    results: dict[str, Any] = {"device": args.device, "torch": torch.__version__}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)

    lab_model = args.out / "lab-badnets.safetensors"
    if not lab_model.exists():
        _run(
            "lab build",
            [
                "lab", "build", "--dataset", "synthetic", "--attack", "badnets", "--target",
                "blue star", "--out", str(lab_model),
            ],
            results,
        )  # fmt: skip
    synthetic = args.out / "synthetic"
    if not synthetic.exists():
        _run("lab data", ["lab", "data", "synthetic", "--out", str(synthetic)], results)
    check(
        "lab",
        lab_model,
        synthetic / "test",
        args.out,
        args.device,
        extra,
        purify_extra,
        results,
        attack=["--attack", "badnets", "--target", "blue star"],
    )
    if not args.skip_vit:
        vit = random_checkpoint(args.out / "vit-b-32-random.safetensors", seed=0)
        data = class_subset(args.cifar, 10, args.out / "cifar10-subset")
        check("vit-b-32", vit, data, args.out, args.device, extra, purify_extra, results)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
