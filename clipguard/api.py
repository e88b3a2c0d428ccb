"""The Python API: :func:`scan`, :func:`purify` and :func:`evaluate`.

The CLI is a thin layer over these functions, and so is any governance pipeline that embeds
clipguard: each returns a pydantic report object and, when ``out_dir`` is given, writes
``report.json`` and the plugin's artefacts there atomically. User errors raise
:class:`~clipguard.errors.ClipguardError` subclasses with a one-line message.

No call leaves a global setting changed: each runs inside
:func:`clipguard.runtime.torch_settings` (``threads`` torch CPU threads, None for as many as
now; deterministic kernels) and restores torch's thread count and deterministic switch on
return, even on an exception. Each seeds Python's, NumPy's and torch's generators with its
``seed`` (:func:`clipguard.runtime.seed_everything`).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from clipguard.components import RunContext, ShotSet
from clipguard.config import build_config
from clipguard.cost import plan_scan, with_actuals
from clipguard.data import (
    ImageFolder,
    Sample,
    load_pixels,
    open_image_folder,
    resolve_class,
    split_shots,
    subsample,
    take_per_class,
)
from clipguard.defaults import (
    DEFAULT_DRAWS,
    DEFAULT_EVAL_LIMIT,
    DEFAULT_MAX_MINUTES,
    DEFAULT_SHOTS,
)
from clipguard.errors import InputError
from clipguard.io import atomic_write_bytes
from clipguard.metrics import (
    Evaluation,
    classes_judged,
    evaluate_pixels,
    evaluate_samples,
    lost_classes,
    triggered_success,
)
from clipguard.model import ModelBundle, load_model, resolve_device
from clipguard.plugins import Registry, get_registry, resolve_trigger
from clipguard.progress import Progress
from clipguard.prompts import PromptClassifier, load_prompt_file, save_prompt_file
from clipguard.report import (
    AttackSpec,
    CostRecord,
    DataInfo,
    EvaluationReport,
    Finding,
    LostClass,
    Metrics,
    ModelInfo,
    Purification,
    Report,
    RunInfo,
    tool_info,
    utc_now,
    write_report,
)
from clipguard.runtime import seed_everything, torch_settings
from clipguard.triggers import Trigger, TriggerFile, load_trigger_file, save_trigger_file

# --------------------------------------------------------------------------- helpers


def command_line() -> str:
    """This process's command line (``sys.argv``, shell-quoted): what a report records as
    ``run.command`` when its caller gives none."""
    return shlex.join(sys.argv)


def _model_info(bundle: ModelBundle) -> ModelInfo:
    return ModelInfo(
        path=str(bundle.path) if bundle.path else None,
        sha256=bundle.sha256,
        architecture=bundle.arch,
        parameters=bundle.n_parameters,
        image_size=bundle.image_size,
    )


def _resolve_attack(
    registry: Registry,
    attack: str | None,
    target: str | None,
    folder: ImageFolder,
    image_size: int,
    attack_options: Mapping[str, Any] | None = None,
) -> tuple[Trigger | None, int | None, AttackSpec | None]:
    """The trigger of a registered attack (:func:`~clipguard.plugins.resolve_trigger`), the
    index of its target class (a class or folder name of ``folder``:
    :func:`~clipguard.data.resolve_class`) and the report's record of it; all None without
    an attack."""
    if attack is None and target is None:
        return None, None, None
    if attack is None or target is None:
        raise InputError("--attack and --target go together")
    index = resolve_class(target, folder.classnames, folder.folders)
    trigger, _, options = resolve_trigger(attack, dict(attack_options or {}), image_size, registry)
    spec = AttackSpec(name=attack, target_class=folder.classnames[index], options=options)
    return trigger, index, spec


def _metrics(evaluation: Evaluation, classnames: Sequence[str]) -> Metrics:
    return Metrics(**evaluation.as_dict(), class_recall=_class_recall(evaluation, classnames))


def _class_recall(evaluation: Evaluation, classnames: Sequence[str]) -> dict[str, float | None]:
    """Class name -> recall (empty when ``evaluation`` has no per-class counts)."""
    if not evaluation.class_images:
        return {}
    return dict(zip(classnames, evaluation.class_recall, strict=True))


class _Run:
    """Common set-up of a scan or purify run: seed, model, data, shots, context.

    Every argument is keyword-only; ``draws`` is what :meth:`offer_more_draws` offers.
    """

    def __init__(
        self,
        *,
        command: str,
        model_path: Path,
        data_dir: Path,
        shots: int,
        seed: int,
        device: str,
        classnames_file: Path | None,
        arch: str | None,
        allow_torchscript: bool,
        quiet: bool,
        registry: Registry,
        draws: int = 1,
    ) -> None:
        if draws < 1:
            raise InputError(f"--draws must be at least 1, got {draws}")
        self.started_at = utc_now()
        self.clock = time.perf_counter()
        self.command = command
        self.seed = seed
        seed_everything(seed)
        self.registry = registry
        self.draws = draws
        self.progress = Progress(quiet=quiet)
        device = resolve_device(device)
        self.context = RunContext(seed=seed, device=torch.device(device), progress=self.progress)
        with self.context.stage("load model"):
            self.bundle = load_model(
                model_path, arch=arch, allow_torchscript=allow_torchscript, device=device
            )
        self.context.encoder_images = lambda: self.bundle.image_encoder_images
        with self.context.stage("load data"):
            self.folder: ImageFolder = open_image_folder(data_dir, classnames_file)
        self.n_shots = shots
        self.used_samples: set[Sample] = set()
        #: held-out images already loaded, by (seed, images per class): a plugin may ask twice
        self.held_out_loaded: dict[tuple[int, int], ShotSet | None] = {}
        self.shots, self.rest_samples = self.shots_of(seed)

    def shots_of(self, seed: int) -> tuple[ShotSet, list[Sample]]:
        """``n_shots`` images per class drawn with ``seed`` (counted among the run's images)
        and the folder's other images; the run's own shots are left as they are."""
        with self.context.stage("load data"):
            shot_samples, rest_samples = split_shots(self.folder, self.n_shots, seed)
        return self.loaded(shot_samples, "loading shots"), rest_samples

    def held_out_of(self, per_class: int) -> ShotSet | None:
        """Up to ``per_class`` images per class that are not among the run's shots, drawn
        with the run's seed (counted among the run's images); None when there are none.
        Loaded once per seed and count: a second call returns the same images."""
        key = (self.context.seed, per_class)
        if key not in self.held_out_loaded:
            samples = take_per_class(self.rest_samples, max(per_class, 0), self.context.seed)
            held_out = self.loaded(samples, "loading held-out images") if samples else None
            self.held_out_loaded[key] = held_out
        return self.held_out_loaded[key]

    def loaded(self, samples: list[Sample], description: str) -> ShotSet:
        """``samples`` loaded with the model's transform (stage "load data", a progress bar
        of ``description``) and counted among the run's images."""
        with self.context.stage("load data"):
            pixels, labels = load_pixels(
                samples, self.bundle.pixel_transform, self.progress, description
            )
        self.used_samples.update(samples)
        return ShotSet(pixels=pixels, labels=labels, classnames=self.folder.classnames)

    def offer_more_draws(self) -> None:
        """Let the plugin draw more shots and held-out images: :attr:`RunContext.draws` is
        the run's ``draws``, :attr:`RunContext.draw_shots` draws shot set ``i`` (``1 <= i <
        draws``, seed ``seed + i``; None for one draw) and :attr:`RunContext.held_out_shots`
        gives images outside the shots. Only for runs that hold no images back for
        evaluation (a scan)."""
        self.context.draws = self.draws
        if self.draws > 1:
            self.context.draw_shots = self.drawn_shots
        self.context.held_out_shots = self.held_out_of

    def drawn_shots(self, index: int) -> ShotSet:
        """Shot draw ``index`` of the run (seed ``seed + index``), for ``1 <= index < draws``;
        a ``ValueError`` (a plugin's bug) outside that range."""
        if not 1 <= index < self.draws:
            raise ValueError(f"shot draw {index} is not on offer (1 to {self.draws - 1})")
        return self.shots_of(self.seed + index)[0]

    def data_info(self) -> DataInfo:
        """The data folder and every shot drawn so far (count and content hash)."""
        return DataInfo(
            path=str(self.folder.root),
            classes=self.folder.classnames,
            shots=self.n_shots,
            n_images=len(self.used_samples),
            files_sha256=self.folder.files_sha256(self.used_samples),
        )

    def run_info(self, cost: CostRecord | None = None) -> RunInfo:
        return RunInfo(
            command=self.command,
            working_directory=os.getcwd(),
            seed=self.seed,
            device=str(self.context.device),
            started_at=self.started_at,
            finished_at=utc_now(),
            seconds=time.perf_counter() - self.clock,
            stage_seconds={k: round(v, 4) for k, v in self.context.stage_seconds.items()},
            image_encoder_images=self.bundle.image_encoder_images,
            text_encoder_prompts=self.bundle.text_encoder_prompts,
            cost=cost,
        )

    def plugin_versions(self) -> dict[str, str]:
        versions = {f"scanner:{r.name}": r.version for r in self.registry.scanners.values()}
        versions.update({f"purifier:{r.name}": r.version for r in self.registry.purifiers.values()})
        return versions


