"""Sources: plan the items of a run, then load them shard by shard.

``plan(num_samples)`` lists lightweight, JSON-able references to items in a fixed order (the
same config gives the same plan, which makes reruns resumable); ``load(refs, shard, start)``
turns references into ``Sample``s. An item that cannot be read (corrupt image, truncated tar)
becomes a dropped sample with its reason, so it is counted and logged, never fatal.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import os
import tarfile
import zlib
from collections import defaultdict

import numpy as np
from PIL import Image

from x2edit.data_pipeline.sample import Sample
from x2edit.data_pipeline.stages.base import Stage, register_stage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class CorruptImage(Exception):
    pass


def decode_image(data: bytes | str, size: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 from encoded bytes or a path; center-cropped and resized to ``size`` if given."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.load()
            rgb = im.convert("RGB")
    except _DECODE_ERRORS as e:
        raise CorruptImage(f"{type(e).__name__}: {e}") from None
    if size is not None:
        w, h = rgb.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        rgb = rgb.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    return np.asarray(rgb)


class Source(Stage):
    role = "source"

    @property
    def key_prefix(self) -> str:
        return self.type_name.removesuffix("_source")

    def plan(self, num_samples: int | None) -> tuple[list, dict]:
        """(item references in a fixed order, at most ``num_samples``; a report of unreadable inputs)."""
        raise NotImplementedError

    def load(self, refs: list, shard: int, start: int) -> list[Sample]:
        """Samples for ``refs``; ``start`` is the global index of the first (it makes the keys)."""
        raise NotImplementedError

    def process(self, batch):  # sources only plan and load
        return batch

    def _key(self, index: int) -> str:
        return f"{self.key_prefix}-{index:09d}"


def _expand(patterns: list[str] | str, what: str) -> list[str]:
    """Files matching glob patterns (or brace-expanded shard lists), sorted, de-duplicated."""
    from braceexpand import braceexpand  # installed with webdataset

    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    files: list[str] = []
    for p in pats:
        for u in braceexpand(os.path.expanduser(p)):
            hits = sorted(glob.glob(u)) if any(c in u for c in "*?[") else [u]
            files.extend(hits)
    files = sorted(dict.fromkeys(files))
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{what}: input file {missing[0]!r} does not exist")
    if not files:
        raise FileNotFoundError(f"{what}: no input files match {pats}")
    return files


# ---------------------------------------------------------------------------------------------


@register_stage("shapeworld_source")
class ShapeWorldSource(Source):
    """Seeds of Shape World pairs: ``start``, ``start + 1``, ... of the chosen split."""

    @dataclasses.dataclass
    class Params:
        split: str = "train"
        start: int = 0

    @property
    def provides(self):
        return frozenset({"seed"})

    @property
    def key_prefix(self) -> str:
        return f"sw-{self.params.split}"

    def validate(self):
        from x2edit.data_pipeline.shapeworld import SPLITS

        if self.params.split not in SPLITS:
            raise ValueError(f"{self.name}: split must be one of {', '.join(SPLITS)}, got {self.params.split!r}")
        if self.params.start < 0:
            raise ValueError(f"{self.name}: start must be >= 0")

    def plan(self, num_samples):
        if num_samples is None:
            raise ValueError(f"{self.name}: Shape World is unbounded; give --num-samples")
        return list(range(self.params.start, self.params.start + num_samples)), {}

    def load(self, refs, shard, start):
        out = []
        for seed in refs:
            s = Sample(key=self._key(seed), shard=shard, seed=int(seed))
            s.provenance.update({"source": "shapeworld", "split": self.params.split, "seed": int(seed)})
            out.append(s)
        return out


@register_stage("folder_source")
class FolderSource(Source):
    """Images in a folder (recursive). Optionally ``NAME.txt`` beside ``NAME.jpg`` holds the instruction."""

    @dataclasses.dataclass
    class Params:
        path: str
        extensions: list[str] = dataclasses.field(default_factory=lambda: list(IMAGE_EXTENSIONS))
        recursive: bool = True
        size: int | None = None
        instructions_from_txt: bool = False

    @property
    def provides(self):
        return frozenset({"source", "instruction"} if self.params.instructions_from_txt else {"source"})

    def validate(self):
        if not os.path.isdir(os.path.expanduser(self.params.path)):
            raise FileNotFoundError(f"{self.name}: image folder {self.params.path!r} does not exist")

    def plan(self, num_samples):
        root = os.path.expanduser(self.params.path)
        exts = tuple(e.lower() for e in self.params.extensions)
        found = []
        for dirpath, dirnames, files in os.walk(root):
            dirnames.sort()
            found += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(files) if f.lower().endswith(exts)]
            if not self.params.recursive:
                break
        found.sort()
        return (found if num_samples is None else found[:num_samples]), {}

    def load(self, refs, shard, start):
        root = os.path.expanduser(self.params.path)
        out = []
        for i, rel in enumerate(refs):
            s = Sample(key=self._key(start + i), shard=shard)
            s.provenance.update({"source": "folder", "source_id": rel})
            path = os.path.join(root, rel)
            try:
                s.source = decode_image(path, self.params.size)
            except CorruptImage as e:
                s.drop(self.name, "corrupt source image", f"{rel}: {e}")
            if s.kept and self.params.instructions_from_txt:
                txt = os.path.splitext(path)[0] + ".txt"
                if os.path.isfile(txt):
                    with open(txt, encoding="utf-8") as f:
                        s.instruction = f.read().strip()
                if not s.instruction:
                    s.drop(self.name, "missing instruction", f"{rel}: no text in {os.path.basename(txt)}")
            out.append(s)
        return out


def scan_tar(path: str, image_keys: tuple[str, ...]) -> tuple[list[str], str | None]:
    """Sample keys of a WebDataset tar that have an image, in order, and the error that stopped the scan.

    A truncated tar yields the samples whose members were all present before the damage. Plain
    tars are scanned by their headers (a member is whole if its data ends within the file);
    compressed ones are read through.
    """
    members: dict[str, set[str]] = {}
    order: list[str] = []
    error = None
    plain = not path.endswith((".gz", ".tgz", ".bz2", ".xz"))
    file_size = os.path.getsize(path)
    try:
        with tarfile.open(path, "r:" if plain else "r:*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                if "." not in base:
                    continue
                key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
                if key not in members:
                    order.append(key)
                    members[key] = set()
                if plain:
                    whole = m.offset_data + m.size <= file_size
                else:
                    f = tf.extractfile(m)
                    whole = len(f.read() if f is not None else b"") == m.size
                if not whole:
                    raise tarfile.ReadError(f"member {m.name} is truncated")
                members[key].add(base.split(".", 1)[1].lower())
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        error = f"{type(e).__name__}: {e}"
        if order:
            # The sample being read when the damage was found may lack members that followed.
            members.pop(order.pop(), None)
    keys = [k for k in order if members[k] & set(image_keys)]
    return keys, error


@register_stage("webdataset_source")
class WebDatasetSource(Source):
    """WebDataset tar shards (glob or brace patterns). Truncated tars: readable samples are used.

    Args (Params):
        urls: patterns, e.g. "data/shard-{000000..000009}.tar" or "data/*.tar".
        image_key: extensions tried for the source image, ";"-separated.
        instruction_key: extension holding the instruction ("txt", or "json:FIELD"), or None.
        task_key: "json:FIELD" / extension holding the task name, or None.
        target_key: extension of an existing target image, or None.
    """

    @dataclasses.dataclass
    class Params:
        urls: list[str] | str
        image_key: str = "jpg;png;jpeg;webp"
        instruction_key: str | None = None
        task_key: str | None = None
        target_key: str | None = None
        size: int | None = None

    @property
    def provides(self):
        p = self.params
        return frozenset({"source"} | ({"instruction"} if p.instruction_key else set())
                         | ({"task"} if p.task_key else set()) | ({"target"} if p.target_key else set()))

    def validate(self):
        self._files = _expand(self.params.urls, self.name)

    def plan(self, num_samples):
        files = getattr(self, "_files", None) or _expand(self.params.urls, self.name)
        image_keys = tuple(self.params.image_key.split(";"))
        refs: list = []
        report: dict = {"truncated_inputs": []}
        for f in files:
            keys, error = scan_tar(f, image_keys)
            if error:
                report["truncated_inputs"].append({"file": f, "readable_samples": len(keys), "error": error})
            refs += [[f, k] for k in keys]
            if num_samples is not None and len(refs) >= num_samples:
                break
        return (refs if num_samples is None else refs[:num_samples]), report

    def _field(self, files: dict[str, bytes], spec: str | None):
        if spec is None:
            return None
        if spec.startswith("json:"):
            import json

            for ext in ("json",):
                if ext in files:
                    return json.loads(files[ext]).get(spec[5:])
            return None
        data = files.get(spec)
        return data.decode("utf-8").strip() if data is not None else None

    def load(self, refs, shard, start):
        wanted: dict[str, set[str]] = defaultdict(set)
        for f, k in refs:
            wanted[f].add(k)
        found: dict[tuple[str, str], dict[str, bytes]] = defaultdict(dict)
        for f, keys in wanted.items():
            left = set(keys)
            try:
                with tarfile.open(f, "r:*") as tf:
                    for m in tf:
                        base = os.path.basename(m.name)
                        if not m.isfile() or "." not in base:
                            continue
                        key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
                        if key in keys:
                            found[(f, key)][base.split(".", 1)[1].lower()] = tf.extractfile(m).read()
                            left.discard(key)
                        elif not left:
                            break  # members of a sample are consecutive: this shard's part is read
            except (tarfile.TarError, EOFError, OSError, zlib.error):
                pass  # the planned (readable) samples came before the damage
        image_keys = self.params.image_key.split(";")
        out = []
        for i, (f, k) in enumerate(refs):
            s = Sample(key=self._key(start + i), shard=shard)
            s.provenance.update({"source": "webdataset", "source_id": f"{os.path.basename(f)}:{k}"})
            files = found.get((f, k), {})
            img = next((files[e] for e in image_keys if e in files), None)
            try:
                if img is None:
                    raise CorruptImage("image member missing or unreadable")
                s.source = decode_image(img, self.params.size)
                if self.params.target_key:
                    if self.params.target_key not in files:
                        raise CorruptImage(f"target member .{self.params.target_key} missing")
                    s.target = decode_image(files[self.params.target_key], self.params.size)
            except CorruptImage as e:
                s.drop(self.name, "corrupt source image", f"{s.provenance['source_id']}: {e}")
            s.instruction = self._field(files, self.params.instruction_key)
            task = self._field(files, self.params.task_key)
            s.task = str(task) if task is not None else None
            if s.kept and self.params.instruction_key and not s.instruction:
                s.drop(self.name, "missing instruction", s.provenance["source_id"])
            out.append(s)
        return out


@register_stage("parquet_source")
class ParquetSource(Source):
    """Rows of parquet files. The image column holds bytes, {"bytes", "path"} structs (Hugging Face
    ``Image`` feature) or paths (relative to the parquet file)."""

    @dataclasses.dataclass
    class Params:
        path: list[str] | str
        image_column: str = "image"
        instruction_column: str | None = None
        task_column: str | None = None
        target_column: str | None = None
        size: int | None = None

    @property
    def provides(self):
        p = self.params
        return frozenset({"source"} | ({"instruction"} if p.instruction_column else set())
                         | ({"task"} if p.task_column else set()) | ({"target"} if p.target_column else set()))

    def validate(self):
        import pyarrow.parquet as pq

        self._files = _expand(self.params.path, self.name)
        for f in self._files:
            try:
                names = pq.read_schema(f).names
            except Exception as e:  # pyarrow raises several types for a bad file
                raise ValueError(f"{self.name}: cannot read parquet file {f!r}: {e}") from None
            for col in (self.params.image_column, self.params.instruction_column, self.params.task_column,
                        self.params.target_column):
                if col is not None and col not in names:
                    raise ValueError(f"{self.name}: column {col!r} not in {f!r} (columns: {', '.join(names)})")

    def plan(self, num_samples):
        import pyarrow.parquet as pq

        files = getattr(self, "_files", None) or _expand(self.params.path, self.name)
        refs: list = []
        for f in files:
            n = pq.ParquetFile(f).metadata.num_rows
            refs += [[f, r] for r in range(n)]
            if num_samples is not None and len(refs) >= num_samples:
                break
        return (refs if num_samples is None else refs[:num_samples]), {}

    @staticmethod
    def _image_bytes(value, base: str):
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, str):
            return value if os.path.isabs(value) else os.path.join(base, value)
        return value

    def load(self, refs, shard, start):
        import pyarrow.parquet as pq

        p = self.params
        cols = [c for c in (p.image_column, p.instruction_column, p.task_column, p.target_column) if c]
        rows: dict[tuple[str, int], dict] = {}
        by_file: dict[str, list[int]] = defaultdict(list)
        for f, r in refs:
            by_file[f].append(r)
        for f, rs in by_file.items():
            table = pq.read_table(f, columns=cols).take(rs).to_pylist()
            rows.update({(f, r): row for r, row in zip(rs, table)})
        out = []
        for i, (f, r) in enumerate(refs):
            row = rows[(f, r)]
            s = Sample(key=self._key(start + i), shard=shard)
            s.provenance.update({"source": "parquet", "source_id": f"{os.path.basename(f)}:{r}"})
            base = os.path.dirname(f)
            try:
                img = self._image_bytes(row[p.image_column], base)
                if img is None:
                    raise CorruptImage("empty image cell")
                s.source = decode_image(img, p.size)
                if p.target_column:
                    tgt = self._image_bytes(row[p.target_column], base)
                    if tgt is None:
                        raise CorruptImage("empty target cell")
                    s.target = decode_image(tgt, p.size)
            except CorruptImage as e:
                s.drop(self.name, "corrupt source image", f"{s.provenance['source_id']}: {e}")
            if p.instruction_column:
                s.instruction = row[p.instruction_column] or None
                if s.kept and not s.instruction:
                    s.drop(self.name, "missing instruction", s.provenance["source_id"])
            if p.task_column and row[p.task_column] is not None:
                s.task = str(row[p.task_column])
            out.append(s)
        return out
