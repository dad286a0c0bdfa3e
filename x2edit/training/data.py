"""Training data readers: every supported layout of editing pairs becomes a stream of ``EditSample``.

Formats (``list_readers()``; a config dict ``{"format": NAME, "path": ..., ...}`` picks one through
``build_reader``):

  x2edit           this project's WebDataset shards: KEY.src.png, KEY.tgt.png, KEY.json
  x2edit_upstream  upstream X2Edit shards as its writers wrote them: the source/target members of
                   any of its three layouts (detected per sample), KEY.json with Chinese or English
                   task labels (upstream's label table, x2edit_upstream_data.yaml), instructions in
                   several keys and languages, scores as numbers or stringified lists
  paired_folder    ai-toolkit layout: target images, same names under ``control_path`` (sources),
                   NAME.txt instruction beside each target
  jsonl            lines {"image_path", "control_path", "caption"[, "task", "scores"]}
  parquet          HF-style parquet with a column map; image cells are bytes, {"bytes", "path"}
                   structs or paths

A reader is used three ways:
  * ``iter(reader)``: streams decoded samples (any shard, compressed or not);
  * ``EditDataset(configs, buckets)``: a map-style dataset over a metadata index (no pixels kept),
    with source sizes for ``BucketBatchSampler`` and samples resized to their bucket;
  * ``reader.scan()``: every sample with what the reader does with it and why (``x2edit data inspect``).

Every pass counts what it saw, kept and dropped by reason in ``reader.stats``: undecodable images,
truncated shards, missing members, unknown tasks (with ``on_unknown_task: skip``), "other" tasks
(``on_other_task: skip``), samples without a score a filter names, and samples a filter rejects. A
pass that keeps nothing raises ``NoSamplesError`` naming the filters and the drop counts.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import glob
import hashlib
import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml
from PIL import Image, UnidentifiedImageError

from x2edit.data_pipeline.shards import TarScan, TarSpan, iter_tar, panel_names  # the one tar reader
from x2edit.data_pipeline.stages.filters import (
    Rule as ScoreFilter,  # one rule grammar for build-data and train
)
from x2edit.images import check_size, load_image, to_rgb
from x2edit.tasks import TASKS, get_task
from x2edit.training.buckets import Bucket, BucketBatchSampler, assign_bucket, fit_pair

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ASPECT_TOLERANCE = 0.01  # |log(source ratio) - log(target ratio)| above this: the pair cannot be co-cropped


# -- samples, stats, errors ------------------------------------------------------------------


@dataclass
class EditSample:
    """One editing pair, decoded.

    Args:
        source: the image to edit (RGB).
        target: the edited image (RGB).
        instruction: the edit instruction.
        task: a taxonomy name (``x2edit.tasks``), ``OTHER_TASK`` ("other": a label upstream trains
            as a class of its own, kept with ``on_other_task: train``) or None when the data has no label.
        scores: named numeric quality scores (lists already reduced to one number).
        key: the sample's key inside its origin (tar key, file stem, row).
        origin: where it came from (shard, file, ``file:line``), for messages and debugging.
        captions: (source, target) scene descriptions where the data has them (x2edit shards of Shape
            World): the pair as a 2-panel IC-LoRA set; None otherwise. A set of n panels has n.
        panels: a set's panels after the pair (the target's size), empty for a pair.
        set_caption: a set's joint caption as written with it (``x2edit.incontext``), None for a pair.
    """

    source: Image.Image
    target: Image.Image
    instruction: str
    task: str | None
    scores: dict[str, float]
    key: str
    origin: str
    captions: tuple[str, ...] | None = None
    panels: tuple[Image.Image, ...] = ()
    set_caption: str | None = None


class NoSamplesError(ValueError):
    """A reader (after its filters) produced no sample."""


class ImageError(ValueError):
    """An image that cannot be used: not decodable, truncated, too small or too large."""


class AspectMismatch(ImageError):
    """Source and target aspect ratios differ, so no common crop aligns them."""


@dataclass
class ReadStats:
    """Counts of one pass over a reader. ``seen == kept + sum(dropped_by_reason.values())``.

    ``examples`` keeps the first few ``where: detail`` strings per reason.
    """

    kept: int = 0
    dropped_by_reason: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def seen(self) -> int:
        return self.kept + self.dropped

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())

    def drop(self, reason: str, where: str, detail: str = "") -> None:
        self.dropped_by_reason[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(f"{where}: {detail}" if detail else where)

    def merge(self, other: ReadStats) -> ReadStats:
        out = ReadStats(self.kept + other.kept, self.dropped_by_reason + other.dropped_by_reason)
        for reason in {**self.examples, **other.examples}:
            out.examples[reason] = (self.examples.get(reason, []) + other.examples.get(reason, []))[:3]
        return out

    def summary(self) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.dropped_by_reason.items()))
        return f"seen {self.seen}, kept {self.kept}, dropped {self.dropped}" + (f" ({reasons})" if reasons else "")


# -- score parsing and filters ---------------------------------------------------------------

_REDUCE: dict[str, Callable[[list[float]], float]] = {
    "mean": lambda v: sum(v) / len(v), "min": min, "max": max, "sum": sum,
}


def score_list(value: Any) -> list[float] | None:
    """The numbers of a list score: a list or tuple of numbers or numeric strings, or such a list
    written as a string ("[7.5, 8.0]", "['8', '9']", parsed with ``ast.literal_eval``, never eval);
    None for anything else (nested lists, text items, other values)."""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] not in ("[", "("):
            return None
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    if not isinstance(value, (list, tuple)):
        return None
    items = [parse_score(v) if not isinstance(v, (list, tuple)) else None for v in value]
    return None if any(v is None for v in items) else items


def parse_score(value: Any, reduce: str = "mean") -> float | None:
    """A score as one float, or None when ``value`` is not a score.

    Accepts numbers, numeric strings ("7.5") and list scores (``score_list``). A list is reduced with
    ``reduce`` ("mean" by default: a [following, naturalness] pair of 1-5 judgements stays on the 1-5
    scale). An empty list sums to 0 (upstream's ``sum(eval("[]"))``) and has no mean, min or max.
    Booleans, NaN/inf, "None" and other text are not scores.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    items = score_list(value)
    if items is not None:
        if not items and reduce != "sum":
            return None
        return float(_REDUCE[reduce](items))
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


_SCORE_RULE = re.compile(r"^\s*(mean|min|max|sum)\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)(.*)$", re.S)


@dataclass(frozen=True)
class ScoreRule:
    """``NAME OP NUMBER`` (build-data's threshold rule, on the score as the reader reduces it) or
    ``REDUCE(NAME) OP NUMBER`` with REDUCE one of mean, min, max, sum: that reduction of a list score,
    e.g. ``sum(score_7b) >= 9`` as upstream writes it."""

    rule: ScoreFilter
    reduce: str | None = None

    @classmethod
    def parse(cls, text: Any) -> ScoreRule:
        m = _SCORE_RULE.match(text) if isinstance(text, str) else None
        if m is None:
            return cls(ScoreFilter.parse(text))
        try:
            return cls(ScoreFilter.parse(m.group(2) + m.group(3)), m.group(1))
        except ValueError:
            raise ValueError(f"bad score rule {text!r}: expected '[mean|min|max|sum(]<score>[)] <op> <number>'") from None

    @property
    def score(self) -> str:
        return self.rule.score

    def value(self, fields: Mapping[str, Any], list_reduce: str) -> float | None:
        return parse_score(fields.get(self.score), self.reduce or list_reduce)

    def __str__(self) -> str:
        return str(self.rule) if self.reduce is None else f"{self.reduce}({self.score}) {self.rule.op} {self.rule.value:g}"


@dataclass(frozen=True)
class FilterRule:
    """One entry of a reader's ``filters``: a score rule string for every sample, or a mapping

        {when: {FIELD: value or [values], has: [keys], lacks: [keys], without: {FIELD: regex}},
         keep: [score rules] | drop: true, if_missing: drop | keep}

    that applies to the samples whose metadata (JSON fields) ``when`` matches: ``keep`` rules must all
    hold; ``drop: true`` drops every match. A score is missing when its field is absent or holds no
    number ("None", text); ``if_missing`` says whether such a sample is dropped (the default) or kept.
    """

    keep: tuple[ScoreRule, ...] = ()
    drop: bool = False
    when: tuple[tuple[str, Any], ...] = ()  # (FIELD, (values...)) / ("has"|"lacks", keys) / ("without", ((FIELD, regex),))
    if_missing: str = "drop"

    KEYS: ClassVar[tuple[str, ...]] = ("when", "keep", "drop", "if_missing")

    @classmethod
    def parse(cls, spec: Any) -> FilterRule:
        if isinstance(spec, str):
            return cls(keep=(ScoreRule.parse(spec),))
        if not isinstance(spec, Mapping):
            raise ValueError(f"a filter is a score rule string or a mapping with {', '.join(cls.KEYS)}, got {spec!r}")
        unknown = sorted(set(spec) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"filter {dict(spec)!r}: unknown key(s) {unknown}; keys are {', '.join(cls.KEYS)}")
        keep, drop = spec.get("keep"), spec.get("drop", False)
        if isinstance(keep, str) or (keep is not None and not isinstance(keep, list)):
            raise ValueError(f"filter {dict(spec)!r}: keep must be a list of score rules")
        if bool(keep) == bool(drop) or drop not in (True, False):
            raise ValueError(f"filter {dict(spec)!r}: give either keep: [score rules] or drop: true")
        if spec.get("if_missing", "drop") not in ("drop", "keep"):
            raise ValueError(f"filter {dict(spec)!r}: if_missing must be 'drop' or 'keep'")
        when = spec.get("when", {})
        if not isinstance(when, Mapping):
            raise ValueError(f"filter {dict(spec)!r}: when must be a mapping of JSON fields to values")
        conditions = []
        for k, v in when.items():
            if k in ("has", "lacks"):
                v = (v,) if isinstance(v, str) else tuple(v)
            elif k == "without":
                if not isinstance(v, Mapping):
                    raise ValueError(f"filter {dict(spec)!r}: without must map fields to regular expressions")
                try:
                    v = tuple((f, re.compile(r)) for f, r in v.items())
                except re.error as e:
                    raise ValueError(f"filter {dict(spec)!r}: bad regular expression ({e})") from None
            else:
                v = tuple(v) if isinstance(v, list) else (v,)
            conditions.append((k, v))
        return cls(tuple(ScoreRule.parse(r) for r in keep or ()), bool(drop), tuple(conditions),
                   spec.get("if_missing", "drop"))

    def applies(self, fields: Mapping[str, Any]) -> bool:
        for k, v in self.when:
            if k == "has":
                ok = all(f in fields for f in v)
            elif k == "lacks":
                ok = not any(f in fields for f in v)
            elif k == "without":
                ok = all(not (isinstance(fields.get(f), str) and r.search(fields[f])) for f, r in v)
            else:
                ok = k in fields and fields[k] in v
            if not ok:
                return False
        return True

    def check(self, fields: Mapping[str, Any], list_reduce: str) -> tuple[str, str] | None:
        """None if the sample passes, else the drop (reason, detail)."""
        if not self.applies(fields):
            return None
        tag = f" [{self.condition}]" if self.when else ""
        if self.drop:
            return f"filter: drop{tag}", ""
        for r in self.keep:
            x = r.value(fields, list_reduce)
            if x is None:
                if self.if_missing == "keep":
                    continue
                have = sorted(k for k in fields if parse_score(fields[k]) is not None)
                return f"missing_score: {r.score}{tag}", (f"{r.score} = {fields[r.score]!r}" if r.score in fields
                                                          else f"has {have or 'no scores'}")
            if not r.rule.holds(x):
                return f"filter: {r}{tag}", f"{r.score} = {x:g}"
        return None

    @property
    def condition(self) -> str:
        parts = []
        for k, v in self.when:
            if k in ("has", "lacks"):
                parts.append(f"{k} {'/'.join(v)}")
            elif k == "without":
                parts += [f"{f} without /{r.pattern}/" for f, r in v]
            else:
                shown = [x if isinstance(x, str) and x.strip() else json.dumps(x, ensure_ascii=False) for x in v]
                parts.append(f"{k}={shown[0]}" if len(v) == 1 else f"{k} in {'/'.join(shown)}")
        return ", ".join(parts)

    def __str__(self) -> str:
        what = "drop" if self.drop else " and ".join(map(str, self.keep))
        tag = f"[{self.condition}] " if self.when else ""
        return tag + what + (" (if missing: keep)" if self.if_missing == "keep" and not self.drop else "")


# -- task labels -----------------------------------------------------------------------------

# A label upstream trains as a class of its own (its to_type_id id 0). Routed training gives it the
# first task slot no task uses: tasks have ids 0..14 (x2edit.tasks), the router has
# ``num_task_slots`` (16) rows, so "other" is slot 15.
OTHER_TASK = "other"
OTHER_TASK_ID = len(TASKS)


def task_slot(task: str) -> int:
    """The router slot of a sample's task: its taxonomy id, or ``OTHER_TASK_ID`` for "other"."""
    return OTHER_TASK_ID if task == OTHER_TASK else get_task(task).id


@functools.lru_cache(maxsize=1)
def upstream_conventions() -> dict:
    """Upstream X2Edit's data conventions (layouts, label table, label tasks, instruction keys,
    filter presets) from ``x2edit_upstream_data.yaml`` beside this module."""
    return yaml.safe_load((Path(__file__).parent / "x2edit_upstream_data.yaml").read_text(encoding="utf-8"))


def upstream_task_labels() -> dict[str, str]:
    """Upstream's label -> taxonomy name (or "other"), every label of its table and its writers."""
    return {label: task for task, labels in upstream_conventions()["task_labels"].items() for label in labels}


def _label_key(label: str) -> str:
    return re.sub(r"[\s\-]+", "_", label.strip().lower())


def _alias_map(aliases: Mapping[str, str] | None) -> dict[str, str]:
    return {_label_key(k): v for k, v in (aliases or {}).items()}


def _resolve_task(label: str, alias_map: Mapping[str, str]) -> str:
    key = _label_key(label)
    name = alias_map.get(key, key)
    return OTHER_TASK if name == OTHER_TASK else get_task(name).name


def normalize_task(label: str, aliases: Mapping[str, str] | None = None) -> str:
    """The taxonomy name of a data label: case, spaces and hyphens are ignored ("Color-Change",
    "color change" -> "color_change"); ``aliases`` maps other labels (compared the same way) to
    taxonomy names or "other". Raises ``ValueError`` (from ``get_task``) for an unknown label."""
    return _resolve_task(label, _alias_map(aliases))


# -- image references: where a sample's pixels are, without holding them -----------------------


@dataclass(frozen=True)
class ParquetCell:
    """An image cell of a parquet file (bytes, a {"bytes", "path"} struct or a path string)."""

    path: str
    row_group: int
    row: int
    column: str


ImageRef = bytes | Path | TarSpan | ParquetCell


@functools.lru_cache(maxsize=2)  # samples are read in bucket order, often from the same row group
def _row_group_column(path: str, row_group: int, column: str):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(row_group, columns=[column]).column(column)


def _cell_ref(value: Any, base_dir: Path) -> bytes | Path | None:
    """bytes or a path for an image cell; None when the cell holds no image."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        return base_dir / value
    return None


def _image_bytes(ref: ImageRef, limit: int | None = None) -> bytes | Path:
    """The bytes (or file) of an image reference; ``limit``: at most that many bytes of a tar member."""
    if isinstance(ref, TarSpan):
        try:
            return ref.read(limit)
        except EOFError as e:
            raise ImageError(str(e)) from None
    if isinstance(ref, ParquetCell):
        value = _row_group_column(ref.path, ref.row_group, ref.column)[ref.row].as_py()
        out = _cell_ref(value, Path(ref.path).parent)
        if out is None:
            raise ImageError(f"column {ref.column!r} holds no image")
        return out
    return ref


def _open(ref: ImageRef, what: str, limit: int | None = None) -> Image.Image:
    """A lazily opened (header-only), size-checked image from bytes; raises ``ImageError``."""
    data = _image_bytes(ref, limit)
    if isinstance(data, Path):
        if not data.is_file():
            raise ImageError(f"{what} file not found: {data}")
        data = data.read_bytes()
    try:
        img = Image.open(io.BytesIO(data))
        check_size(img, what)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as e:
        raise ImageError(f"{what} is not an image PIL can read ({type(e).__name__})") from None
    except ValueError as e:
        raise ImageError(str(e)) from None
    return img


def probe_size(ref: ImageRef, what: str = "image") -> tuple[int, int]:
    """(width, height) from the image header only; raises ``ImageError``."""
    if isinstance(ref, Path):
        try:
            with Image.open(ref) as img:
                check_size(img, what)
                return img.size
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as e:
            raise ImageError(f"{what} {ref} is not an image PIL can read ({type(e).__name__})") from None
        except ValueError as e:
            raise ImageError(str(e)) from None
    if isinstance(ref, TarSpan) and ref.size > _HEAD_BYTES:
        try:  # the header is near the start: an index of a large dataset need not read whole images
            return _open(ref, what, _HEAD_BYTES).size
        except ImageError:
            pass
    return _open(ref, what).size


_HEAD_BYTES = 64 * 1024


def decode_image(ref: ImageRef, what: str = "image") -> Image.Image:
    """Fully decode an image reference to validated 8-bit RGB; raises ``ImageError``."""
    if isinstance(ref, Path):
        try:
            return load_image(ref)
        except (FileNotFoundError, ValueError) as e:
            raise ImageError(str(e)) from None
    img = _open(ref, what)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{what} is corrupt or truncated ({e})") from None
    return to_rgb(img)


def _same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(math.log(a[0] / a[1]) - math.log(b[0] / b[1])) <= ASPECT_TOLERANCE


# -- records: a sample's metadata and image references ---------------------------------------


@dataclass
class SampleRecord:
    """A sample that passed the metadata checks, with references to its images.

    ``size`` is the source image's (width, height) once probed (``EditReader.index``).
    """

    key: str
    origin: str
    instruction: str
    task: str | None
    scores: dict[str, float]
    source: ImageRef
    target: ImageRef
    size: tuple[int, int] | None = None
    captions: tuple[str, ...] | None = None
    panels: tuple[ImageRef, ...] = ()
    set_caption: str | None = None


def load_record(record: SampleRecord) -> EditSample:
    """Decode a record's images; raises ``ImageError`` (also when source and target aspect
    ratios differ, since no common crop then aligns them)."""
    source = decode_image(record.source, "source")
    target = decode_image(record.target, "target")
    if not _same_aspect(source.size, target.size):
        raise AspectMismatch(f"source {source.size[0]}x{source.size[1]} and target "
                         f"{target.size[0]}x{target.size[1]} have different aspect ratios")
    panels = tuple(decode_image(ref, f"panel {i}") for i, ref in enumerate(record.panels, 2))
    for i, panel in enumerate(panels, 2):
        if panel.size != target.size:
            raise ImageError(f"panel {i} is {panel.size[0]}x{panel.size[1]}, the target {target.size[0]}x"
                             f"{target.size[1]}: a set's panels share one size")
    return EditSample(source, target, record.instruction, record.task, dict(record.scores), record.key,
                      record.origin, record.captions, panels, record.set_caption)


def _captions(value, n: int = 2) -> tuple[str, ...] | None:
    """A sample's scene captions from its metadata, when it has ``n`` non-empty strings there (one per panel)."""
    if isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(c, str) and c.strip() for c in value):
        return tuple(value)
    return None


