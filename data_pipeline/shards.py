"""Writing and reading x2edit's WebDataset shards.

A shard is a tar of samples, each as consecutive members::

    KEY.src.png   source image (RGB)
    KEY.tgt.png   target image (RGB)
    KEY.mask.png  edited region (L, 255 inside), when known and enabled
    KEY.json      {"key", "instruction", "task", "task_id", "scores": {name: number|null},
                   "score_notes": {name: why null}, "provenance": {...}, "width", "height"}

Writing is atomic: the tar is written to ``NAME.tmp``, synced and renamed, so a reader never sees
half a shard. Reading tolerates damage: a truncated tar yields the samples before the damage and
``ReadReport`` says what was lost.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.sample import Sample
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
    return {"key": s.key, "instruction": s.instruction, "task": s.task, "task_id": task_id,
            "scores": dict(s.scores), "score_notes": dict(s.notes), "provenance": s.provenance,
            "width": w, "height": h}


def sample_record(s: Sample, write_mask: bool = True) -> dict[str, bytes | str]:
    """The tar members of a kept sample, as a WebDataset record (``__key__`` + extension -> bytes)."""
    rec: dict[str, bytes | str] = {"__key__": s.key, "src.png": encode_png(s.source), "tgt.png": encode_png(s.target)}
    if write_mask and s.mask is not None:
        rec["mask.png"] = encode_png(s.mask.astype(np.uint8) * 255)
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
# Reading.


@dataclass
class ShardSample:
    """A sample read back from a shard: images as arrays (or PNG bytes with ``decode=False``)."""

    key: str
    source: np.ndarray | bytes
    target: np.ndarray | bytes
    mask: np.ndarray | bytes | None
    meta: dict
    shard: str = ""

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


def _split(name: str) -> tuple[str, str]:
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower()


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
    cur_key, members = None, {}
    read = 0

    def finish(key, mem):
        nonlocal read
        if key is None:
            return None
        missing = [r for r in require if r not in mem]
        if missing:
            report.incomplete.append({"file": path, "key": key, "missing": missing})
            return None
        read += 1
        report.samples += 1
        meta = json.loads(mem["json"]) if "json" in mem else {}
        mask = mem.get("mask.png")
        if decode:
            src = decode_png(mem["src.png"]) if "src.png" in mem else None
            tgt = decode_png(mem["tgt.png"]) if "tgt.png" in mem else None
            mask = decode_png(mask, "L") > 127 if mask is not None else None
        else:
            src, tgt = mem.get("src.png"), mem.get("tgt.png")
        return ShardSample(key, src, tgt, mask, meta, os.path.basename(path))

    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split(m.name)
                f = tf.extractfile(m)
                data = f.read() if f is not None else b""
                if len(data) != m.size:
                    raise tarfile.ReadError(f"member {m.name} is truncated")
                if key != cur_key:
                    done = finish(cur_key, members)
                    if done is not None:
                        yield done
                    cur_key, members = key, {}
                members[ext] = data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        report.truncated.append({"file": path, "samples_read": read, "error": f"{type(e).__name__}: {e}"})
        if cur_key is not None:
            report.incomplete.append({"file": path, "key": cur_key, "missing": ["(truncated)"]})
        return
    done = finish(cur_key, members)
    if done is not None:
        yield done


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
