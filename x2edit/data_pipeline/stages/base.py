"""Stages: small steps with declared dependencies, registered by name.

A stage is built from a ``Params`` dataclass (what a YAML config or the CLI gives), declares the
sample fields it ``requires`` and ``provides``, and processes batches of ``Sample``s. Cheap checks
(paths exist, rules parse, names are known) happen in ``validate`` before any work starts; heavy
setup (loading a model) happens once per worker in ``setup``.

Roles: source (plans and loads items), sampler, expert, instructions, scorer, filter.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, ClassVar

from x2edit.data_pipeline.sample import Sample

STAGES: dict[str, type[Stage]] = {}
ROLES = ("source", "sampler", "expert", "instructions", "scorer", "filter")


def register_stage(name: str):
    """Class decorator: make a stage available to configs under ``name``."""

    def deco(cls: type[Stage]) -> type[Stage]:
        if name in STAGES:
            raise ValueError(f"stage {name!r} registered twice")
        if cls.role not in ROLES:
            raise ValueError(f"stage {name!r} has unknown role {cls.role!r}")
        cls.type_name = name
        STAGES[name] = cls
        return cls

    return deco


class Stage:
    """Base class. Subclasses define ``role``, a ``Params`` dataclass and ``process``."""

    type_name: ClassVar[str] = ""
    role: ClassVar[str] = ""
    uses_model: ClassVar[bool] = False  # run in an actor pool by the Ray engine

    @dataclasses.dataclass
    class Params:
        pass

    def __init__(self, params: Params, name: str | None = None):
        self.params = params
        self.name = name or self.type_name

    # -- declarations -----------------------------------------------------------------------

    @property
    def requires(self) -> frozenset[str]:
        return frozenset()

    @property
    def provides(self) -> frozenset[str]:
        return frozenset()

    def score_names(self) -> tuple[str, ...]:
        """Scores this stage writes (scorers only)."""
        return ()

    @property
    def batch_size(self) -> int | None:
        """Preferred batch size; None means the run's default."""
        return getattr(self.params, "batch_size", None)

    # -- lifecycle --------------------------------------------------------------------------

    def validate(self) -> None:
        """Cheap checks before any work; raise ValueError / FileNotFoundError with one clear line."""

    def setup(self) -> None:
        """Heavy, once-per-worker initialisation (e.g. loading a model)."""

    def process(self, batch: list[Sample]) -> list[Sample]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"type": self.type_name, "name": self.name, **dataclasses.asdict(self.params)}


# ---------------------------------------------------------------------------------------------
# Params from plain data (YAML), with type checks that name the stage and the field.


def _check_type(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and (not args or all(_check_type(v, args[0]) for v in value))
    if origin is dict:
        k, v = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_check_type(a, k) and _check_type(b, v) for a, b in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def build_params(stage_cls: type[Stage], raw: dict, where: str) -> Stage.Params:
    """``stage_cls.Params`` from a dict, rejecting unknown keys and wrongly typed values."""
    pcls = stage_cls.Params
    hints = typing.get_type_hints(pcls)
    fields = {f.name: f for f in dataclasses.fields(pcls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        raise ValueError(f"{where}: unknown parameter(s) {', '.join(unknown)}; valid: {valid}")
    missing = [n for n, f in fields.items() if n not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}: missing required parameter(s) {', '.join(missing)}")
    for name, value in raw.items():
        if not _check_type(value, hints[name]):
            raise ValueError(f"{where}: parameter {name}={value!r} should be {_type_name(hints[name])}")
    return pcls(**raw)


def check_model_path(where: str, path: str) -> None:
    """A model given by path must be a local directory (nothing is downloaded)."""
    if not path:
        raise ValueError(f"{where}: 'path' is required (a local model directory)")
    if not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"{where}: model path {path!r} is not a directory; give a local model folder")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: expected auto, float32, float16 or bfloat16") from None
