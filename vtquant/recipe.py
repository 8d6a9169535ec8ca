"""YAML recipes <-> :class:`vtquant.config.Recipe`, with errors that name the bad key.

Keys are exactly the dataclass field names (llm-compressor's rule), so a recipe
reads like the Python API.  Unknown keys are errors, with a close-match hint.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any, Union

import yaml

from .fileio import atomic_write_text
from .config import (VLM_TOWERS, ActArgs, CalibConfig, ConfigError, Recipe, RotationConfig, SinkConfig,
                     WeightArgs)

_SECTIONS = {
    "weights": WeightArgs,
    "activations": ActArgs,
    "sinks": SinkConfig,
    "rotation": RotationConfig,
    "calibration": CalibConfig,
    "kv_cache": ActArgs,
}


def _check_keys(where: str, data: dict, cls: type) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in valid:
            hint = difflib.get_close_matches(str(key), valid, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{where}: unknown key {key!r}{extra}; valid keys: {valid}")


def _build(where: str, cls: type, data: Any) -> Any:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    _check_keys(where, data, cls)
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in data.items():
        default = next(f for f in dataclasses.fields(cls) if f.name == key)
        expected = default.default if default.default is not dataclasses.MISSING else None
        if isinstance(expected, bool) and not isinstance(value, bool):
            raise ConfigError(f"{where}.{key} = {value!r}: expected true or false")
        if isinstance(expected, (int, float)) and not isinstance(expected, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.{key} = {value!r}: expected a number ({types[key]})")
    try:
        return cls(**data)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    """Build and validate a :class:`Recipe` from a plain dict (e.g. parsed YAML)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping at the top level")
    _check_keys(source, data, Recipe)
    if "version" not in data:
        raise ConfigError(f"{source}: missing key 'version' (add 'version: 1' at the top)")
    kwargs = dict(data)
    towers = kwargs.pop("towers", None)
    if towers is not None:
        kwargs["towers"] = _tower_recipes(data, towers, source)
    for key, cls in _SECTIONS.items():
        if key in kwargs:
            kwargs[key] = _build(f"{source}: {key}", cls, kwargs[key])
            if kwargs[key] is None and key not in ("weights", "activations", "kv_cache"):
                kwargs[key] = cls()
    try:
        return Recipe(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except TypeError as err:  # wrong value types that dataclasses cannot take
        raise ConfigError(f"{source}: {err}") from None


def _tower_recipes(data: dict, towers: Any, source: str) -> dict:
    """``towers: {vision: {...}, projector: {...}, language: {...}}``: each section overrides the
    top-level keys (a mapping section such as ``sinks`` key by key; ``null`` replaces it)."""
    if not isinstance(towers, dict):
        raise ConfigError(f"{source}: towers: expected a mapping of tower names {list(VLM_TOWERS)} to recipe "
                          f"sections, got {type(towers).__name__}")
    base = {k: v for k, v in data.items() if k != "towers"}
    out = {}
    for name, section in towers.items():
        where = f"{source}: towers.{name}"
        if name not in VLM_TOWERS:
            hint = difflib.get_close_matches(str(name), VLM_TOWERS, n=1, cutoff=0.5)
            raise ConfigError(f"{source}: towers: unknown tower {name!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                              f"the towers of a vision-language model are {list(VLM_TOWERS)}")
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: expected a mapping of recipe keys, got {type(section).__name__}")
        if section.get("towers") is not None:
            raise ConfigError(f"{where}: a tower section cannot have towers of its own")
        _check_keys(where, section, Recipe)
        merged = dict(base)
        for key, value in section.items():
            if key == "towers":
                continue
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merged[key] = {**base[key], **value}
            else:
                merged[key] = value
        out[name] = recipe_from_dict(merged, source=where)
    return out


def load_recipe(path: Union[str, os.PathLike]) -> Recipe:
    """Read a YAML recipe file.

    Raises:
        FileNotFoundError: the file does not exist (the message lists the shipped recipes).
        ConfigError: a key or value is invalid (the message names it).
    """
    path = Path(path)
    if not path.exists():
        shipped = sorted(str(p.relative_to(recipes_dir())) for p in recipes_dir().rglob("*.yaml")) if recipes_dir().exists() else []
        candidate = recipes_dir() / path
        if candidate.exists():
            path = candidate
        else:
            raise FileNotFoundError(f"recipe {str(path)!r} not found; shipped recipes (under {recipes_dir()}): {shipped}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                          "save the recipe as UTF-8 YAML") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return recipe_from_dict(data, source=str(path))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def save_recipe(recipe: Recipe, path: Union[str, os.PathLike]) -> None:
    """Write a recipe as YAML, atomically."""
    atomic_write_text(Path(path), recipe_to_yaml(recipe))


def recipes_dir() -> Path:
    """The ``recipes/`` folder shipped beside the package (source checkout)."""
    return Path(__file__).resolve().parent.parent / "recipes"
