"""The cost of a scan, known before it starts.

A scanner declares its plan (:meth:`clipguard.Scanner.plan`): per stage, at most how many
images pass through the image encoder with and without backward, and how many prompts
through the text encoder. The core measures what one pass of *this* model costs on *this*
device (:func:`measure_unit_costs`: a few passes, nothing counted against the scan) and turns
the plan into projected seconds per stage (:func:`project`). ``clipguard scan --estimate``
prints that without scanning; every scan records it, with what each stage actually took
(:func:`with_actuals`), in ``report.run.cost``.

A time budget (``--max-minutes``) becomes a pass budget through the same measurement
(:func:`affordable_images`), so a scan's work stays a deterministic function of its
options once the budget in force is known (the report records it). Text-encoder work is
counted in image-encoder images by compute (:func:`text_image_equivalents`, from the
architecture's floating-point operations, not from timings), so a pass budget means the
same on every machine.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel

from clipguard.model import ModelBundle, build_clip_from_config
from clipguard.report import CostRecord, StageCost, UnitCosts

if TYPE_CHECKING:
    from clipguard.components import RunContext, Scanner, ShotSet

#: images of the first measured image-encoder pass (a ViT-B/32 pass of 8 images with
#: backward takes seconds on two CPU cores; per image, larger batches cost about the same)
MEASURE_BATCH = 8
#: images of the measured pass when the first took less than :data:`CHEAP_PASS_SECONDS`: a
#: small model's per-call overhead would dominate a pass of 8 images, and scans pass
#: batches of about this size (8 shots of every class at once)
LARGE_BATCH = 64
CHEAP_PASS_SECONDS = 0.2
#: context vectors of the measured prompt-tuning pass (the cbpt tuning's default)
MEASURE_CONTEXT = 4


@dataclass(frozen=True)
class StagePlan:
    """One stage of a scan as its scanner plans it: at most these passes.

    ``image_passes``: images through the image encoder with a backward pass (trigger
    inversion, probes); ``image_forwards``: without (features of shots); ``text_passes`` /
    ``text_forwards``: prompts through the text encoder with / without a backward pass.
    ``condition``: when the stage runs only in some scans (None: always)."""

    name: str
    image_passes: int = 0
    image_forwards: int = 0
    text_passes: int = 0
    text_forwards: int = 0
    condition: str | None = None


@dataclass(frozen=True)
class ScanPlan:
    """A scanner's plan for one scan: its stages in order, the pass budget in force (None
    when the scanner has none), the budget at which no stage would be cut short, and notes
    for people (what was cut, how the budget was set)."""

    stages: list[StagePlan]
    budget: int | None = None
    budget_needed: int | None = None
    notes: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work: Any, repeats: int, warm_up: Any = None) -> float:
    """Seconds per call of ``work()`` over ``repeats`` calls, after one warm-up call of
    ``warm_up()`` (default: ``work()``)."""
    (warm_up or work)()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def measure_unit_costs(
    bundle: ModelBundle,
    classnames: list[str],
    batch_size: int | None = None,
    repeats: int = 1,
) -> UnitCosts:
    """Seconds per image of the image encoder (forward with backward to the input, and
    forward alone) at ``batch_size`` images (None: :data:`MEASURE_BATCH`, or
    :data:`LARGE_BATCH` where a pass of that many takes under :data:`CHEAP_PASS_SECONDS`),
    and per prompt of the text encoder (a prompt-tuning step over ``classnames``, and a
    forward), on the bundle's device.

    Each is timed over ``repeats`` calls after a warm-up call (the image encoder's on one
    image). Random inputs from a private
    generator: neither the global random state nor the bundle's pass counters change."""
    if batch_size is None:
        first = measure_unit_costs(bundle, classnames, MEASURE_BATCH, repeats)
        if first.image_pass_seconds * MEASURE_BATCH >= CHEAP_PASS_SECONDS:
            return first
        batch_size = LARGE_BATCH
    from clipguard.prompts import PromptEncoder

    device = bundle.device
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch_size, 3, bundle.image_size, bundle.image_size, generator=generator)
    pixels = pixels.to(device)
    model = bundle.model

    def image_pass(images: torch.Tensor = pixels) -> None:
        x = images.clone().requires_grad_(True)
        model.encode_image(bundle.normalize(x)).sum().backward()

    def image_forward(images: torch.Tensor = pixels) -> None:
        with torch.no_grad():
            model.encode_image(bundle.normalize(images))

    def warm_up() -> None:  # one image: a real-size model's batch takes seconds
        image_pass(pixels[:1])
        image_forward(pixels[:1])

    prompts_before = bundle.text_encoder_prompts
    encoder = PromptEncoder(bundle, classnames, MEASURE_CONTEXT).to(device)
    width = int(model.token_embedding.weight.shape[1])
    context = torch.randn(len(classnames), MEASURE_CONTEXT, width, generator=generator)
    context = context.to(device)

    def text_pass() -> None:
        weights = context.clone().requires_grad_(True)
        encoder(weights).sum().backward()

    def text_forward() -> None:
        with torch.no_grad():
            encoder(context)

    n = len(classnames)
    units = UnitCosts(
        device=str(device),
        batch_size=batch_size,
        image_pass_seconds=_timed(device, image_pass, repeats, warm_up) / batch_size,
        image_forward_seconds=_timed(device, image_forward, repeats, warm_up) / batch_size,
        text_pass_seconds=_timed(device, text_pass, repeats) / n,
        text_forward_seconds=_timed(device, text_forward, repeats) / n,
        threads=torch.get_num_threads(),
    )
    bundle.text_encoder_prompts = prompts_before
    return units


