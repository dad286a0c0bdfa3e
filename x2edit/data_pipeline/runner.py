"""Running a build: plan, check the output directory, process shards on an engine, commit, report.

Output directory layout::

    shard-000000.tar ...      committed shards (WebDataset)
    _parts/shard-000000.parquet, _parts/shard-000000.json
                              per-shard index rows and stats, written before the shard's tar
    index.parquet             every planned sample (kept or dropped, with scores and drop reason)
    stats.json                totals, per-task table, per-stage stats, drop reasons, speed
    manifest.json             config fingerprint, plan fingerprint, committed shards, complete flag
    config.yaml               the resolved config

A shard is committed when its tar is renamed into place, after its parts: a shard's tar exists
only if the shard is whole and its parts are there. A rerun of the same config and inputs skips
committed shards, removes leftovers of interrupted ones (``*.tmp``) and redoes them; the manifest
only ever lists committed shards and says ``complete: true`` only when all are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections import Counter, defaultdict
from pathlib import Path

import yaml

from x2edit.data_pipeline.config import BuildConfig
from x2edit.data_pipeline.pipeline import Pipeline
from x2edit.data_pipeline.shard_jobs import _MAX_LISTED, PARTS, ShardJob, _atomic_write_bytes
from x2edit.data_pipeline.shards import SHARD_GLOB, shard_name

log = logging.getLogger("data_pipeline")

FORMAT = "x2edit-build-data"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Planning.


def plan_jobs(pipeline: Pipeline) -> tuple[list[ShardJob], str, dict]:
    """Shard jobs for the whole run, the plan's fingerprint, and the source's report."""
    cfg = pipeline.config
    refs, report = pipeline.source.plan(cfg.num_samples)
    n = cfg.writer.samples_per_shard
    jobs = [ShardJob(i, i * n, refs[i * n:(i + 1) * n]) for i in range((len(refs) + n - 1) // n)]
    h = hashlib.sha256()
    for j in jobs:
        h.update(json.dumps(j.refs).encode())
    return jobs, h.hexdigest(), report


# ---------------------------------------------------------------------------------------------
# The output directory: ownership, resume, manifest.


class OutputDir:
    """Guards an output directory: one run at a time, same config and inputs to resume."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock = self.path / ".build.lock"

    def acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        if self.lock.exists():
            try:
                other = json.loads(self.lock.read_text())
            except (OSError, ValueError):
                other = {}
            if other.get("host") == me["host"] and _alive(other.get("pid")) and other.get("pid") != me["pid"]:
                raise ValueError(f"{self.path} is being written by another build-data run (pid {other['pid']})")
        self.lock.write_text(json.dumps(me))

    def release(self) -> None:
        try:
            self.lock.unlink()
        except FileNotFoundError:
            pass

    def manifest(self) -> dict | None:
        p = self.path / "manifest.json"
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except ValueError:
            return None

    def ours(self) -> list[Path]:
        """Files and folders this tool writes (what --overwrite removes)."""
        names = ["index.parquet", "stats.json", "manifest.json", "config.yaml", PARTS]
        return ([p for p in self.path.glob(SHARD_GLOB)] + list(self.path.glob("*.tmp"))
                + [self.path / n for n in names if (self.path / n).exists()])

    def prepare(self, config_hash: str, plan_hash: str, overwrite: bool) -> set[int]:
        """Refuse, clean or resume; returns the indices of committed shards to skip."""
        m = self.manifest()
        leftovers = self.ours()
        if overwrite:
            for p in leftovers:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            return set()
        if m is None:
            if any(p.name.startswith("shard-") or p.name == PARTS for p in leftovers):
                raise ValueError(f"{self.path} holds shards without a manifest (another tool's or a broken run's); "
                                 f"use --overwrite to replace them, or another --out")
            return set()
        if m.get("format") != FORMAT:
            raise ValueError(f"{self.path}/manifest.json is not a build-data manifest; use another --out")
        if m.get("config_hash") != config_hash:
            raise ValueError(f"{self.path} holds shards of another config (fingerprint {m.get('config_hash', '?')[:12]}"
                             f", this config {config_hash[:12]}); use --overwrite to replace them, or another --out")
        if m.get("plan_fingerprint") != plan_hash:
            raise ValueError(f"{self.path} was built from different inputs (the source's items changed since); "
                             f"use --overwrite to rebuild, or another --out")
        # Interrupted shards: remove temporary files; a tar without its parts is not committed.
        for p in self.path.glob("*.tmp"):
            p.unlink()
        for p in (self.path / PARTS).glob("*.tmp") if (self.path / PARTS).is_dir() else ():
            p.unlink()
        done = set()
        for p in self.path.glob(SHARD_GLOB):
            idx = int(p.stem.split("-")[1])
            stem = p.stem
            if (self.path / PARTS / f"{stem}.parquet").is_file() and (self.path / PARTS / f"{stem}.json").is_file():
                done.add(idx)
            else:
                p.unlink()
        return done

    def write_manifest(self, manifest: dict) -> None:
        _atomic_write_bytes(self.path / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Aggregation and report.


def aggregate(parts: list[dict], score_names: list[str], stage_order: list[str]) -> dict:
    totals = Counter()
    drops: Counter = Counter()
    per_task: dict = defaultdict(lambda: {"generated": 0, "kept": 0, "score_sum": Counter(), "score_count": Counter()})
    stages = {n: {"in": 0, "dropped": 0, "seconds": 0.0} for n in stage_order}
    corrupt: list = []
    for p in parts:
        for k in ("generated", "kept", "dropped", "skipped_corrupt"):
            totals[k] += p[k]
        drops.update(p["drop_reasons"])
        corrupt += p["corrupt"]
        for t, v in p["per_task"].items():
            per_task[t]["generated"] += v["generated"]
            per_task[t]["kept"] += v["kept"]
            per_task[t]["score_sum"].update(v["score_sum"])
            per_task[t]["score_count"].update(v["score_count"])
        for n, v in p["stages"].items():
            if n in stages:
                for k in ("in", "dropped", "seconds"):
                    stages[n][k] += v[k]
    table = {}
    for t in sorted(per_task):
        v = per_task[t]
        table[t] = {"generated": v["generated"], "kept": v["kept"],
                    "mean_scores": {n: v["score_sum"][n] / v["score_count"][n] for n in score_names
                                    if v["score_count"][n]}}
    for v in stages.values():
        v["seconds_per_sample"] = v["seconds"] / v["in"] if v["in"] else None
    return {"totals": dict(totals), "drop_reasons": dict(drops.most_common()), "per_task": table, "stages": stages,
            "corrupt_inputs": corrupt[:_MAX_LISTED]}


def format_table(stats: dict, score_names: list[str], max_scores: int = 4) -> str:
    """The per-task table printed at the end of a run."""
    shown = score_names[:max_scores]
    head = ["task", "generated", "kept", *(f"mean {n}" for n in shown)]
    lines = []
    for t, v in stats["per_task"].items():
        ms = v["mean_scores"]
        lines.append([t, str(v["generated"]), str(v["kept"]), *(f"{ms[n]:.3g}" if n in ms else "-" for n in shown)])
    tot = stats["totals"]
    lines.append(["total", str(tot.get("generated", 0)), str(tot.get("kept", 0))] + [""] * len(shown))
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in lines]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# The build.