def _write_artifacts(out_dir: Path | None, artifacts: Mapping[str, bytes]) -> dict[str, str]:
    if out_dir is None:
        return {}
    written = {}
    for name, data in artifacts.items():
        if Path(name).name != name:
            raise InputError(f"plugin artefact name {name!r} must be a plain file name")
        path = Path(out_dir) / name
        atomic_write_bytes(path, data)
        written[name] = str(path)
    return written


# --------------------------------------------------------------------------- scan


def _scan_run(
    *,
    command: str,
    model_path: Path | str,
    data_dir: Path | str,
    scanner: str,
    shots: int,
    seed: int,
    device: str,
    options: Mapping[str, Any] | None,
    config_file: Path | None,
    classnames_file: Path | None,
    arch: str | None,
    allow_torchscript: bool,
    quiet: bool,
    draws: int,
    max_minutes: float | None,
) -> tuple[Any, Any, _Run, CostRecord]:
    """The scanner, its config and the run of a scan, set up (model and shots loaded, the
    draws offered, the deadline set), and its cost record (:func:`clipguard.cost.plan_scan`);
    ``command`` is recorded as the report's ``run.command``."""
    if max_minutes is not None and not max_minutes > 0:
        raise InputError(f"--max-minutes must be above 0, got {max_minutes}")
    registry = get_registry()
    component = registry.scanner(scanner)
    config = build_config(component.Config, options, config_file, what=f"scanner {scanner}")
    run = _Run(
        command=command,
        model_path=Path(model_path),
        data_dir=Path(data_dir),
        shots=shots,
        seed=seed,
        device=device,
        classnames_file=classnames_file,
        arch=arch,
        allow_torchscript=allow_torchscript,
        quiet=quiet,
        registry=registry,
        draws=draws,
    )
    run.offer_more_draws()
    if max_minutes is not None:
        run.context.deadline = run.clock + 60 * max_minutes
    cost = plan_scan(
        component,
        run.bundle,
        run.shots,
        config,
        run.context,
        max_minutes=max_minutes,
        overhead_seconds=time.perf_counter() - run.clock,
    )
    return component, config, run, cost


