"""Benchmark harness: every defence over every model of a lab zoo, in one run, on one machine.

Each (model, defence) pair runs ``clipguard purify`` in its own subprocess, so that its peak
memory (``ru_maxrss`` from ``os.wait4``) and wall time are its own. CBPT and its ablations
invert their own trigger (the seconds of that inversion are recorded apart, as the
purification targets exclude it); every model is also scanned once with ``cbpt``. Results
accumulate in a JSON file; a rerun skips pairs already there (resumable). Tables and a figure
are then regenerated from the results.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipguard.io import atomic_write_json, atomic_write_text
from clipguard.progress import Progress
from clipguard.report import cpu_capability, cpu_model

#: defence name -> (purifier plugin, options, needs the scan's trigger)
DEFENCES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "zeroshot": ("zeroshot", {}, False),
    "coop": ("coop", {}, False),
    # CBPT reuses the trigger of the model's cbpt scan (run once per model, its seconds are
    # recorded with the scan), as `clipguard purify --trigger` does
    "cbpt": ("cbpt", {}, True),
    # the trigger loss even when the scan found no backdoor (on a clean model it costs CA)
    "cbpt-ungated": ("cbpt", {"gate_on_verdict": False}, True),
    "cbpt-no-trigger-loss": ("cbpt", {"no_trigger_loss": True}, True),
    "cbpt-no-anchor-loss": ("cbpt", {"no_anchor_loss": True}, True),
    "cbpt-random-mask": ("cbpt", {"random_mask": True}, True),
    # besides the mask trigger, a smooth warp of at most 8 pixels fitted towards the target
    "cbpt-warp-trigger": ("cbpt", {"warp_trigger_pixels": 8.0}, True),
    # where a reach probe decided the scan, also that probe's transformation towards the target
    "cbpt-probe-trigger": ("cbpt", {"probe_trigger": True}, True),
    # held to the hand-crafted prompts whatever the scan (the default holds a trigger of a scan
    # through fitted prompts to prompts fitted by plain CoOp)
    "cbpt-handcrafted-reference": ("cbpt", {"reference_prompts": "handcrafted"}, True),
    # a KL term keeping the clean-view predictions of the hand-crafted prompts (candidate)
    "cbpt-distill": ("cbpt", {"distill_weight": 3.0}, True),
    # the fine-tuning baselines with the settings that scored best (CA - ASR) on the held-out
    # part of the demo model's training split among lr 3e-4..1e-2 (docs/benchmarks.md); their
    # plugin defaults are gentler, for large pre-trained models
    "finetune": ("finetune", {"lr": 1e-2, "epochs": 30}, False),
    "cleanclip": ("cleanclip", {"lr": 3e-3, "epochs": 20}, False),
    # the plugins' own, gentler defaults (on CIFAR-10 the tuned settings above wreck CA)
    "finetune-default": ("finetune", {}, False),
    "cleanclip-default": ("cleanclip", {}, False),
}
QUICK_DEFENCES = ("cbpt", "finetune")


@dataclass(frozen=True)
class ZooModel:
    """A lab model and what its card says about it."""

    path: Path
    name: str
    attack: str
    target: str | None
    trigger_options: dict[str, Any]
    data_root: Path
    card: dict[str, Any]

    @property
    def backdoored(self) -> bool:
        return self.attack != "none"

    @property
    def sha256(self) -> str | None:
        """The model file's sha256 as its card records it."""
        return self.card.get("model_sha256")


def find_models(zoo: Path) -> list[ZooModel]:
    """Every ``*.safetensors`` model with a lab card (``NAME.card.json``) under ``zoo``."""
    models = []
    for card_file in sorted(Path(zoo).rglob("*.card.json")):
        card = json.loads(card_file.read_text())
        path = card_file.with_name(card_file.name.removesuffix(".card.json") + ".safetensors")
        if not path.is_file():
            continue
        models.append(
            ZooModel(
                path=path,
                name=path.stem,
                attack=card["attack"],
                target=card.get("target"),
                trigger_options=card.get("trigger_options") or {},
                data_root=Path(card["dataset"]["root"]),
                card=card,
            )
        )
    return models