@dataclass
class _Raw:
    """What a format yields before the shared checks (label not normalized, scores parsed).

    ``fields``: the sample's metadata as the format stores it (JSON fields, row cells), for filters
    (raw score values) and their ``when`` conditions; ``notes``: what the format found out on the way
    (layout, label, instruction key), for ``scan``.
    """

    key: str
    origin: str
    instruction: Any
    task: Any
    scores: dict[str, float]
    source: ImageRef
    target: ImageRef
    fields: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    panels: tuple[ImageRef, ...] = ()  # a set's panels after the pair (x2edit shards' panel2.png ...)


@dataclass
class Scanned:
    """One sample as ``EditReader.scan`` saw it.

    Args:
        raw: what the format read (metadata, image references, ``notes``).
        task: the task it maps to (a taxonomy name, "other"), None without a label; the label itself
            when it maps to nothing (``outcome`` "unknown_task").
        outcome: "kept", or the reason it is dropped (as counted in ``ReadStats``).
        detail: the value or message behind a drop.
    """

    raw: _Raw
    task: str | None
    outcome: str
    detail: str = ""

    @property
    def where(self) -> str:
        return f"{self.raw.origin}:{self.raw.key}"


# -- readers ---------------------------------------------------------------------------------

READERS: dict[str, type[EditReader]] = {}