def estimate(
    model_path: Path | str,
    data_dir: Path | str,
    scanner: str = "cbpt",
    shots: int = DEFAULT_SHOTS,
    seed: int = 0,
    device: str = "cpu",
    options: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
    classnames_file: Path | None = None,
    arch: str | None = None,
    allow_torchscript: bool = False,
    draws: int = DEFAULT_DRAWS,
    max_minutes: float | None = DEFAULT_MAX_MINUTES,
    threads: int | None = None,
    command: str | None = None,
) -> CostRecord:
    """What a :func:`scan` with these arguments would cost, without scanning: the
    scanner's plan (stages, image- and text-encoder passes) and the seconds it projects to,
    from a few passes of this model measured on this device (``clipguard scan
    --estimate``). ``known`` is False for a scanner that declares no plan."""
    with torch_settings(threads=threads, deterministic=True):
        _, _, _, cost = _scan_run(
            command=command if command is not None else command_line(),
            model_path=model_path,
            data_dir=data_dir,
            scanner=scanner,
            shots=shots,
            seed=seed,
            device=device,
            options=options,
            config_file=config_file,
            classnames_file=classnames_file,
            arch=arch,
            allow_torchscript=allow_torchscript,
            quiet=True,
            draws=draws,
            max_minutes=max_minutes,
        )
        return cost


