"""Fleet audits: scan many models with one command, resumably, locally or on Ray.

A fleet is every checkpoint named on the command line or found under a folder
(:func:`find_models`). Each model gets a folder ``OUT/<name>/`` (:func:`model_names`) with
its ``report.json`` (and the other report formats asked for) and ``fleet.json``, the record
of the model's sha256 and the scan options it was scanned with; ``OUT/summary.jsonl`` holds
one :class:`FleetRow` per model.

* :func:`plan_fleet` checks everything before any work: the models (a folder without
  checkpoints is refused), the data folder, the scanner, the output folders and files, the
  executor. It imports neither torch nor Ray.
* :func:`run_fleet` scans the models of a plan: in this process (``jobs=1``), in ``jobs``
  local processes (``spawn``), or as Ray tasks (``executor="ray"``). A model whose scan
  fails is a row with its one-line error, never the end of the run. ``summary.jsonl`` is
  rewritten atomically after every finished model, so an interrupted run leaves a valid one.
* A model whose ``fleet.json`` records the same sha256 and the same options fingerprint
  (:func:`options_record`) beside an intact ``report.json`` is not scanned again: its row is
  re-used (``reused`` true), before any worker process or Ray is started, so a rerun with
  nothing left to scan starts neither. Failed models are always scanned again.
* :func:`fleet_exit_code`: 2 if any model failed, else 1 if any backdoor, else 3 if any
  inconclusive (each only when ``fail_on`` names it), else 0.

:func:`scan_fleet` is plan and run in one call.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from clipguard.defaults import DEFAULT_DRAWS, DEFAULT_SHOTS
from clipguard.errors import ClipguardError, InputError
from clipguard.io import atomic_write_text, sha256_file
from clipguard.outputs import SUFFIXES, check_output_dir
from clipguard.progress import Progress
from clipguard.report import FleetRecord, FleetRow

#: file suffixes a folder search takes for checkpoints (what :func:`clipguard.model.load_model`
#: reads)
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
SUMMARY_FILE = "summary.jsonl"
#: per model: its sha256 and the options its report was made with (what a rerun compares)
RECORD_FILE = "fleet.json"
Executor = Literal["local", "ray"]
EXECUTORS: tuple[str, ...] = ("local", "ray")
RAY_MISSING = "--executor ray needs Ray, which is not installed: pip install clipguard[ray]"
#: seconds a Ray cluster address gets to accept a connection before the fleet gives up on it
#: (Ray itself retries a wrong address for minutes)
RAY_CONNECT_TIMEOUT = 10.0
#: torch threads a model's scan gets unless told otherwise: at most this many (the command
#: line's default, :data:`clipguard.runtime.CLI_DEFAULT_MAX_THREADS`) and at most the cores
#: divided by the models scanned at a time
DEFAULT_MAX_THREADS = 2
#: the longest model folder name kept whole; a longer one is cut and given a hash
MAX_NAME = 100
#: metadata formats of clipguard's own safetensors files that are not models (trigger,
#: prompt and pixel-cache files): a folder search leaves them out
_MODEL_FORMAT_PREFIX = "clipguard.model/"
_SIDECAR_FORMAT_PREFIX = "clipguard."
#: the largest safetensors header read to tell a sidecar from a model
_MAX_SNIFFED_HEADER = 16 * 1024 * 1024
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
WORKER_DIED = (
    "internal error: the worker process ended unexpectedly (killed, or out of memory?); "
    "rerun to retry"
)


class ScanSettings(BaseModel):
    """What every model of a fleet is scanned with: the keyword arguments of
    :func:`clipguard.api.scan` (same names and defaults) other than the model, the data, the
    output folder and ``quiet``. ``threads`` None: chosen per run (:func:`run_fleet`)."""

    model_config = ConfigDict(extra="forbid")

    scanner: str = "cbpt"
    shots: int = DEFAULT_SHOTS
    seed: int = 0
    device: str = "cpu"
    options: dict[str, Any] = Field(default_factory=dict)
    config_file: Path | None = None
    classnames_file: Path | None = None
    arch: str | None = None
    allow_torchscript: bool = False
    draws: int = DEFAULT_DRAWS
    threads: int | None = None
    command: str | None = None
    max_minutes: float | None = None


@dataclass(frozen=True)
class FleetModel:
    """A model of a fleet: its path (as given or found) and its output folder's name."""

    path: Path
    name: str


