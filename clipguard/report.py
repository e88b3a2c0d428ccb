"""Pydantic models of every report clipguard writes, and their JSON Schemas.

Reports carry a ``schema_version``; a change that breaks readers bumps it. ``clipguard schema
--write`` writes the JSON Schema of each model to ``schemas/``; a test keeps them in sync.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from clipguard.errors import InputError
from clipguard.io import atomic_write_text

SCHEMA_VERSION = "1.0"
#: report.json's schema version: 1.1 added the top-level ``verdict`` and ``target_class``;
#: 1.2 the run's whole command line and its ``working_directory``, the scan's cost
#: (``run.cost``: projected and actual, per stage) and every finding's ``next_steps``
REPORT_SCHEMA_VERSION = "1.2"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolInfo(_Model):
    """Versions of clipguard and the libraries that produced the report."""

    clipguard: str
    python: str
    torch: str
    open_clip: str
    platform: str
    cpu: str | None = Field(
        None,
        description=(
            "processor model (floating-point results, and so trained weights, can differ "
            "between processors with the same seed)"
        ),
    )
    cpu_capability: str | None = Field(
        None,
        description=(
            "the instruction set torch's CPU kernels use (AVX512, AVX2, ...): the same seed "
            "gives the same numbers only on the same capability"
        ),
    )
    plugins: dict[str, str] = Field(default_factory=dict, description="plugin name -> version")


class UnitCosts(_Model):
    """Seconds of one pass of the model on the run's device, measured before the scan
    (:func:`clipguard.cost.measure_unit_costs`)."""

    device: str
    batch_size: int = Field(description="images per measured image-encoder pass")
    image_pass_seconds: float = Field(
        description="per image: image encoder forward and backward (gradients to the input)"
    )
    image_forward_seconds: float = Field(description="per image: image encoder forward only")
    text_pass_seconds: float = Field(
        description="per prompt: text encoder forward and backward (prompt tuning)"
    )
    text_forward_seconds: float = Field(description="per prompt: text encoder forward only")
    threads: int = Field(description="torch CPU threads during the measurement")


class StageCost(_Model):
    """One stage of a scan: the passes its scanner planned (at most), the seconds they
    project to, and what the stage actually took."""

    stage: str
    image_passes: int = Field(0, description="images through the image encoder with backward")
    image_forwards: int = Field(0, description="images through the image encoder, forward only")
    text_passes: int = Field(0, description="prompts through the text encoder with backward")
    text_forwards: int = Field(0, description="prompts through the text encoder, forward only")
    condition: str | None = Field(None, description="when the stage runs only sometimes")
    projected_seconds: float | None = None
    actual_seconds: float | None = Field(None, description="null until the scan ran")
    actual_image_images: int | None = Field(
        None, description="images the stage passed through the image encoder"
    )


class CostRecord(_Model):
    """The cost of a scan: its plan and projection before it starts, then what it took.

    ``known`` is False when the scanner declares no plan (a third-party scanner without
    ``Scanner.plan``): the projection is then unknown, never a guess."""

    scanner: str
    known: bool
    reason: str | None = Field(None, description="why the plan is unknown")
    units: UnitCosts | None = None
    stages: list[StageCost] = Field(default_factory=list)
    budget: int | None = Field(
        None, description="the scanner's pass budget in force (after --max-minutes)"
    )
    budget_needed: int | None = Field(
        None, description="the pass budget at which no stage would be cut short"
    )
    max_minutes: float | None = None
    projected_seconds: float | None = Field(
        None, description="at most, within the budget (measurement included)"
    )
    actual_seconds: float | None = None
    notes: list[str] = Field(default_factory=list)


class NextStep(_Model):
    """What to run to settle an ``inconclusive`` finding: the arguments to add to (or
    replace in) the same ``clipguard scan`` command, and why."""

    args: list[str] = Field(description="command-line arguments, e.g. ['--draws', '5']")
    text: str = Field(description="for people: what it does and why")


class RunInfo(_Model):
    """How the run was made: seed, device, wall-clock times, seconds per stage."""

    command: str = Field(
        description="the whole command line of the run, shell-quoted (schema 1.2; before: "
        "the command and model only)"
    )
    working_directory: str | None = Field(
        None,
        description="the folder the command ran in: relative paths of the report are relative "
        "to it (schema 1.2; null in older reports)",
    )
    seed: int
    device: str
    started_at: datetime
    finished_at: datetime
    seconds: float
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    image_encoder_images: int = Field(0, description="images passed through the image encoder")
    text_encoder_prompts: int = Field(0, description="prompts passed through the text encoder")
    cost: CostRecord | None = Field(
        None, description="scan: projected and actual cost per stage (schema 1.2)"
    )


class ModelInfo(_Model):
    """The audited checkpoint."""

    path: str | None
    sha256: str
    architecture: str
    parameters: int
    image_size: int


class DataInfo(_Model):
    """The clean data used: where, which classes, how many shots, and a hash of the files."""

    path: str
    classes: list[str]
    shots: int | None = Field(None, description="images per class used by the plugin")
    n_images: int
    files_sha256: str


class Finding(_Model):
    """One scanner's result."""

    scanner: str
    scanner_version: str
    verdict: Literal["backdoor", "clean", "inconclusive"]
    score: float
    target_class: str | None
    explanation: str
    config: dict[str, Any]
    statistics: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict, description="name -> written path")
    next_steps: list[NextStep] = Field(
        default_factory=list,
        description="inconclusive: what to run next to settle it (schema 1.2)",
    )