def scan(
    model_path: Path | str,
    data_dir: Path | str,
    scanner: str = "cbpt",
    shots: int = DEFAULT_SHOTS,
    seed: int = 0,
    device: str = "cpu",
    options: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
    classnames_file: Path | None = None,
    arch: str | None = None,
    allow_torchscript: bool = False,
    out_dir: Path | str | None = None,
    quiet: bool = True,
    draws: int = DEFAULT_DRAWS,
    threads: int | None = None,
    command: str | None = None,
    max_minutes: float | None = DEFAULT_MAX_MINUTES,
    on_plan: Callable[[CostRecord], None] | None = None,
) -> Report:
    """Scan a checkpoint for a backdoor with a registered scanner.

    Loads the model safely, draws ``shots`` clean images per class from ``data_dir`` with
    ``seed``, runs the scanner once and returns the report. ``draws`` (at least 1) is how many
    shot draws the scanner is offered (:attr:`RunContext.draws`): it may draw sets ``1`` to
    ``draws - 1`` (seeds ``seed + 1`` ...), each counted in the report's data hash; a scanner
    that uses one draw ignores it. With ``out_dir`` it writes the scanner's artefacts and
    ``report.json`` there, each atomically (the report last).

    Before the scan, a few passes of the model are measured and the scanner's plan projected
    (:func:`estimate`); ``on_plan`` gets that record before the scan starts, and the report
    keeps it with what each stage took (``report.run.cost``). ``max_minutes`` is a time
    budget for the whole run (:attr:`RunContext.deadline`; default
    :data:`~clipguard.defaults.DEFAULT_MAX_MINUTES`, None for none): a scanner that honours
    it does less work, and says so, rather than run over.

    Runs with ``threads`` torch CPU threads (None: as many as now) and deterministic
    kernels; both settings are restored on return (:func:`clipguard.runtime.torch_settings`).
    ``command`` is recorded as the report's ``run.command`` (default: this process's command
    line, :func:`command_line`).
    """
    with torch_settings(threads=threads, deterministic=True):
        component, config, run, cost = _scan_run(
            command=command if command is not None else command_line(),
            model_path=model_path,
            data_dir=data_dir,
            scanner=scanner,
            shots=shots,
            seed=seed,
            device=device,
            options=options,
            config_file=config_file,
            classnames_file=classnames_file,
            arch=arch,
            allow_torchscript=allow_torchscript,
            quiet=quiet,
            draws=draws,
            max_minutes=max_minutes,
        )
        if on_plan is not None:
            on_plan(cost)
        with run.context.stage("scan"):
            outcome = component.scan(run.bundle, run.shots, config, run.context)
        out = Path(out_dir) if out_dir is not None else None
        artifacts = _write_artifacts(out, outcome.artifacts)
        finding = Finding(
            scanner=component.name,
            scanner_version=component.version,
            verdict=outcome.verdict,
            score=float(outcome.score),
            target_class=outcome.target_class,
            explanation=outcome.explanation,
            config=config.model_dump(mode="json"),
            statistics=outcome.statistics,
            artifacts=artifacts,
            next_steps=list(outcome.next_steps),
        )
        cost = with_actuals(cost, run.context, time.perf_counter() - run.clock)
        report = Report(
            kind="scan",
            tool=tool_info(run.plugin_versions()),
            run=run.run_info(cost),
            model=_model_info(run.bundle),
            data=run.data_info(),
            findings=[finding],
            errors=run.registry.errors,
        )
        if out is not None:
            write_report(out / "report.json", report)
        return report


# --------------------------------------------------------------------------- purify


