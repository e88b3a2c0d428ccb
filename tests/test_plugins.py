"""The plugin contract: a third-party scanner through the CLI, entry points, errors, allow-list."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from clipguard import plugins
from clipguard.cli import app
from clipguard.components import Purifier, RunContext, Scanner, ScanOutcome, ShotSet
from clipguard.hookspecs import hookimpl
from clipguard.model import ModelBundle
from clipguard.report import cpu_capability, cpu_model

runner = CliRunner()


class VerdictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    verdict: str = "backdoor"
    target: int = 0


class FixedVerdictScanner(Scanner):
    """A third-party scanner in a few lines: reports the configured verdict."""

    name = "fixed"
    version = "9.9"
    description = "reports the configured verdict"
    Config = VerdictConfig

    def scan(
        self, bundle: ModelBundle, shots: ShotSet, config: BaseModel, context: RunContext
    ) -> ScanOutcome:
        assert isinstance(config, VerdictConfig)
        assert shots.pixels.shape[-1] == bundle.image_size
        return ScanOutcome(
            verdict=config.verdict,  # type: ignore[arg-type]
            score=0.5,
            target_class=shots.classnames[config.target],
            explanation="configured",
            statistics={"n_shots": int(shots.labels.numel())},
            artifacts={"note.txt": b"hello"},
        )


class ThirdPartyPlugin:
    @hookimpl
    def clipguard_register_scanners(self, register):
        register(FixedVerdictScanner())


@pytest.fixture
def third_party():
    manager = plugins.get_plugin_manager()
    plugin = ThirdPartyPlugin()
    manager.register(plugin, name="third-party")
    yield plugin
    manager.unregister(plugin)


def test_third_party_scanner_runs_through_cli(third_party, tiny_model_path, tiny_data, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "scan",
            str(tiny_model_path),
            "--data",
            str(tiny_data),
            "--plugin",
            "fixed",
            "--shots",
            "2",
            "--out",
            str(out),
            "--option",
            "target=1",
            "--quiet",
        ],
    )
    assert result.exit_code == 1, result.output
    report = json.loads((out / "report.json").read_text())
    finding = report["findings"][0]
    assert finding["scanner"] == "fixed" and finding["verdict"] == "backdoor"
    assert finding["target_class"] == report["data"]["classes"][1]
    assert finding["statistics"]["n_shots"] == 2 * len(report["data"]["classes"])
    assert (out / "note.txt").read_bytes() == b"hello"
    assert report["run"]["seed"] == 0 and report["model"]["sha256"]
    # what produced it, down to the processor and the instruction set torch's kernels use
    # (weights trained from one seed can differ between them)
    assert report["tool"]["torch"] and report["tool"]["cpu"] == cpu_model()
    assert report["tool"]["cpu_capability"] == cpu_capability() and cpu_capability()


def test_clean_verdict_exits_zero(third_party, tiny_model_path, tiny_data):
    result = runner.invoke(
        app,
        [
            "scan",
            str(tiny_model_path),
            "--data",
            str(tiny_data),
            "--plugin",
            "fixed",
            "--shots",
            "2",
            "-o",
            "verdict=clean",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output


def test_invalid_plugin_option_is_exit_2(third_party, tiny_model_path, tiny_data):
    result = runner.invoke(
        app,
        [
            "scan",
            str(tiny_model_path),
            "--data",
            str(tiny_data),
            "--plugin",
            "fixed",
            "--shots",
            "2",
            "-o",
            "nonsense=1",
            "--quiet",
        ],
    )
    assert result.exit_code == 2
    assert "invalid scanner fixed option nonsense" in result.output


def test_config_file_options(third_party, tiny_model_path, tiny_data, tmp_path):
    config = tmp_path / "options.toml"
    config.write_text('verdict = "clean"\n')
    result = runner.invoke(
        app,
        [
            "scan",
            str(tiny_model_path),
            "--data",
            str(tiny_data),
            "--plugin",
            "fixed",
            "--shots",
            "2",
            "--config",
            str(config),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output


def test_unknown_scanner_is_exit_2(tiny_model_path, tiny_data):
    result = runner.invoke(
        app, ["scan", str(tiny_model_path), "--data", str(tiny_data), "--plugin", "nope"]
    )
    assert result.exit_code == 2
    assert "unknown scanner 'nope'" in result.output


def test_plugins_json_lists_entries_with_package(third_party):
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0
    listing = json.loads(result.output)
    assert set(listing) >= {"scanners", "purifiers", "triggers", "errors"}
    fixed = next(s for s in listing["scanners"] if s["name"] == "fixed")
    assert fixed["version"] == "9.9" and fixed["package"]
    assert any(t["name"] == "badnets" for t in listing["triggers"])


def test_plugins_options_lists_every_option_with_type_default_and_meaning():
    result = runner.invoke(app, ["plugins", "--options", "cbpt", "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    assert listing["name"] == "cbpt" and set(listing) == {"name", "scanners", "purifiers"}
    band = next(o for o in listing["scanners"] if o["name"] == "screen_again")
    assert band["type"] == "[number, number]" and band["default"] == [0.5, 1.5]
    signals = next(o for o in listing["scanners"] if o["name"] == "signals")
    assert signals["type"] == '"joint" | "size"' and signals["default"] == "joint"
    # a default that a validator fills in shows as the value in force
    threshold = next(o for o in listing["scanners"] if o["name"] == "evidence_threshold")
    assert threshold["type"] == "number | null" and threshold["default"] == 2.0
    table = runner.invoke(app, ["plugins", "--options", "cbpt"], env={"COLUMNS": "160"})
    assert table.exit_code == 0
    assert "screen_again" in table.output and "[number, number]" in table.output


def test_every_built_in_option_says_what_it_does():
    registry = plugins.get_registry()
    for kind, table in (("scanners", registry.scanners), ("purifiers", registry.purifiers),
                        ("triggers", registry.triggers)):  # fmt: skip
        for name in table:
            for option in registry.options_of(name)[kind]:
                assert option["description"], f"{kind} {name}: {option['name']} undocumented"


def test_a_third_party_config_is_listed_as_declared(third_party):
    class Required(BaseModel):
        label: str
        weight: float = 0.5

    assert plugins.config_options(Required) == [
        {"name": "label", "type": "string", "required": True, "default": None, "description": ""},
        {"name": "weight", "type": "number", "required": False, "default": 0.5,
         "description": ""},
    ]  # fmt: skip
    fixed = json.loads(runner.invoke(app, ["plugins", "--options", "fixed", "--json"]).output)
    assert [(o["name"], o["default"]) for o in fixed["scanners"]] == [
        ("verdict", "backdoor"),
        ("target", 0),
    ]


def test_plugins_options_of_an_unknown_name_is_a_clear_error():
    result = runner.invoke(app, ["plugins", "--options", "nope"])
    assert result.exit_code == 2
    assert "no scanner, purifier or trigger family is called 'nope'" in result.output
    assert "cbpt" in result.output


def test_duplicate_name_is_an_error_naming_both_plugins(third_party):
    class Again:
        @hookimpl
        def clipguard_register_scanners(self, register):
            register(FixedVerdictScanner())

    manager = plugins.get_plugin_manager()
    manager.register(Again(), name="copycat")
    registry = plugins.get_registry()
    assert registry.scanners["fixed"].plugin == "third-party"
    assert any("'fixed' registered twice" in e and "copycat" in e for e in registry.errors)


def _fake_entry_points(monkeypatch, *points: EntryPoint) -> None:
    monkeypatch.setattr(plugins, "entry_points", lambda group: list(points))


def test_broken_entry_point_is_reported_and_others_still_work(monkeypatch, tmp_path):
    module = tmp_path / "good_plugin_mod.py"
    module.write_text(
        "from clipguard.hookspecs import hookimpl\n"
        "from tests.test_plugins import FixedVerdictScanner\n"
        "@hookimpl\n"
        "def clipguard_register_scanners(register):\n"
        "    register(FixedVerdictScanner())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _fake_entry_points(
        monkeypatch,
        EntryPoint("broken", "no_such_module_for_clipguard", "clipguard"),
        EntryPoint("good", "good_plugin_mod", "clipguard"),
    )
    registry = plugins.get_registry()
    assert "fixed" in registry.scanners
    assert any("'broken'" in e and "failed to import" in e for e in registry.errors)
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0


def test_allow_list_restricts_entry_points(monkeypatch):
    _fake_entry_points(
        monkeypatch, EntryPoint("broken", "no_such_module_for_clipguard", "clipguard")
    )
    monkeypatch.setenv("CLIPGUARD_PLUGINS", "")
    assert not any("broken" in e for e in plugins.get_registry().errors)
    monkeypatch.setenv("CLIPGUARD_PLUGINS", "broken")
    plugins.reset_plugin_manager()
    assert any("'broken'" in e for e in plugins.get_registry().errors)


def test_registering_a_wrong_type_is_an_error():
    class Wrong:
        @hookimpl
        def clipguard_register_purifiers(self, register):
            register(object())

    plugins.get_plugin_manager().register(Wrong(), name="wrong")
    registry = plugins.get_registry()
    assert any("not a Purifier" in e for e in registry.errors)
    assert all(isinstance(r.obj, Purifier) for r in registry.purifiers.values())


def test_schema_files_are_in_sync():
    from clipguard.report import schema_texts

    folder = Path(__file__).resolve().parents[1] / "schemas"
    for name, text in schema_texts().items():
        path = folder / name
        assert path.exists(), f"{path} missing: run `clipguard schema --write`"
        assert path.read_text() == text, f"{path} is stale: run `clipguard schema --write`"


def test_trace_variable_traces_registration_hooks(monkeypatch, capsys):
    monkeypatch.setenv("CLIPGUARD_TRACE_HOOKS", "1")
    plugins.get_registry()
    err = capsys.readouterr().err
    assert "clipguard_register_triggers [plugin 'clipguard.builtin_triggers']" in err


def test_a_scan_without_its_plugin_installed_names_the_package(
    monkeypatch, tiny_model_path, tiny_data
):
    """The core ships no scanner: with no plugin loaded, the default scan and purify say which
    package to install, in one line and exit code 2."""
    from tests.core.cli_helpers import assert_one_line_error, run_cli

    monkeypatch.setenv("CLIPGUARD_PLUGINS", "")
    result = run_cli("scan", tiny_model_path, "--data", tiny_data)
    assert_one_line_error(result, "scanner 'cbpt' is not installed", "clipguard-cbpt")
    result = run_cli("purify", tiny_model_path, "--data", tiny_data, "--plugin", "finetune")
    assert_one_line_error(result, "purifier 'finetune'", "clipguard-baselines")
    result = run_cli("scan", tiny_model_path, "--data", tiny_data, "--plugin", "other")
    assert_one_line_error(result, "no scanner plugin is installed", "clipguard-cbpt")


def test_the_lab_registers_its_triggers_and_commands_like_any_plugin(monkeypatch):
    """The lab is the entry point ``lab`` of the clipguard package, not a built-in: the
    allow-list can leave it out, and it adds `clipguard lab` and `clipguard demo`."""
    from clipguard.cli import app as cli_app

    registry = plugins.get_registry()
    assert registry.triggers["wanet"].plugin == "lab"
    assert registry.triggers["wanet"].package == "clipguard"
    assert registry.triggers["badnets"].plugin == "clipguard.builtin_triggers"
    groups = {group.name for group in cli_app.registered_groups}
    commands = {command.name for command in cli_app.registered_commands}
    assert "lab" in groups and "demo" in commands
    monkeypatch.setenv("CLIPGUARD_PLUGINS", "")
    plugins.reset_plugin_manager()
    assert set(plugins.get_registry().triggers) == {"badnets"}


def test_a_plugin_failing_to_register_commands_is_an_error_and_adds_none():
    import typer

    class Broken:
        @hookimpl
        def clipguard_register_commands(self, app):
            app.command("half")(lambda: None)
            raise RuntimeError("no commands today")

    manager = plugins.get_plugin_manager()
    manager.register(Broken(), name="broken-commands")
    app_ = typer.Typer()
    plugins.register_commands(app_)
    assert [c.name for c in app_.registered_commands if c.name == "half"] == []
    errors = plugins.get_registry().errors
    assert any("'broken-commands'" in e and "no commands today" in e for e in errors)
