"""What a plugin author imports: `import clipguard` and nothing else, without torch on import."""

from __future__ import annotations

import subprocess
import sys

import pytest

import clipguard
from clipguard import components, hookspecs, model, plugins, triggers


def test_import_clipguard_does_not_import_torch() -> None:
    code = "import sys, clipguard; assert 'torch' not in sys.modules, 'torch imported'"
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize("name", sorted(set(clipguard.__all__) - {"__version__"}))
def test_every_public_name_is_the_defining_modules_object(name: str) -> None:
    home = {"hookimpl": hookspecs, "Deferred": hookspecs, "ModelBundle": model, "Trigger": triggers}
    home["TriggerFamily"] = triggers
    assert getattr(clipguard, name) is getattr(home.get(name, components), name)
    assert name in dir(clipguard)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = clipguard.nothing_here


def test_a_plugin_written_against_the_package_alone_registers() -> None:
    class OnlyClipguard(clipguard.Scanner):
        name = "only-clipguard"
        version = "1"
        Config = triggers.BadNetsConfig  # any pydantic model

        def scan(self, bundle, shots, config, context):  # pragma: no cover - not run
            return clipguard.ScanOutcome("clean", 0.0, None, "")

    class Plugin:
        @clipguard.hookimpl
        def clipguard_register_scanners(self, register):
            register(OnlyClipguard())

    plugin = Plugin()
    manager = plugins.get_plugin_manager()
    manager.register(plugin, name="only-clipguard")
    try:
        assert "only-clipguard" in plugins.get_registry().scanners
    finally:
        manager.unregister(plugin)