def register_reader(name: str):
    """Class decorator adding a reader to the ``format`` registry."""

    def deco(cls):
        if name in READERS:
            raise ValueError(f"reader format {name!r} is already registered")
        cls.format = name
        READERS[name] = cls
        return cls

    return deco


def list_readers() -> list[str]:
    return sorted(READERS)


def build_reader(config: Mapping[str, Any]) -> EditReader:
    """A reader from a config dict ``{"format": NAME, "path": ..., <that reader's options>}``."""
    config = dict(config)
    name = config.pop("format", None)
    if name not in READERS:
        raise ValueError(f"data format {name!r} is unknown: expected one of {', '.join(list_readers())}")
    cls = READERS[name]
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for data format {name!r}: "
                         f"expected {', '.join(sorted(allowed))}")
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.init and f.name not in config and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"data format {name!r} needs option(s) {', '.join(missing)}")
    return cls(**config)


def list_filter_presets() -> list[str]:
    return sorted(upstream_conventions()["filter_presets"])


@dataclass(kw_only=True)
class EditReader:
    """Base of all readers; its fields are the options every format shares.

    Args:
        path: the data location (a directory, file, glob, or a list of these; formats say which).
        filters: score rules such as ``["sc >= 7", "sum(score_7b) >= 9"]`` for every sample, or
            conditional rules (``FilterRule``: ``{when: {label: step1x}, keep: [...]}``); a sample
            lacking a named score is dropped (reason ``missing_score: NAME``) unless its rule says
            ``if_missing: keep``.
        filter_preset: a named list of rules applied before ``filters`` (``list_filter_presets()``:
            "x2edit_upstream", upstream X2Edit's own filter).
        list_reduce: how a list score becomes one number in ``sample.scores`` and in rules without
            their own reduction: "mean" (default), "min", "max", "sum".
        on_unknown_task: for a label that maps to no task: "error" (default: raise naming the label
            and the sample), "skip" (drop and count as ``unknown_task``) or "other" (treat it as
            "other", as upstream does).
        on_other_task: for a label that maps to "other": "skip" (default: drop and count as
            ``other_task``) or "train" (keep it as task "other", routed to ``OTHER_TASK_ID``).
        task_aliases: extra data labels -> taxonomy names or "other", e.g. ``{"removal": "subject_deletion"}``.
    """

    format: ClassVar[str] = ""
    path: str | list[str]
    filters: list = field(default_factory=list)
    filter_preset: str | None = None
    list_reduce: str = "mean"
    on_unknown_task: str = "error"
    on_other_task: str = "skip"
    task_aliases: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.filters, (str, Mapping)):
            raise ValueError(f"filters must be a list of rules, got {self.filters!r}")
        if self.filter_preset is not None and self.filter_preset not in list_filter_presets():
            raise ValueError(f"unknown filter_preset {self.filter_preset!r}: available are {list_filter_presets()}")
        preset = upstream_conventions()["filter_presets"][self.filter_preset] if self.filter_preset else []
        self.rules = [FilterRule.parse(f) for f in [*preset, *self.filters]]
        if self.list_reduce not in _REDUCE:
            raise ValueError(f"list_reduce must be one of {', '.join(_REDUCE)}, got {self.list_reduce!r}")
        if self.on_unknown_task not in ("error", "skip", "other"):
            raise ValueError(f"on_unknown_task must be 'error', 'skip' or 'other', got {self.on_unknown_task!r}")
        if self.on_other_task not in ("skip", "train"):
            raise ValueError(f"on_other_task must be 'skip' or 'train', got {self.on_other_task!r}")
        for label, name in self.task_aliases.items():
            if name != OTHER_TASK:
                try:
                    get_task(name)
                except ValueError as e:
                    raise ValueError(f"task_aliases[{label!r}]: {e} or {OTHER_TASK!r}") from None
        # a format's built-in label table first, the user's aliases over it
        self._aliases = {**_alias_map(self._default_aliases()), **_alias_map(self.task_aliases)}
        self.stats = ReadStats()

    def _default_aliases(self) -> Mapping[str, str]:
        return {}

    # each format implements this: raw samples, format-level drops recorded in ``stats``
    def _raw(self, stats: ReadStats, index: bool) -> Iterator[_Raw]:
        raise NotImplementedError

    def _can_index(self) -> bool:
        return True

    def _describe(self) -> str:
        return f"{self.format} data at {self.path}"

    def _paths(self, suffixes: tuple[str, ...]) -> list[Path]:
        """Files named by ``path``: directories are searched recursively for ``suffixes``."""
        patterns = [self.path] if isinstance(self.path, (str, os.PathLike)) else list(self.path)
        files: list[Path] = []
        for pattern in patterns:
            p = Path(pattern)
            if p.is_dir():
                files += sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(suffixes))
            elif p.is_file():
                files.append(p)
            else:
                matched = sorted(Path(m) for m in glob.glob(str(pattern), recursive=True) if Path(m).is_file())
                if not matched:
                    raise FileNotFoundError(f"{self.format} data: nothing found at {pattern}")
                files += matched
        if not files:
            raise FileNotFoundError(f"{self.format} data: no {'/'.join(suffixes)} files under {self.path}")
        return files

    def _task(self, label: Any) -> tuple[str | None, str]:
        """(task, problem): problem is "" (task: a name, "other" or None), "unknown" or "other"."""
        if label is None or label == "":
            return None, ""
        try:
            task = _resolve_task(label, self._aliases) if isinstance(label, str) else None
        except ValueError:
            task = None
        if task is None:
            if self.on_unknown_task != "other":
                return None, "unknown"
            task = OTHER_TASK
        if task == OTHER_TASK and self.on_other_task == "skip":
            return task, "other"
        return task, ""

    def _check(self, raw: _Raw, strict: bool = True) -> Scanned:
        """The metadata checks (instruction, task, filters) of one raw sample."""
        if not isinstance(raw.instruction, str) or not raw.instruction.strip():
            detail = raw.notes.get("no_instruction") or f"instruction is {raw.instruction!r}"
            return Scanned(raw, None, "bad_metadata", detail)
        task, problem = self._task(raw.task)
        if problem == "unknown":
            if strict and self.on_unknown_task == "error":
                raise ValueError(f"{raw.origin}:{raw.key}: unknown task label {raw.task!r}; map it with task_aliases "
                                 f"{{{raw.task!r}: <taxonomy name or other>}} or set on_unknown_task: skip or other")
            stops = " (on_unknown_task: error: training stops here)" if self.on_unknown_task == "error" else ""
            return Scanned(raw, raw.task, "unknown_task", repr(raw.task) + stops)
        if problem == "other":
            return Scanned(raw, task, "other_task", repr(raw.task))
        for rule in self.rules:
            dropped = rule.check(raw.fields, self.list_reduce)
            if dropped:
                return Scanned(raw, task, *dropped)
        return Scanned(raw, task, "kept")

    def _records(self, stats: ReadStats, index: bool) -> Iterator[SampleRecord]:
        """Records passing the metadata checks (instruction, task, score filters)."""
        for raw in self._raw(stats, index):
            checked = self._check(raw)
            if checked.outcome != "kept":
                stats.drop(checked.outcome, checked.where, checked.detail)
                continue
            set_caption = raw.fields.get("set_caption") if raw.panels else None
            yield SampleRecord(raw.key, raw.origin, raw.instruction.strip(), checked.task, raw.scores,
                               raw.source, raw.target, captions=_captions(raw.fields.get("captions"), 2 + len(raw.panels)),
                               panels=raw.panels, set_caption=set_caption if isinstance(set_caption, str) else None)

    def _empty(self, stats: ReadStats) -> NoSamplesError:
        filters = ", ".join(f"'{f}'" for f in self.rules) or "none"
        return NoSamplesError(f"no samples left from {self._describe()} ({stats.summary()}); filters: {filters}. "
                              f"First drops: {dict((r, s[0]) for r, s in stats.examples.items())}")

    def __iter__(self) -> Iterator[EditSample]:
        """Stream decoded samples; the pass's counts are in ``self.stats``."""
        stats = self.stats = ReadStats()
        for record in self._records(stats, index=False):
            try:
                sample = load_record(record)
            except ImageError as e:
                reason = "aspect_mismatch" if isinstance(e, AspectMismatch) else "decode_error"
                stats.drop(reason, f"{record.origin}:{record.key}", str(e))
                continue
            stats.kept += 1
            yield sample
        if stats.kept == 0:
            raise self._empty(stats)

    @staticmethod
    def _probe(record: SampleRecord) -> tuple[str, str]:
        """Header checks of a record's images: ("", "") and ``record.size`` set, or (reason, detail)."""
        try:
            size = probe_size(record.source, "source")
            target_size = probe_size(record.target, "target")
        except ImageError as e:
            return "decode_error", str(e)
        if not _same_aspect(size, target_size):
            return "aspect_mismatch", f"source {size[0]}x{size[1]}, target {target_size[0]}x{target_size[1]}"
        record.size = size
        return "", ""

    def index(self) -> list[SampleRecord]:
        """All usable records with their source size, reading only image headers (no pixels kept)."""
        stats = self.stats = ReadStats()
        out = []
        for record in self._records(stats, index=True):
            reason, detail = self._probe(record)
            if reason:
                stats.drop(reason, f"{record.origin}:{record.key}", detail)
                continue
            stats.kept += 1
            out.append(record)
        if not out:
            raise self._empty(stats)
        return out

    def scan(self, images: bool = True, limit: int | None = None) -> Iterator[Scanned]:
        """Every sample the format yields (up to ``limit``) with what the reader does with it: kept, or
        dropped and why, as training would (``images``: also read the image headers, as the index
        does). Unknown labels do not raise here. Format-level drops (missing members, truncated
        shards, unreadable JSON) have no sample to show: they are counted in ``self.stats``."""
        stats = self.stats = ReadStats()
        for n, raw in enumerate(self._raw(stats, index=self._can_index())):
            if limit is not None and n >= limit:
                break
            checked = self._check(raw, strict=False)
            if checked.outcome == "kept" and images:
                record = SampleRecord(raw.key, raw.origin, raw.instruction, checked.task, raw.scores, raw.source,
                                      raw.target)
                reason, detail = self._probe(record)
                if reason:
                    checked.outcome, checked.detail = reason, detail
            if checked.outcome == "kept":
                stats.kept += 1
            else:
                stats.drop(checked.outcome, checked.where, checked.detail)
            yield checked


