"""The ``clipguard`` command line: a thin typer layer over :mod:`clipguard.api`.

Exit codes: 0 success (``scan``: verdict clean), 1 (``scan``: backdoor found;
``purify --fail-on-lost-class``: a class was lost), 2 error (bad input, refused or corrupt
checkpoint, plugin problem), 3 (``scan``: verdict inconclusive), 130 interrupted.
``scan --fail-on`` chooses which verdicts fail (default: backdoor and inconclusive).
Errors are one line on stderr; ``CLIPGUARD_DEBUG=1`` adds the traceback.

Every command checks its options and paths first (output folders and the report files it
will replace included: :mod:`clipguard.outputs`), then imports torch and does the work:
``--help``, ``--version``, ``plugins``, ``schema`` and every such error answer without
loading torch (:mod:`clipguard.api` is imported inside the commands that need it).

``scan``, ``purify`` and ``evaluate`` run with ``--threads`` torch CPU threads (environment
variable ``CLIPGUARD_THREADS``); by default the smaller of torch's own count and 2
(:func:`clipguard.runtime.cli_threads`), the count the plugins used to cap themselves at.
The API leaves torch's count as it is unless told otherwise.

Installed plugins add commands through the ``clipguard_register_commands`` hook: the lab
adds ``clipguard lab ...`` and ``clipguard demo``.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from clipguard import fleet
from clipguard.cli_errors import (
    EXIT_BACKDOOR,
    EXIT_CLEAN,
    EXIT_INCONCLUSIVE,
    EXIT_INTERRUPTED,
    EXIT_LOST_CLASS,
    handle_errors,
)
from clipguard.cli_options import DrawsOpt, QuietOpt, SeedOpt, ThreadsOpt
from clipguard.config import parse_options
from clipguard.defaults import (
    DEFAULT_DRAWS,
    DEFAULT_EVAL_LIMIT,
    DEFAULT_MAX_MINUTES,
    DEFAULT_SHOTS,
)
from clipguard.errors import InputError
from clipguard.io import atomic_write_text
from clipguard.outputs import SUFFIXES, OutputPlan, check_output_dir, parse_formats, plan_outputs
from clipguard.plugins import get_registry, register_commands
from clipguard.progress import display
from clipguard.render import lost_class_warnings, next_step_lines, render
from clipguard.report import CostRecord, EvaluationReport, Report, read_report, write_schemas

DEFAULT_SCHEMA_DIR = Path("schemas")
#: the command line being run, as :class:`_RecordingGroup` read it (:func:`command_line`)
_command_line: ContextVar[str | None] = ContextVar("clipguard_command_line", default=None)


class _RecordingGroup(TyperGroup):
    """The root command group; it records the command line it is given, so a report can
    carry it whole (:func:`command_line`)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        _command_line.set(shlex.join([ctx.info_name or "clipguard", *args]))
        return super().parse_args(ctx, args)


def command_line() -> str:
    """The command line being run, shell-quoted: the program name and every argument as
    given (what a report records as ``run.command``)."""
    recorded = _command_line.get()
    assert recorded is not None, "command_line() outside a command"
    return recorded


