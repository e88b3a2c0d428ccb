"""`clipguard scan --draws N` / `api.scan(draws=N)`: how many shot draws the scanner is offered
(:attr:`RunContext.draws`); the scanner runs once and decides how to combine them."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from clipguard import api, plugins
from clipguard.components import RunContext, Scanner, ScanOutcome, ShotSet
from clipguard.errors import InputError
from clipguard.hookspecs import hookimpl
from clipguard.model import ModelBundle
from tests.core.cli_helpers import assert_one_line_error, run_cli


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DrawingScanner(Scanner):
    """Draws every shot set on offer and records what it was offered."""

    name = "drawing"
    version = "1"
    Config = NoOptions

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

    def scan(
        self, bundle: ModelBundle, shots: ShotSet, config: BaseModel, context: RunContext
    ) -> ScanOutcome:
        drawn = (
            [context.draw_shots(i) for i in range(1, context.draws)] if context.draw_shots else []
        )
        beyond = None
        if context.draw_shots is not None:
            try:
                context.draw_shots(context.draws)
            except ValueError as error:
                beyond = str(error)
        self.calls.append(
            {
                "draws": context.draws,
                "offered": context.draw_shots is not None,
                "drawn": drawn,
                "beyond": beyond,
                "held_out": context.held_out_shots is not None,
                "shots": shots,
            }
        )
        return ScanOutcome(verdict="clean", score=0.0, target_class=None, explanation="drawn")


@pytest.fixture
def drawing() -> DrawingScanner:
    scanner = DrawingScanner()

    class Plugin:
        @hookimpl
        def clipguard_register_scanners(self, register):
            register(scanner)

    plugin = Plugin()
    manager = plugins.get_plugin_manager()
    manager.register(plugin, name="drawing-plugin")
    yield scanner
    manager.unregister(plugin)


def test_three_draws_are_offered_by_default_and_the_scanner_runs_once(
    drawing, tiny_model_path, tiny_data
) -> None:
    report = api.scan(tiny_model_path, tiny_data, scanner="drawing", shots=2, seed=3)
    [call] = drawing.calls
    assert api.DEFAULT_DRAWS == 3 and call["draws"] == 3 and call["offered"]
    first: ShotSet = call["shots"]  # type: ignore[assignment]
    drawn: list[ShotSet] = call["drawn"]  # type: ignore[assignment]
    assert len(drawn) == 2 and all(d.pixels.shape == first.pixels.shape for d in drawn)
    assert not torch.equal(drawn[0].pixels, first.pixels)  # seed 4's draw, not seed 3's
    assert "not on offer" in str(call["beyond"])
    assert call["held_out"]
    # every image drawn is counted and hashed: more than one draw's 2 shots of 3 classes
    assert 6 < report.data.n_images <= 18
    assert report.run.seed == 3


def test_one_draw_offers_no_more_shots_but_still_held_out_images(
    drawing, tiny_model_path, tiny_data
) -> None:
    report = api.scan(tiny_model_path, tiny_data, scanner="drawing", shots=2, draws=1)
    [call] = drawing.calls
    assert call["draws"] == 1 and not call["offered"] and call["held_out"]
    assert report.data.n_images == 6


def test_a_draw_is_the_same_images_as_a_scan_with_its_seed(
    drawing, tiny_model_path, tiny_data
) -> None:
    api.scan(tiny_model_path, tiny_data, scanner="drawing", shots=2, seed=3, draws=2)
    api.scan(tiny_model_path, tiny_data, scanner="drawing", shots=2, seed=4, draws=1)
    second_draw = drawing.calls[0]["drawn"][0]  # type: ignore[index]
    alone = drawing.calls[1]["shots"]
    assert torch.equal(second_draw.pixels, alone.pixels)  # type: ignore[attr-defined]
    assert torch.equal(second_draw.labels, alone.labels)  # type: ignore[attr-defined]


def test_the_cli_passes_draws_to_the_scanner(drawing, tiny_model_path, tiny_data) -> None:
    result = run_cli(
        "scan", tiny_model_path, "--data", tiny_data, "--plugin", "drawing", "--shots", "2",
        "--draws", "2", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert drawing.calls[0]["draws"] == 2


def test_a_plugin_called_directly_is_offered_one_draw() -> None:
    context = RunContext()
    assert context.draws == 1 and context.draw_shots is None


def test_draws_below_one_is_a_one_line_error(tiny_model_path, tiny_data) -> None:
    result = run_cli("scan", tiny_model_path, "--data", tiny_data, "--draws", "0")
    assert_one_line_error(result, "--draws must be at least 1")
    with pytest.raises(InputError, match="--draws must be at least 1"):
        api.scan(tiny_model_path, tiny_data, draws=0)