def purify(
    model_path: Path | str,
    data_dir: Path | str,
    purifier: str = "cbpt",
    shots: int = DEFAULT_SHOTS,
    seed: int = 0,
    device: str = "cpu",
    options: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
    trigger_path: Path | str | None = None,
    eval_data: Path | str | None = None,
    eval_limit: int | None = DEFAULT_EVAL_LIMIT,
    attack: str | None = None,
    attack_options: Mapping[str, Any] | None = None,
    target: str | None = None,
    classnames_file: Path | None = None,
    arch: str | None = None,
    allow_torchscript: bool = False,
    out_dir: Path | str | None = None,
    quiet: bool = True,
    threads: int | None = None,
    command: str | None = None,
    draws: int = DEFAULT_DRAWS,
) -> Report:
    """Purify a checkpoint with a registered purifier and measure CA/ASR before and after.

    The purifier sees only ``shots`` images per class of ``data_dir``. Metrics are measured on
    ``eval_data`` or, by default, on the images of ``data_dir`` it did not see (at most
    ``eval_limit``). ASR uses the registered ``attack`` aimed at ``target`` when given, and the
    purifier's own (inverted) trigger when it reports one. Without ``trigger_path`` the purifier
    is offered ``draws`` shot draws and held-out images of ``data_dir`` as a scan is
    (:meth:`_Run.offer_more_draws`), so that its own inversion can be the scan's; they only
    choose the trigger, never tune the prompts. With ``out_dir``, writes the prompt
    file (or the purifier's model file), other artefacts and ``report.json`` atomically.

    Runs with ``threads`` torch CPU threads (None: as many as now) and deterministic
    kernels; both settings are restored on return (:func:`clipguard.runtime.torch_settings`).
    ``command`` is recorded as the report's ``run.command`` (default: this process's command
    line, :func:`command_line`).
    """
    with torch_settings(threads=threads, deterministic=True):
        registry = get_registry()
        component = registry.purifier(purifier)
        config = build_config(component.Config, options, config_file, what=f"purifier {purifier}")
        run = _Run(
            command=command if command is not None else command_line(),
            model_path=Path(model_path),
            data_dir=Path(data_dir),
            shots=shots,
            seed=seed,
            device=device,
            classnames_file=classnames_file,
            arch=arch,
            allow_torchscript=allow_torchscript,
            quiet=quiet,
            registry=registry,
            draws=draws,
        )
        classnames = run.folder.classnames
        trigger_file: TriggerFile | None = None
        if trigger_path is None:
            run.offer_more_draws()
        else:
            trigger_file = load_trigger_file(Path(trigger_path))
            trigger_file.check_fits(run.bundle.sha256, classnames, run.bundle.image_size)

        with run.context.stage("load evaluation data"):
            if eval_data is not None:
                eval_folder = open_image_folder(eval_data, classnames_file)
                if eval_folder.classnames != classnames:
                    raise InputError(
                        f"{eval_data}: evaluation classes differ from those of {data_dir}"
                    )
                eval_samples = eval_folder.samples
            else:
                eval_samples = run.rest_samples
                if not eval_samples:
                    raise InputError(
                        f"{data_dir}: no images left for evaluation after the shots; "
                        "pass --eval-data"
                    )
            eval_samples = subsample(eval_samples, eval_limit, seed)
            eval_pixels, eval_labels = load_pixels(
                eval_samples, run.bundle.pixel_transform, run.progress, "loading evaluation images"
            )
        real_trigger, real_target, attack_spec = _resolve_attack(
            run.registry, attack, target, run.folder, run.bundle.image_size, attack_options
        )

        baseline = PromptClassifier(run.bundle, classnames)
        with run.context.stage("evaluate before"):
            before = evaluate_pixels(
                baseline.predict,
                eval_pixels,
                eval_labels,
                real_trigger,
                real_target,
                len(classnames),
            )
        with run.context.stage("purify"):
            outcome = component.purify(
                run.bundle, run.shots, config, run.context, trigger=trigger_file
            )
        with run.context.stage("evaluate after"):
            after = evaluate_pixels(
                outcome.classifier.predict,
                eval_pixels,
                eval_labels,
                real_trigger,
                real_target,
                len(classnames),
            )
            inverted = _inverted_trigger_metrics(
                outcome, baseline, classnames, eval_pixels, eval_labels, before, after
            )

        out = Path(out_dir) if out_dir is not None else None
        artifacts = _write_artifacts(out, outcome.artifacts)
        if out is not None and outcome.prompts is not None:
            save_prompt_file(out / "prompts.safetensors", outcome.prompts)
            artifacts["prompts"] = str(out / "prompts.safetensors")
        if (
            out is not None
            and outcome.trigger is not None
            and "trigger.safetensors" not in artifacts
        ):
            save_trigger_file(out / "trigger.safetensors", outcome.trigger)
            artifacts["trigger"] = str(out / "trigger.safetensors")

        purification = Purification(
            purifier=component.name,
            purifier_version=component.version,
            config=config.model_dump(mode="json"),
            evaluation_data=str(eval_data) if eval_data is not None else f"{data_dir} (held out)",
            attack=attack_spec,
            before=_metrics(before, classnames),
            after=_metrics(after, classnames),
            lost_classes=[
                LostClass(
                    name=classnames[k],
                    recall_before=before.class_recall[k],
                    recall_after=after.class_recall[k],
                )
                for k in lost_classes(before, after)
            ],
            classes_judged=classes_judged(before),
            statistics=outcome.statistics,
            artifacts=artifacts,
            **inverted,
        )
        report = Report(
            kind="purify",
            tool=tool_info(run.plugin_versions()),
            run=run.run_info(),
            model=_model_info(run.bundle),
            data=run.data_info(),
            purification=purification,
            errors=run.registry.errors,
        )
        if out is not None:
            write_report(out / "report.json", report)
        return report