def build(config: BuildConfig, out: str | os.PathLike, engine: str = "local", workers: int = 1,
          ray_address: str | None = None, overwrite: bool = False, progress: bool = True,
          echo=print) -> dict:
    """Build a dataset; returns the stats written to ``stats.json``.

    Args:
        config: the build config.
        out: output directory.
        engine: "local" (processes over shards) or "ray" (Ray Data).
        workers: local processes, or Ray actors / CPUs per stage.
        ray_address: a Ray cluster address (ray engine); None starts a local Ray.
        overwrite: replace another run's output in ``out``.
        progress: show a progress bar.
        echo: where the final table goes.
    """
    if engine not in ("local", "ray"):
        raise ValueError(f"unknown engine {engine!r}: expected 'local' or 'ray'")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    pipeline = Pipeline(config)  # every config error surfaces here, before any work
    jobs, plan_hash, plan_report = plan_jobs(pipeline)
    if not jobs:
        raise ValueError("the source has no items to process")
    config_hash = config.fingerprint()
    outdir = OutputDir(out)
    outdir.acquire()
    try:
        done = outdir.prepare(config_hash, plan_hash, overwrite)
        return _run(pipeline, jobs, plan_hash, plan_report, config_hash, outdir, done, engine, workers,
                    ray_address, progress, echo)
    finally:
        outdir.release()