# -- WebDataset tar shards (ours and upstream X2Edit's) --------------------------------------

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(kw_only=True)
class _TarReader(EditReader):
    json_suffix: str = "json"

    def _layouts(self) -> list[tuple[str, str]]:
        """The (source suffix, target suffix) pairs a sample may have, tried in order."""
        raise NotImplementedError

    def _meta(self, obj: dict, key: str, origin: str) -> _Raw:
        """A raw sample (image references left empty) from the sample's JSON; raises ``ValueError``."""
        raise NotImplementedError

    def _can_index(self) -> bool:
        return all(p.name.lower().endswith(".tar") for p in self._paths(_TAR_SUFFIXES))

    def _missing(self, group: dict) -> str:
        has = ", ".join(sorted(group))
        if self.json_suffix not in group:
            return f"no {self.json_suffix} (has {has})"
        layouts = self._layouts()
        if len(layouts) == 1:
            return f"no {', '.join(s for s in layouts[0] if s not in group)} (has {has})"
        pairs = ", ".join(f"{s} + {t}" for s, t in layouts)
        return f"no source + target pair of any layout ({pairs}); has {has}"

    def _raw(self, stats: ReadStats, index: bool) -> Iterator[_Raw]:
        layouts = self._layouts()

        def layout_of(group):
            return next(((s, t) for s, t in layouts if s in group and t in group), None)

        def complete(group):  # a sample cut short by damage is used only if it has all it needs
            return self.json_suffix in group and layout_of(group) is not None

        for shard in self._paths(_TAR_SUFFIXES):
            scan = TarScan(str(shard))
            for key, group in iter_tar(shard, scan, spans=index, complete=complete):
                where = f"{shard}:{key}"
                layout = layout_of(group)
                if layout is None or self.json_suffix not in group:
                    stats.drop("missing_member", where, self._missing(group))
                    continue
                try:
                    obj = json.loads(group[self.json_suffix])
                    if not isinstance(obj, dict):
                        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                    raw = self._meta(obj, key, str(shard))
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                    stats.drop("bad_metadata", where, str(e))
                    continue
                raw.source, raw.target = group[layout[0]], group[layout[1]]
                raw.notes["layout"] = f"{layout[0]} + {layout[1]}"
                if "panels" in raw.fields:  # a set of more panels (x2edit build-data's colour sets)
                    try:
                        names = panel_names(raw.fields)
                    except ValueError as e:
                        stats.drop("bad_metadata", where, str(e))
                        continue
                    if any(n not in group for n in names):
                        stats.drop("missing_member", where, f"no {', '.join(n for n in names if n not in group)} "
                                                            f"of its {raw.fields['panels']} panels")
                        continue
                    raw.panels = tuple(group[n] for n in names)
                yield raw
            if scan.error:
                logger.warning("%s is truncated or corrupt (%s); using the %d samples before the damage",
                               shard, scan.error, scan.samples)
                stats.drop("truncated_shard", str(shard), f"{scan.error}; {scan.samples} samples read before it")


