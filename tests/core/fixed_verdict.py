"""A scanner plugin that returns the verdict it is told (``-o verdict=...``), and the
``fixed_verdict`` fixture that registers it: for tests of what a verdict does (exit codes,
outputs, SARIF, progress) without a real scan."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict

from clipguard import plugins
from clipguard.components import RunContext, Scanner, ScanOutcome, ShotSet
from clipguard.hookspecs import hookimpl
from clipguard.model import ModelBundle

TARGETS = {"backdoor": "cat", "inconclusive": "dog", "clean": None}


class VerdictOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verdict: str = "clean"


class FixedVerdictScanner(Scanner):
    """Returns the verdict its option names (the target of :data:`TARGETS`)."""

    name = "fixed-verdict"
    version = "1"
    Config = VerdictOptions

    def scan(
        self, bundle: ModelBundle, shots: ShotSet, config: BaseModel, context: RunContext
    ) -> ScanOutcome:
        assert isinstance(config, VerdictOptions)
        target = TARGETS[config.verdict]
        target = shots.classnames[0] if target else None
        return ScanOutcome(
            verdict=config.verdict,  # type: ignore[arg-type]
            score=0.5,
            target_class=target,
            explanation="as configured",
        )


@pytest.fixture
def fixed_verdict():
    class Plugin:
        @hookimpl
        def clipguard_register_scanners(self, register):
            register(FixedVerdictScanner())

    plugin = Plugin()
    manager = plugins.get_plugin_manager()
    manager.register(plugin, name="fixed-verdict-plugin")
    yield
    manager.unregister(plugin)
