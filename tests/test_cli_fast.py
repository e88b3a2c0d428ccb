"""A command line that answers at once: --help, --version, plugins, schema and option errors
without importing torch; plugins registered as Deferred are listed without loading them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clipguard import defaults, plugins
from clipguard.hookspecs import Deferred, hookimpl
from tests.core.cli_helpers import assert_one_line_error, run_cli

#: runs the command line once per argument list in one process, then says whether torch or
#: open_clip was imported, and by which command first
_PROBE = """
import json, runpy, sys
heavy = ("torch", "open_clip")
first, codes = None, []
for args in json.loads(sys.argv[1]):
    sys.argv = ["clipguard", *args]
    try:
        runpy.run_module("clipguard", run_name="__main__")
    except SystemExit as exit_:
        codes.append(exit_.code)
    if first is None and any(name in sys.modules for name in heavy):
        first = args
sys.stderr.write("PROBE " + json.dumps({"first_heavy": first, "codes": codes}) + "\\n")
"""


def _probe(*commands: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(list(commands))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next(line for line in result.stderr.splitlines() if line.startswith("PROBE "))
    return json.loads(line.removeprefix("PROBE "))


def _every_help() -> list[list[str]]:
    """``--help`` of every command and command group of the installed command line."""
    from clipguard.cli import app

    helps: list[list[str]] = [["--help"]]

    def walk(typer_app, prefix: list[str]) -> None:
        for command in typer_app.registered_commands:
            name = command.name or command.callback.__name__.replace("_", "-")
            helps.append([*prefix, name, "--help"])
        for group in typer_app.registered_groups:
            helps.append([*prefix, group.name, "--help"])
            walk(group.typer_instance, [*prefix, group.name])

    walk(app, [])
    return helps


def test_help_version_plugins_and_schema_do_not_import_torch():
    commands = [["--version"], ["plugins"], ["plugins", "--json"], ["schema"], *_every_help()]
    assert ["scan", "--help"] in commands and ["report", "render", "--help"] in commands
    probe = _probe(*commands)
    assert probe["first_heavy"] is None, f"{probe['first_heavy']} imported torch or open_clip"
    assert probe["codes"] == [0] * len(commands)


def test_errors_about_paths_and_options_come_before_torch(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    taken = tmp_path / "taken"
    taken.write_text("x")
    commands = [
        ["scan", str(tmp_path / "missing.safetensors"), "--data", str(tmp_path)],
        ["scan", str(model), "--data", str(tmp_path / "none")],
        ["scan", str(model), "--data", str(tmp_path), "--out", str(taken)],
        ["scan", str(model), "--data", str(tmp_path), "--format", "pdf"],
        ["scan", str(model), "--data", str(tmp_path), "--fail-on", "maybe"],
        ["purify", str(model), "--data", str(tmp_path), "--format", "md,html"],
        ["evaluate", str(model), "--data", str(tmp_path), "--target", "cat"],
        ["evaluate", str(model), "--data", str(tmp_path), "--attack", "nope", "--target", "cat"],
        ["report", "render", str(taken), "--format", "md"],
    ]
    probe = _probe(*commands)
    assert probe["first_heavy"] is None, f"{probe['first_heavy']} imported torch first"
    assert probe["codes"] == [2] * len(commands)


def test_api_and_cli_share_the_defaults():
    from clipguard import api

    assert (api.DEFAULT_SHOTS, api.DEFAULT_DRAWS, api.DEFAULT_EVAL_LIMIT) == (
        defaults.DEFAULT_SHOTS,
        defaults.DEFAULT_DRAWS,
        defaults.DEFAULT_EVAL_LIMIT,
    )


def test_deferred_components_carry_their_own_names():
    """What `clipguard plugins` lists without loading a component is what loading it gives."""
    registry = plugins.get_registry()
    deferred = [
        entry
        for _, table in registry._kinds()
        for entry in table.values()
        if isinstance(entry.source, Deferred)
    ]
    assert {"cbpt", "cbpt-nc", "coop", "badnets", "blended"} <= {e.name for e in deferred}
    for entry in deferred:
        component = entry.obj
        assert (component.name, str(component.version), component.description) == (
            entry.name,
            entry.version,
            entry.description,
        ), entry.source.target


def test_the_lab_registers_every_family_of_its_modules_in_order():
    from clipguard.lab.attacks import LAB_FAMILIES
    from clipguard.lab.attacks_extended import EXTENDED_FAMILIES
    from clipguard.lab.plugin import FAMILIES

    loaded = [type(family.load()) for family in FAMILIES]
    assert loaded == [*LAB_FAMILIES, *EXTENDED_FAMILIES]


@pytest.fixture
def register_scanner():
    def register(deferred: Deferred) -> None:
        class Plugin:
            @hookimpl
            def clipguard_register_scanners(self, register):
                register(deferred)

        plugins.get_plugin_manager().register(Plugin(), name=f"deferred-{deferred.name}")

    return register


def test_a_deferred_scanner_that_cannot_load_is_one_line(
    register_scanner, tiny_model_path, tiny_data
):
    register_scanner(Deferred("no_such_module_for_clipguard:Scanner", "ghost", "1"))
    listing = json.loads(run_cli("plugins", "--json").stdout)
    assert "ghost" in {entry["name"] for entry in listing["scanners"]}
    result = run_cli("scan", tiny_model_path, "--data", tiny_data, "--plugin", "ghost")
    assert_one_line_error(result, "scanner 'ghost'", "failed to load", "ModuleNotFoundError")


def test_a_deferred_scanner_must_be_what_it_claims(register_scanner, tiny_model_path, tiny_data):
    register_scanner(Deferred("tests.core.fixed_verdict:FixedVerdictScanner", "liar", "1"))
    result = run_cli("scan", tiny_model_path, "--data", tiny_data, "--plugin", "liar")
    assert_one_line_error(result, "scanner 'liar'", "loads as 'fixed-verdict'")


def test_an_unknown_scanner_is_refused_before_the_model(tiny_data, tmp_path):
    model = Path(tmp_path / "m.safetensors")
    model.write_bytes(b"not loaded")
    result = run_cli("scan", model, "--data", tiny_data, "--plugin", "nope")
    assert_one_line_error(result, "unknown scanner 'nope'")