@register_reader("x2edit")
@dataclass(kw_only=True)
class X2EditShardReader(_TarReader):
    """This project's shards (``x2edit build-data``): KEY.src.png, KEY.tgt.png and KEY.json with
    "instruction", "task" and "scores" ({name: number or null}); other JSON fields (provenance) are kept
    out of the sample. ``path``: a directory (searched recursively), a .tar file or a glob."""

    source_suffix: str = "src.png"
    target_suffix: str = "tgt.png"

    def _layouts(self):
        return [(self.source_suffix, self.target_suffix)]

    def _meta(self, obj, key, origin):
        scores = obj.get("scores") or {}
        if not isinstance(scores, dict):
            raise ValueError(f"scores must be an object, got {type(scores).__name__}")
        # our writer stores numbers, or null where a scorer could not score (then the score is
        # absent from the sample); anything else is a bug to surface, not to coerce
        bad = {k: v for k, v in scores.items()
               if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))}
        if bad:
            raise ValueError(f"non-numeric scores {bad}")
        fields = {**{k: v for k, v in obj.items() if k != "scores"}, **scores}
        return _Raw(key, origin, obj.get("instruction"), obj.get("task"),
                    {k: float(v) for k, v in scores.items() if v is not None}, b"", b"", fields)


LANGUAGES = ("en", "zh", "mix")
_CJK = re.compile(r"[\u3400-\u9fff]")


