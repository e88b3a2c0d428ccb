"""No global side effects: a library call leaves torch's thread count and deterministic switch
as it found them, whatever it set inside (clipguard.runtime.torch_settings)."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from clipguard import api, plugins
from clipguard.components import RunContext, Scanner, ScanOutcome, ShotSet
from clipguard.errors import InputError
from clipguard.hookspecs import hookimpl
from clipguard.model import ModelBundle
from clipguard.runtime import CLI_DEFAULT_MAX_THREADS, cli_threads, torch_settings


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SettingsScanner(Scanner):
    """Records the torch settings it runs under."""

    name = "settings"
    version = "1"
    Config = NoOptions

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool]] = []

    def scan(
        self, bundle: ModelBundle, shots: ShotSet, config: BaseModel, context: RunContext
    ) -> ScanOutcome:
        self.seen.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()))
        return ScanOutcome(verdict="clean", score=0.0, target_class=None, explanation="")


@pytest.fixture
def settings_scanner() -> SettingsScanner:
    scanner = SettingsScanner()

    class Plugin:
        @hookimpl
        def clipguard_register_scanners(self, register):
            register(scanner)

    plugin = Plugin()
    manager = plugins.get_plugin_manager()
    manager.register(plugin, name="settings-plugin")
    yield scanner
    manager.unregister(plugin)


@pytest.fixture
def settings():
    """torch's settings before the test, restored after it whatever happened."""
    before = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield before
    torch.set_num_threads(before[0])
    torch.use_deterministic_algorithms(before[1], warn_only=before[2])


def _now() -> tuple[int, bool, bool]:
    return (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )


def test_a_library_scan_leaves_torch_settings_as_they_were(
    settings, settings_scanner, tiny_model_path, tiny_data
) -> None:
    torch.set_num_threads(3)
    torch.use_deterministic_algorithms(False)
    api.scan(tiny_model_path, tiny_data, scanner="settings", shots=2, threads=1)
    assert settings_scanner.seen == [(1, True)]  # inside: the threads asked for, deterministic
    assert _now() == (3, False, False)
    api.scan(tiny_model_path, tiny_data, scanner="settings", shots=2)
    assert settings_scanner.seen[-1] == (3, True)  # threads=None: torch's count as it was
    assert _now() == (3, False, False)


def test_a_failing_scan_restores_the_settings_too(
    settings, settings_scanner, tiny_model_path, tmp_path
) -> None:
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)
    with pytest.raises(InputError):
        api.scan(tiny_model_path, tmp_path / "missing", scanner="settings", threads=1)
    assert _now() == (2, False, False)


def test_purify_and_evaluate_leave_torch_settings_as_they_were(
    settings, tiny_model_path, tiny_data
) -> None:
    torch.set_num_threads(3)
    torch.use_deterministic_algorithms(True, warn_only=False)
    api.evaluate(tiny_model_path, tiny_data, threads=1)
    assert _now() == (3, True, False)
    pytest.importorskip("clipguard_baselines")
    api.purify(tiny_model_path, tiny_data, purifier="zeroshot", shots=2, threads=1)
    assert _now() == (3, True, False)


def test_torch_settings_restore_on_an_exception(settings) -> None:
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError), torch_settings(threads=1, deterministic=True):
        assert _now()[:2] == (1, True)
        raise RuntimeError
    assert _now()[:2] == (2, settings[1])


def test_the_cli_default_is_torchs_count_at_most_two(settings) -> None:
    assert cli_threads(5) == 5
    torch.set_num_threads(1)
    assert cli_threads(None) == 1
    torch.set_num_threads(4)
    assert cli_threads(None) == CLI_DEFAULT_MAX_THREADS == 2
