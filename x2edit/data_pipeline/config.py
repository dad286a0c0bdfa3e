"""The build-data configuration: plain data (YAML) <-> dataclasses, with ``key=value`` overrides.

A config is a list of stages plus run settings::

    num_samples: 1000
    batch_size: 32
    writer: {samples_per_shard: 500, write_mask: true}
    stages:
      - type: shapeworld_source        # every entry: a registered stage type ...
        split: train                   # ... and its parameters
      - type: task_sampler
        weights: {color_change: 2.0}
      ...

Overrides address run settings (``num_samples=200``, ``writer.samples_per_shard=100``), a stage by
name or type (``task_sampler.weights.color_change=3``, ``shapeworld_expert.resolution=128``) or
by position (``stages.2.resolution=128``); values are parsed as YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

import yaml

# The Shape World default (also in configs/build_data/shapeworld.yaml; a test keeps them equal).
DEFAULT_CONFIG: dict = {
    "num_samples": 1000,
    "batch_size": 32,
    "writer": {"samples_per_shard": 500, "write_mask": True},
    "stages": [
        {"type": "shapeworld_source", "split": "train", "start": 0},
        {"type": "task_sampler", "weights": {}, "seed": 0},
        {"type": "shapeworld_expert", "resolution": 64},
        {"type": "template_instructions"},
        {"type": "oracle_scorer"},
        {"type": "pixel_scorer"},
        {"type": "threshold_filter", "rules": ["oracle_psnr >= 40", "changed_ratio >= 0.002"]},
    ],
}


@dataclass
class StageSpec:
    """One stage entry: its registered ``type``, display ``name`` (default: the type) and parameters."""

    type: str
    params: dict = field(default_factory=dict)
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.type

    def to_dict(self) -> dict:
        d = {"type": self.type}
        if self.name:
            d["name"] = self.name
        d.update(self.params)
        return d


@dataclass
class WriterConfig:
    """Output shards: ``samples_per_shard`` planned samples per tar (kept ones are written);
    ``write_mask`` adds ``KEY.mask.png`` when the sample has a mask."""

    samples_per_shard: int = 500
    write_mask: bool = True


@dataclass
class BuildConfig:
    stages: list[StageSpec]
    num_samples: int | None = 1000
    batch_size: int = 32
    writer: WriterConfig = field(default_factory=WriterConfig)

    def to_dict(self) -> dict:
        return {"num_samples": self.num_samples, "batch_size": self.batch_size,
                "writer": dataclasses.asdict(self.writer), "stages": [s.to_dict() for s in self.stages]}

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: two runs with equal fingerprints write the same shards."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> BuildConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
        known = {"num_samples", "batch_size", "writer", "stages"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        stages_raw = raw.get("stages")
        if not isinstance(stages_raw, list) or not stages_raw:
            raise ValueError(f"{where}: 'stages' must be a non-empty list of stage entries")
        stages = []
        for i, entry in enumerate(stages_raw):
            if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
                raise ValueError(f"{where}: stages[{i}] must be a mapping with a 'type' (a stage name)")
            params = {k: v for k, v in entry.items() if k not in ("type", "name")}
            stages.append(StageSpec(entry["type"], params, entry.get("name")))
        writer_raw = raw.get("writer") or {}
        if not isinstance(writer_raw, dict):
            raise ValueError(f"{where}: 'writer' must be a mapping")
        wfields = {f.name for f in dataclasses.fields(WriterConfig)}
        bad = sorted(set(writer_raw) - wfields)
        if bad:
            raise ValueError(f"{where}: unknown writer key(s) {', '.join(bad)}; valid: {', '.join(sorted(wfields))}")
        writer = WriterConfig(**writer_raw)
        if not isinstance(writer.samples_per_shard, int) or writer.samples_per_shard < 1:
            raise ValueError(f"{where}: writer.samples_per_shard must be a positive integer")
        num = raw.get("num_samples", 1000)
        if num is not None and (not isinstance(num, int) or isinstance(num, bool) or num < 1):
            raise ValueError(f"{where}: num_samples must be a positive integer (or null for all inputs)")
        bs = raw.get("batch_size", 32)
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
            raise ValueError(f"{where}: batch_size must be a positive integer")
        return cls(stages=stages, num_samples=num, batch_size=bs, writer=writer)


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict, text: str) -> None:
    """Apply one ``key=value`` override to a raw config dict, in place."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override key {key!r} is malformed")
    stages = raw.get("stages") or []
    if parts[0] in ("num_samples", "batch_size", "writer", "stages"):
        node, path = raw, parts
    else:
        hits = [s for s in stages if isinstance(s, dict) and parts[0] in (s.get("name"), s.get("type"))]
        if not hits:
            names = sorted({s.get("name") or s.get("type") for s in stages if isinstance(s, dict)})
            raise ValueError(f"override {key!r}: {parts[0]!r} is neither a setting (num_samples, batch_size, "
                             f"writer.*, stages.N.*) nor a stage of this config ({', '.join(names)})")
        if len(hits) > 1:
            raise ValueError(f"override {key!r}: several stages match {parts[0]!r}; give them names or use stages.N")
        if len(parts) == 1:
            raise ValueError(f"override {key!r}: name a parameter, e.g. {parts[0]}.PARAM=value")
        node, path = hits[0], parts[1:]
    for p in path[:-1]:
        if isinstance(node, list):
            try:
                node = node[int(p)]
            except (ValueError, IndexError):
                raise ValueError(f"override {key!r}: no list element {p!r}") from None
        else:
            node = node.setdefault(p, {})
            if not isinstance(node, (dict, list)):
                raise ValueError(f"override {key!r}: {p!r} is not a mapping")
    last = path[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = _parse_value(value)
        except (ValueError, IndexError):
            raise ValueError(f"override {key!r}: no list element {last!r}") from None
    else:
        node[last] = _parse_value(value)


def load_config(path: str | None = None, overrides: list[str] = (), num_samples: int | None = None) -> BuildConfig:
    """The config from a YAML file (None: the Shape World default), with overrides applied.

    Raises FileNotFoundError / ValueError with one line naming the problem.
    """
    if path is None:
        raw, where = copy.deepcopy(DEFAULT_CONFIG), "default config"
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            mark = getattr(e, "problem_mark", None)
            at = f" (line {mark.line + 1})" if mark is not None else ""
            raise ValueError(f"cannot parse config {path!r}{at}: {getattr(e, 'problem', None) or e}") from None
        where = path
        if raw is None:
            raise ValueError(f"config {path!r} is empty")
        if not isinstance(raw, dict):
            raise ValueError(f"config {path!r}: expected a mapping at the top level")
    for o in overrides:
        apply_override(raw, o)
    if num_samples is not None:
        raw["num_samples"] = num_samples
    return BuildConfig.from_dict(raw, where)