def has_cjk(text: str) -> bool:
    """Whether ``text`` holds CJK ideographs (how upstream tells a Chinese instruction)."""
    return bool(_CJK.search(text))


@register_reader("x2edit_upstream")
@dataclass(kw_only=True)
class X2EditUpstreamReader(_TarReader):
    """Upstream X2Edit WebDataset shards, as its writers (OPPO-Mente-Lab/X2Edit data_pipeline/*.py)
    wrote them. Its conventions are data: ``x2edit_upstream_data.yaml``.

    Each sample's source and target are found among upstream's three member layouts (KEY.1.0.jpg +
    KEY.2.jpg; KEY..1.0.jpg + KEY..2.jpg; KEY..1.jpg + KEY..2.jpg), unless ``source_suffix`` and
    ``target_suffix`` name one. Task labels map by upstream's label table (every label of its
    ``to_type_id`` and its writers, Chinese or English) with ``task_aliases`` on top; a sample without
    a task key takes the task of its ``label`` ("Delete": subject deletion).

    Args:
        source_suffix, target_suffix: one member layout for every sample (both or neither).
        language: which instruction to train on: "en" (default: instruction_en, else instruction, else
            instruction_zh), "zh" (instruction_zh, else instruction, else instruction_en), or "mix":
            en or zh per sample, 50/50 as upstream's reader does for Kontext data, drawn from ``seed``
            and the sample's key so every pass picks the same.
        seed: the seed of ``language: mix``.
        instruction_key: one JSON key to read the instruction from, instead of ``language``'s keys.
        task_key: JSON field of the task label.
        score_keys: JSON fields read as scores; None: every other field that parses as a score
            (``parse_score``), top-level or inside a "scores" object.
    """

    source_suffix: str | None = None
    target_suffix: str | None = None
    language: str = "en"
    seed: int = 0
    instruction_key: str | None = None
    task_key: str = "task"
    score_keys: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        if (self.source_suffix is None) != (self.target_suffix is None):
            raise ValueError("give both source_suffix and target_suffix (one layout), or neither (detect per sample)")
        if self.language not in LANGUAGES:
            raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {self.language!r}")
        if self.instruction_key is not None and self.language != "en":
            raise ValueError("give instruction_key (one JSON key) or language, not both")
        conventions = upstream_conventions()
        self._label_tasks = conventions["label_tasks"]
        self._instruction_keys = {lang: tuple(keys) for lang, keys in conventions["instruction_keys"].items()}
        self._not_scores = {self.task_key, "scores", *(k for keys in self._instruction_keys.values() for k in keys)}
        if self.instruction_key:
            self._not_scores.add(self.instruction_key)

    def _default_aliases(self):
        return upstream_task_labels()

    def _layouts(self):
        if self.source_suffix is not None:
            return [(self.source_suffix, self.target_suffix)]
        return [tuple(pair) for pair in upstream_conventions()["layouts"]]

    def _language(self, key: str, origin: str) -> str:
        if self.language != "mix":
            return self.language
        # a hash, not a CRC: a CRC's low bit flips alike for every key when only the seed changes
        digest = hashlib.blake2b(f"{self.seed}/{Path(origin).name}/{key}".encode(), digest_size=8).digest()
        return "zh" if digest[0] & 1 else "en"

    def _meta(self, obj, key, origin):
        lang = self._language(key, origin)
        keys = (self.instruction_key,) if self.instruction_key else self._instruction_keys[lang]
        used = next((k for k in keys if isinstance(obj.get(k), str) and obj[k].strip()), None)
        notes = {"label": obj.get("label"), "language": lang, "instruction_key": used}
        if used is None:
            notes["no_instruction"] = f"no instruction: none of {', '.join(keys)} holds text"
        task = obj.get(self.task_key)
        if task in (None, "") and isinstance(obj.get("label"), str) and obj["label"] in self._label_tasks:
            task = self._label_tasks[obj["label"]]
            notes["task_from"] = "label"
        fields = dict(obj)
        if isinstance(obj.get("scores"), dict):
            fields.update(obj["scores"])
        candidates = {k: v for k, v in fields.items() if k not in self._not_scores}
        if self.score_keys is not None:
            candidates = {k: candidates[k] for k in self.score_keys if k in candidates}
        scores = {k: s for k, v in candidates.items() if (s := parse_score(v, self.list_reduce)) is not None}
        return _Raw(key, origin, obj.get(used) if used else None, task, scores, b"", b"", fields, notes)


