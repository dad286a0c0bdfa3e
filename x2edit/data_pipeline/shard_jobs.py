"""One shard's work, what every engine runs: process a shard's items through the stages, then commit it.

``runner`` plans the shards and hands the pending ones to an engine (``engines/local.py``,
``engines/ray.py``); the engines call ``process_shard`` (or ``encode_sample`` per item) and
``commit_shard`` from here, so the engines never import the runner back. A shard is committed when its
tar is renamed into place, after its index and stats parts (``_parts/``): its tar exists only if the
shard is whole.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from x2edit.data_pipeline.pipeline import Pipeline
from x2edit.data_pipeline.sample import Sample
from x2edit.data_pipeline.shards import sample_record, shard_name, write_tar

log = logging.getLogger("data_pipeline")

PARTS = "_parts"
_MAX_LISTED = 100  # corrupt inputs listed by name in stats (all are counted)


@dataclass
class ShardJob:
    """One output shard's work: its index, the global index of its first item, and item references."""

    index: int
    start: int
    refs: list


@dataclass
class Encoded:
    """A processed sample ready to commit: tar record (None if dropped) and index row."""

    pos: int
    record: dict | None
    row: dict
    timings: dict


def index_schema(score_names: list[str]):
    import pyarrow as pa

    fields = [("key", pa.string()), ("shard", pa.int64()), ("kept", pa.bool_()), ("drop_stage", pa.string()),
              ("drop_rule", pa.string()), ("drop_detail", pa.string()), ("task", pa.string()),
              ("instruction", pa.string()), ("source_id", pa.string()), ("width", pa.int64()),
              ("height", pa.int64())]
    fields += [(n, pa.float64()) for n in score_names]
    fields += [("score_notes", pa.string()), ("provenance", pa.string())]
    return pa.schema(fields)


def encode_sample(s: Sample, pos: int, score_names: list[str], write_mask: bool) -> Encoded:
    stage, rule, detail = s.dropped or (None, None, None)
    shape = s.source.shape if s.source is not None else (None, None)
    row = {"key": s.key, "shard": s.shard, "kept": s.kept, "drop_stage": stage, "drop_rule": rule,
           "drop_detail": detail, "task": s.task, "instruction": s.instruction,
           "source_id": str(s.provenance.get("source_id", s.provenance.get("seed", ""))),
           "width": shape[1], "height": shape[0],
           "score_notes": json.dumps(s.notes, sort_keys=True), "provenance": json.dumps(s.provenance, sort_keys=True)}
    row.update({n: s.scores.get(n) for n in score_names})
    record = sample_record(s, write_mask) if s.kept else None
    return Encoded(pos, record, row, dict(s.extra.get("timings", {})))


def process_shard(pipeline: Pipeline, job: ShardJob, progress=None) -> list[Encoded]:
    """Load a shard's items and run every stage over them in batches; nothing is written."""
    cfg = pipeline.config
    t0 = time.perf_counter()
    samples = pipeline.source.load(job.refs, job.index, job.start)
    share = (time.perf_counter() - t0) / max(len(samples), 1)
    for s in samples:
        s.extra["timings"] = {pipeline.source.name: share}
    names = pipeline.score_names()
    out: list[Encoded] = []
    for b0 in range(0, len(samples), cfg.batch_size):
        batch = pipeline.run_stages(samples[b0:b0 + cfg.batch_size])
        out += [encode_sample(s, b0 + i, names, cfg.writer.write_mask) for i, s in enumerate(batch)]
        if progress is not None:
            kept = sum(s.kept for s in batch)
            progress(len(batch), kept, len(batch) - kept)
    return out


def shard_stats(index: int, encoded: list[Encoded], stage_order: list[str], score_names: list[str]) -> dict:
    """Counts, drop reasons, per-task sums and per-stage stats of one shard."""
    rows = [e.row for e in encoded]
    drops = Counter(f"{r['drop_stage']}: {r['drop_rule']}" for r in rows if not r["kept"])
    corrupt = [{"key": r["key"], "source_id": r["source_id"], "reason": r["drop_detail"]}
               for r in rows if r["drop_rule"] == "corrupt source image"]
    per_task: dict = {}
    for r in rows:
        t = per_task.setdefault(r["task"] or "(none)", {"generated": 0, "kept": 0, "score_sum": {}, "score_count": {}})
        t["generated"] += 1
        t["kept"] += int(r["kept"])
        for n in score_names:
            if r.get(n) is not None:
                t["score_sum"][n] = t["score_sum"].get(n, 0.0) + r[n]
                t["score_count"][n] = t["score_count"].get(n, 0) + 1
    stages = {n: {"in": 0, "dropped": 0, "seconds": 0.0} for n in stage_order}
    for e in encoded:
        stop = stage_order.index(e.row["drop_stage"]) if e.row["drop_stage"] in stage_order else len(stage_order)
        for n in stage_order[: stop + 1]:
            stages[n]["in"] += 1
        if not e.row["kept"] and e.row["drop_stage"] in stages:
            stages[e.row["drop_stage"]]["dropped"] += 1
        for n, sec in e.timings.items():
            if n in stages:
                stages[n]["seconds"] += sec
    kept = sum(r["kept"] for r in rows)
    return {"shard": index, "name": shard_name(index), "generated": len(rows), "kept": kept,
            "dropped": len(rows) - kept, "skipped_corrupt": len(corrupt), "corrupt": corrupt[:_MAX_LISTED],
            "drop_reasons": dict(drops), "per_task": per_task, "stages": stages}


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit_shard(out: Path, index: int, encoded: list[Encoded], stage_order: list[str],
                 score_names: list[str]) -> dict:
    """Write a shard's index part, stats part, then its tar (the commit point). Returns the stats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    encoded = sorted(encoded, key=lambda e: e.pos)
    parts = out / PARTS
    parts.mkdir(exist_ok=True)
    name = shard_name(index).removesuffix(".tar")
    table = pa.Table.from_pylist([e.row for e in encoded], schema=index_schema(score_names))
    tmp = parts / f"{name}.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, parts / f"{name}.parquet")
    stats = shard_stats(index, encoded, stage_order, score_names)
    _atomic_write_bytes(parts / f"{name}.json", json.dumps(stats, sort_keys=True).encode())
    write_tar(out / shard_name(index), (e.record for e in encoded if e.record is not None))
    for c in stats["corrupt"]:
        log.warning("skipped corrupt input %s (%s): %s", c["source_id"], c["key"], c["reason"])
    return stats