def stage_seconds(stage: StagePlan, units: UnitCosts) -> float:
    """The seconds ``stage``'s passes take at ``units``."""
    return (
        stage.image_passes * units.image_pass_seconds
        + stage.image_forwards * units.image_forward_seconds
        + stage.text_passes * units.text_pass_seconds
        + stage.text_forwards * units.text_forward_seconds
    )


def project(
    scanner: str,
    plan: ScanPlan | None,
    units: UnitCosts | None,
    max_minutes: float | None = None,
    overhead_seconds: float = 0.0,
) -> CostRecord:
    """The cost record of ``plan`` at ``units``: projected seconds per stage and in all
    (``overhead_seconds``, the loading and measurement already spent, included). Without a
    plan the cost is unknown (``known`` False), never guessed."""
    if plan is None:
        return CostRecord(
            scanner=scanner,
            known=False,
            reason=f"scanner {scanner!r} declares no plan (Scanner.plan)",
            units=units,
            max_minutes=max_minutes,
        )
    stages = [
        StageCost(
            stage=stage.name,
            image_passes=stage.image_passes,
            image_forwards=stage.image_forwards,
            text_passes=stage.text_passes,
            text_forwards=stage.text_forwards,
            condition=stage.condition,
            projected_seconds=None if units is None else round(stage_seconds(stage, units), 3),
        )
        for stage in plan.stages
    ]
    total = None
    if units is not None:
        total = round(overhead_seconds + sum(s.projected_seconds or 0.0 for s in stages), 3)
    return CostRecord(
        scanner=scanner,
        known=True,
        units=units,
        stages=stages,
        budget=plan.budget,
        budget_needed=plan.budget_needed,
        max_minutes=max_minutes,
        projected_seconds=total,
        notes=list(plan.notes),
    )


