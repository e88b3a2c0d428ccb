"""Plugin options from the command line and from config files, validated into a ``Config``.

A scanner, purifier or trigger family declares its options as a pydantic model (its
``Config``). :func:`parse_options` reads ``--option key=value`` strings,
:func:`read_config_file` a JSON or TOML file, and :func:`build_config` validates both (the
file first, the options on top) into the model. Every failure is an
:class:`~clipguard.errors.InputError` with a one-line message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomllib
from pydantic import BaseModel, ValidationError

from clipguard.errors import InputError


def parse_options(options: Sequence[str]) -> dict[str, Any]:
    """``key=value`` strings to a dict; values are parsed as JSON when they can be."""
    parsed: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--option {option!r} is not of the form key=value")
        try:
            parsed[key.strip()] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            parsed[key.strip()] = value
    return parsed


def read_config_file(path: Path) -> dict[str, Any]:
    """Options from a JSON or TOML file (a single table / object)."""
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: config file is not UTF-8 text") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except RecursionError:
        raise InputError(f"{path}: config file is nested too deeply") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise InputError(
            f"{path}: config file is not valid {path.suffix[1:] or 'JSON'}: {error}"
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: config file must hold an object of options")
    return data


def build_config(
    config_model: type[BaseModel],
    options: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
    what: str = "plugin",
) -> BaseModel:
    """Validate options (``config_file`` first, ``options`` on top) into ``config_model``.

    ``what`` names the component in the error message (``"scanner cbpt"``,
    ``"attack badnets"``); the message names the first invalid option.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(read_config_file(Path(config_file)))
    values.update(options or {})
    try:
        return config_model.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"]) or "options"
        raise InputError(f"invalid {what} option {location}: {first['msg']}") from None