class Metrics(_Model):
    """CA and ASR (fractions in [0, 1]) on one image set; ASR null without an attack."""

    clean_accuracy: float
    attack_success_rate: float | None
    n_images: int
    n_attacked: int
    class_recall: dict[str, float | None] = Field(
        default_factory=dict,
        description="class name -> fraction of its clean images classified as it (null: none "
        "evaluated)",
    )


class LostClass(_Model):
    """A class the purified classifier has all but stopped recognising (recall fractions)."""

    name: str
    recall_before: float
    recall_after: float


class AttackSpec(_Model):
    """The attack an ASR was measured with: a registered trigger family or an inverted trigger."""

    name: str
    target_class: str
    options: dict[str, Any] = Field(default_factory=dict)


class Purification(_Model):
    """A purifier's result: metrics before and after, on the same held-out images."""

    purifier: str
    purifier_version: str
    config: dict[str, Any]
    evaluation_data: str
    attack: AttackSpec | None
    before: Metrics
    after: Metrics
    inverted_trigger_attack: AttackSpec | None = None
    inverted_trigger_before: Metrics | None = None
    inverted_trigger_after: Metrics | None = None
    lost_classes: list[LostClass] = Field(
        default_factory=list,
        description="classes the purified classifier has all but stopped recognising (their "
        "recall fell to under half, by a margin; clipguard.metrics.lost_classes): typically "
        "the backdoor's target, given up to bring ASR down",
    )
    classes_judged: int | None = Field(
        None,
        description="how many classes had enough evaluation images to be judged for loss "
        "(the others cannot appear in lost_classes; raise --eval-limit)",
    )
    statistics: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict)


class Report(_Model):
    """The report of a ``scan`` or ``purify`` run (report.json)."""

    schema_version: Literal["1.0", "1.1", "1.2"] = REPORT_SCHEMA_VERSION
    kind: Literal["scan", "purify"]
    verdict: Literal["backdoor", "clean", "inconclusive"] | None = Field(
        None,
        description="scan: the overall verdict (backdoor if any finding says so, then "
        "inconclusive, else clean), derived from the findings; purify: null",
    )
    target_class: str | None = Field(
        None,
        description="scan: the target class of the finding that decided the verdict (null "
        "for a clean verdict); purify: null",
    )
    tool: ToolInfo
    run: RunInfo
    model: ModelInfo
    data: DataInfo
    findings: list[Finding] = Field(default_factory=list)
    purification: Purification | None = None
    errors: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _overall_verdict(self) -> Report:
        """Derive ``verdict`` and ``target_class`` from the findings of a scan report; a
        stored report whose values disagree with its findings is refused."""
        verdict, target = _overall(self.findings) if self.kind == "scan" else (None, None)
        stored = self.model_fields_set
        for name, derived in (("verdict", verdict), ("target_class", target)):
            if name in stored and getattr(self, name) != derived:
                raise ValueError(
                    f"report {name} {getattr(self, name)!r} disagrees with its findings"
                )
            object.__setattr__(self, name, derived)
        return self


def _overall(
    findings: list[Finding],
) -> tuple[Literal["backdoor", "clean", "inconclusive"], str | None]:
    """The overall verdict of ``findings`` and the target class of the first finding with it."""
    for verdict in ("backdoor", "inconclusive"):
        deciding = [finding for finding in findings if finding.verdict == verdict]
        if deciding:
            return verdict, deciding[0].target_class
    return "clean", None


class EvaluationReport(_Model):
    """What ``clipguard evaluate --json`` prints."""

    schema_version: Literal["1.0"] = SCHEMA_VERSION
    model: ModelInfo
    data: DataInfo
    prompts: str | None
    attack: AttackSpec | None
    clean_accuracy: float
    attack_success_rate: float | None
    n_images: int
    n_attacked: int
    class_recall: dict[str, float | None] = Field(
        default_factory=dict, description="class name -> fraction of its images classified as it"
    )
    seconds: float


class TriggerFileMetadata(_Model):
    """Metadata of a trigger file (safetensors ``__metadata__``; lists and dicts as JSON text)."""

    format: Literal["clipguard.trigger/1"]
    model_sha256: str
    classnames: str = Field(description="JSON list of class names")
    settings: str = Field(description="JSON object of the settings that made the trigger")
    producer: str


class PromptFileMetadata(_Model):
    """Metadata of a prompt file (safetensors ``__metadata__``; lists and dicts as JSON text)."""

    format: Literal["clipguard.prompts/1"]
    classnames: str = Field(description="JSON list of class names, one per context row")
    model_sha256: str
    architecture: str
    plugin: str
    plugin_version: str
    settings: str = Field(description="JSON object of the tuning settings")


