"""Configuration as data for retrieval's commands: dataclasses read from YAML plus ``key=value`` overrides.

Unknown keys and wrong types are refused before any work, with the key named.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from x2edit.training.config import check_type  # one type check for every command's config


def from_dict(cls, data: dict):
    """A ``cls`` dataclass from a mapping; unknown keys and wrong types raise ValueError naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping of {cls.__name__} keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key {unknown[0]!r}; valid keys: {sorted(names)}")
    return cls(**{k: check_type(v, hints[k], k) for k, v in data.items()})


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


def save_model(model, path: str | Path, fmt: str, metadata: dict | None = None, dtype=None) -> Path:
    """Write ``model`` (an nn.Module with a dataclass ``config``) as safetensors: its weights (cast to
    ``dtype`` if given), and in the header ``format``, the config and the caller's ``metadata``."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to(dtype) if dtype is not None else v.detach()).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": fmt, "config": json.dumps(dataclasses.asdict(model.config)),
                                          "user": json.dumps(metadata or {})})
    return path


def load_model(cls, config_cls, path: str | Path, fmt: str, what: str):
    """The ``cls(config_cls(...))`` saved by ``save_model`` at ``path``, in float32 and eval mode, with its
    ``metadata``; a missing file or one of another ``format`` is refused naming ``what`` it should be."""
    import json

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != fmt:
            raise ValueError(f"{path} is not a {what} file (format {meta.get('format')!r})")
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    model = cls(config_cls(**json.loads(meta["config"])))
    model.load_state_dict(state)
    model.metadata = json.loads(meta.get("user", "{}"))
    return model.eval()
