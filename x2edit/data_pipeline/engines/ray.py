"""The Ray engine: the same stages on Ray Data, locally or on a cluster (``--ray-address``).

Dataflow::

    from_items(shard jobs) -> flat_map(load)            one row per planned sample
      -> map_batches(stages...)                          cheap stages fused, run as Ray tasks
      -> map_batches(ModelStage, ActorPoolStrategy)      each model stage in an actor pool
      -> map_batches(encode)                             PNG + JSON + index row, on the workers
      -> iter_batches on the driver                      shards committed as they complete

Rows carry a pickled ``Sample`` (images are small numpy arrays), so every stage runs the same code
as in the local engine. Committing on the driver keeps one writer per output directory (atomic
renames, an honest manifest) and needs no shared filesystem on a cluster; the output is identical
to the local engine's for the same config.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np

from x2edit.data_pipeline.shard_jobs import ShardJob, commit_shard, encode_sample

_PIPELINES: dict = {}


def _pipeline(cfg: dict):
    """The worker's pipeline for this config (built once per worker process)."""
    from x2edit.data_pipeline.config import BuildConfig
    from x2edit.data_pipeline.pipeline import Pipeline

    key = repr(sorted(cfg.items(), key=lambda kv: kv[0]))
    if key not in _PIPELINES:
        _PIPELINES[key] = Pipeline(BuildConfig.from_dict(cfg))
    return _PIPELINES[key]


def _load(row: dict, cfg: dict) -> list[dict]:
    import time

    job = pickle.loads(row["job"])
    p = _pipeline(cfg)
    t0 = time.perf_counter()
    samples = p.source.load(job.refs, job.index, job.start)
    share = (time.perf_counter() - t0) / max(len(samples), 1)
    out = []
    for i, s in enumerate(samples):
        s.extra["timings"] = {p.source.name: share}
        out.append({"shard": job.index, "pos": i, "blob": pickle.dumps(s)})
    return out


def _apply(batch: dict, cfg: dict, names: list[str]) -> dict:
    p = _pipeline(cfg)
    stages = [s for s in p.stages if s.name in names]
    samples = [pickle.loads(b) for b in batch["blob"]]
    samples = p.run_stages(samples, stages)
    return {"shard": batch["shard"], "pos": batch["pos"], "blob": np.array([pickle.dumps(s) for s in samples],
                                                                           dtype=object)}


class _ModelStage:
    """Actor holding one model stage (loaded once in ``__init__``)."""

    def __init__(self, cfg: dict, name: str):
        self.cfg, self.name = cfg, name
        p = _pipeline(cfg)
        next(s for s in p.stages if s.name == name).setup()

    def __call__(self, batch: dict) -> dict:
        return _apply(batch, self.cfg, [self.name])


def _encode(batch: dict, cfg: dict) -> dict:
    p = _pipeline(cfg)
    names = p.score_names()
    out = []
    for pos, b in zip(batch["pos"], batch["blob"]):
        s = pickle.loads(b)
        out.append(pickle.dumps(encode_sample(s, int(pos), names, p.config.writer.write_mask)))
    return {"shard": batch["shard"], "pos": batch["pos"], "blob": np.array(out, dtype=object)}


def _groups(pipeline) -> list[tuple[bool, list]]:
    """Consecutive stages grouped: (uses_model, [stages]); model stages stand alone."""
    groups: list[tuple[bool, list]] = []
    for st in pipeline.stages:
        if st.uses_model or not groups or groups[-1][0]:
            groups.append((st.uses_model, [st]))
        else:
            groups[-1][1].append(st)
    return groups


def run_ray(pipeline, jobs: list[ShardJob], out: Path, workers: int, address: str | None, on_done, on_progress) -> None:
    """Process ``jobs`` on Ray Data; same callbacks as the local engine."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("the ray engine needs Ray Data: pip install x2edit[ray]") from None

    started = False
    if not ray.is_initialized():
        # A local Ray gets `workers` logical CPUs for the tasks plus `workers` per model stage's actor
        # pool (actors hold their CPU while alive; without the extra, tasks could starve). A cluster
        # brings its own resources.
        n_pools = sum(uses_model for uses_model, _ in _groups(pipeline))
        kw = {"num_cpus": workers * (1 + n_pools)} if address is None else {}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
        started = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the progress bar is ours
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        cfg = pipeline.config.to_dict()
        bs = pipeline.config.batch_size

        ds = ray.data.from_items([{"job": pickle.dumps(j)} for j in jobs], override_num_blocks=len(jobs))
        ds = ds.flat_map(_load, fn_kwargs={"cfg": cfg})
        for uses_model, stages in _groups(pipeline):
            names = [s.name for s in stages]
            if uses_model:
                st = stages[0]
                wants_gpu = has_gpu and getattr(st.params, "device", "auto") in ("auto", "cuda")
                ds = ds.map_batches(_ModelStage, fn_constructor_kwargs={"cfg": cfg, "name": st.name},
                                    batch_size=st.batch_size or bs, batch_format="numpy",
                                    compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=1 if wants_gpu else 0)
            else:
                ds = ds.map_batches(_apply, fn_kwargs={"cfg": cfg, "names": names}, batch_size=bs, batch_format="numpy")
        ds = ds.map_batches(_encode, fn_kwargs={"cfg": cfg}, batch_size=bs, batch_format="numpy")

        stage_order = [pipeline.source.name] + [s.name for s in pipeline.stages]
        score_names = pipeline.score_names()
        expected = {j.index: len(j.refs) for j in jobs}
        waiting: dict[int, list] = {j.index: [] for j in jobs}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            kept = 0
            for shard, blob in zip(batch["shard"], batch["blob"]):
                enc = pickle.loads(blob)
                kept += enc.record is not None
                waiting[int(shard)].append(enc)
            on_progress(len(batch["shard"]), kept, len(batch["shard"]) - kept)
            for shard in {int(x) for x in batch["shard"]}:
                if len(waiting[shard]) == expected[shard]:
                    on_done(commit_shard(out, shard, waiting.pop(shard), stage_order, score_names))
        if waiting:
            raise RuntimeError(f"Ray returned incomplete shards: {sorted(waiting)}")
    finally:
        if started:
            ray.shutdown()
