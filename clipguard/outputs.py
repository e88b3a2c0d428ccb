"""Where a command's outputs go, decided and checked before any work starts.

* :func:`parse_formats` reads ``--format`` (repeatable, comma-separated).
* :func:`plan_outputs` decides which format goes to stdout and which are written as
  ``report.<ext>`` files, and refuses combinations that cannot be honoured.
* :func:`check_output_dir` checks that an output folder can be created or written and that
  the files a run will write there can be replaced, and :func:`check_output_file` that an
  output file can be written, without writing anything.

Every refusal is an :class:`~clipguard.errors.InputError` with one line: the command line
reports it and exits 2 before a model is loaded. Only the standard library is imported.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clipguard.errors import InputError

#: report formats and the suffix of their file (``report.<suffix>``)
SUFFIXES: dict[str, str] = {"json": "json", "md": "md", "html": "html", "sarif": "sarif"}


def parse_formats(values: Sequence[str] | None) -> list[str]:
    """``--format`` values (each repeatable and comma-separated) as a list without repeats,
    in the order given; :class:`InputError` for an unknown format."""
    chosen: list[str] = []
    for value in values or []:
        for part in value.split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in SUFFIXES:
                raise InputError(
                    f"--format {part.strip()!r}: choose from {', '.join(SUFFIXES)} "
                    "(repeatable or comma-separated)"
                )
            if name not in chosen:
                chosen.append(name)
    return chosen


@dataclass(frozen=True)
class OutputPlan:
    """What a command prints and writes: ``stdout``, the format printed on stdout (None: the
    report is not printed); ``files``, the formats written as ``report.<suffix>`` under the
    output folder."""

    stdout: str | None
    files: tuple[str, ...]

    def file_names(self) -> list[str]:
        """The names of the report files of :attr:`files`."""
        return [f"report.{SUFFIXES[fmt]}" for fmt in self.files]


def plan_outputs(formats: Sequence[str], json_stdout: bool, out: Path | None) -> OutputPlan:
    """Where each report format goes.

    * ``--json`` (``json_stdout``) is ``--format json`` on stdout.
    * One format and no ``--json``: printed on stdout, and written under ``--out`` if given.
    * Every format that is not printed is written as ``report.<suffix>`` under ``--out``:
      several formats, or ``--json`` with other formats, need ``--out`` (else
      :class:`InputError`).
    """
    if json_stdout:
        stdout: str | None = "json"
    elif len(formats) == 1:
        stdout = formats[0]
    else:
        stdout = None
    unprinted = [fmt for fmt in formats if fmt != stdout]
    if unprinted and out is None:
        shown = ",".join(unprinted)
        reason = "--json prints JSON on stdout" if json_stdout else "several formats are files"
        raise InputError(f"--format {shown} needs --out (the folder to write them in): {reason}")
    return OutputPlan(stdout=stdout, files=tuple(formats) if out is not None else ())


def check_output_dir(out: Path, files: Iterable[str] = ()) -> None:
    """Check, writing nothing, that ``out`` is a folder a run can write in (or create) and
    that each of ``files`` (names inside it) can be replaced; :class:`InputError` naming the
    path otherwise: ``out`` is a file, a broken link or a folder that cannot be written, its
    nearest existing parent is not a folder or cannot be written, or a file to write is a
    folder."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out}: is an existing file, not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise InputError(f"--out {out}: folder is not writable")
        for name in files:
            path = out / name
            if path.is_dir():
                raise InputError(f"{path}: is a folder, so the report file cannot be written")
        return
    if out.is_symlink():
        raise InputError(f"--out {out}: is a broken symbolic link")
    _check_creatable(out, "folder")


def check_output_file(path: Path) -> None:
    """Check, writing nothing, that a run can write the file ``path`` (replacing it if it
    exists); :class:`InputError` naming it otherwise: it is a folder, or its folder cannot
    be written or created."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--out {path}: is a folder, expected a file name")
    folder = path.absolute().parent
    if folder.is_dir():
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(f"--out {path}: folder {folder} is not writable")
        return
    _check_creatable(path, "file")


def _check_creatable(path: Path, what: str) -> None:
    """The nearest existing folder above ``path`` is a folder a run can create it in."""
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise InputError(f"--out {path}: cannot create the {what}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {path}: cannot create the {what}: {parent} is not writable")