def plan_scan(
    component: Scanner,
    bundle: ModelBundle,
    shots: ShotSet,
    config: BaseModel,
    context: RunContext,
    max_minutes: float | None = None,
    overhead_seconds: float = 0.0,
) -> CostRecord:
    """Measure this model's passes on this device (into ``context.unit_costs``), ask the
    scanner for its plan and project it (:func:`project`). A scanner without a plan, or
    whose plan fails, gets an unknown cost, with the reason; the scan itself goes on."""
    start = time.perf_counter()
    with context.stage("cost estimate"), torch.random.fork_rng(devices=[]):
        context.unit_costs = measure_unit_costs(bundle, list(shots.classnames))
    overhead = overhead_seconds + time.perf_counter() - start
    try:
        with torch.random.fork_rng(devices=[]):
            plan = component.plan(bundle, shots, config, context)
    except Exception as error:  # a plugin's plan must not stop its scan
        record = project(component.name, None, context.unit_costs, max_minutes, overhead)
        return record.model_copy(
            update={"reason": f"the plan of scanner {component.name!r} failed: {error}"}
        )
    return project(component.name, plan, context.unit_costs, max_minutes, overhead)


def with_actuals(record: CostRecord, context: RunContext, seconds: float) -> CostRecord:
    """``record`` with what each planned stage took (``context.stage_seconds`` and
    ``stage_images``) and the run's ``seconds``."""
    stages = [
        stage.model_copy(
            update={
                "actual_seconds": round(context.stage_seconds.get(stage.stage, 0.0), 3),
                "actual_image_images": context.stage_images.get(stage.stage, 0),
            }
        )
        for stage in record.stages
    ]
    return record.model_copy(update={"stages": stages, "actual_seconds": round(seconds, 3)})


def affordable_images(context: RunContext, reserve_seconds: float = 0.0) -> int | None:
    """How many image-encoder images (with backward, the dearest pass) fit in the time left
    before ``context.deadline``, less ``reserve_seconds``; None without a deadline or
    without measured unit costs."""
    left = context.seconds_left()
    if left is None or context.unit_costs is None:
        return None
    per_image = max(context.unit_costs.image_pass_seconds, 1e-9)
    return max(int((left - reserve_seconds) / per_image), 0)


@functools.lru_cache(maxsize=16)
def _flops(model_cfg_json: str) -> tuple[float, float, int]:
    """Forward floating-point operations of one image and of one full-length prompt, and
    the context length, of the architecture in ``model_cfg_json`` (counted on the ``meta``
    device: nothing is allocated)."""
    from torch.utils.flop_counter import FlopCounterMode

    model_cfg = json.loads(model_cfg_json)
    with torch.device("meta"):
        model = build_clip_from_config(model_cfg)
    size = model.visual.image_size
    side = size if isinstance(size, int) else size[0]
    with FlopCounterMode(display=False) as counter:
        model.encode_image(torch.zeros(1, 3, side, side, device="meta"))
    image = float(counter.get_total_flops())
    length = int(model.context_length)
    with FlopCounterMode(display=False) as counter:
        model.encode_text(torch.zeros(1, length, dtype=torch.long, device="meta"))
    text = float(counter.get_total_flops())
    return image, text, length


def _architecture_flops(bundle: ModelBundle) -> tuple[float, float, int]:
    cfg = {k: v for k, v in bundle.model_cfg.items() if k != "preprocess_cfg"}
    return _flops(json.dumps(cfg, sort_keys=True))


def image_flops(bundle: ModelBundle) -> float:
    """Floating-point operations of one image's forward pass through ``bundle``'s image
    encoder, counted on its architecture (not timed: the same on every machine)."""
    return _architecture_flops(bundle)[0]


def text_image_equivalents(bundle: ModelBundle, prompts: int, tokens: int) -> float:
    """The image-encoder images whose compute equals that of ``prompts`` prompts of
    ``tokens`` tokens through the text encoder (both forward, or both with backward): the
    ratio of their floating-point operations for this architecture (linear in the tokens,
    which the prompt encoder cuts after the last end-of-text token)."""
    image, text, length = _architecture_flops(bundle)
    if image <= 0:
        return 0.0
    return prompts * text * min(tokens, length) / length / image


def minutes(seconds: float | None) -> str:
    """``seconds`` for people: ``"42 s"``, ``"3.5 min"``, ``"2.1 h"``, or ``"unknown"``."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