@dataclass(frozen=True)
class ModelJob:
    """Everything a worker needs to scan one model (picklable for processes and Ray);
    ``path`` is the model as given or found, what its row shows."""

    path: str
    model: Path
    name: str
    out_dir: Path
    data_dir: Path
    settings: ScanSettings
    fingerprint: str
    record: dict[str, Any]
    formats: tuple[str, ...]
    sarif_base: Path | None
    quiet: bool = True

    def row(self, **values: Any) -> FleetRow:
        """A row of this model; fields not given are null (``seconds``: 0)."""
        fields: dict[str, Any] = {
            "sha256": None,
            "verdict": None,
            "target": None,
            "score": None,
            "seconds": 0.0,
            "error": None,
            "report": None,
            **values,
        }
        return FleetRow(path=self.path, name=self.name, **fields)

    def absolute(self) -> ModelJob:
        """This job with every path made absolute, for a worker in another folder."""
        settings = self.settings.model_copy(
            update={
                name: Path(os.path.abspath(value))
                for name in ("config_file", "classnames_file")
                if (value := getattr(self.settings, name)) is not None
            }
        )
        return replace(
            self,
            model=Path(os.path.abspath(self.model)),
            out_dir=Path(os.path.abspath(self.out_dir)),
            data_dir=Path(os.path.abspath(self.data_dir)),
            settings=settings,
            sarif_base=Path(os.path.abspath(self.sarif_base)) if self.sarif_base else None,
        )


@dataclass(frozen=True)
class FleetPlan:
    """A checked fleet scan (:func:`plan_fleet`): what :func:`run_fleet` runs."""

    models: tuple[FleetModel, ...]
    data_dir: Path
    out_dir: Path
    settings: ScanSettings
    record: dict[str, Any]
    fingerprint: str
    formats: tuple[str, ...]
    sarif_base: Path | None
    jobs: int | None
    executor: Executor
    ray_address: str | None

    def job(self, model: FleetModel, threads: int, quiet: bool) -> ModelJob:
        """The job of ``model``, scanned with ``threads`` torch threads."""
        return ModelJob(
            path=str(model.path),
            model=model.path,
            name=model.name,
            out_dir=self.out_dir / model.name,
            data_dir=self.data_dir,
            settings=self.settings.model_copy(update={"threads": threads}),
            fingerprint=self.fingerprint,
            record=self.record,
            formats=self.formats,
            sarif_base=self.sarif_base,
            quiet=quiet,
        )


# --------------------------------------------------------------------------- finding models


def is_fleet(paths: Sequence[Path]) -> bool:
    """Whether ``paths`` make a fleet scan: several paths, or a folder."""
    return len(paths) > 1 or (len(paths) == 1 and Path(paths[0]).is_dir())


def is_sidecar(path: Path) -> bool:
    """Whether ``path`` is one of clipguard's own safetensors files that are not models (a
    trigger, prompt or pixel-cache file: its metadata ``format`` is ``clipguard.*`` but not
    ``clipguard.model/*``). A file whose header cannot be read is not one (it is scanned, and
    its error reported)."""
    if path.suffix.lower() != ".safetensors":
        return False
    try:
        with open(path, "rb") as stream:
            length = int.from_bytes(stream.read(8), "little")
            if not 0 < length <= _MAX_SNIFFED_HEADER:
                return False
            header = json.loads(stream.read(length).decode("utf-8"))
        found = header.get("__metadata__", {}).get("format", "")
    except (OSError, ValueError, AttributeError, RecursionError):
        return False
    return (
        isinstance(found, str)
        and found.startswith(_SIDECAR_FORMAT_PREFIX)
        and not found.startswith(_MODEL_FORMAT_PREFIX)
    )