class ModelFileMetadata(_Model):
    """Metadata of a model file written by clipguard (safetensors ``__metadata__``)."""

    model_config = ConfigDict(extra="allow")
    format: Literal["clipguard.model/1"]
    open_clip_config: str = Field(description='JSON {"model_cfg": open_clip model config}')


class FleetRow(_Model):
    """One model of a fleet scan (``clipguard scan MODEL... --out OUT``): a line of
    ``OUT/summary.jsonl``."""

    path: str = Field(description="the checkpoint, as given or found")
    name: str = Field(description="its folder under the output folder")
    sha256: str | None = Field(description="sha256 of the checkpoint; null if unreadable")
    verdict: Literal["backdoor", "clean", "inconclusive"] | None = Field(
        description="the scan's verdict; null when the scan failed"
    )
    target: str | None = Field(description="suspected target class (report target_class)")
    score: float | None = Field(description="score of the finding that decided the verdict")
    seconds: float = Field(description="wall-clock seconds the model's scan took")
    error: str | None = Field(description="the one-line error of a failed scan, else null")
    report: str | None = Field(description="report.json, relative to the output folder")
    reused: bool = Field(False, description="true when a rerun re-used an earlier scan")


class FleetRecord(_Model):
    """``OUT/<model>/fleet.json`` of a fleet scan: the model and the options its report.json
    was made with; a rerun with the same sha256 and fingerprint re-uses the row."""

    format: Literal["clipguard.fleet/1"]
    sha256: str = Field(description="sha256 of the checkpoint scanned")
    fingerprint: str = Field(description="sha256 of the canonical JSON of options")
    options: dict[str, Any] = Field(
        description="versions, scan options, config and class-name file hashes, data folder"
    )
    row: FleetRow


#: file name in schemas/ -> model
SCHEMAS: dict[str, type[BaseModel]] = {
    "report.schema.json": Report,
    "evaluation.schema.json": EvaluationReport,
    "trigger-file.schema.json": TriggerFileMetadata,
    "prompt-file.schema.json": PromptFileMetadata,
    "model-file.schema.json": ModelFileMetadata,
    "fleet-summary-line.schema.json": FleetRow,
    "fleet-record.schema.json": FleetRecord,
}


def schema_texts() -> dict[str, str]:
    """The JSON Schema text of every report and file format, by file name."""
    return {
        name: json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        for name, model in SCHEMAS.items()
    }


def write_schemas(folder: Path) -> list[Path]:
    """Write every schema into ``folder`` (atomically); return the paths written."""
    written = []
    for name, text in schema_texts().items():
        path = Path(folder) / name
        atomic_write_text(path, text)
        written.append(path)
    return written


def tool_info(plugins: dict[str, str] | None = None) -> ToolInfo:
    """Versions of this process's clipguard, Python, torch and open_clip."""
    import open_clip
    import torch

    from clipguard import __version__

    return ToolInfo(
        clipguard=__version__,
        python=platform.python_version(),
        torch=torch.__version__,
        open_clip=open_clip.__version__,
        platform=platform.platform(),
        cpu=cpu_model(),
        cpu_capability=cpu_capability(),
        plugins=plugins or {},
    )


def cpu_model() -> str | None:
    """The processor's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform`
    reports; None when neither says)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def cpu_capability() -> str | None:
    """The instruction set torch dispatches its CPU kernels to (``"AVX512"``, ``"AVX2"``,
    ``"DEFAULT"``, ...; None when this torch does not say). Two processors with the same
    model name can differ in it, and with it the rounding of every reduction: weights
    trained, and scans made, with one seed agree to the bit only on the same capability."""
    import torch

    capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return str(capability()) if capability is not None else None


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


#: a stored report larger than this is refused before it is parsed
MAX_REPORT_BYTES = 64 * 1024 * 1024


def read_report(path: Path) -> Report:
    """A stored report.json, validated as a :class:`Report` (any schema version this release
    reads); :class:`~clipguard.errors.InputError` with one line for a missing, unreadable,
    oversized, non-JSON or foreign file (the first thing wrong with it named)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: report {'is not a file' if path.exists() else 'not found'}")
    try:
        if path.stat().st_size > MAX_REPORT_BYTES:
            raise InputError(f"{path}: report is larger than {MAX_REPORT_BYTES} bytes")
        data = json.loads(path.read_bytes())
    except OSError as error:
        raise InputError(f"{path}: cannot read report ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InputError(f"{path}: not a JSON file") from None
    try:
        return Report.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        message = str(first["msg"]).splitlines()[0]
        raise InputError(
            f"{path}: not a clipguard scan or purify report ({where}: {message}; "
            f"{error.error_count()} problem(s))"
        ) from None


def write_report(path: Path, report: BaseModel) -> None:
    """Write a report as indented JSON, atomically."""
    atomic_write_text(Path(path), report.model_dump_json(indent=2) + "\n")