def _inverted_trigger_metrics(
    outcome: Any,
    baseline: PromptClassifier,
    classnames: list[str],
    pixels: torch.Tensor,
    labels: torch.Tensor,
    before: Evaluation,
    after: Evaluation,
) -> dict[str, Any]:
    """ASR of the purifier's own trigger before and after; CA is the one already measured."""
    if outcome.trigger is None or outcome.trigger_target not in classnames:
        return {}
    target_index = classnames.index(outcome.trigger_target)
    trigger = outcome.trigger.trigger
    measured = {}
    for name, predict, clean in (
        ("inverted_trigger_before", baseline.predict, before),
        ("inverted_trigger_after", outcome.classifier.predict, after),
    ):
        asr, n_attacked = triggered_success(predict, pixels, labels, trigger, target_index)
        measured[name] = Metrics(
            clean_accuracy=clean.clean_accuracy,
            attack_success_rate=asr,
            n_images=clean.n_images,
            n_attacked=n_attacked,
            class_recall=_class_recall(clean, classnames),
        )
    return {
        "inverted_trigger_attack": AttackSpec(name="inverted", target_class=outcome.trigger_target),
        **measured,
    }


# --------------------------------------------------------------------------- evaluate


def evaluate(
    model_path: Path | str,
    data_dir: Path | str,
    prompts_path: Path | str | None = None,
    attack: str | None = None,
    attack_options: Mapping[str, Any] | None = None,
    target: str | None = None,
    classnames_file: Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    arch: str | None = None,
    allow_torchscript: bool = False,
    device: str = "cpu",
    quiet: bool = True,
    threads: int | None = None,
) -> EvaluationReport:
    """CA of a model (hand-crafted prompts, or a prompt file) on all images of ``data_dir``.

    With ``attack`` and ``target``, also the ASR: among images whose class is not the target,
    the fraction classified as the target once the trigger is applied. ``limit`` evaluates a
    seeded random subset.

    Runs with ``threads`` torch CPU threads (None: as many as now) and deterministic
    kernels; both settings are restored on return (:func:`clipguard.runtime.torch_settings`).
    """
    with torch_settings(threads=threads, deterministic=True):
        start = time.perf_counter()
        seed_everything(seed)
        bundle = load_model(
            model_path, arch=arch, allow_torchscript=allow_torchscript, device=device
        )
        folder = open_image_folder(data_dir, classnames_file)
        prompts = load_prompt_file(Path(prompts_path)) if prompts_path is not None else None
        classifier = PromptClassifier(bundle, folder.classnames, prompts)
        trigger, target_index, spec = _resolve_attack(
            get_registry(), attack, target, folder, bundle.image_size, attack_options
        )
        samples = subsample(folder.samples, limit, seed)
        result = evaluate_samples(
            classifier.predict,
            samples,
            bundle.pixel_transform,
            trigger,
            target_index,
            progress=Progress(quiet=quiet),
            n_classes=len(folder.classnames),
        )
        return EvaluationReport(
            model=_model_info(bundle),
            data=DataInfo(
                path=str(folder.root),
                classes=folder.classnames,
                shots=None,
                n_images=len(samples),
                files_sha256=folder.files_sha256(samples),
            ),
            prompts=str(prompts_path) if prompts_path is not None else None,
            attack=spec,
            clean_accuracy=result.clean_accuracy,
            attack_success_rate=result.attack_success_rate,
            n_images=result.n_images,
            n_attacked=result.n_attacked,
            class_recall=_class_recall(result, folder.classnames),
            seconds=time.perf_counter() - start,
        )