app = typer.Typer(
    name="clipguard",
    cls=_RecordingGroup,
    help="Audit CLIP models for backdoors and purify them with class-wise prompts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
report_app = typer.Typer(no_args_is_help=True, help="Work with stored reports (report.json).")
app.add_typer(report_app, name="report")
stdout = Console()
stderr = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from clipguard import __version__

        typer.echo(f"clipguard {__version__}")
        raise typer.Exit()


@app.callback(
    epilog="Examples:\n\n  clipguard scan model.safetensors --data clean/ --out audit/\n\n"
    "  clipguard report render audit/report.json --format html,sarif --out audit/\n\n"
    "  clipguard scan --help\n\n"
    "Exit codes: 0 clean, 1 backdoor, 2 error, 3 inconclusive (scan --fail-on chooses)."
)
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Audit CLIP models for backdoors and purify them with class-wise prompts."""


#: the exit code of each scan verdict when ``--fail-on`` names it
VERDICT_EXIT = {"backdoor": EXIT_BACKDOOR, "inconclusive": EXIT_INCONCLUSIVE}


def scan_exit_code(verdict: str, fail_on: list[str]) -> int:
    """The exit code of a scan whose verdict is ``verdict``: its code in
    :data:`VERDICT_EXIT` when ``fail_on`` names it, else 0."""
    return VERDICT_EXIT[verdict] if verdict in fail_on else EXIT_CLEAN


def _fail_on(values: list[str] | None) -> list[str]:
    """``--fail-on`` values (repeatable, comma-separated) as a list; none given: both."""
    if not values:
        return list(VERDICT_EXIT)
    chosen = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if unknown := [value for value in chosen if value not in (*VERDICT_EXIT, "none")]:
        raise InputError(f"--fail-on {', '.join(unknown)}: choose backdoor, inconclusive or none")
    return [value for value in chosen if value != "none"]


# Shared options ------------------------------------------------------------------------

ModelArg = Annotated[Path, typer.Argument(help="CLIP checkpoint (.safetensors, .pt/.pth/.bin)")]
DataOpt = Annotated[
    Path, typer.Option("--data", help="clean ImageFolder: one sub-folder per class")
]
ShotsOpt = Annotated[int, typer.Option("--shots", help="clean images per class the plugin may use")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="torch device: cpu, cuda, cuda:1, or auto (CUDA if present)")
]
OptionOpt = Annotated[
    list[str] | None, typer.Option("--option", "-o", help="plugin option key=value (repeatable)")
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="plugin options file (JSON/TOML)")]
ClassnamesOpt = Annotated[
    Path | None, typer.Option("--classnames", help="class names, one per line, in folder order")
]
ArchOpt = Annotated[
    str | None, typer.Option("--arch", help="open_clip architecture name, if the file has none")
]
TorchScriptOpt = Annotated[
    bool,
    typer.Option("--allow-torchscript", help="load TorchScript archives (they can carry code)"),
]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="print the report as JSON on stdout (the same as --format json)"),
]
FormatOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--format",
        help="report formats: json, md, html, sarif (repeatable or comma-separated). One "
        "format is printed on stdout (and written as report.<format> with --out); several are "
        "written under --out only; with --json, JSON goes to stdout and the others to --out",
        show_default=False,
    ),
]
SarifBaseOpt = Annotated[
    Path | None,
    typer.Option(
        "--sarif-base",
        help="folder the SARIF locations are relative to (uriBaseId SRCROOT) [default: the "
        "current folder]",
        show_default=False,
    ),
]
AttackOpt = Annotated[
    str | None, typer.Option("--attack", help="registered trigger family to measure ASR with")
]
AttackOptionOpt = Annotated[
    list[str] | None, typer.Option("--attack-option", help="trigger option key=value (repeatable)")
]
TargetOpt = Annotated[
    str | None,
    typer.Option("--target", help="target class of the attack: a class or class-folder name"),
]


# Checks made before torch loads --------------------------------------------------------


def _check_model(model: Path) -> None:
    """The model exists (what it holds is checked when it is loaded)."""
    if not model.exists():
        raise InputError(f"{model}: model file not found")


def _check_file(path: Path | None, what: str) -> None:
    """``path``, when given, is a regular file."""
    if path is not None and not path.is_file():
        reason = "is not a regular file" if path.exists() else "not found"
        raise InputError(f"{path}: {what} {reason}")


def _check_data(data: Path, classnames: Path | None, target: str | None = None) -> str | None:
    """Check the data folder's classes (not its images) and resolve ``target`` to its class
    name (a folder name is accepted: :func:`clipguard.data.resolve_class`)."""
    from clipguard.data import class_folders, class_names, resolve_class

    folders = class_folders(data)
    names = class_names(data, folders, classnames)
    return None if target is None else names[resolve_class(target, names, folders)]


def _plan(
    formats: Sequence[str] | None,
    json_output: bool,
    out: Path | None,
    sarif_base: Path | None,
    also_written: Sequence[str] = ("report.json",),
) -> OutputPlan:
    """Where the report goes (:func:`clipguard.outputs.plan_outputs`), with the output
    folder and the files the run writes there (``also_written`` and the report files)
    checked."""
    plan = plan_outputs(parse_formats(formats), json_output, out)
    if out is not None:
        check_output_dir(out, [*also_written, *plan.file_names()])
    if sarif_base is not None and not sarif_base.is_dir():
        raise InputError(f"--sarif-base {sarif_base}: not a folder")
    return plan


def _check_plugin(kind: str, name: str) -> None:
    """The plugin is registered (checked without importing it)."""
    get_registry().entry(kind, name)


def _check_draws(draws: int) -> None:
    """``--draws`` is at least 1 (checked before torch loads, as one line)."""
    if draws < 1:
        raise InputError(f"--draws must be at least 1, got {draws}")


def _time_budget(max_minutes: float | None) -> float | None:
    """``--max-minutes`` as the API takes it: None for none or 0 (no time budget); a negative
    value is one line, before torch loads."""
    if max_minutes is None:
        return None
    if max_minutes < 0:
        raise InputError(f"--max-minutes must be 0 (none) or above, got {max_minutes:g}")
    return max_minutes or None


def _check_attack(attack: str | None, target: str | None) -> None:
    """``--attack`` and ``--target`` come together, and the attack is registered."""
    if (attack is None) != (target is None):
        raise InputError("--attack and --target go together")
    if attack is not None:
        _check_plugin("attack", attack)


def _emit(
    report: Report,
    plan: OutputPlan,
    out: Path | None,
    sarif_base: Path | None,
    write_json: bool = False,
) -> None:
    """Write the report files of ``plan`` under ``out`` (report.json only when
    ``write_json``: a run writes it itself) and print ``plan.stdout``."""
    for fmt in plan.files:
        if out is not None and (fmt != "json" or write_json):
            atomic_write_text(out / f"report.{SUFFIXES[fmt]}", render(report, fmt, sarif_base))
    if plan.stdout is not None:
        typer.echo(render(report, plan.stdout, sarif_base), nl=False)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


#: how the summaries colour each verdict
VERDICT_COLOURS = {"backdoor": "bold red", "clean": "green", "inconclusive": "yellow"}


def _print_scan_summary(report: Report, out: Path | None) -> None:
    table = Table(title=f"clipguard scan: {report.model.path}", show_header=True)
    for column in ("scanner", "verdict", "score", "target class", "explanation"):
        table.add_column(column)
    for finding in report.findings:
        table.add_row(
            finding.scanner,
            f"[{VERDICT_COLOURS[finding.verdict]}]{finding.verdict}[/]",
            f"{finding.score:.3f}",
            finding.target_class or "-",
            finding.explanation,
        )
    stderr.print(table)
    for line in next_step_lines(report):
        stderr.print(line, style="yellow", highlight=False)
    if out is not None:
        stderr.print(f"report: {out / 'report.json'}", highlight=False)
        for finding in report.findings:
            for name, path in finding.artifacts.items():
                stderr.print(f"{name}: {path}", highlight=False)


def cost_table(cost: CostRecord) -> Table | Text:
    """The plan and projection of a scan (:mod:`clipguard.cost`) as a table for people."""
    from clipguard.cost import minutes

    if not cost.known:
        return Text(f"projected cost: unknown ({cost.reason})")
    units = cost.units
    title = f"projected cost ({cost.scanner}"
    if units is not None:
        title += (
            f", {units.device}, {units.threads} threads: {units.image_pass_seconds:.4f} s per "
            f"image with backward, {units.text_pass_seconds:.4f} s per prompt step"
        )
    title += ")"
    table = Table(title=title)
    for column in ("stage", "image passes", "image forwards", "text passes", "at most", "when"):
        table.add_column(column)
    for stage in cost.stages:
        table.add_row(
            stage.stage,
            f"{stage.image_passes:,}",
            f"{stage.image_forwards:,}",
            f"{stage.text_passes:,}",
            minutes(stage.projected_seconds),
            stage.condition or "always",
        )
    total = minutes(cost.projected_seconds)
    table.add_row("total (loading and measuring included)", "", "", "", total, "")
    budget = "" if cost.budget is None else f"budget {cost.budget:,} images"
    if cost.budget_needed is not None:
        budget += f" (uncut: {cost.budget_needed:,})"
    table.caption = "; ".join(part for part in [budget, *cost.notes] if part)
    return table


def _print_purify_summary(report: Report, out: Path | None) -> None:
    purification = report.purification
    assert purification is not None
    table = Table(title=f"clipguard purify ({purification.purifier}): {report.model.path}")
    for column in (
        "",
        "CA",
        "ASR" + (f" ({purification.attack.name})" if purification.attack else ""),
    ):
        table.add_column(column)
    table.add_row(
        "before",
        _percent(purification.before.clean_accuracy),
        _percent(purification.before.attack_success_rate),
    )
    table.add_row(
        "after",
        _percent(purification.after.clean_accuracy),
        _percent(purification.after.attack_success_rate),
    )
    stderr.print(table)
    for warning in lost_class_warnings(report):
        stderr.print(f"warning: {warning} (docs/user-guide.md)", style="yellow", highlight=False)
    judged, n_classes = purification.classes_judged, len(report.data.classes)
    if judged is not None and judged < n_classes:
        stderr.print(
            f"note: only {judged} of {n_classes} classes had enough evaluation images to judge "
            "whether the purification lost them; raise --eval-limit (0: all images)",
            highlight=False,
        )
    if purification.inverted_trigger_after is not None and purification.inverted_trigger_before:
        stderr.print(
            "inverted-trigger ASR: "
            f"{_percent(purification.inverted_trigger_before.attack_success_rate)} -> "
            f"{_percent(purification.inverted_trigger_after.attack_success_rate)}",
            highlight=False,
        )
    if out is not None:
        stderr.print(f"report: {out / 'report.json'}", highlight=False)
        for name, path in purification.artifacts.items():
            stderr.print(f"{name}: {path}", highlight=False)


# Commands ------------------------------------------------------------------------------


SCAN_EXAMPLES = """Examples:

  clipguard scan model.safetensors --data clean/ --out audit/

  clipguard scan model.safetensors --data clean/ --json > report.json

  clipguard scan model.safetensors --data clean/ --out audit/ --format html,sarif

  clipguard scan model.safetensors --data clean/ --fail-on backdoor -q

  clipguard scan models/ --data clean/ --out audits/ --jobs 2

  clipguard scan models/ --data clean/ --out audits/ --executor ray --ray-address HEAD:6379
"""


@app.command(epilog=SCAN_EXAMPLES)
@handle_errors
def scan(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="CLIP checkpoint (.safetensors, .pt/.pth/.bin); several, or folders searched "
            "for them, make a fleet scan (docs/fleet.md)",
            metavar="MODEL",
            show_default=False,
        ),
    ],
    data: DataOpt,
    plugin: Annotated[
        str, typer.Option("--plugin", help="scanner name (see `clipguard plugins`)")
    ] = "cbpt",
    shots: ShotsOpt = DEFAULT_SHOTS,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="folder for report.json and artefacts (a fleet: a folder per model and "
            "summary.jsonl; required)",
        ),
    ] = None,
    option: OptionOpt = None,
    config: ConfigOpt = None,
    classnames: ClassnamesOpt = None,
    arch: ArchOpt = None,
    allow_torchscript: TorchScriptOpt = False,
    seed: SeedOpt = 0,
    draws: DrawsOpt = DEFAULT_DRAWS,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    json_output: JsonOpt = False,
    output_format: FormatOpt = None,
    sarif_base: SarifBaseOpt = None,
    fail_on: Annotated[
        list[str] | None,
        typer.Option(
            "--fail-on",
            help="verdicts that fail the command: backdoor, inconclusive (repeatable or "
            "comma-separated; none: always exit 0 after a scan) [default: both]",
            show_default=False,
        ),
    ] = None,
    quiet: QuietOpt = False,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="measure a few passes of the model on --device and print the scan's plan "
            "(stages, encoder passes, projected seconds) without scanning; --json for machines",
        ),
    ] = False,
    max_minutes: Annotated[
        float | None,
        typer.Option(
            "--max-minutes",
            help="time budget of the whole scan (default: none): the scanner does less work "
            "to end in time; a scan cut short is inconclusive, with what to run next",
            show_default=False,
        ),
    ] = DEFAULT_MAX_MINUTES,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            min=1,
            help="fleet: models scanned at a time; above 1, each in its own process "
            "(default: 1; with --executor ray: as many as the cluster fits)",
            show_default=False,
        ),
    ] = None,
    executor: Annotated[
        str,
        typer.Option(
            "--executor", help="fleet: local (processes here) or ray (a Ray task per model)"
        ),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="fleet: the Ray cluster to run on, HEAD:6379 (default: a local Ray)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Scan MODEL for a backdoor; several models, or folders of them, make a fleet scan.

    Exit 0: clean, 1: backdoor found, 2: error, 3: inconclusive (with the default --fail-on).
    Every scan prints its projected cost when it starts (not with -q); --estimate prints it
    alone, exit 0.

    Fleet scan: several MODELs, or folders searched for checkpoints (--out
    required). Writes OUT/<model>/report.json (and the --format files) per
    model and OUT/summary.jsonl, a JSON line per model (--json prints them).
    A rerun skips the models already scanned with the same options.
    Exit 2 if any model failed, else 1 if any is a backdoor, else 3 if any
    is inconclusive (each as --fail-on chooses), else 0 (docs/fleet.md).
    """
    failing = _fail_on(fail_on)
    arguments: dict[str, Any] = {
        "scanner": plugin,
        "shots": shots,
        "seed": seed,
        "device": device,
        "options": parse_options(option or []),
        "config_file": config,
        "classnames_file": classnames,
        "arch": arch,
        "allow_torchscript": allow_torchscript,
        "draws": draws,
        "threads": threads,
        "max_minutes": _time_budget(max_minutes),
        "command": command_line(),
    }
    if fleet.is_fleet(models):
        if estimate:
            raise InputError("--estimate takes one model file, not a fleet")
        fleet_args = {"jobs": jobs, "executor": executor, "ray_address": ray_address}
        code = _scan_fleet(models, data, out, arguments, fleet_args, output_format, json_output,
                           sarif_base, failing, quiet)  # fmt: skip
        raise typer.Exit(code)
    (model,) = models
    plan = _plan(output_format, json_output, out, sarif_base)
    _check_model(model)
    _check_file(config, "config file")
    _check_data(data, classnames)
    _check_plugin("scanner", plugin)
    _check_draws(draws)
    from clipguard import api
    from clipguard.runtime import cli_threads

    arguments["threads"] = cli_threads(threads)
    if estimate:
        with display("clipguard scan --estimate", quiet):
            cost = api.estimate(model, data, **arguments)
        if json_output:
            typer.echo(cost.model_dump_json(indent=2))
        else:
            stdout.print(cost_table(cost))
        raise typer.Exit(EXIT_CLEAN)
    show_plan = not quiet and plan.stdout is None
    with display("clipguard scan", quiet):
        report = api.scan(
            model,
            data,
            out_dir=out,
            quiet=quiet,
            on_plan=(lambda cost: stderr.print(cost_table(cost))) if show_plan else None,
            **arguments,
        )
    _emit(report, plan, out, sarif_base)
    if plan.stdout is None and not quiet:
        _print_scan_summary(report, out)
    raise typer.Exit(scan_exit_code(report.verdict or "clean", failing))


def _scan_fleet(
    models: list[Path],
    data: Path,
    out: Path | None,
    arguments: dict[str, Any],
    fleet_args: dict[str, Any],
    output_format: list[str] | None,
    json_output: bool,
    sarif_base: Path | None,
    failing: list[str],
    quiet: bool,
) -> int:
    """``clipguard scan`` of a fleet (:mod:`clipguard.fleet`): checked first, then run under
    one progress display (a bar of models done); the summary table on stderr (not with
    ``quiet``), the rows as JSON lines on stdout with ``--json``; returns the exit code."""
    from clipguard import fleet

    if out is None:
        raise InputError("a fleet scan (several models or a folder) needs --out")
    plan = fleet.plan_fleet(
        models,
        data,
        out,
        fleet.ScanSettings(**arguments),
        formats=parse_formats(output_format),
        sarif_base=sarif_base,
        **fleet_args,
    )
    finished: list[fleet.FleetRow] = []
    try:
        with display(f"clipguard scan: {len(plan.models)} models", quiet):
            rows = fleet.run_fleet(plan, quiet=quiet, on_row=finished.append)
    except KeyboardInterrupt:
        stderr.print(
            f"interrupted: {len(finished)} of {len(plan.models)} models finished "
            f"({out / fleet.SUMMARY_FILE}); run the command again to resume",
            style="yellow",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if json_output:
        for row in rows:
            typer.echo(row.model_dump_json())
    if not quiet:
        _print_fleet_summary(rows, out)
    return fleet.fleet_exit_code(rows, failing)


def _print_fleet_summary(rows: Sequence[fleet.FleetRow], out: Path) -> None:
    counts = {verdict: sum(row.verdict == verdict for row in rows) for verdict in VERDICT_COLOURS}
    failed = sum(row.error is not None for row in rows)
    title = f"clipguard scan: {len(rows)} models, " + ", ".join(
        [f"{count} {verdict}" for verdict, count in counts.items()] + [f"{failed} failed"]
    )
    table = Table(title=title)
    for column in ("model", "verdict", "score", "target class", "seconds", "error"):
        table.add_column(column)
    for row in rows:
        verdict = "error" if row.verdict is None else row.verdict
        seconds = f"{row.seconds:.1f}" + (" (reused)" if row.reused else "")
        table.add_row(
            Text(row.name),
            f"[{VERDICT_COLOURS.get(verdict, 'bold red')}]{verdict}[/]",
            "-" if row.score is None else f"{row.score:.3f}",
            Text(row.target or "-"),
            seconds,
            Text(row.error or ""),
        )
    stderr.print(table)
    stderr.print(f"summary: {out / fleet.SUMMARY_FILE}", highlight=False, soft_wrap=True)


PURIFY_EXAMPLES = """Examples:

  clipguard purify model.safetensors --data clean/ --out purified/

  clipguard purify model.safetensors --data clean/ --trigger audit/trigger.safetensors \\
  --attack badnets --target blue_star --out purified/ --format md
"""


@app.command(epilog=PURIFY_EXAMPLES)
@handle_errors
def purify(
    model: ModelArg,
    data: DataOpt,
    plugin: Annotated[
        str, typer.Option("--plugin", help="purifier name (see `clipguard plugins`)")
    ] = "cbpt",
    trigger: Annotated[
        Path | None, typer.Option("--trigger", help="trigger.safetensors from an earlier scan")
    ] = None,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="ImageFolder for before/after metrics")
    ] = None,
    eval_limit: Annotated[
        int, typer.Option("--eval-limit", help="at most this many evaluation images (0: all)")
    ] = DEFAULT_EVAL_LIMIT,
    attack: AttackOpt = None,
    attack_option: AttackOptionOpt = None,
    target: TargetOpt = None,
    shots: ShotsOpt = DEFAULT_SHOTS,
    out: Annotated[Path | None, typer.Option("--out", help="folder for prompts and report")] = None,
    option: OptionOpt = None,
    config: ConfigOpt = None,
    classnames: ClassnamesOpt = None,
    arch: ArchOpt = None,
    allow_torchscript: TorchScriptOpt = False,
    seed: SeedOpt = 0,
    draws: DrawsOpt = DEFAULT_DRAWS,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    json_output: JsonOpt = False,
    output_format: FormatOpt = None,
    sarif_base: SarifBaseOpt = None,
    quiet: QuietOpt = False,
    fail_on_lost_class: Annotated[
        bool,
        typer.Option(
            "--fail-on-lost-class",
            help="exit 1 when the purification all but lost a class (report: lost_classes); "
            "the outputs are written all the same",
        ),
    ] = False,
) -> None:
    """Purify MODEL: learn class-wise prompts (or a model) that neutralise the backdoor.

    Exit 0, or 1 with --fail-on-lost-class when a class was lost, 2 on error."""
    written = ("report.json", "prompts.safetensors", "trigger.safetensors")
    plan = _plan(output_format, json_output, out, sarif_base, also_written=written)
    options = parse_options(option or [])
    attack_options = parse_options(attack_option or [])
    _check_model(model)
    _check_file(config, "config file")
    _check_file(trigger, "trigger file")
    _check_attack(attack, target)
    target = _check_data(data, classnames, target)
    if eval_data is not None:
        _check_data(eval_data, classnames)
    _check_plugin("purifier", plugin)
    _check_draws(draws)
    from clipguard import api
    from clipguard.runtime import cli_threads

    with display("clipguard purify", quiet):
        report = api.purify(
            model,
            data,
            purifier=plugin,
            shots=shots,
            seed=seed,
            device=device,
            options=options,
            config_file=config,
            trigger_path=trigger,
            eval_data=eval_data,
            eval_limit=eval_limit or None,
            attack=attack,
            attack_options=attack_options,
            target=target,
            classnames_file=classnames,
            arch=arch,
            allow_torchscript=allow_torchscript,
            out_dir=out,
            quiet=quiet,
            draws=draws,
            threads=cli_threads(threads),
            command=command_line(),
        )
    _emit(report, plan, out, sarif_base)
    if plan.stdout is None and not quiet:
        _print_purify_summary(report, out)
    assert report.purification is not None
    if fail_on_lost_class and report.purification.lost_classes:
        raise typer.Exit(EXIT_LOST_CLASS)