def _search(folder: Path, skip: Path | None) -> list[Path]:
    """The checkpoints under ``folder``, sorted by their path within it: files with a
    :data:`CHECKPOINT_SUFFIXES` suffix, hidden files and folders (a leading dot), links to
    folders, the folder ``skip`` and clipguard's sidecar files (:func:`is_sidecar`) left out."""
    found = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = [
            name
            for name in dirs
            if not name.startswith(".")
            and (skip is None or os.path.abspath(os.path.join(top, name)) != str(skip))
        ]
        for name in files:
            path = Path(top) / name
            if (
                not name.startswith(".")
                and path.suffix.lower() in CHECKPOINT_SUFFIXES
                and path.is_file()
                and not is_sidecar(path)
            ):
                found.append(path)
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def find_models(paths: Sequence[Path], skip: Path | None = None) -> tuple[list[Path], Path]:
    """The checkpoints of ``paths`` and their common root (an absolute folder).

    A file is taken as it is; a folder is searched recursively (:func:`_search`; ``skip``, the
    output folder, is left out). Repeats (the same file, after links are resolved) are kept
    once, at their first place. :class:`InputError` for a path that does not exist and for a
    folder without checkpoints."""
    skip = Path(os.path.abspath(skip)) if skip is not None else None
    models: list[Path] = []
    anchors: list[str] = []
    seen: set[Path] = set()
    for given in paths:
        given = Path(given)
        if given.is_dir():
            found = _search(given, skip)
            if not found:
                suffixes = ", ".join(CHECKPOINT_SUFFIXES)
                raise InputError(
                    f"{given}: no checkpoints found ({suffixes}; hidden folders are skipped)"
                )
            anchors.append(os.path.abspath(given))
        elif given.exists():
            found = [given]
            anchors.append(os.path.dirname(os.path.abspath(given)))
        else:
            raise InputError(f"{given}: model file or folder not found")
        for path in found:
            if (key := path.resolve()) not in seen:
                seen.add(key)
                models.append(path)
    return models, Path(os.path.commonpath(anchors))


def _safe_name(relative: Path) -> str:
    """A folder name for a model at ``relative`` (to the fleet's root): its parts without the
    checkpoint suffix, joined with ``__``, every character but letters, digits, ``.``, ``_``
    and ``-`` made ``_``, no leading dot, at most :data:`MAX_NAME` characters."""
    parts = list(relative.parts)
    last = parts[-1]
    if Path(last).suffix.lower() in CHECKPOINT_SUFFIXES:
        last = last[: -len(Path(last).suffix)]
    parts[-1] = last or "model"
    name = "__".join(_UNSAFE_NAME.sub("_", part) for part in parts)
    name = "_" + name[1:] if name.startswith(".") else name
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 9]}-{_short_hash(relative)}"
    return name


def _short_hash(relative: Path) -> str:
    return hashlib.sha256(relative.as_posix().encode("utf-8", "surrogateescape")).hexdigest()[:8]


def model_names(models: Sequence[Path], root: Path) -> list[str]:
    """A unique, filesystem-safe folder name per model, from its path relative to ``root``
    (:func:`_safe_name`). Names that collide (compared case-insensitively, as some file
    systems do) or that would be :data:`SUMMARY_FILE` get ``-`` and 8 hex digits of a hash of
    their relative path; a clash left after that gets ``-2``, ``-3``, ... in order. The same
    paths always give the same names."""
    relatives = [Path(os.path.relpath(os.path.abspath(model), root)) for model in models]
    names = [_safe_name(relative) for relative in relatives]
    counts: dict[str, int] = {}
    for name in names:
        counts[name.casefold()] = counts.get(name.casefold(), 0) + 1
    reserved = SUMMARY_FILE.casefold()
    names = [
        f"{name}-{_short_hash(relative)}"
        if counts[name.casefold()] > 1 or name.casefold() == reserved
        else name
        for name, relative in zip(names, relatives, strict=True)
    ]
    unique: list[str] = []
    taken: set[str] = set()
    for name in names:
        candidate, number = name, 1
        while candidate.casefold() in taken:
            number += 1
            candidate = f"{name}-{number}"
        taken.add(candidate.casefold())
        unique.append(candidate)
    return unique