def _run(pipeline, jobs, plan_hash, plan_report, config_hash, outdir, done, engine, workers, ray_address,
         progress, echo):
    from tqdm import tqdm

    config = pipeline.config
    out = outdir.path
    score_names = pipeline.score_names()
    stage_order = [pipeline.source.name] + [s.name for s in pipeline.stages]
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    committed: dict[int, dict] = {}
    for i in sorted(done):
        committed[i] = json.loads((out / PARTS / f"{shard_name(i).removesuffix('.tar')}.json").read_text())

    def manifest(complete: bool) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "config_hash": config_hash,
                "plan_fingerprint": plan_hash, "num_planned": sum(len(j.refs) for j in jobs),
                "samples_per_shard": config.writer.samples_per_shard, "total_shards": len(jobs),
                "complete": complete, "score_names": score_names,
                "shards": [{"name": shard_name(i), "index": i, "kept": committed[i]["kept"],
                            "generated": committed[i]["generated"]} for i in sorted(committed)],
                "files": {"index": "index.parquet", "stats": "stats.json", "config": "config.yaml"}}

    outdir.write_manifest(manifest(False))
    pending = [j for j in jobs if j.index not in done]
    total = sum(len(j.refs) for j in pending)
    bar = tqdm(total=total, unit="pair", disable=not progress, dynamic_ncols=True, desc="build-data")
    counts = {"kept": 0, "dropped": 0}

    def on_progress(n: int, kept: int, dropped: int) -> None:
        counts["kept"] += kept
        counts["dropped"] += dropped
        bar.set_postfix(kept=counts["kept"], dropped=counts["dropped"], refresh=False)
        bar.update(n)

    def on_done(stats: dict) -> None:
        committed[stats["shard"]] = stats
        outdir.write_manifest(manifest(False))

    t0 = time.perf_counter()
    if pending:
        if engine == "local":
            from x2edit.data_pipeline.engines.local import run_local

            run_local(pipeline, pending, out, workers, on_done, on_progress)
        else:
            from x2edit.data_pipeline.engines.ray import run_ray

            run_ray(pipeline, pending, out, workers, ray_address, on_done, on_progress)
    seconds = time.perf_counter() - t0
    bar.close()

    # Final files: the index of every sample, the stats, and a complete manifest.
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(out / PARTS / f"{shard_name(j.index).removesuffix('.tar')}.parquet") for j in jobs]
    index = pa.concat_tables(tables)
    tmp = out / "index.parquet.tmp"
    pq.write_table(index, tmp)
    os.replace(tmp, out / "index.parquet")
    stats = aggregate([committed[j.index] for j in jobs], score_names, stage_order)
    stats["inputs"] = plan_report
    stats["run"] = {"engine": engine, "workers": workers, "shards_this_run": len(pending),
                    "samples_this_run": total, "seconds": round(seconds, 3),
                    "pairs_per_second": round(total / seconds, 2) if seconds > 0 and total else None,
                    "resumed_shards": len(done)}
    stats["config_hash"] = config_hash
    _atomic_write_bytes(out / "stats.json", json.dumps(stats, indent=1, sort_keys=True).encode())
    outdir.write_manifest(manifest(True))
    echo(format_table(stats, score_names))
    tot = stats["totals"]
    rate = stats["run"]["pairs_per_second"]
    echo(f"{tot.get('kept', 0)} kept / {tot.get('generated', 0)} generated in {len(jobs)} shard(s) -> {out}"
         + (f"; this run: {total} pairs in {seconds:.1f} s ({rate} pairs/s)" if total else "; nothing to do")
         + (f"; {tot['skipped_corrupt']} corrupt input(s) skipped" if tot.get("skipped_corrupt") else "")
         + (f"; {len(plan_report.get('truncated_inputs', []))} truncated input tar(s)"
            if plan_report.get("truncated_inputs") else ""))
    return stats
