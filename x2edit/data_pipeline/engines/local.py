"""The local engine: shards in parallel over processes (or in this process with one worker).

Each worker builds the pipeline once (models load once per worker), then processes whole shards
and commits them itself; the driver only updates the manifest and the progress bar.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from pathlib import Path

from x2edit.data_pipeline.shard_jobs import ShardJob, commit_shard, process_shard

_worker: dict = {}


def _stage_info(pipeline) -> tuple[list[str], list[str]]:
    return [pipeline.source.name] + [s.name for s in pipeline.stages], pipeline.score_names()


def _run_job(pipeline, job: ShardJob, out: Path, progress) -> dict:
    stage_order, score_names = _stage_info(pipeline)
    encoded = process_shard(pipeline, job, progress)
    return commit_shard(out, job.index, encoded, stage_order, score_names)


def _init(config_dict: dict, out: str, queue, threads: int) -> None:
    from x2edit.data_pipeline.config import BuildConfig
    from x2edit.data_pipeline.pipeline import Pipeline

    pipeline = Pipeline(BuildConfig.from_dict(config_dict))
    if any(s.uses_model for s in pipeline.stages):
        import torch

        torch.set_num_threads(threads)  # share the cores between workers
    pipeline.setup()
    _worker.update(pipeline=pipeline, out=Path(out), queue=queue)


def _work(job: ShardJob) -> dict:
    q = _worker["queue"]
    return _run_job(_worker["pipeline"], job, _worker["out"], lambda n, k, d: q.put((n, k, d)))


def run_local(pipeline, jobs: list[ShardJob], out: Path, workers: int, on_done, on_progress) -> None:
    """Process ``jobs``; ``on_done(stats)`` after each committed shard, ``on_progress(n, kept, dropped)``."""
    workers = min(workers, len(jobs))
    if workers <= 1:
        pipeline.setup()
        for job in jobs:
            on_done(_run_job(pipeline, job, out, on_progress))
        return
    ctx = mp.get_context("spawn")  # fresh interpreters: safe with torch and threads
    queue = ctx.Queue()

    def pump() -> None:
        while True:
            item = queue.get()
            if item is None:
                return
            on_progress(*item)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    threads = max(1, (os.cpu_count() or 1) // workers)
    try:
        with ctx.Pool(workers, initializer=_init, initargs=(pipeline.config.to_dict(), str(out), queue, threads)) as pool:
            for stats in pool.imap_unordered(_work, jobs):
                on_done(stats)
    finally:
        queue.put(None)
        reader.join(timeout=5)