# -- folders, JSONL, parquet -----------------------------------------------------------------


@register_reader("paired_folder")
@dataclass(kw_only=True)
class PairedFolderReader(EditReader):
    """ai-toolkit layout: ``path`` holds target images and NAME.txt instructions beside them;
    ``control_path`` holds the source images under the same names (same stem, any image extension).

    Args:
        control_path: the folder of source images.
        caption_ext: extension of the instruction files.
        task: the task of every pair in the folder (taxonomy name), or None.
    """

    control_path: str
    caption_ext: str = "txt"
    task: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.task is not None:
            self.task = normalize_task(self.task, self.task_aliases)
        for p in (self.path, self.control_path):
            if not Path(p).is_dir():
                raise FileNotFoundError(f"paired_folder: {p} is not a directory")

    def _raw(self, stats, index):
        control = Path(self.control_path)
        sources = {}
        for f in sorted(control.iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                sources.setdefault(f.stem, []).append(f)
        for target in sorted(Path(self.path).iterdir()):
            if target.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            where = str(target)
            same = control / target.name
            candidates = [same] if same.is_file() else sources.get(target.stem, [])
            if len(candidates) != 1:
                stats.drop("missing_image" if not candidates else "ambiguous_control", where,
                           f"{len(candidates)} source images named {target.stem}.* in {control}")
                continue
            caption = target.with_suffix("." + self.caption_ext.lstrip("."))
            if not caption.is_file():
                stats.drop("missing_caption", where, f"no {caption.name}")
                continue
            instruction = caption.read_text(encoding="utf-8", errors="replace")
            yield _Raw(target.stem, str(target.parent), instruction, self.task, {}, candidates[0], target)


@register_reader("jsonl")
@dataclass(kw_only=True)
class JsonlReader(EditReader):
    """JSON lines ``{"image_path": TARGET, "control_path": SOURCE, "caption": INSTRUCTION}`` with
    optional "task" and "scores" ({name: score}); relative paths are relative to the .jsonl file.
    ``path``: a .jsonl file, a directory of them or a glob."""

    def _raw(self, stats, index):
        for file in self._paths((".jsonl",)):
            with open(file, encoding="utf-8") as lines:
                for n, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    where = f"{file}:{n}"
                    try:
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                        target, source = row["image_path"], row["control_path"]
                        if not (isinstance(target, str) and isinstance(source, str)):
                            raise ValueError("image_path and control_path must be strings")
                        raw_scores = row.get("scores") or {}
                        if not isinstance(raw_scores, dict):
                            raise ValueError("scores must be an object")
                    except (ValueError, KeyError) as e:
                        stats.drop("bad_metadata", where, f"{type(e).__name__}: {e}")
                        continue
                    scores = {k: s for k, v in raw_scores.items()
                              if (s := parse_score(v, self.list_reduce)) is not None}
                    yield _Raw(str(n), str(file), row.get("caption"), row.get("task"), scores,
                               file.parent / source, file.parent / target, {**row, **raw_scores})


@register_reader("parquet")
@dataclass(kw_only=True)
class ParquetReader(EditReader):
    """HF-style parquet files.

    Args:
        columns: role -> column name for the roles "source", "target", "instruction" (required)
            and "task" (optional), e.g. ``{"source": "input_image", "target": "edited_image",
            "instruction": "edit_prompt"}``. Image cells: bytes, {"bytes", "path"} structs or path
            strings (relative to the parquet file).
        score_columns: columns read as scores (``parse_score``), named by their column name; filters
            see these and the mapped columns.
    """

    columns: dict[str, str]
    score_columns: list[str] = field(default_factory=list)
    ROLES: ClassVar[tuple[str, ...]] = ("source", "target", "instruction", "task")

    def __post_init__(self):
        super().__post_init__()
        unknown = sorted(set(self.columns) - set(self.ROLES))
        missing = [r for r in ("source", "target", "instruction") if r not in self.columns]
        if unknown or missing:
            raise ValueError(f"parquet columns map: unknown role(s) {unknown}, missing role(s) {missing}; "
                             f"roles are {', '.join(self.ROLES)}")

    def _raw(self, stats, index):
        import pyarrow.parquet as pq

        wanted = list(dict.fromkeys([*self.columns.values(), *self.score_columns]))
        for file in self._paths((".parquet",)):
            pf = pq.ParquetFile(file)
            absent = [c for c in wanted if c not in pf.schema_arrow.names]
            if absent:
                raise ValueError(f"{file} has no column(s) {absent}; it has {pf.schema_arrow.names}")
            row0 = 0
            for rg in range(pf.num_row_groups):
                rows = pf.read_row_group(rg, columns=wanted).to_pylist()
                for i, row in enumerate(rows):
                    key = str(row0 + i)
                    refs = {}
                    for role in ("source", "target"):
                        col = self.columns[role]
                        ref = _cell_ref(row[col], file.parent)
                        if isinstance(ref, bytes) and index:  # keep the index free of pixels
                            ref = ParquetCell(str(file), rg, i, col)
                        refs[role] = ref
                    if refs["source"] is None or refs["target"] is None:
                        stats.drop("missing_image", f"{file}:{key}", "empty image cell")
                        continue
                    scores = {c: s for c in self.score_columns
                              if (s := parse_score(row[c], self.list_reduce)) is not None}
                    task = row[self.columns["task"]] if "task" in self.columns else None
                    yield _Raw(key, str(file), row[self.columns["instruction"]], task, scores,
                               refs["source"], refs["target"], {c: row[c] for c in self.score_columns})
                row0 += len(rows)


# -- map-style dataset -----------------------------------------------------------------------


class EditDataset:
    """A map-style dataset over one or more readers, built from a metadata index.

    Args:
        sources: a reader, a config dict, or a list of them (concatenated in order).
        buckets: when given, ``dataset[i]`` is resized and center-cropped to its bucket (by its
            source's aspect ratio); use ``batch_sampler`` so a batch shares one bucket.

    ``dataset[i]`` is an ``EditSample``, or None when its pixels turn out corrupt (the index
    only reads headers); the trainer's collate function drops None.
    """

    def __init__(self, sources: EditReader | Mapping | Sequence[EditReader | Mapping],
                 buckets: Sequence[Bucket] | None = None):
        if isinstance(sources, (EditReader, Mapping)):
            sources = [sources]
        self.readers = [s if isinstance(s, EditReader) else build_reader(s) for s in sources]
        self.records: list[SampleRecord] = []
        for reader in self.readers:
            self.records += reader.index()
        self.stats = functools.reduce(ReadStats.merge, (r.stats for r in self.readers), ReadStats())
        self.buckets = list(buckets) if buckets is not None else None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [r.size for r in self.records]

    @property
    def tasks(self) -> list[str | None]:
        return [r.task for r in self.records]

    def __getitem__(self, i: int) -> EditSample | None:
        record = self.records[i]
        try:
            sample = load_record(record)
        except ImageError as e:
            logger.warning("skipping %s:%s: %s", record.origin, record.key, e)
            return None
        if self.buckets is not None:
            _fit_sample(sample, assign_bucket(record.size, self.buckets))
        return sample

    def batch_sampler(self, batch_size: int, *, balanced_tasks: bool = False, seed: int = 0,
                      drop_last: bool = False) -> BucketBatchSampler:
        """A ``BucketBatchSampler`` over this dataset's buckets (see its Args)."""
        if self.buckets is None:
            raise ValueError("batch_sampler needs buckets: EditDataset(..., buckets=make_buckets(...))")
        return BucketBatchSampler(self.sizes, self.buckets, batch_size, tasks=self.tasks,
                                  balanced_tasks=balanced_tasks, seed=seed, drop_last=drop_last)


def _fit_sample(sample: EditSample, bucket: Bucket) -> None:
    """Fit the sample's images (pair and further panels) to ``bucket`` in place, by one rule."""
    sample.source, sample.target = fit_pair(sample.source, sample.target, bucket)
    sample.panels = tuple(fit_pair(p, p, bucket)[1] for p in sample.panels)


def load_samples(spec: EditReader | Mapping, *, filters: Sequence[str] | None = None,
                 resolution: int | None = None, buckets: Sequence[Bucket] | None = None) -> list[EditSample]:
    """All samples of one reader, decoded into memory (for small data such as Shape World sets).

    Args:
        spec: a reader or a reader config dict.
        filters: score filters added to the config's own ``filters``.
        resolution: fit every pair to ``resolution`` x ``resolution`` (one square bucket), so any
            batch of them stacks.
        buckets: fit each pair to its aspect-ratio bucket instead (batch with ``BucketBatchSampler``
            over ``[s.source.size for s in samples]``); not together with ``resolution``.
    """
    if resolution is not None and buckets is not None:
        raise ValueError("give resolution (one square size) or buckets, not both")
    if isinstance(spec, EditReader):
        if filters:
            raise ValueError("filters= applies to a config dict; put them in the reader's own filters")
        reader = spec
    else:
        spec = dict(spec)
        reader = build_reader({**spec, "filters": [*spec.get("filters", []), *(filters or [])]})
    if resolution is not None:
        buckets = [(resolution, resolution)]
    samples = []
    for sample in reader:
        if buckets is not None:
            _fit_sample(sample, assign_bucket(sample.source.size, buckets))
        samples.append(sample)
    return samples
