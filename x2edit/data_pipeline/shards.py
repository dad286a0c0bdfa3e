"""Writing and reading x2edit's WebDataset shards.

A shard is a tar of samples, each as consecutive members::

    KEY.src.png   source image (RGB)
    KEY.tgt.png   target image (RGB)
    KEY.mask.png  edited region (L, 255 inside), when known and enabled
    KEY.json      {"key", "instruction", "task", "task_id", "scores": {name: number|null},
                   "score_notes": {name: why null}, "provenance": {...}, "width", "height"}

Shape World samples also carry "captions" (the scenes' descriptions): a pair is then a 2-panel IC-LoRA set. A
set of n > 2 panels (``shapeworld_expert`` ``panels: n``) is its pair (panels 0 and 1, src and tgt) plus::

    KEY.panel2.png ... KEY.panel{n-1}.png   the further panels (RGB, the target's size)
    KEY.json      + "panels": n, "captions": n scene captions, "set_caption": the set's joint caption

Writing is atomic: the tar is written to ``NAME.tmp``, synced and renamed, so a reader never sees
half a shard. Reading tolerates damage: a truncated tar yields the samples before the damage and
``ReadReport`` says what was lost.

``iter_tar`` is the project's one tar reader: ``read_shard`` below and every tar format of
``x2edit.training.data`` (ours, upstream X2Edit's) group members through it.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from x2edit.data_pipeline.sample import Sample
from x2edit.tasks import TASK_NAMES, get_task

SHARD_GLOB = "shard-*.tar"
REQUIRED = ("src.png", "tgt.png", "json")
_MTIME = 1_700_000_000  # fixed member time: the same samples give byte-identical tars


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def decode_png(data: bytes, mode: str = "RGB") -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert(mode))


def sample_meta(s: Sample) -> dict:
    """The JSON metadata written beside a sample's images."""
    h, w = s.source.shape[:2]
    task_id = get_task(s.task).id if s.task in TASK_NAMES else None
    meta = {"key": s.key, "instruction": s.instruction, "task": s.task, "task_id": task_id,
            "scores": dict(s.scores), "score_notes": dict(s.notes), "provenance": s.provenance,
            "width": w, "height": h}
    if "captions" in s.extra:  # the scenes' descriptions: the pair is a 2-panel IC-LoRA set (x2edit.incontext)
        meta["captions"] = [str(c) for c in s.extra["captions"]]
    if s.extra.get("panels"):  # a set of more panels: how many, and its joint caption
        meta["panels"] = 2 + len(s.extra["panels"])
        meta["set_caption"] = str(s.extra["set_caption"])
    return meta


def sample_record(s: Sample, write_mask: bool = True) -> dict[str, bytes | str]:
    """The tar members of a kept sample, as a WebDataset record (``__key__`` + extension -> bytes)."""
    rec: dict[str, bytes | str] = {"__key__": s.key, "src.png": encode_png(s.source), "tgt.png": encode_png(s.target)}
    if write_mask and s.mask is not None:
        rec["mask.png"] = encode_png(s.mask.astype(np.uint8) * 255)
    for i, panel in enumerate(s.extra.get("panels") or (), 2):
        rec[f"panel{i}.png"] = encode_png(panel)
    rec["json"] = json.dumps(sample_meta(s), sort_keys=True).encode()
    return rec


def write_tar(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Atomically write records (``__key__`` + extension -> bytes) to a tar; returns the number written.

    The WebDataset layout needs nothing but a plain tar whose members are ``KEY.EXT`` in sample
    order, so the standard library writes it (importing webdataset would pull in torch per worker).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for rec in records:
                key = rec["__key__"]
                for ext in sorted(k for k in rec if not k.startswith("_")):
                    data = rec[ext]
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), _MTIME, 0o444
                    tf.addfile(info, io.BytesIO(data))
                n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n


# ---------------------------------------------------------------------------------------------
# Reading: the one tar reader, for build-data's shards and for every tar format `x2edit train` reads.


