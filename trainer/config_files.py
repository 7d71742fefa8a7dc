"""Configuration files a run names — its recipe, a DeepSpeed JSON — checked so that a fault names the file and key.

A recipe's values become the parser's defaults, and argparse converts a string default only when it parses the
command line: a bad value then surfaced as ``argument --learning_rate: invalid float value: 'abc'`` after a screen of
usage, as if it had been typed, and a value of the wrong YAML type (``max_length: 1.5``) was not checked at all. An
invalid DeepSpeed JSON surfaced as a bare ``Expecting property name…`` without the file. Here each recipe value is
converted as argparse would convert it (its type, its choices) and refused with ``RECIPE: key: value is not …``;
a JSON file is parsed once and refused with ``FILE:line:column``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from trainer.errors import UserError


class ConfigError(UserError, ValueError):
    """A recipe or flag combination that cannot run; the message says what to change."""


def option_name(flag: str, sources: dict[str, str]) -> str:
    """How a message names an option: ``--flag``, or ``RECIPE: key`` when the recipe set it."""
    key = flag.lstrip("-")
    origin = sources.get(key, "")
    return f"{origin.removeprefix('recipe ')}: {key}" if origin.startswith("recipe ") else flag


def check_recipe_values(recipe: Path, values: dict[str, Any], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``values`` checked against the options they set; returns them with whole floats of integer options made ints
    and integers of float options made floats (strings are left for argparse, which converts them the same way)."""
    checked = {}
    for key, value in values.items():
        action = parser._option_string_actions.get(f"--{key}")
        checked[key] = value if action is None or value is None else _checked(recipe, key, value, action)
    return checked


def _checked(recipe: Path, key: str, value: Any, action: argparse.Action) -> Any:
    convert = action.type
    kind = _kind(action)
    if action.nargs in ("+", "*") and isinstance(value, list):
        return [_checked(recipe, key, v, _single(action)) for v in value]
    if isinstance(value, str):
        if callable(convert) and convert is not str:
            try:
                converted = convert(value)
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                raise ConfigError(f"{recipe}: {key}: {value!r} is not {kind}") from None
            if action.choices is not None and converted not in action.choices:
                raise ConfigError(f"{recipe}: {key}: {value!r} is not {kind}")
        return value
    if isinstance(value, (list, dict)) and convert is not str:
        raise ConfigError(f"{recipe}: {key}: a {type(value).__name__} where {kind} is expected")
    if convert is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ConfigError(f"{recipe}: {key}: {value!r} is not {kind}")
        return int(value)
    if convert is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{recipe}: {key}: {value!r} is not {kind}")
        return float(value)
    if getattr(convert, "__name__", "") == "string_to_bool" and not isinstance(value, bool):
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{recipe}: {key}: {value!r} is not {kind}")
    if action.choices is not None and str(value) not in [str(c) for c in action.choices]:
        raise ConfigError(f"{recipe}: {key}: {value!r} is not {kind}")
    return value


def _single(action: argparse.Action) -> argparse.Action:
    """The action with one value instead of a list (each element of a list value is checked alone)."""
    return argparse.Action(action.option_strings, action.dest, type=action.type, choices=action.choices)


def _kind(action: argparse.Action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(str(getattr(c, "value", c)) for c in action.choices)
    names = {int: "a whole number", float: "a number", str: "text"}
    if action.type in names:
        return names[action.type]
    if getattr(action.type, "__name__", "") == "string_to_bool":
        return "true or false"
    return f"a valid --{action.dest}"


def check_json_file(path: str | Path, flag: str) -> None:
    """Refuse a JSON configuration file that does not parse, naming its line and column and the parser's reason."""
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}:{error.colno}: {flag}: not valid JSON: {error.msg}; fix the "
                              "file (ds_configs/ holds working examples)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: {flag}: cannot read it: {error}") from None
