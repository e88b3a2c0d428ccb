"""The plugin manager: built-in plugins, entry-point plugins, and the registry they fill.

* Built-in plugins (:data:`BUILTIN_PLUGINS`: the core's own trigger family) always load.
* Installed plugins load from the ``clipguard`` entry-point group: the scanners and
  purifiers (packages ``clipguard-cbpt``, ``clipguard-baselines``), the lab (entry point
  ``lab`` of the ``clipguard`` package: its trigger families and the ``clipguard lab`` and
  ``clipguard demo`` commands) and third-party plugins alike. ``CLIPGUARD_PLUGINS`` (a
  comma-separated list of entry-point names) restricts which of them load; set it to an
  empty string to load none.
* A plugin that fails to import, or registers a name another plugin already took, becomes an
  error in :attr:`Registry.errors` naming the plugin and its package; the rest still work.
* A component registered as a :class:`~clipguard.hookspecs.Deferred` is listed from the
  names it carries and imported when first used (:attr:`Registered.obj`): the project's own
  plugins register theirs so, and building the registry imports neither them nor torch.
* ``CLIPGUARD_TRACE_HOOKS=1`` prints every hook call to stderr (for plugin authors).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from clipguard import hookspecs
from clipguard.config import build_config
from clipguard.errors import PluginError
from clipguard.hookspecs import Deferred

if TYPE_CHECKING:
    import typer

    from clipguard.components import Purifier, Scanner
    from clipguard.triggers import Trigger, TriggerFamily

ENTRY_POINT_GROUP = "clipguard"
BUILTIN_PLUGINS = ("clipguard.builtin_triggers",)
#: the distribution that provides each component of the project's own plugins, for the hint
#: of an "unknown scanner" error (the core never imports them)
PROVIDED_BY = {
    "cbpt": "clipguard-cbpt",
    "cbpt-nc": "clipguard-cbpt",
    "coop": "clipguard-cbpt",
    "zeroshot": "clipguard-baselines",
    "finetune": "clipguard-baselines",
    "cleanclip": "clipguard-baselines",
}
#: the class every registered component of a kind derives from, as (module, name): imported
#: only to check a component, so listing deferred components imports neither torch nor them
BASES = {
    "scanner": ("clipguard.components", "Scanner"),
    "purifier": ("clipguard.components", "Purifier"),
    "trigger": ("clipguard.triggers", "TriggerFamily"),
}
ALLOW_LIST_VARIABLE = "CLIPGUARD_PLUGINS"
TRACE_VARIABLE = "CLIPGUARD_TRACE_HOOKS"


def _base(kind: str) -> type:
    module, name = BASES[kind]
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Registered:
    """One registered scanner, purifier or trigger family, and where it came from.

    ``source`` is the registered instance or the :class:`~clipguard.hookspecs.Deferred` that
    loads it; :attr:`obj` is the instance, loaded on first access.
    """

    name: str
    version: str
    description: str
    plugin: str
    package: str
    kind: str
    source: Any

    @functools.cached_property
    def obj(self) -> Any:
        """The component; a deferred one is imported, built and checked here (its class, name
        and version), any failure a one-line :class:`PluginError` naming the plugin."""
        if not isinstance(self.source, Deferred):
            return self.source
        where = f"{self.kind} {self.name!r} of plugin {self.plugin!r} (package {self.package})"
        try:
            obj = self.source.load()
        except Exception as error:
            raise PluginError(
                f"{where} failed to load from {self.source.target}: {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}"
            ) from error
        base = _base(self.kind)
        if not isinstance(obj, base):
            raise PluginError(f"{where} loads a {type(obj).__name__}, not a {base.__name__}")
        loaded = (getattr(obj, "name", None), str(getattr(obj, "version", "")))
        if loaded != (self.name, self.version):
            raise PluginError(
                f"{where} was registered as version {self.version} but loads as "
                f"{loaded[0]!r} version {loaded[1]}"
            )
        return obj

    def describe(self) -> dict[str, str]:
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "plugin": self.plugin,
            "package": self.package,
        }


@dataclass
class Registry:
    """Everything the loaded plugins registered, and the errors met while loading them."""

    scanners: dict[str, Registered] = field(default_factory=dict)
    purifiers: dict[str, Registered] = field(default_factory=dict)
    triggers: dict[str, Registered] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def entry(self, kind: str, name: str) -> Registered:
        """The registered ``kind`` (``"scanner"``, ``"purifier"`` or ``"attack"``) called
        ``name``, without loading it; :class:`PluginError` (one line, with what to install
        or what is available) when there is none."""
        table = {"scanner": self.scanners, "purifier": self.purifiers, "attack": self.triggers}
        return self._entry(kind, table[kind], name)

    def _get(self, kind: str, table: dict[str, Registered], name: str) -> Any:
        return self._entry(kind, table, name).obj

    def _entry(self, kind: str, table: dict[str, Registered], name: str) -> Registered:
        if name not in table:
            package = PROVIDED_BY.get(name) if kind != "attack" else None
            if package is not None:
                raise PluginError(
                    f"{kind} {name!r} is not installed: install the {package} package "
                    f"(pip install {package}; from a source tree: make install)"
                )
            if not table and kind != "attack":
                raise PluginError(
                    f"no {kind} plugin is installed: install one, e.g. clipguard-cbpt "
                    "(pip install clipguard-cbpt; from a source tree: make install)"
                )
            known = ", ".join(sorted(table)) or "none"
            raise PluginError(f"unknown {kind} {name!r} (available: {known})")
        return table[name]

    def scanner(self, name: str) -> Scanner:
        return self._get("scanner", self.scanners, name)

    def purifier(self, name: str) -> Purifier:
        return self._get("purifier", self.purifiers, name)

    def trigger_family(self, name: str) -> TriggerFamily:
        return self._get("attack", self.triggers, name)

    def describe(self) -> dict[str, list[dict[str, str]]]:
        return {kind: [r.describe() for r in table.values()] for kind, table in self._kinds()}

    def options_of(self, name: str) -> dict[str, list[dict[str, Any]]]:
        """The options (:func:`config_options`) of the scanner, purifier and trigger family
        registered as ``name``, by kind (``scanners``, ``purifiers``, ``triggers``; only the
        kinds that have one). Raises :class:`PluginError` when none is called ``name``."""
        found = {
            kind: config_options(table[name].obj.Config)
            for kind, table in self._kinds()
            if name in table
        }
        if not found:
            known = ", ".join(sorted({n for _, table in self._kinds() for n in table})) or "none"
            raise PluginError(
                f"no scanner, purifier or trigger family is called {name!r} (available: {known})"
            )
        return found

    def _kinds(self) -> list[tuple[str, dict[str, Registered]]]:
        return [
            ("scanners", self.scanners),
            ("purifiers", self.purifiers),
            ("triggers", self.triggers),
        ]


def config_options(config: type[BaseModel]) -> list[dict[str, Any]]:
    """Every option of a plugin's ``Config``, in declaration order: its ``name``, JSON
    ``type`` (``"integer"``, ``"number | null"``, ``"[number, number]"``, ``'"joint" |
    "size"'`` ...), whether it is ``required``, its ``default`` as JSON (the value a config
    built from the defaults holds, so a default a validator fills in shows; None for a
    required option; a Config with required options shows each field's own default) and
    its ``description``."""
    schema = config.model_json_schema()
    properties, definitions = schema.get("properties", {}), schema.get("$defs", {})
    try:
        defaults = config().model_dump(mode="json")
    except ValidationError:  # a Config with required options: each field's own default
        defaults = {
            name: to_jsonable_python(field.get_default(call_default_factory=True))
            for name, field in config.model_fields.items()
            if not field.is_required()
        }
    return [
        {
            "name": name,
            "type": _json_type(properties.get(name, {}), definitions),
            "required": field.is_required(),
            "default": defaults.get(name),
            "description": field.description or "",
        }
        for name, field in config.model_fields.items()
    ]


def _json_type(schema: dict[str, Any], definitions: dict[str, Any]) -> str:
    if "$ref" in schema:
        schema = definitions.get(schema["$ref"].rsplit("/", 1)[-1], {})
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    if "anyOf" in schema:
        return " | ".join(_json_type(option, definitions) for option in schema["anyOf"])
    if schema.get("type") == "array" and "prefixItems" in schema:
        items = (_json_type(item, definitions) for item in schema["prefixItems"])
        return f"[{', '.join(items)}]"
    if schema.get("type") == "array":
        return f"array of {_json_type(schema.get('items', {}), definitions)}"
    return str(schema.get("type", "any"))


def _allow_list() -> set[str] | None:
    value = os.environ.get(ALLOW_LIST_VARIABLE)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def create_plugin_manager(errors: list[str] | None = None) -> pluggy.PluginManager:
    """A plugin manager with the hook specs, the built-ins and the allowed entry-point plugins.

    Import failures are appended to ``errors`` (when given) instead of raised.
    """
    errors = errors if errors is not None else []
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        try:
            manager.register(importlib.import_module(module_name), name=module_name)
        except Exception as error:
            errors.append(f"built-in plugin {module_name!r} failed to import: {error}")
    allowed = _allow_list()
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and entry_point.name not in allowed:
            continue
        package = entry_point.dist.name if entry_point.dist else entry_point.value
        if manager.get_plugin(entry_point.name) is not None:
            continue
        try:
            plugin = entry_point.load()
        except Exception as error:  # a broken third-party plugin must not break clipguard
            errors.append(
                f"plugin {entry_point.name!r} (package {package}) failed to import: "
                f"{type(error).__name__}: {error}"
            )
            continue
        manager.register(plugin, name=entry_point.name)
        _PACKAGES[entry_point.name] = package
    if os.environ.get(TRACE_VARIABLE):
        manager.trace.root.setwriter(lambda message: sys.stderr.write(message))
        manager.enable_tracing()
    return manager


#: package (distribution) of each entry-point plugin, by plugin name
_PACKAGES: dict[str, str] = {}


def _package_of(plugin_name: str, plugin: object) -> str:
    if plugin_name in _PACKAGES:
        return _PACKAGES[plugin_name]
    module = getattr(plugin, "__name__", None) or type(plugin).__module__
    return module.split(".")[0]


def _fill(
    hook: pluggy.HookCaller,
    kind: str,
    table: dict[str, Registered],
    errors: list[str],
    trace: Callable[..., None],
) -> None:
    for impl in hook.get_hookimpls():  # registration order
        trace(f"{hook.name} [plugin {impl.plugin_name!r}]")
        package = _package_of(impl.plugin_name, impl.plugin)

        def register(obj: Any, _plugin: str = impl.plugin_name, _package: str = package) -> None:
            if not isinstance(obj, Deferred) and not isinstance(obj, base := _base(kind)):
                errors.append(
                    f"plugin {_plugin!r} (package {_package}) registered a {type(obj).__name__}, "
                    f"not a {base.__name__}"
                )
                return
            name = obj.name
            if name in table:
                first = table[name]
                errors.append(
                    f"{kind} name {name!r} registered twice: by plugin {first.plugin!r} (package "
                    f"{first.package}) and by plugin {_plugin!r} (package {_package}); keeping "
                    "the first"
                )
                return
            table[name] = Registered(
                name=name,
                version=str(getattr(obj, "version", "")),
                description=str(getattr(obj, "description", "")),
                plugin=_plugin,
                package=_package,
                kind=kind,
                source=obj,
            )

        try:
            impl.function(register=register)
        except Exception as error:
            errors.append(
                f"plugin {impl.plugin_name!r} (package {package}) failed while registering "
                f"{kind}s: {type(error).__name__}: {error}"
            )


def resolve_trigger(
    attack: str,
    options: dict[str, Any] | None,
    image_size: int,
    registry: Registry | None = None,
) -> tuple[Trigger, bool, dict[str, Any]]:
    """The trigger of the registered family ``attack`` with ``options``, for square images of
    side ``image_size``: the trigger, whether the family is label-consistent, and the options
    as validated (JSON values, defaults filled in). ``registry`` defaults to
    :func:`get_registry`'s. An unknown family or an invalid option raises a one-line
    :class:`~clipguard.errors.ClipguardError`."""
    family = (registry or get_registry()).trigger_family(attack)
    config = build_config(family.Config, options or {}, what=f"attack {attack}")
    trigger = family.build(config, image_size)
    return trigger, bool(family.label_consistent), config.model_dump(mode="json")


def build_registry(manager: pluggy.PluginManager | None = None) -> Registry:
    """Call every plugin's registration hooks and collect the results and errors."""
    registry = Registry()
    if manager is None:
        manager = create_plugin_manager(registry.errors)
    hooks = manager.hook
    errors = registry.errors
    trace = manager.trace.root.get("hook")  # writes only when CLIPGUARD_TRACE_HOOKS is set
    tables = (
        (hooks.clipguard_register_triggers, "trigger", registry.triggers),
        (hooks.clipguard_register_scanners, "scanner", registry.scanners),
        (hooks.clipguard_register_purifiers, "purifier", registry.purifiers),
    )
    for hook, kind, table in tables:
        _fill(hook, kind, table, errors, trace)
    return registry


_manager: pluggy.PluginManager | None = None
_manager_errors: list[str] = []


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (created on first use). Tests may register on it."""
    global _manager
    if _manager is None:
        _manager_errors.clear()
        _manager = create_plugin_manager(_manager_errors)
    return _manager


def get_registry() -> Registry:
    """A registry built from the process-wide manager, with its import errors included."""
    manager = get_plugin_manager()
    registry = build_registry(manager)
    registry.errors[:0] = _manager_errors
    return registry


def register_commands(app: typer.Typer) -> None:
    """Let every loaded plugin add its commands to ``app``
    (:func:`~clipguard.hookspecs.clipguard_register_commands`), in registration order.

    A plugin whose hook raises is recorded among the manager's errors (shown by ``clipguard
    plugins`` and in reports) and whatever it added before failing is removed, so a broken
    plugin costs its own commands only.
    """
    manager = get_plugin_manager()
    hook = manager.hook.clipguard_register_commands
    trace = manager.trace.root.get("hook")
    for impl in hook.get_hookimpls():
        trace(f"{hook.name} [plugin {impl.plugin_name!r}]")
        commands, groups = list(app.registered_commands), list(app.registered_groups)
        try:
            impl.function(app=app)
        except Exception as error:
            app.registered_commands[:], app.registered_groups[:] = commands, groups
            package = _package_of(impl.plugin_name, impl.plugin)
            _manager_errors.append(
                f"plugin {impl.plugin_name!r} (package {package}) failed while registering "
                f"commands: {type(error).__name__}: {error}"
            )


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (the next call re-reads entry points and the allow-list)."""
    global _manager
    _manager = None
    _PACKAGES.clear()
