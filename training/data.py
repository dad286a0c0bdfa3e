"""Training data readers: every supported layout of editing pairs becomes a stream of ``EditSample``.

Formats (``list_readers()``; a config dict ``{"format": NAME, "path": ..., ...}`` picks one through
``build_reader``):

  x2edit           this project's WebDataset shards: KEY.src.png, KEY.tgt.png, KEY.json
  x2edit_upstream  upstream X2Edit shards: KEY.1.0.jpg (source), KEY.2.jpg (target), KEY.json whose
                   scores may be numbers, numeric strings or (stringified) lists of numbers
  paired_folder    ai-toolkit layout: target images, same names under ``control_path`` (sources),
                   NAME.txt instruction beside each target
  jsonl            lines {"image_path", "control_path", "caption"[, "task", "scores"]}
  parquet          HF-style parquet with a column map; image cells are bytes, {"bytes", "path"}
                   structs or paths

A reader is used two ways:
  * ``iter(reader)``: streams decoded samples (any shard, compressed or not);
  * ``EditDataset(configs, buckets)``: a map-style dataset over a metadata index (no pixels kept),
    with source sizes for ``BucketBatchSampler`` and samples resized to their bucket.

Every pass counts what it saw, kept and dropped by reason in ``reader.stats``: undecodable images,
truncated shards, missing members, unknown tasks (with ``on_unknown_task: skip``), samples without
a score a filter names, and samples a filter rejects. A pass that keeps nothing raises
``NoSamplesError`` naming the filters and the drop counts.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import glob
import io
import json
import logging
import math
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image, UnidentifiedImageError
from webdataset.tariterators import base_plus_ext

from data_pipeline.stages.filters import Rule as ScoreFilter  # one rule grammar for build-data and train
from x2edit.images import check_size, load_image, to_rgb
from x2edit.tasks import get_task

from .buckets import Bucket, BucketBatchSampler, assign_bucket, fit_pair

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
        task: a taxonomy name (``x2edit.tasks``) or None when the data has no label.
        scores: named numeric quality scores (lists already reduced to one number).
        key: the sample's key inside its origin (tar key, file stem, row).
        origin: where it came from (shard, file, ``file:line``), for messages and debugging.
    """

    source: Image.Image
    target: Image.Image
    instruction: str
    task: str | None
    scores: dict[str, float]
    key: str
    origin: str


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


def parse_score(value: Any, reduce: str = "mean") -> float | None:
    """A score as one float, or None when ``value`` is not a score.

    Accepts numbers, numeric strings ("7.5"), lists of numbers or numeric strings, and such lists
    written as strings ("[7.5, 8.0]", "['8', '9']", parsed with ``ast.literal_eval``, never eval).
    A list is reduced with ``reduce`` ("mean" by default: a [success, over-editing] pair of 0-10
    judgements stays on the 0-10 scale). Booleans, NaN/inf, empty lists and text are not scores.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in ("[", "("):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return None
            if not isinstance(value, (list, tuple)):
                return None
        else:
            try:
                number = float(text)
            except ValueError:
                return None
            return number if math.isfinite(number) else None
    if isinstance(value, (list, tuple)):
        items = [parse_score(v) if not isinstance(v, (list, tuple)) else None for v in value]
        if not items or any(v is None for v in items):
            return None
        return float(_REDUCE[reduce](items))
    return None


# -- task labels -----------------------------------------------------------------------------


def _label_key(label: str) -> str:
    return re.sub(r"[\s\-]+", "_", label.strip().lower())


def normalize_task(label: str, aliases: Mapping[str, str] | None = None) -> str:
    """The taxonomy name of a data label: case, spaces and hyphens are ignored ("Color-Change",
    "color change" -> "color_change"); ``aliases`` maps other labels (compared the same way) to
    taxonomy names. Raises ``ValueError`` (from ``get_task``) for an unknown label."""
    key = _label_key(label)
    if aliases:
        key = {_label_key(k): v for k, v in aliases.items()}.get(key, key)
    return get_task(key).name


# -- image references: where a sample's pixels are, without holding them -----------------------


@dataclass(frozen=True)
class TarSpan:
    """A member's bytes inside an uncompressed tar."""

    path: str
    offset: int
    size: int


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


