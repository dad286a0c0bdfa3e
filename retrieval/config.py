"""Configuration as data for retrieval's commands: dataclasses read from YAML plus ``key=value`` overrides.

Unknown keys and wrong types are refused before any work, with the key named.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml


def _check(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check(value, arg, key)
            except ValueError:
                pass
        raise ValueError(f"{key}: {value!r} is not a {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ValueError(f"{key}: expected None")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    base = origin or tp
    if base is typing.Any or (base is list and isinstance(value, list)) or (base is dict and isinstance(value, dict)):
        return value
    if not isinstance(value, base) or (base in (int, float) and isinstance(value, bool)):
        raise ValueError(f"{key}: expected {getattr(base, '__name__', base)}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, data: dict):
    """A ``cls`` dataclass from a mapping; unknown keys and wrong types raise ValueError naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping of {cls.__name__} keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key {unknown[0]!r}; valid keys: {sorted(names)}")
    return cls(**{k: _check(v, hints[k], k) for k, v in data.items()})


def load(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """``cls`` from a YAML file (optional) with ``key=value`` overrides (values parsed as YAML)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        data[key.strip()] = yaml.safe_load(raw)
    return from_dict(cls, data)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