# --------------------------------------------------------------------------- planning


def _file_sha256(path: Path | None) -> str | None:
    return None if path is None else sha256_file(path)


def _listing_sha256(folder: Path) -> str:
    """A sha256 over the files under ``folder``: each one's relative path, size and
    modification time (not its bytes: a changed, copied or touched file changes it)."""
    digest = hashlib.sha256()
    entries = []
    for top, _, files in os.walk(folder):
        for name in files:
            path = Path(top) / name
            stat = path.stat()
            entries.append((path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns))
    for entry in sorted(entries):
        digest.update(json.dumps(entry).encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def options_record(settings: ScanSettings, data_dir: Path, scanner_version: str) -> dict[str, Any]:
    """What a model's scan depends on besides the model: clipguard's and the scanner's
    versions, every scan option, the content of the config and class-name files, and the
    data folder (its absolute path and :func:`_listing_sha256`). Threads, jobs and the
    executor are not part of it."""
    from clipguard import __version__

    return {
        "clipguard": __version__,
        "scanner": settings.scanner,
        "scanner_version": scanner_version,
        "shots": settings.shots,
        "seed": settings.seed,
        "draws": settings.draws,
        "device": settings.device,
        "options": settings.options,
        "config_sha256": _file_sha256(settings.config_file),
        "classnames_sha256": _file_sha256(settings.classnames_file),
        "arch": settings.arch,
        "allow_torchscript": settings.allow_torchscript,
        "max_minutes": settings.max_minutes,
        "data": {"path": os.path.abspath(data_dir), "listing_sha256": _listing_sha256(data_dir)},
    }


def fingerprint(record: dict[str, Any]) -> str:
    """sha256 of an :func:`options_record`, as canonical JSON."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_executor(executor: str, jobs: int | None, ray_address: str | None) -> None:
    """The executor is known, ``jobs`` at least 1, ``ray_address`` only with Ray, and Ray
    installed when asked for (found, not imported); :class:`InputError` otherwise."""
    if executor not in EXECUTORS:
        raise InputError(f"--executor {executor!r}: choose local or ray")
    if jobs is not None and jobs < 1:
        raise InputError(f"--jobs must be at least 1, got {jobs}")
    if ray_address is not None and executor != "ray":
        raise InputError("--ray-address needs --executor ray")
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise InputError(RAY_MISSING)


def plan_fleet(
    models: Sequence[Path | str],
    data_dir: Path | str,
    out_dir: Path | str,
    settings: ScanSettings,
    formats: Sequence[str] = (),
    sarif_base: Path | None = None,
    jobs: int | None = None,
    executor: Executor = "local",
    ray_address: str | None = None,
) -> FleetPlan:
    """Check a fleet scan before any work, writing nothing; :class:`InputError` (one line)
    for anything that would fail: the executor (:func:`check_executor`), the models
    (:func:`find_models`), the data folder's classes, the config and class-name files, the
    scanner (registered: checked without importing it), ``draws``, and the output folder
    with every file the run writes in it (``summary.jsonl``, and per model ``report.json``,
    the ``formats`` files and ``fleet.json``). Imports neither torch nor Ray."""
    from clipguard.data import class_folders, class_names
    from clipguard.plugins import get_registry

    check_executor(executor, jobs, ray_address)
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    paths, root = find_models([Path(model) for model in models], skip=out_dir)
    config = settings.config_file
    if config is not None and not config.is_file():
        reason = "is not a regular file" if config.exists() else "not found"
        raise InputError(f"{config}: config file {reason}")
    class_names(data_dir, class_folders(data_dir), settings.classnames_file)
    scanner = get_registry().entry("scanner", settings.scanner)
    if settings.draws < 1:
        raise InputError(f"--draws must be at least 1, got {settings.draws}")
    if sarif_base is not None and not Path(sarif_base).is_dir():
        raise InputError(f"--sarif-base {sarif_base}: not a folder")
    files = ["report.json", *(f"report.{SUFFIXES[fmt]}" for fmt in formats), RECORD_FILE]
    check_output_dir(out_dir, [SUMMARY_FILE])
    if (out_dir / SUMMARY_FILE).is_dir():
        raise InputError(f"{out_dir / SUMMARY_FILE}: is a folder, so the summary cannot be written")
    names = model_names(paths, root)
    for name in names:
        check_output_dir(out_dir / name, files)
    record = options_record(settings, data_dir, scanner.version)
    return FleetPlan(
        models=tuple(FleetModel(path, name) for path, name in zip(paths, names, strict=True)),
        data_dir=data_dir,
        out_dir=out_dir,
        settings=settings,
        record=record,
        fingerprint=fingerprint(record),
        formats=tuple(formats),
        sarif_base=sarif_base,
        jobs=jobs,
        executor=executor,
        ray_address=ray_address,
    )


# --------------------------------------------------------------------------- one model


def _one_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def earlier_row(job: ModelJob) -> FleetRow | None:
    """The row of an earlier scan of this model with these options, read in the calling
    process so that a finished model needs no worker: when its ``fleet.json`` records the
    model's sha256 and the options fingerprint beside an intact report.json (of a model with
    this sha256); report files of ``job.formats`` that are missing are rendered from it.
    None when the model must be scanned (no record, or an unreadable model, record or
    report: the scan reports what is wrong)."""
    from clipguard.render import render
    from clipguard.report import read_report

    if not (job.out_dir / RECORD_FILE).is_file():
        return None
    try:
        sha256 = sha256_file(job.model)
        record = FleetRecord.model_validate_json((job.out_dir / RECORD_FILE).read_bytes())
        if record.sha256 != sha256 or record.fingerprint != job.fingerprint:
            return None
        report = read_report(job.out_dir / "report.json")
        row = record.row
        if report.model.sha256 != sha256 or row.error is not None:
            return None
        for fmt in job.formats:
            path = job.out_dir / f"report.{SUFFIXES[fmt]}"
            if not path.is_file():
                atomic_write_text(path, render(report, fmt, job.sarif_base))
    except (OSError, ValueError, ClipguardError):
        return None
    return row.model_copy(update={"path": job.path, "name": job.name, "reused": True})


def run_model(job: ModelJob) -> FleetRow:
    """Scan one model of a fleet (what every worker runs) and return its row; never raises
    an :class:`Exception`: a :class:`ClipguardError` is a row with its one-line message,
    anything else a row with ``internal error: ...``.

    Removes the model's old ``fleet.json`` (the caller has found no earlier scan to re-use,
    :func:`earlier_row`), scans it into ``job.out_dir``
    (report.json and the scanner's artefacts), writes the other ``job.formats`` files, then
    ``fleet.json`` last, each atomically."""
    from clipguard import api  # before the clock: a worker's first import is not the model's

    start = time.perf_counter()
    try:
        sha256 = sha256_file(job.model)
    except OSError as error:
        return job.row(error=f"{job.model}: cannot read the model ({error.strerror or error})")
    try:
        (job.out_dir / RECORD_FILE).unlink(missing_ok=True)
        from clipguard.render import render

        report = api.scan(
            job.model,
            job.data_dir,
            out_dir=job.out_dir,
            quiet=job.quiet,
            **job.settings.model_dump(),
        )
        for fmt in job.formats:
            if fmt != "json":
                path = job.out_dir / f"report.{SUFFIXES[fmt]}"
                atomic_write_text(path, render(report, fmt, job.sarif_base))
        deciding = next(f for f in report.findings if f.verdict == report.verdict)
        row = job.row(
            sha256=report.model.sha256,
            verdict=report.verdict,
            target=report.target_class,
            score=deciding.score,
            seconds=round(time.perf_counter() - start, 3),
            report=f"{job.name}/report.json",
        )
        record = FleetRecord(
            format="clipguard.fleet/1",
            sha256=report.model.sha256,
            fingerprint=job.fingerprint,
            options=job.record,
            row=row,
        )
        atomic_write_text(job.out_dir / RECORD_FILE, record.model_dump_json(indent=2) + "\n")
        return row
    except ClipguardError as error:
        message = _one_line(error)
    except Exception as error:  # a bug, or a failure no check foresaw: still one row
        message = f"internal error: {type(error).__name__}: {_one_line(error)}"
    return job.row(sha256=sha256, error=message, seconds=round(time.perf_counter() - start, 3))


# --------------------------------------------------------------------------- summary, exit code


def write_summary(out_dir: Path, rows: Iterable[FleetRow]) -> Path:
    """Write ``OUT/summary.jsonl`` (one JSON object per row) atomically; returns its path."""
    path = Path(out_dir) / SUMMARY_FILE
    atomic_write_text(path, "".join(row.model_dump_json() + "\n" for row in rows))
    return path


def read_summary(path: Path) -> list[FleetRow]:
    """The rows of a ``summary.jsonl``; :class:`InputError` for a file that is not one."""
    try:
        lines = Path(path).read_text().splitlines()
        return [FleetRow.model_validate_json(line) for line in lines if line.strip()]
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a fleet summary ({_one_line(error)})") from None


def fleet_exit_code(rows: Sequence[FleetRow], fail_on: Sequence[str]) -> int:
    """The exit code of a fleet scan: 2 if any model failed (the audit is incomplete), else
    1 if a model is a backdoor and ``fail_on`` names backdoor, else 3 if a model is
    inconclusive and ``fail_on`` names inconclusive, else 0."""
    from clipguard.cli_errors import EXIT_BACKDOOR, EXIT_CLEAN, EXIT_ERROR, EXIT_INCONCLUSIVE

    verdicts = {row.verdict for row in rows}
    if any(row.error is not None for row in rows):
        return EXIT_ERROR
    for verdict, code in (("backdoor", EXIT_BACKDOOR), ("inconclusive", EXIT_INCONCLUSIVE)):
        if verdict in verdicts and verdict in fail_on:
            return code
    return EXIT_CLEAN


# --------------------------------------------------------------------------- running


def available_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_per_model(plan: FleetPlan) -> int:
    """Torch threads of each model's scan: ``settings.threads`` when given; else at most
    :data:`DEFAULT_MAX_THREADS`, and locally at most the cores divided by ``jobs`` (so the
    models scanned at a time use no more threads than there are cores)."""
    if plan.settings.threads is not None:
        return plan.settings.threads
    if plan.executor == "ray":
        return DEFAULT_MAX_THREADS
    return max(1, min(DEFAULT_MAX_THREADS, available_cores() // (plan.jobs or 1)))


def _init_worker() -> None:
    """A local worker process: Ctrl-C is the parent's to handle (it ends the workers), and
    freed memory is kept for reuse, as the ``clipguard`` command does."""
    from clipguard.allocator import reuse_freed_memory

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reuse_freed_memory()


Finished = Callable[[int, FleetRow], None]


#: jobs to run, each with its index in the plan (what ``Finished`` is called with)
Indexed = Sequence[tuple[int, ModelJob]]


def _run_in_process(jobs: Indexed, progress: Progress, finished: Finished) -> None:
    """Run ``jobs`` one after another in this process, each under a stage of ``progress``
    named after its model (the display counts models, not each scan's stages)."""
    for index, job in jobs:
        with progress.stage(job.name):
            row = run_model(job)
        finished(index, row)


def _run_processes(jobs: Indexed, workers: int, finished: Finished) -> None:
    """Run ``jobs`` in ``workers`` spawned processes, at most ``workers`` at a time. A worker
    that dies fails the models in flight (rows with :data:`WORKER_DIED`) and a fresh pool
    takes the rest. On an interruption the workers are ended."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    pending = deque(jobs)
    running: dict[Future[FleetRow], tuple[int, ModelJob]] = {}
    pool: ProcessPoolExecutor | None = None
    try:
        while pending or running:
            if pool is None:
                pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)
            while pending and len(running) < workers:
                index, job = pending.popleft()
                running[pool.submit(run_model, job)] = (index, job)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                index, job = running.pop(future)
                try:
                    row = future.result()
                except BrokenProcessPool:
                    row, broken = job.row(error=WORKER_DIED), True
                except Exception as error:
                    row = job.row(error=f"internal error: {type(error).__name__}: {error}")
                finished(index, row)
            if broken:
                pool.shutdown(wait=False, cancel_futures=True)
                pool = None
    except BaseException:
        if pool is not None:
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    if pool is not None:
        pool.shutdown(wait=True)


def _run_ray(
    jobs: Indexed,
    threads: int,
    limit: int | None,
    address: str | None,
    finished: Finished,
) -> None:
    """Run each job as a Ray task that reserves ``threads`` CPUs, at most ``limit`` at a time
    (None: as many as the cluster fits). Connects to ``address`` (a running cluster) or
    starts a local Ray, unless Ray is already initialised in this process; shuts down only
    what it started; :class:`InputError` when Ray cannot start or connect, at once when
    nothing answers at ``address`` (:func:`ray_unreachable`). Workers get
    absolute paths (they run in another folder, or on another machine). A task Ray could
    not run is a row with its error."""
    try:
        import ray
    except ImportError:
        raise InputError(RAY_MISSING) from None
    import logging

    started = not ray.is_initialized()
    if started:
        if address is not None and (why := ray_unreachable(address)) is not None:
            raise InputError(f"cannot connect to the Ray cluster at {address}: {why}")
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        except Exception as error:  # Ray raises ConnectionError, ValueError, RuntimeError ...
            where = f"connect to the Ray cluster at {address}" if address else "start Ray"
            raise InputError(f"cannot {where}: {_one_line(error)}") from None
    try:
        task = ray.remote(run_model).options(num_cpus=threads, max_retries=0)
        pending = deque(jobs)
        running: dict[Any, tuple[int, ModelJob]] = {}
        while pending or running:
            while pending and (limit is None or len(running) < limit):
                index, job = pending.popleft()
                running[task.remote(job.absolute())] = (index, job)
            (done,), _ = ray.wait(list(running), num_returns=1)
            index, job = running.pop(done)
            try:
                row = ray.get(done)
            except ray.exceptions.RayError as error:
                row = job.row(error=f"internal error: ray: {type(error).__name__}: {error}")
            finished(index, row)
    finally:
        if started:
            ray.shutdown()


def ray_unreachable(address: str, timeout: float = RAY_CONNECT_TIMEOUT) -> str | None:
    """Why nothing answers at the Ray cluster ``address`` when it names a host and port
    (``HOST:PORT`` or ``ray://HOST:PORT``): a TCP connection there fails or takes longer than
    ``timeout`` seconds. None when one is accepted, or for an address Ray resolves itself
    (``auto``, ``local``)."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit():
        return None
    host = host.removeprefix("[").removesuffix("]")  # an IPv6 address in brackets
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        return f"nothing answers at {host}:{port} ({reason})"


def run_fleet(
    plan: FleetPlan,
    quiet: bool = True,
    on_row: Callable[[FleetRow], None] | None = None,
) -> list[FleetRow]:
    """Scan every model of ``plan``; returns their rows in the plan's order (also in
    ``OUT/summary.jsonl``, rewritten after every finished model).

    ``plan.executor`` "local" with ``jobs`` 1 (or None) scans in this process, its progress
    shown unless ``quiet``; with ``jobs`` N in N spawned processes, each scan quiet. "ray"
    runs each model as a Ray task (:func:`_run_ray`). Models a rerun re-uses
    (:func:`earlier_row`) are finished first, in this process; workers or Ray start only
    for the rest, and not at all when none is left. Each scan gets
    :func:`threads_per_model` torch threads. A bar counts the models done (unless
    ``quiet``); ``on_row`` is called with each row as it finishes."""
    threads = threads_per_model(plan)
    in_process = plan.executor == "local" and (plan.jobs or 1) == 1
    jobs = [plan.job(model, threads, quiet or not in_process) for model in plan.models]
    rows: dict[int, FleetRow] = {}
    progress = Progress(quiet=quiet)
    with progress.task("models", total=len(jobs)) as advance:

        def finished(index: int, row: FleetRow) -> None:
            rows[index] = row
            write_summary(plan.out_dir, [rows[i] for i in sorted(rows)])
            if on_row is not None:
                on_row(row)
            advance(1)

        to_scan = []
        for index, job in enumerate(jobs):
            reused = earlier_row(job)
            if reused is None:
                to_scan.append((index, job))
            else:
                finished(index, reused)
        if not to_scan:
            pass  # every model re-used: no worker, no Ray
        elif plan.executor == "ray":
            _run_ray(to_scan, threads, plan.jobs, plan.ray_address, finished)
        elif in_process:
            _run_in_process(to_scan, progress, finished)
        else:
            _run_processes(to_scan, plan.jobs or 1, finished)
    return [rows[index] for index in range(len(jobs))]


def scan_fleet(
    models: Sequence[Path | str],
    data_dir: Path | str,
    out_dir: Path | str,
    jobs: int | None = None,
    executor: Executor = "local",
    ray_address: str | None = None,
    formats: Sequence[str] = (),
    sarif_base: Path | None = None,
    quiet: bool = True,
    **scan_kwargs: Any,
) -> list[FleetRow]:
    """Scan every checkpoint of ``models`` (files, and folders searched recursively:
    :func:`find_models`) on ``data_dir`` into ``out_dir``; returns one :class:`FleetRow`
    per model, in order (also written as ``out_dir/summary.jsonl``).

    ``scan_kwargs`` are :func:`clipguard.api.scan`'s (:class:`ScanSettings`: ``scanner``,
    ``shots``, ``seed``, ``options``, ``draws``, ...); ``threads`` None gives each model at
    most 2, and at most the cores divided by ``jobs``. ``jobs``: models scanned at a time
    (local processes; with Ray, tasks in flight, None: as many as the cluster fits).
    ``executor="ray"`` runs each model as a Ray task on the cluster at ``ray_address`` (or a
    local Ray). ``formats`` (json, md, html, sarif) are written per model beside
    report.json. Everything is checked first (:func:`plan_fleet`): a
    :class:`ClipguardError` before any work; a model that fails later is a row with its
    error. A rerun re-uses the models already scanned with the same options."""
    if unknown := sorted(set(scan_kwargs) - set(ScanSettings.model_fields)):
        raise TypeError(f"scan_fleet() got unexpected keyword arguments: {', '.join(unknown)}")
    plan = plan_fleet(
        models,
        data_dir,
        out_dir,
        ScanSettings(**scan_kwargs),
        formats=formats,
        sarif_base=sarif_base,
        jobs=jobs,
        executor=executor,
        ray_address=ray_address,
    )
    return run_fleet(plan, quiet=quiet)