def _image_bytes(ref: ImageRef) -> bytes | Path:
    if isinstance(ref, TarSpan):
        with open(ref.path, "rb") as f:
            f.seek(ref.offset)
            data = f.read(ref.size)
        if len(data) != ref.size:
            raise ImageError(f"{ref.path} ends inside this member (truncated shard)")
        return data
    if isinstance(ref, ParquetCell):
        value = _row_group_column(ref.path, ref.row_group, ref.column)[ref.row].as_py()
        out = _cell_ref(value, Path(ref.path).parent)
        if out is None:
            raise ImageError(f"column {ref.column!r} holds no image")
        return out
    return ref


def _open(ref: ImageRef, what: str) -> Image.Image:
    """A lazily opened (header-only), size-checked image from bytes; raises ``ImageError``."""
    data = _image_bytes(ref)
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
    return _open(ref, what).size


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


def load_record(record: SampleRecord) -> EditSample:
    """Decode a record's images; raises ``ImageError`` (also when source and target aspect
    ratios differ, since no common crop then aligns them)."""
    source = decode_image(record.source, "source")
    target = decode_image(record.target, "target")
    if not _same_aspect(source.size, target.size):
        raise AspectMismatch(f"source {source.size[0]}x{source.size[1]} and target "
                         f"{target.size[0]}x{target.size[1]} have different aspect ratios")
    return EditSample(source, target, record.instruction, record.task, dict(record.scores), record.key,
                      record.origin)


@dataclass
class _Raw:
    """What a format yields before the shared checks (label not normalized, scores parsed)."""

    key: str
    origin: str
    instruction: Any
    task: Any
    scores: dict[str, float]
    source: ImageRef
    target: ImageRef


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


@dataclass(kw_only=True)
class EditReader:
    """Base of all readers; its fields are the options every format shares.

    Args:
        path: the data location (a directory, file, glob, or a list of these; formats say which).
        filters: score filters such as ``["sc >= 7", "overall > 6.5"]``; a sample lacking a named
            score is dropped (reason ``missing_score: NAME``).
        on_unknown_task: "error" (default: raise naming the label and the sample) or "skip"
            (drop and count as ``unknown_task``).
        task_aliases: extra data labels -> taxonomy names, e.g. ``{"removal": "subject_deletion"}``.
    """

    format: ClassVar[str] = ""
    path: str | list[str]
    filters: list[str] = field(default_factory=list)
    on_unknown_task: str = "error"
    task_aliases: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.filters, str):
            raise ValueError(f"filters must be a list of expressions, got the string {self.filters!r}")
        self.score_filters = [ScoreFilter.parse(f) for f in self.filters]
        if self.on_unknown_task not in ("error", "skip"):
            raise ValueError(f"on_unknown_task must be 'error' or 'skip', got {self.on_unknown_task!r}")
        for label, name in self.task_aliases.items():
            try:
                get_task(name)
            except ValueError as e:
                raise ValueError(f"task_aliases[{label!r}]: {e}") from None
        self.stats = ReadStats()

    # each format implements this: raw samples, format-level drops recorded in ``stats``
    def _raw(self, stats: ReadStats, index: bool) -> Iterator[_Raw]:
        raise NotImplementedError

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

    def _task(self, label: Any, where: str, stats: ReadStats) -> tuple[bool, str | None]:
        if label is None or label == "":
            return True, None
        if isinstance(label, str):
            try:
                return True, normalize_task(label, self.task_aliases)
            except ValueError:
                pass
        if self.on_unknown_task == "skip":
            stats.drop("unknown_task", where, repr(label))
            return False, None
        raise ValueError(f"{where}: unknown task label {label!r}; map it with task_aliases "
                         f"{{{label!r}: <taxonomy name>}} or set on_unknown_task: skip")

    def _records(self, stats: ReadStats, index: bool) -> Iterator[SampleRecord]:
        """Records passing the metadata checks (instruction, task, score filters)."""
        for raw in self._raw(stats, index):
            where = f"{raw.origin}:{raw.key}"
            if not isinstance(raw.instruction, str) or not raw.instruction.strip():
                stats.drop("bad_metadata", where, f"instruction is {raw.instruction!r}")
                continue
            ok, task = self._task(raw.task, where, stats)
            if not ok:
                continue
            rejected = None
            for f in self.score_filters:
                if f.score not in raw.scores:
                    rejected = (f"missing_score: {f.score}", f"has {sorted(raw.scores) or 'no scores'}")
                    break
                if not f.holds(raw.scores[f.score]):
                    rejected = (f"filter: {f}", f"{f.score} = {raw.scores[f.score]:g}")
                    break
            if rejected:
                stats.drop(rejected[0], where, rejected[1])
                continue
            yield SampleRecord(raw.key, raw.origin, raw.instruction.strip(), task, raw.scores, raw.source, raw.target)

    def _empty(self, stats: ReadStats) -> NoSamplesError:
        filters = ", ".join(f"'{f}'" for f in self.score_filters) or "none"
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

    def index(self) -> list[SampleRecord]:
        """All usable records with their source size, reading only image headers (no pixels kept)."""
        stats = self.stats = ReadStats()
        out = []
        for record in self._records(stats, index=True):
            where = f"{record.origin}:{record.key}"
            try:
                size = probe_size(record.source, "source")
                target_size = probe_size(record.target, "target")
            except ImageError as e:
                stats.drop("decode_error", where, str(e))
                continue
            if not _same_aspect(size, target_size):
                stats.drop("aspect_mismatch", where, f"source {size[0]}x{size[1]}, target "
                                                     f"{target_size[0]}x{target_size[1]}")
                continue
            record.size = size
            stats.kept += 1
            out.append(record)
        if not out:
            raise self._empty(stats)
        return out


