"""The ``clipguard`` command line: a thin typer layer over :mod:`clipguard.api`.

Exit codes: 0 success (``scan``: verdict clean), 1 (``scan``: backdoor found;
``purify --fail-on-lost-class``: a class was lost), 2 error (bad input, refused or corrupt
checkpoint, plugin problem), 3 (``scan``: verdict inconclusive), 130 interrupted.
``scan --fail-on`` chooses which verdicts fail (default: backdoor and inconclusive).
Errors are one line on stderr; ``CLIPGUARD_DEBUG=1`` adds the traceback.

``scan``, ``purify`` and ``evaluate`` run with ``--threads`` torch CPU threads (environment
variable ``CLIPGUARD_THREADS``); by default the smaller of torch's own count and 2
(:func:`clipguard.runtime.cli_threads`), the count the plugins used to cap themselves at.
The API leaves torch's count as it is unless told otherwise.

Installed plugins add commands through the ``clipguard_register_commands`` hook: the lab
adds ``clipguard lab ...`` and ``clipguard demo``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from clipguard import api
from clipguard.cli_errors import (
    EXIT_BACKDOOR,
    EXIT_CLEAN,
    EXIT_INCONCLUSIVE,
    EXIT_LOST_CLASS,
    handle_errors,
)
from clipguard.cli_options import QuietOpt, SeedOpt, ThreadsOpt
from clipguard.config import parse_options
from clipguard.errors import InputError
from clipguard.io import atomic_write_text
from clipguard.plugins import register_commands
from clipguard.render import SUFFIXES, Format, lost_class_warnings, render
from clipguard.report import EvaluationReport, Report, write_schemas
from clipguard.runtime import cli_threads

DEFAULT_SCHEMA_DIR = Path("schemas")

app = typer.Typer(
    name="clipguard",
    help="Audit CLIP models for backdoors and purify them with class-wise prompts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stdout = Console()
stderr = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from clipguard import __version__

        typer.echo(f"clipguard {__version__}")
        raise typer.Exit()


@app.callback()
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
DeviceOpt = Annotated[str, typer.Option("--device", help="torch device, e.g. cpu or cuda")]
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
JsonOpt = Annotated[bool, typer.Option("--json", help="print the report as JSON on stdout")]
FormatOpt = Annotated[
    Format | None,
    typer.Option(
        "--format",
        help="print the report in this format (json, md, html, sarif); with --out, also write "
        "it there as report.<format>",
    ),
]
AttackOpt = Annotated[
    str | None, typer.Option("--attack", help="registered trigger family to measure ASR with")
]
AttackOptionOpt = Annotated[
    list[str] | None, typer.Option("--attack-option", help="trigger option key=value (repeatable)")
]
TargetOpt = Annotated[str | None, typer.Option("--target", help="target class name of the attack")]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def _print_scan_summary(report: Report, out: Path | None) -> None:
    table = Table(title=f"clipguard scan: {report.model.path}", show_header=True)
    for column in ("scanner", "verdict", "score", "target class", "explanation"):
        table.add_column(column)
    colours = {"backdoor": "bold red", "clean": "green", "inconclusive": "yellow"}
    for finding in report.findings:
        table.add_row(
            finding.scanner,
            f"[{colours[finding.verdict]}]{finding.verdict}[/]",
            f"{finding.score:.3f}",
            finding.target_class or "-",
            finding.explanation,
        )
    stderr.print(table)
    if out is not None:
        stderr.print(f"report: {out / 'report.json'}", highlight=False)
        for finding in report.findings:
            for name, path in finding.artifacts.items():
                stderr.print(f"{name}: {path}", highlight=False)


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


def _emit(report: Report, output_format: Format, out: Path | None) -> None:
    text = render(report, output_format)
    if out is not None and output_format != "json":
        atomic_write_text(out / f"report.{SUFFIXES[output_format]}", text)
    typer.echo(text, nl=False)


# Commands ------------------------------------------------------------------------------


@app.command()
@handle_errors
def scan(
    model: ModelArg,
    data: DataOpt,
    plugin: Annotated[
        str, typer.Option("--plugin", help="scanner name (see `clipguard plugins`)")
    ] = "cbpt",
    shots: ShotsOpt = api.DEFAULT_SHOTS,
    out: Annotated[
        Path | None, typer.Option("--out", help="folder for report.json and artefacts")
    ] = None,
    option: OptionOpt = None,
    config: ConfigOpt = None,
    classnames: ClassnamesOpt = None,
    arch: ArchOpt = None,
    allow_torchscript: TorchScriptOpt = False,
    seed: SeedOpt = 0,
    draws: Annotated[
        int,
        typer.Option(
            "--draws",
            help=(
                "shot draws the scanner may use: --shots per class each, seeds SEED, "
                "SEED+1, ... (the cbpt scanner screens each and judges by the median)"
            ),
        ),
    ] = api.DEFAULT_DRAWS,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    json_output: JsonOpt = False,
    output_format: FormatOpt = None,
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
) -> None:
    """Scan MODEL for a backdoor.

    Exit 0: clean, 1: backdoor found, 2: error, 3: inconclusive (with the default --fail-on).
    """
    failing = _fail_on(fail_on)
    output_format = "json" if json_output else output_format
    report = api.scan(
        model,
        data,
        scanner=plugin,
        shots=shots,
        seed=seed,
        device=device,
        options=parse_options(option or []),
        config_file=config,
        classnames_file=classnames,
        arch=arch,
        allow_torchscript=allow_torchscript,
        out_dir=out,
        quiet=quiet or output_format is not None,
        draws=draws,
        threads=cli_threads(threads),
    )
    if output_format is not None:
        _emit(report, output_format, out)
    elif not quiet:
        _print_scan_summary(report, out)
    raise typer.Exit(scan_exit_code(report.verdict or "clean", failing))


@app.command()
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
    ] = api.DEFAULT_EVAL_LIMIT,
    attack: AttackOpt = None,
    attack_option: AttackOptionOpt = None,
    target: TargetOpt = None,
    shots: ShotsOpt = api.DEFAULT_SHOTS,
    out: Annotated[Path | None, typer.Option("--out", help="folder for prompts and report")] = None,
    option: OptionOpt = None,
    config: ConfigOpt = None,
    classnames: ClassnamesOpt = None,
    arch: ArchOpt = None,
    allow_torchscript: TorchScriptOpt = False,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    json_output: JsonOpt = False,
    output_format: FormatOpt = None,
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
    output_format = "json" if json_output else output_format
    report = api.purify(
        model,
        data,
        purifier=plugin,
        shots=shots,
        seed=seed,
        device=device,
        options=parse_options(option or []),
        config_file=config,
        trigger_path=trigger,
        eval_data=eval_data,
        eval_limit=eval_limit or None,
        attack=attack,
        attack_options=parse_options(attack_option or []),
        target=target,
        classnames_file=classnames,
        arch=arch,
        allow_torchscript=allow_torchscript,
        out_dir=out,
        quiet=quiet or output_format is not None,
        threads=cli_threads(threads),
    )
    if output_format is not None:
        _emit(report, output_format, out)
    elif not quiet:
        _print_purify_summary(report, out)
    assert report.purification is not None
    if fail_on_lost_class and report.purification.lost_classes:
        raise typer.Exit(EXIT_LOST_CLASS)


@app.command()
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
    report: EvaluationReport = api.evaluate(
        model,
        data,
        prompts_path=prompts,
        attack=attack,
        attack_options=parse_options(attack_option or []),
        target=target,
        classnames_file=classnames,
        limit=limit,
        seed=seed,
        arch=arch,
        allow_torchscript=allow_torchscript,
        device=device,
        quiet=quiet or json_output,
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


@app.command()
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
    from clipguard.plugins import get_registry

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


@app.command()
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
