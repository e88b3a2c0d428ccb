"""Run the benchmark: every defence over every model of a zoo, then regenerate the docs.

    python -m benchmarks.run --zoo ZOO                      # full run, resumable
    python -m benchmarks.run --quick --results /tmp/q.json  # one attack, two defences

Results accumulate in ``benchmarks/results/<date>.json`` (or ``--results``); the tables and
the figure in docs/benchmarks.md are regenerated from them (``--doc``).
"""

from __future__ import annotations

import datetime
import fnmatch
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.harness import (
    DEFENCES,
    QUICK_DEFENCES,
    Harness,
    ZooModel,
    find_models,
    markdown_tables,
    update_docs,
    write_figure,
)
from clipguard.config import parse_options
from clipguard.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _quick_model(progress: Progress) -> list[ZooModel]:
    """The demo's backdoored synthetic model (built once, cached) as a one-model zoo."""
    from clipguard.lab.demo import ensure_demo_model

    return find_models(ensure_demo_model(progress).parent)[:1]


@app.command()
def main(
    zoo: Annotated[Path | None, typer.Option(help="zoo folder (models with .card.json)")] = None,
    defences: Annotated[str, typer.Option(help="comma list of defences")] = ",".join(DEFENCES),
    clean_defences: Annotated[
        str | None,
        typer.Option(help="comma list of the defences also run on clean models (default: all)"),
    ] = None,
    quick: Annotated[bool, typer.Option(help="one backdoored model, two defences")] = False,
    results: Annotated[Path | None, typer.Option(help="results JSON (resumable)")] = None,
    doc: Annotated[
        Path | None, typer.Option(help="markdown file whose tables to regenerate")
    ] = None,
    shots: int = 16,
    seed: int = 0,
    eval_limit: Annotated[int, typer.Option(help="test images per evaluation")] = 2000,
    only: Annotated[
        str | None,
        typer.Option(help="run only the zoo models whose name matches this glob, e.g. '*-s1'"),
    ] = None,
    merge: Annotated[
        list[Path] | None,
        typer.Option(
            help="results JSON of another run (e.g. a parallel --only run) to add first; "
            "its (model, defence) pairs are not run again; repeatable"
        ),
    ] = None,
    scan_option: Annotated[
        list[str] | None,
        typer.Option(help="option of every cbpt scan, key=value (e.g. signals=size); repeatable"),
    ] = None,
    section: Annotated[
        str, typer.Option(help="generated section of --doc to replace (its marker name)")
    ] = "benchmark-tables",
    quiet: bool = False,
) -> None:
    """Run defences over a zoo and write results, tables and a figure."""
    progress = Progress(quiet=quiet)
    chosen = (
        list(QUICK_DEFENCES) if quick else [d.strip() for d in defences.split(",") if d.strip()]
    )
    unknown = [d for d in chosen if d not in DEFENCES]
    if unknown:
        raise typer.BadParameter(f"unknown defences {unknown}; known: {', '.join(DEFENCES)}")
    if zoo is not None:
        models = find_models(zoo)
        if only is not None:
            models = [m for m in models if fnmatch.fnmatch(m.name, only)]
        if quick:
            models = [m for m in models if m.backdoored][:1]
    elif quick:
        models = _quick_model(progress)
    else:
        raise typer.BadParameter("--zoo is required unless --quick")
    if not models:
        raise typer.BadParameter(f"no models with cards under {zoo}")
    date = datetime.date.today().isoformat()
    results = results or ROOT / "benchmarks" / "results" / f"{date}.json"
    harness = Harness(
        results_path=results,
        runs_dir=results.with_suffix("") / "runs",
        shots=shots,
        seed=seed,
        eval_limit=eval_limit,
        scan_options=parse_options(scan_option or []),
    )
    on_clean = None if clean_defences is None else [d.strip() for d in clean_defences.split(",")]
    for other in merge or []:
        harness.merge(other)
    harness.run(models, chosen, progress, clean_defences=on_clean)
    tables = markdown_tables(harness.results, chosen)
    typer.echo(tables)
    if doc is not None:
        figure = results.with_suffix(".png")
        write_figure(harness.results, chosen, figure)
        relative_figure = (
            Path("..") / figure.resolve().relative_to(ROOT)
            if figure.resolve().is_relative_to(ROOT)
            else figure
        )
        command = shlex.join(["python", "-m", "benchmarks.run", *sys.argv[1:]])
        update_docs(doc, tables, relative_figure, command, results, section=section)


if __name__ == "__main__":
    app()