@dataclass(frozen=True)
class TarSpan:
    """A member's bytes inside an uncompressed tar, read on demand (an index holds no pixels)."""

    path: str
    offset: int
    size: int

    def read(self, limit: int | None = None) -> bytes:
        """The member's bytes (the first ``limit`` of them when given); raises ``EOFError`` when the
        file ends inside the member (a shard truncated after it was indexed)."""
        n = self.size if limit is None else min(limit, self.size)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(n)
        if len(data) != n:
            raise EOFError(f"{self.path} ends inside this member (truncated shard)")
        return data


def split_member(name: str) -> tuple[str | None, str]:
    """(key, suffix) of a tar member name by WebDataset's rule (``webdataset.tariterators.base_plus_ext``,
    not imported: it pulls in torch): the key runs to the first dot of the file name, the suffix is the
    rest, so ``KEY..1.jpg`` (a writer's dict key ".1.jpg") has suffix ".1.jpg". (None, "") without a dot."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (os.path.join(d, stem) if d else stem), ext


@dataclass
class TarScan:
    """One pass over a tar: samples yielded, and the damage that ended it (None: read to its end).

    ``lost`` is the key of the sample the damage cut (not yielded)."""

    path: str
    samples: int = 0
    error: str | None = None
    lost: str | None = None


def iter_tar(path: str | os.PathLike, scan: TarScan | None = None, *, spans: bool = False,
             complete: Callable[[dict], bool] | None = None) -> Iterator[tuple[str, dict[str, bytes | TarSpan]]]:
    """(key, {suffix: bytes}) per sample of a tar, in order: consecutive members sharing a key, as
    WebDataset groups them. Damage ends the file, not the program: the samples before it are yielded
    and ``scan.error`` says what was found.

    Args:
        path: a .tar, or a compressed .tar.gz / .tgz (streamed; no spans).
        scan: filled in with the count and the damage (optional).
        spans: give members other than JSON as ``TarSpan``s instead of bytes (uncompressed tars only).
        complete: when damage cuts the file, the sample it was reading is yielded if this holds for
            its members (e.g. every required member is there), else recorded as ``scan.lost``.
    """
    path = Path(path)
    scan = scan if scan is not None else TarScan(str(path))
    compressed = not path.name.lower().endswith(".tar")
    if spans and compressed:
        raise ValueError(f"{path} is compressed: an index needs random access to uncompressed .tar shards; "
                         "decompress it, or stream it")
    file_size = path.stat().st_size
    key, group, end = None, {}, 0
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                k, suffix = split_member(member.name)
                if k is None:
                    continue
                if k != key:
                    if group:
                        scan.samples += 1
                        yield key, group
                    key, group = k, {}
                end = member.offset_data + member.size
                if not compressed and end > file_size:
                    raise tarfile.ReadError(f"member {member.name} ends past the end of the file")
                if spans and not suffix.endswith("json"):
                    group[suffix] = TarSpan(str(path), member.offset_data, member.size)
                else:
                    data = tf.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} is truncated")
                    group[suffix] = data
        # tar writers end an archive with >= 2 zero blocks; without them the file was cut at a member
        # boundary, which tarfile reads as a clean end
        if not compressed and end and file_size < end + (-end % 512) + 1024:
            scan.error = "no end-of-archive marker (file cut short)"
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        scan.error = f"{type(e).__name__}: {e}"
    if group:
        if scan.error is None or (complete is not None and complete(group)):
            scan.samples += 1
            yield key, group
        else:
            scan.lost = key


@dataclass
class ShardSample:
    """A sample read back from a shard: images as arrays (or PNG bytes with ``decode=False``)."""

    key: str
    source: np.ndarray | bytes
    target: np.ndarray | bytes
    mask: np.ndarray | bytes | None
    meta: dict
    shard: str = ""
    panels: list = field(default_factory=list)  # a set's panels after the pair (``panel_names``), decoded or bytes

    @property
    def instruction(self) -> str:
        return self.meta["instruction"]

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def scores(self) -> dict:
        return self.meta.get("scores", {})

    @property
    def provenance(self) -> dict:
        return self.meta.get("provenance", {})


@dataclass
class ReadReport:
    """What reading found: samples read, damaged files and samples that lacked members."""

    files: int = 0
    samples: int = 0
    truncated: list[dict] = field(default_factory=list)
    incomplete: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.truncated and not self.incomplete

    def summary(self) -> str:
        s = f"{self.samples} samples from {self.files} file(s)"
        if self.truncated:
            s += f"; {len(self.truncated)} truncated file(s): " + ", ".join(
                f"{os.path.basename(t['file'])} ({t['samples_read']} read, {t['error']})" for t in self.truncated)
        if self.incomplete:
            s += f"; {len(self.incomplete)} incomplete sample(s) skipped"
        return s


def panel_names(meta: dict) -> list[str]:
    """The members of a sample's further panels ("panel2.png", ...), from its metadata's "panels" count; a
    one-line ``ValueError`` for a count that is not an integer >= 2."""
    n = meta.get("panels", 2)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"\"panels\" must be an integer >= 2, got {n!r}")
    return [f"panel{i}.png" for i in range(2, n)]


def read_shard(path: str | os.PathLike, report: ReadReport | None = None, decode: bool = True,
               require: tuple[str, ...] = REQUIRED) -> Iterator[ShardSample]:
    """Samples of one tar, in order. Damage ends the file, not the program: what was read before it
    is yielded and ``report`` records the rest.

    Args:
        path: the tar.
        report: collects counts and problems (optional).
        decode: decode PNGs to arrays (RGB; masks to bool) or leave bytes.
        require: members a sample must have to be yielded.
    """
    report = report if report is not None else ReadReport()
    report.files += 1
    path = str(path)
    scan, read = TarScan(path), 0
    for key, mem in iter_tar(path, scan):
        missing = [r for r in require if r not in mem]
        if missing:
            report.incomplete.append({"file": path, "key": key, "missing": missing})
            continue
        meta = json.loads(mem["json"]) if "json" in mem else {}
        try:
            panels = panel_names(meta)
        except ValueError as e:
            report.incomplete.append({"file": path, "key": key, "missing": [f"(bad metadata: {e})"]})
            continue
        if any(n not in mem for n in panels):
            report.incomplete.append({"file": path, "key": key, "missing": [n for n in panels if n not in mem]})
            continue
        read += 1
        report.samples += 1
        mask = mem.get("mask.png")
        if decode:
            src = decode_png(mem["src.png"]) if "src.png" in mem else None
            tgt = decode_png(mem["tgt.png"]) if "tgt.png" in mem else None
            mask = decode_png(mask, "L") > 127 if mask is not None else None
            panels = [decode_png(mem[n]) for n in panels]
        else:
            src, tgt, panels = mem.get("src.png"), mem.get("tgt.png"), [mem[n] for n in panels]
        yield ShardSample(key, src, tgt, mask, meta, os.path.basename(path), panels)
    if scan.error:
        report.truncated.append({"file": path, "samples_read": read, "error": scan.error})
        if scan.lost is not None:
            report.incomplete.append({"file": path, "key": scan.lost, "missing": ["(truncated)"]})


def shard_paths(out_dir: str | os.PathLike) -> list[str]:
    """The committed shards of a build-data output directory (from its manifest when present)."""
    out = Path(out_dir)
    manifest = out / "manifest.json"
    if manifest.is_file():
        with open(manifest, encoding="utf-8") as f:
            names = [s["name"] for s in json.load(f)["shards"]]
        return [str(out / n) for n in names if (out / n).is_file()]
    return sorted(str(p) for p in out.glob(SHARD_GLOB))


def read_shards(paths: str | os.PathLike | Iterable, report: ReadReport | None = None,
                decode: bool = True) -> Iterator[ShardSample]:
    """Samples of several tars, or of every committed shard of an output directory."""
    if isinstance(paths, (str, os.PathLike)) and os.path.isdir(paths):
        paths = shard_paths(paths)
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for p in paths:
        yield from read_shard(p, report, decode)


def read_index(out_dir: str | os.PathLike):
    """The parquet index (every planned sample, kept or dropped, with scores) as a pyarrow Table."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(out_dir) / "index.parquet")