@dataclass
class Measured:
    """One subprocess run: its JSON output, wall seconds and peak resident memory."""

    payload: dict[str, Any]
    wall_seconds: float
    peak_rss_mb: float
    returncode: int
    stderr: str = ""


def option_arguments(flag: str, options: dict[str, Any]) -> list[str]:
    """``[flag, "key=JSON", ...]`` for every option, as the clipguard CLI reads them."""
    return [item for key, value in options.items() for item in (flag, f"{key}={json.dumps(value)}")]


def run_measured(arguments: Sequence[str]) -> Measured:
    """Run ``clipguard ARGUMENTS`` in a subprocess; parse its stdout as JSON.

    The child is reaped with ``os.wait4``, whose resource usage is that child's alone, so its
    peak resident memory is its own (``RUSAGE_CHILDREN`` would be a running maximum).
    """
    command = [sys.executable, "-m", "clipguard", *arguments]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read().strip()
    return Measured(
        payload=json.loads(output) if output.strip().startswith("{") else {},
        wall_seconds=wall,
        peak_rss_mb=usage.ru_maxrss / 1024,  # kilobytes on Linux
        returncode=process.returncode,
        stderr=errors.splitlines()[-1] if errors else "",
    )


@dataclass
class Harness:
    """Runs defences over models and keeps the results in ``results_path``."""

    results_path: Path
    runs_dir: Path
    shots: int = 16
    seed: int = 0
    eval_limit: int = 2000
    #: options of every cbpt scan (e.g. ``{"signals": "size"}``); recorded in the results
    scan_options: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.results_path.is_file():
            self.results = json.loads(self.results_path.read_text())
        self.results.setdefault("runs", [])
        self.results.setdefault("scans", [])
        recorded = self.results.setdefault("scan_options", self.scan_options)
        if recorded != self.scan_options:
            raise ValueError(
                f"{self.results_path} holds scans made with options {recorded}, not "
                f"{self.scan_options}: use another results file"
            )
        self.results["machine"] = {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu": cpu_model(),
            "cpu_capability": cpu_capability(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        }

    def _done(self, kind: str, model: ZooModel, name: str) -> dict[str, Any] | None:
        """The stored entry of ``name`` on ``model``, if it was measured on this very model
        file (same sha256): a model rebuilt under the same name is measured again."""
        for entry in self.results[kind]:
            if (
                entry["model"] == model.name
                and entry.get("defence", "scan") == name
                and entry.get("model_sha256") == model.sha256
            ):
                return entry
        return None

    def _store(self, kind: str, entry: dict[str, Any]) -> None:
        """Save ``entry``, replacing any earlier one of the same model and defence."""
        key = (entry["model"], entry.get("defence", "scan"))
        self.results[kind] = [
            e for e in self.results[kind] if (e["model"], e.get("defence", "scan")) != key
        ] + [entry]
        self._save()

    def _save(self) -> None:
        atomic_write_json(self.results_path, self.results)

    def merge(self, other: Path) -> None:
        """Add the scans and runs of another results file that this one does not have yet."""
        payload = json.loads(Path(other).read_text())
        if payload.get("scan_options", {}) != self.results["scan_options"]:
            raise ValueError(f"{other}: its scans used other options; not merged")
        scanned = {e["model"] for e in self.results["scans"]}
        self.results["scans"] += [e for e in payload.get("scans", []) if e["model"] not in scanned]
        ran = {(e["model"], e["defence"]) for e in self.results["runs"]}
        self.results["runs"] += [
            e for e in payload.get("runs", []) if (e["model"], e["defence"]) not in ran
        ]
        self._save()

    def scan(self, model: ZooModel) -> dict[str, Any]:
        """The cbpt scan of ``model`` (run once; its trigger is reused by CBPT defences)."""
        done = self._done("scans", model, "scan")
        if done is not None and Path(done["trigger"]).is_file():
            return done
        out = self.runs_dir / model.name / "scan"
        measured = run_measured(
            [
                "scan",
                str(model.path),
                "--data",
                str(model.data_root / "train"),
                "--shots",
                str(self.shots),
                "--seed",
                str(self.seed),
                "--out",
                str(out),
                "--json",
                *option_arguments("--option", self.scan_options),
            ]
        )
        if measured.returncode not in (0, 1, 3):  # clean, backdoor, inconclusive
            raise RuntimeError(f"scan of {model.name} failed: {measured.stderr}")
        finding = measured.payload["findings"][0]
        entry = {
            "model": model.name,
            "model_sha256": model.sha256,
            "attack": model.attack,
            "target": model.target,
            "verdict": finding["verdict"],
            "score": finding["score"],
            "suspected_target": finding["target_class"],
            "statistics": finding["statistics"],
            "trigger": str(out / "trigger.safetensors"),
            "scan_seconds": measured.payload["run"]["stage_seconds"].get("scan"),
            "wall_seconds": measured.wall_seconds,
            "peak_rss_mb": measured.peak_rss_mb,
            "image_encoder_images": measured.payload["run"]["image_encoder_images"],
        }
        self._store("scans", entry)
        return entry

    def defend(self, model: ZooModel, defence: str) -> dict[str, Any]:
        """Run one defence on one model (skipped when already in the results)."""
        done = self._done("runs", model, defence)
        if done is not None:
            return done
        purifier, options, needs_trigger = DEFENCES[defence]
        arguments = [
            "purify",
            str(model.path),
            "--data",
            str(model.data_root / "train"),
            "--plugin",
            purifier,
            "--shots",
            str(self.shots),
            "--seed",
            str(self.seed),
            "--eval-data",
            str(model.data_root / "test"),
            "--eval-limit",
            str(self.eval_limit),
            "--out",
            str(self.runs_dir / model.name / defence),
            "--json",
        ]
        arguments += option_arguments("--option", options)
        if model.backdoored:
            arguments += ["--attack", model.attack, "--target", str(model.target)]
            arguments += option_arguments("--attack-option", model.trigger_options)
        if needs_trigger:
            arguments += ["--trigger", self.scan(model)["trigger"]]
        else:
            self.scan(model)
        measured = run_measured(arguments)
        if measured.returncode != 0:
            raise RuntimeError(f"{defence} on {model.name} failed: {measured.stderr}")
        report = measured.payload
        purification = report["purification"]
        recall_before = purification["before"]["class_recall"]
        recall_after = purification["after"]["class_recall"]
        entry = {
            "model": model.name,
            "model_sha256": model.sha256,
            "attack": model.attack,
            "target": model.target,
            "defence": defence,
            "purifier": purifier,
            "options": options,
            "ca_before": purification["before"]["clean_accuracy"],
            "asr_before": purification["before"]["attack_success_rate"],
            "ca_after": purification["after"]["clean_accuracy"],
            "asr_after": purification["after"]["attack_success_rate"],
            "target_recall_before": recall_before.get(model.target) if model.target else None,
            "target_recall_after": recall_after.get(model.target) if model.target else None,
            "lost_classes": [lost["name"] for lost in purification["lost_classes"]],
            "n_eval": purification["after"]["n_images"],
            "purify_seconds": report["run"]["stage_seconds"].get("purify"),
            "inversion_seconds": sum(
                report["run"]["stage_seconds"].get(stage, 0.0)
                for stage in ("inversion", "refinement", "extra triggers")
            ),
            "wall_seconds": measured.wall_seconds,
            "peak_rss_mb": measured.peak_rss_mb,
            "image_encoder_images": report["run"]["image_encoder_images"],
            "text_encoder_prompts": report["run"]["text_encoder_prompts"],
            "oracle_ca": model.card.get("oracle_clean_accuracy"),
            "oracle_asr": model.card.get("oracle_attack_success_rate"),
        }
        self._store("runs", entry)
        return entry

    def run(
        self,
        models: Iterable[ZooModel],
        defences: Sequence[str],
        progress: Progress,
        clean_defences: Sequence[str] | None = None,
    ) -> None:
        """Run every defence on every model; on clean models only ``clean_defences`` (all
        ``defences`` when None)."""
        pairs = [
            (model, defence)
            for model in models
            for defence in defences
            if model.backdoored or clean_defences is None or defence in clean_defences
        ]
        for model, defence in progress.track(pairs, description="benchmark"):
            self.defend(model, defence)


# --------------------------------------------------------------------------- tables


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def markdown_tables(results: dict[str, Any], defences: Sequence[str]) -> str:
    """Per-attack and averaged CA/ASR tables (like the paper's Table 1), and cost ratios."""
    runs = results["runs"]
    attacks = sorted({r["attack"] for r in runs if r["attack"] != "none"})
    present = [d for d in defences if any(r["defence"] == d for r in runs)]
    lines = [
        "### Backdoored models: CA / ASR after each defence (%)",
        "",
        "The last column is the oracle ceiling of the lab models (model cards): a linear probe "
        "trained on clean and really triggered features with their true labels (at logit "
        "scale 100).",
        "",
        "| attack | models | " + " | ".join(present) + " | oracle ceiling |",
        "|---|---|" + "---|" * len(present) + "---|",
    ]
    for attack in [*attacks, "average"]:
        cells = []
        for defence in present:
            chosen = [
                r
                for r in runs
                if r["defence"] == defence
                and r["attack"] != "none"
                and (attack == "average" or r["attack"] == attack)
            ]
            ca = _mean(r["ca_after"] for r in chosen)
            asr = _mean(r["asr_after"] for r in chosen)
            cells.append(f"{_pct(ca)} / {_pct(asr)}")
        label = f"**{attack}**" if attack == "average" else attack
        reference = [
            r
            for r in runs
            if r["defence"] == present[0]
            and r["attack"] != "none"
            and (attack == "average" or r["attack"] == attack)
        ]
        oracle = (
            f"{_pct(_mean(r.get('oracle_ca') for r in reference))} / "
            f"{_pct(_mean(r.get('oracle_asr') for r in reference))}"
        )
        lines.append(f"| {label} | {len(reference)} | " + " | ".join(cells) + f" | {oracle} |")
    lines += _recall_table(runs, present)
    clean_runs = [r for r in runs if r["attack"] == "none"]
    if clean_runs:
        lines += [
            "",
            "### Clean models: CA before -> after (%)",
            "",
            "| defence | CA before | CA after | change (points) |",
            "|---|---|---|---|",
        ]
        for defence in [d for d in present if any(r["defence"] == d for r in clean_runs)]:
            chosen = [r for r in clean_runs if r["defence"] == defence]
            before = _mean(r["ca_before"] for r in chosen)
            after = _mean(r["ca_after"] for r in chosen)
            change = None if before is None or after is None else 100 * (after - before)
            lines.append(
                f"| {defence} | {_pct(before)} | {_pct(after)} | "
                f"{'-' if change is None else f'{change:+.2f}'} |"
            )
    backdoored = backdoored_runs(runs)
    costed = backdoored or list(runs)
    over = "the backdoored models, which every defence purified" if backdoored else "the models"
    lines += [
        "",
        f"### Cost per purification (mean over {over}; ratio to cbpt in the same run)",
        "",
        "| defence | purify s | of which inversion s | ratio | peak MB | ratio | "
        "image-encoder images |",
        "|---|---|---|---|---|---|---|",
    ]
    cbpt_time = _mean(r["purify_seconds"] for r in costed if r["defence"] == "cbpt")
    cbpt_memory = _mean(r["peak_rss_mb"] for r in costed if r["defence"] == "cbpt")
    for defence in present:
        chosen = [r for r in costed if r["defence"] == defence]
        seconds = _mean(r["purify_seconds"] for r in chosen)
        memory = _mean(r["peak_rss_mb"] for r in chosen)
        images = _mean(r["image_encoder_images"] for r in chosen)
        inversion = _mean(r.get("inversion_seconds") for r in chosen) or 0.0
        time_ratio = f"{seconds / cbpt_time:.2f}" if seconds and cbpt_time else "-"
        memory_ratio = f"{memory / cbpt_memory:.2f}" if memory and cbpt_memory else "-"
        lines.append(
            f"| {defence} | {seconds:.2f} | {inversion:.2f} | {time_ratio} | {memory:.0f} | "
            f"{memory_ratio} | "
            f"{images:.0f} |"
        )
    scans = results.get("scans", [])
    if scans:
        lines += [
            "",
            "### cbpt scans of these models",
            "",
            "| model | attack | target | verdict | suspected target | score | scan s |",
            "|---|---|---|---|---|---|---|",
        ]
        for scan in scans:
            lines.append(
                f"| {scan['model']} | {scan['attack']} | {scan['target'] or '-'} | "
                f"{scan['verdict']} | {scan['suspected_target'] or '-'} | {scan['score']:.3f} | "
                f"{scan['scan_seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def _recall_table(runs: Sequence[dict[str, Any]], defences: Sequence[str]) -> list[str]:
    """The target class's recall before and after each defence, and how many runs lost a class
    (``lost_classes`` of the purify report); empty for results stored before recall was."""
    recorded = [r for r in runs if "lost_classes" in r]
    if not recorded:
        return []
    lines = [
        "",
        "### The target class's recall, and classes lost (backdoored models; all models)",
        "",
        "A purification can bring ASR to 0 by no longer predicting the target class; the "
        "target's recall on its own clean test images shows it. A run *loses* a class when the "
        "class's recall falls below half, by at least 15 points (the purify report's "
        "`lost_classes`).",
        "",
        "| defence | target recall before % | target recall after % | runs losing a class, "
        "backdoored | runs losing a class, clean |",
        "|---|---|---|---|---|",
    ]
    for defence in defences:
        chosen = [r for r in recorded if r["defence"] == defence]
        if not chosen:
            continue
        backdoored = [r for r in chosen if r["attack"] != "none"]
        clean = [r for r in chosen if r["attack"] == "none"]
        lines.append(
            f"| {defence} | {_pct(_mean(r['target_recall_before'] for r in backdoored))} | "
            f"{_pct(_mean(r['target_recall_after'] for r in backdoored))} | "
            f"{sum(bool(r['lost_classes']) for r in backdoored)} of {len(backdoored)} | "
            f"{sum(bool(r['lost_classes']) for r in clean)} of {len(clean)} |"
        )
    return lines


def backdoored_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs on backdoored models: every defence purifies those (clean models may get only
    some defences), so means of cost over them compare like with like."""
    return [r for r in runs if r["attack"] != "none"]


def write_figure(results: dict[str, Any], defences: Sequence[str], path: Path) -> None:
    """PNG: CA against ASR per defence (backdoored models), and purification time per defence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = backdoored_runs(results["runs"])
    present = [d for d in defences if any(r["defence"] == d for r in results["runs"])]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.get_cmap("tab20").colors  # distinct for up to 20 defences
    markers = "osD^v<>"
    for index, defence in enumerate(present):
        chosen = [r for r in runs if r["defence"] == defence]
        left.scatter(
            [100 * (r["asr_after"] or 0) for r in chosen],
            [100 * r["ca_after"] for r in chosen],
            label=defence,
            alpha=0.8,
            color=colours[index % len(colours)],
            marker=markers[index % len(markers)],
        )
    left.set_xlabel("ASR after (%)")
    left.set_ylabel("CA after (%)")
    left.set_title("backdoored models: lower right is bad, upper left is good")
    left.legend(fontsize=7)
    seconds = [_mean(r["purify_seconds"] for r in runs if r["defence"] == d) or 0 for d in present]
    right.barh(present, seconds)
    right.set_xlabel("purification seconds (mean over backdoored models)")
    right.set_title("cost on this machine")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    os.replace(temporary, path)


def update_docs(
    doc: Path,
    tables: str,
    figure: Path | None,
    command: str,
    results: Path,
    section: str = "benchmark-tables",
) -> None:
    """Replace the generated ``section`` of ``doc`` (between its markers) with fresh tables."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    generated = [
        begin,
        "",
        f"Generated by `{command}` from `{results.as_posix()}`.",
        "",
        tables,
    ]
    if figure is not None:
        generated += [f"![CA against ASR, and time, per defence]({figure.as_posix()})", ""]
    generated.append(end)
    block = "\n".join(generated)
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(doc, text)