# -- WebDataset tar shards (ours and upstream X2Edit's) --------------------------------------

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _iter_tar_groups(path: Path, stats: ReadStats, index: bool,
                     required: tuple[str, ...]) -> Iterator[tuple[str, dict[str, bytes | TarSpan]]]:
    """(key, {suffix: bytes}) per sample of a tar, grouped WebDataset-style (key = name up to the
    first dot of the file name). With ``index``, only .json members are read; images become
    ``TarSpan``s. A truncated shard yields what it holds before the damage, then records one
    ``truncated_shard`` drop."""
    compressed = not path.name.lower().endswith(".tar")
    if index and compressed:
        raise ValueError(f"{path} is compressed: an index needs random access to uncompressed .tar shards; "
                         "decompress it, or stream it with iter(reader)")
    file_size = path.stat().st_size
    key, group, end, n = None, {}, 0, 0
    error = None
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                k, suffix = base_plus_ext(member.name)
                if k is None:
                    continue
                if k != key:
                    if group:
                        n += 1
                        yield key, group
                    key, group = k, {}
                end = member.offset_data + member.size
                if not compressed and end > file_size:
                    raise tarfile.ReadError(f"member {member.name} ends past the end of the file")
                if index and not suffix.endswith("json"):
                    group[suffix] = TarSpan(str(path), member.offset_data, member.size)
                else:
                    group[suffix] = tf.extractfile(member).read()
        # tar writers end an archive with >= 2 zero blocks; without them the file was cut at a
        # member boundary, which tarfile reads as a clean end
        if not compressed and end and file_size < end + (-end % 512) + 1024:
            error = "no end-of-archive marker (file cut short)"
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        error = f"{type(e).__name__}: {e}"
    if group and (error is None or all(s in group for s in required)):
        n += 1
        yield key, group
    if error:
        logger.warning("%s is truncated or corrupt (%s); using the %d samples before the damage", path, error, n)
        stats.drop("truncated_shard", str(path), f"{error}; {n} samples read before it")


@dataclass(kw_only=True)
class _TarReader(EditReader):
    source_suffix: str = ""
    target_suffix: str = ""
    json_suffix: str = "json"

    def _meta(self, obj: dict, where: str) -> tuple[Any, Any, dict[str, float]]:
        raise NotImplementedError

    def _raw(self, stats: ReadStats, index: bool) -> Iterator[_Raw]:
        required = (self.source_suffix, self.target_suffix, self.json_suffix)
        for shard in self._paths(_TAR_SUFFIXES):
            for key, group in _iter_tar_groups(shard, stats, index, required):
                where = f"{shard}:{key}"
                missing = [s for s in required if s not in group]
                if missing:
                    stats.drop("missing_member", where, f"no {', '.join(missing)} (has {', '.join(sorted(group))})")
                    continue
                try:
                    obj = json.loads(group[self.json_suffix])
                    if not isinstance(obj, dict):
                        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                    instruction, task, scores = self._meta(obj, where)
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                    stats.drop("bad_metadata", where, str(e))
                    continue
                yield _Raw(key, str(shard), instruction, task, scores,
                           group[self.source_suffix], group[self.target_suffix])


