"""The floors import one way: the core never imports the lab or a plugin; no plugin imports the
lab or another plugin. Checked on the source (ast), so a lazy import inside a function counts."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAB = "clipguard.lab"
PLUGIN_PACKAGES = ("clipguard_cbpt", "clipguard_baselines", "clipguard_nc")
#: a dotted module name, or "module:attribute" (a Deferred component's target)
MODULE_NAME = re.compile(r"(?P<module>[A-Za-z_]\w*(\.[A-Za-z_]\w*)+)(:[A-Za-z_]\w*)?")


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports (absolute names; relative imports resolved), by line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(_source_root(path)).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    # a module named in a string is imported by name (importlib): BUILTIN_PLUGINS, and the
    # target of a Deferred component
    found.extend(
        (node.lineno, match["module"])
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and (match := MODULE_NAME.fullmatch(node.value))
    )
    return found


def _source_root(path: Path) -> Path:
    for parent in path.parents:
        if not (parent / "__init__.py").exists():
            return parent
    raise AssertionError(path)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _core_modules() -> list[Path]:
    return [p for p in sorted((ROOT / "clipguard").rglob("*.py")) if "lab" not in p.parts]


def _plugin_modules() -> list[tuple[str, Path]]:
    """(the plugin's own package, module) for every module of plugins/*."""
    modules = []
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        own = next((p for p in path.parts if p in PLUGIN_PACKAGES), None)
        if own is None:  # scripts beside a plugin (plugins/cbpt/experiments) use their plugin
            own = {"cbpt": "clipguard_cbpt", "baselines": "clipguard_baselines"}.get(
                path.relative_to(ROOT / "plugins").parts[0], ""
            )
        modules.append((own, path))
    return modules


def _violations(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for line, module in _imports(path)
        if any(_within(module, package) for package in forbidden)
    ]


def test_the_core_imports_neither_the_lab_nor_a_plugin() -> None:
    modules = _core_modules()
    assert ROOT / "clipguard" / "api.py" in modules and len(modules) > 20
    violations = [v for p in modules for v in _violations(p, (LAB, *PLUGIN_PACKAGES))]
    assert not violations, "\n".join(violations)


def test_no_plugin_imports_the_lab_or_another_plugin() -> None:
    modules = _plugin_modules()
    assert {own for own, _ in modules} >= set(PLUGIN_PACKAGES)
    violations = [
        v
        for own, path in modules
        for v in _violations(path, (LAB, *(p for p in PLUGIN_PACKAGES if p != own)))
    ]
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize(
    ("source", "imported"),
    [
        ("import clipguard.lab.train", "clipguard.lab.train"),
        ("from clipguard.lab import train", "clipguard.lab.train"),
        ("from clipguard import lab", "clipguard.lab"),
        ("def f():\n    from clipguard_cbpt.oracle import x", "clipguard_cbpt.oracle"),
        ('PLUGINS = ("clipguard.lab.attacks",)', "clipguard.lab.attacks"),
    ],
)
def test_the_check_sees_every_form_of_import(tmp_path, source, imported) -> None:
    module = tmp_path / "module.py"
    module.write_text(source + "\n")
    assert any(_within(name, imported) for _, name in _imports(module))