EVALUATE_EXAMPLES = """Examples:

  clipguard evaluate model.safetensors --data test/

  clipguard evaluate model.safetensors --data test/ --prompts purified/prompts.safetensors \\
  --attack badnets --target blue_star --json
"""


@app.command(epilog=EVALUATE_EXAMPLES)
@handle_errors
def evaluate(
    model: ModelArg,
    data: DataOpt,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="prompt file from purify")
    ] = None,
    attack: AttackOpt = None,
    attack_option: AttackOptionOpt = None,
    target: TargetOpt = None,
    limit: Annotated[int | None, typer.Option("--limit", help="evaluate a random subset")] = None,
    classnames: ClassnamesOpt = None,
    arch: ArchOpt = None,
    allow_torchscript: TorchScriptOpt = False,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Clean accuracy (CA) of MODEL on DATA, and attack success rate (ASR) with --attack."""
    attack_options = parse_options(attack_option or [])
    _check_model(model)
    _check_file(prompts, "prompt file")
    _check_attack(attack, target)
    target = _check_data(data, classnames, target)
    from clipguard import api
    from clipguard.runtime import cli_threads

    with display("clipguard evaluate", quiet):
        report: EvaluationReport = api.evaluate(
            model,
            data,
            prompts_path=prompts,
            attack=attack,
            attack_options=attack_options,
            target=target,
            classnames_file=classnames,
            limit=limit,
            seed=seed,
            arch=arch,
            allow_torchscript=allow_torchscript,
            device=device,
            quiet=quiet,
            threads=cli_threads(threads),
        )
    if json_output:
        typer.echo(report.model_dump_json(indent=2))
        return
    stdout.print(
        f"clean accuracy (CA): {_percent(report.clean_accuracy)} on {report.n_images} images"
    )
    if report.attack is not None:
        target = report.attack.target_class
        stdout.print(
            f"attack success rate (ASR, {report.attack.name} -> {target}): "
            f"{_percent(report.attack_success_rate)} on {report.n_attacked} images"
        )
        # an ASR near 0 can mean the target class is no longer predicted at all
        stdout.print(
            f"recall of the target class {target!r}: {_percent(report.class_recall.get(target))}",
            highlight=False,
        )


RENDER_EXAMPLES = """Examples:

  clipguard report render audit/report.json --format html > report.html

  clipguard report render audit/report.json --format html,sarif --out audit/ --sarif-base .
