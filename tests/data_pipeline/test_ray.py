"""The Ray engine, for real, on a local Ray instance: same config, same output as the local engine."""

from __future__ import annotations

import pytest

from x2edit.data_pipeline.config import BuildConfig
from x2edit.data_pipeline.runner import build
from x2edit.data_pipeline.shards import read_index, read_shards

pytest.importorskip("ray.data")


def test_ray_engine_matches_local(tmp_path, tiny_vlm_dir):
    # A model stage (the tiny VLM judge) runs in a Ray actor pool; the others as fused Ray tasks.
    cfg = BuildConfig.from_dict({
        "num_samples": 12, "batch_size": 4, "writer": {"samples_per_shard": 6},
        "stages": [
            {"type": "shapeworld_source"},
            {"type": "task_sampler"},
            {"type": "shapeworld_expert", "resolution": 32},
            {"type": "template_instructions"},
            {"type": "vlm_judge", "path": tiny_vlm_dir, "max_new_tokens": 4, "device": "cpu"},
            {"type": "pixel_scorer"},
            {"type": "threshold_filter", "rules": ["changed_ratio >= 0.002"]},
        ]})
    quiet = {"progress": False, "echo": lambda *_: None}
    ray_stats = build(cfg, tmp_path / "ray", engine="ray", workers=2, **quiet)
    build(cfg, tmp_path / "local", engine="local", workers=1, **quiet)
    assert ray_stats["run"]["engine"] == "ray" and ray_stats["totals"]["generated"] == 12
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert read_index(tmp_path / "ray").equals(read_index(tmp_path / "local"))
    assert len(list(read_shards(tmp_path / "ray"))) == ray_stats["totals"]["kept"]