@register_reader("x2edit")
@dataclass(kw_only=True)
class X2EditShardReader(_TarReader):
    """This project's shards (``x2edit build-data``): KEY.src.png, KEY.tgt.png and KEY.json with
    "instruction", "task" and "scores" ({name: number or null}); other JSON fields (provenance) are kept
    out of the sample. ``path``: a directory (searched recursively), a .tar file or a glob."""

    source_suffix: str = "src.png"
    target_suffix: str = "tgt.png"

    def _meta(self, obj, where):
        scores = obj.get("scores") or {}
        if not isinstance(scores, dict):
            raise ValueError(f"scores must be an object, got {type(scores).__name__}")
        # our writer stores numbers, or null where a scorer could not score (then the score is
        # absent from the sample); anything else is a bug to surface, not to coerce
        bad = {k: v for k, v in scores.items()
               if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))}
        if bad:
            raise ValueError(f"non-numeric scores {bad}")
        return obj.get("instruction"), obj.get("task"), {k: float(v) for k, v in scores.items() if v is not None}


@register_reader("x2edit_upstream")
@dataclass(kw_only=True)
class X2EditUpstreamReader(_TarReader):
    """Upstream X2Edit WebDataset shards: KEY.1.0.jpg (source), KEY.2.jpg (target), KEY.json.

    Args:
        instruction_key: JSON field of the instruction.
        task_key: JSON field of the task label (taxonomy names in any case / with spaces or
            hyphens; other labels through ``task_aliases``).
        score_keys: JSON fields read as scores; None: every other field that parses as a score
            (``parse_score``), top-level or inside a "scores" object.
        list_reduce: how a list score becomes one number: "mean" (default), "min", "max", "sum".
    """

    source_suffix: str = "1.0.jpg"
    target_suffix: str = "2.jpg"
    instruction_key: str = "instruction"
    task_key: str = "task"
    score_keys: list[str] | None = None
    list_reduce: str = "mean"

    def __post_init__(self):
        super().__post_init__()
        if self.list_reduce not in _REDUCE:
            raise ValueError(f"list_reduce must be one of {', '.join(_REDUCE)}, got {self.list_reduce!r}")

    def _meta(self, obj, where):
        fields = {k: v for k, v in obj.items() if k not in (self.instruction_key, self.task_key, "scores")}
        if isinstance(obj.get("scores"), dict):
            fields.update(obj["scores"])
        if self.score_keys is not None:
            fields = {k: fields[k] for k in self.score_keys if k in fields}
        scores = {k: s for k, v in fields.items() if (s := parse_score(v, self.list_reduce)) is not None}
        return obj.get(self.instruction_key), obj.get(self.task_key), scores


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

    list_reduce: str = "mean"

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
                               file.parent / source, file.parent / target)


@register_reader("parquet")
@dataclass(kw_only=True)
class ParquetReader(EditReader):
    """HF-style parquet files.

    Args:
        columns: role -> column name for the roles "source", "target", "instruction" (required)
            and "task" (optional), e.g. ``{"source": "input_image", "target": "edited_image",
            "instruction": "edit_prompt"}``. Image cells: bytes, {"bytes", "path"} structs or path
            strings (relative to the parquet file).
        score_columns: columns read as scores (``parse_score``), named by their column name.
        list_reduce: as for ``x2edit_upstream``.
    """

    columns: dict[str, str]
    score_columns: list[str] = field(default_factory=list)
    list_reduce: str = "mean"
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
                               refs["source"], refs["target"])
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
            sample.source, sample.target = fit_pair(sample.source, sample.target,
                                                    assign_bucket(record.size, self.buckets))
        return sample

    def batch_sampler(self, batch_size: int, *, balanced_tasks: bool = False, seed: int = 0,
                      drop_last: bool = False) -> BucketBatchSampler:
        """A ``BucketBatchSampler`` over this dataset's buckets (see its Args)."""
        if self.buckets is None:
            raise ValueError("batch_sampler needs buckets: EditDataset(..., buckets=make_buckets(...))")
        return BucketBatchSampler(self.sizes, self.buckets, batch_size, tasks=self.tasks,
                                  balanced_tasks=balanced_tasks, seed=seed, drop_last=drop_last)


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
            sample.source, sample.target = fit_pair(sample.source, sample.target,
                                                    assign_bucket(sample.source.size, buckets))
        samples.append(sample)
    return samples