"""


@report_app.command("render", epilog=RENDER_EXAMPLES)
@handle_errors
def report_render(
    report_file: Annotated[
        Path, typer.Argument(help="report.json of a scan or purify run", show_default=False)
    ],
    output_format: Annotated[
        list[str],
        typer.Option(
            "--format",
            help="formats: json, md, html, sarif (repeatable or comma-separated). One format "
            "is printed on stdout (and written as report.<format> with --out); several are "
            "written under --out only",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="folder to write report.<format> files in")
    ] = None,
    sarif_base: SarifBaseOpt = None,
) -> None:
    """Render a stored report.json again, in other formats (it is validated first)."""
    plan = _plan(output_format, False, out, sarif_base, also_written=())
    if not plan.stdout and not plan.files:
        raise InputError("--format: give at least one of json, md, html, sarif")
    _emit(read_report(report_file), plan, out, sarif_base, write_json=True)


@app.command(
    epilog="Examples:\n\n  clipguard plugins\n\n  clipguard plugins --options cbpt --json\n"
)
@handle_errors
def plugins(
    json_output: JsonOpt = False,
    options: Annotated[
        str | None,
        typer.Option(
            "--options",
            metavar="NAME",
            help="list the options (--option key=value) of the scanner, purifier and trigger "
            "family called NAME: type, default and meaning",
        ),
    ] = None,
) -> None:
    """List the registered scanners, purifiers and trigger families, and plugin errors."""
    registry = get_registry()
    if options is not None:
        _print_options(options, registry.options_of(options), json_output)
        return
    listing = registry.describe()
    if json_output:
        typer.echo(json.dumps({**listing, "errors": registry.errors}, indent=2))
        return
    for kind, entries in listing.items():
        table = Table(title=kind)
        for column in ("name", "version", "package", "description"):
            table.add_column(column)
        for entry in entries:
            table.add_row(entry["name"], entry["version"], entry["package"], entry["description"])
        stdout.print(table)
    for error in registry.errors:
        stderr.print(f"plugin error: {error}", style="red", highlight=False)


def _print_options(name: str, found: dict[str, list[dict[str, Any]]], json_output: bool) -> None:
    if json_output:
        typer.echo(json.dumps({"name": name, **found}, indent=2))
        return
    for kind, rows in found.items():
        flag = "--attack-option" if kind == "triggers" else "--option"
        table = Table(title=f"{kind} {name!r}: {flag} key=value (values read as JSON)")
        table.add_column("option", no_wrap=True)
        table.add_column("type", overflow="fold", max_width=20)
        table.add_column("default", overflow="fold", max_width=18)
        table.add_column("description", ratio=1)
        for row in rows:
            cells = (row["name"], row["type"], _shown_default(row), row["description"])
            table.add_row(*(Text(cell) for cell in cells))  # Text: "[a, b]" is not markup
        stdout.print(table)


def _shown_default(option: dict[str, Any]) -> str:
    if option["required"]:
        return "(required)"
    value = option["default"]
    return f"{value:.6g}" if isinstance(value, float) else json.dumps(value)


@app.command(
    epilog="Examples:\n\n  clipguard schema > schemas.json\n\n"
    "  clipguard schema --write --dir schemas\n"
)
@handle_errors
def schema(
    write: Annotated[bool, typer.Option("--write", help="write the schemas into --dir")] = False,
    directory: Annotated[Path, typer.Option("--dir", help="schema folder")] = DEFAULT_SCHEMA_DIR,
) -> None:
    """Print (or --write) the JSON Schema of every report and file format."""
    from clipguard.report import schema_texts

    if write:
        for path in write_schemas(directory):
            stdout.print(f"wrote {path}", highlight=False)
        return
    typer.echo(
        json.dumps({name: json.loads(text) for name, text in schema_texts().items()}, indent=2)
    )


def _wrap_commands(typer_app: typer.Typer, commands: int = 0, groups: int = 0) -> None:
    """Give the commands of ``typer_app`` from the ``commands``-th on, and those of its
    sub-apps from the ``groups``-th on (with all of their commands), the CLI's error
    handling."""
    for command in typer_app.registered_commands[commands:]:
        if command.callback is not None:
            command.callback = handle_errors(command.callback)
    for group in typer_app.registered_groups[groups:]:
        if group.typer_instance is not None:
            _wrap_commands(group.typer_instance)


def _add_plugin_commands() -> None:
    """The commands of the installed plugins (``clipguard_register_commands``), with the CLI's
    error handling."""
    commands, groups = len(app.registered_commands), len(app.registered_groups)
    register_commands(app)
    _wrap_commands(app, commands, groups)


_add_plugin_commands()
