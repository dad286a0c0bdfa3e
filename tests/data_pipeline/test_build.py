"""End-to-end `x2edit build-data` runs: outputs, resume after a kill, refusal, inputs that are damaged."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from x2edit.cli import main
from x2edit.data_pipeline.config import load_config
from x2edit.data_pipeline.runner import build
from x2edit.data_pipeline.shards import ReadReport, read_index, read_shards, shard_paths
from x2edit.tasks import TASK_NAMES

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> int:
    return main(["build-data", "--no-progress", *args])


def _tars(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.tar"))}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    assert _cli("--out", str(out), "--num-samples", "150", "--workers", "1", "writer.samples_per_shard=50") == 0
    return out


def test_default_build_writes_all_tasks(default_run, capsys):
    out = default_run
    report = ReadReport()
    samples = list(read_shards(out, report))
    assert report.ok and report.files == 3
    assert {s.task for s in samples} == set(TASK_NAMES)
    keys = [s.key for s in samples]
    assert len(keys) == len(set(keys))
    for s in samples[:20]:
        assert s.source.shape == (64, 64, 3) and s.target.shape == (64, 64, 3) and s.mask.shape == (64, 64)
        assert isinstance(s.instruction, str) and s.instruction
        assert s.scores["oracle_psnr"] == 100.0 and s.scores["oracle_match"] == 1.0
        assert all(v is None or isinstance(v, float) for v in s.scores.values())
        assert s.provenance["generator"] == "shapeworld" and "seed" in s.provenance
    index = read_index(out)
    assert index.num_rows == 150
    kept = index.filter(index["kept"]).num_rows
    assert kept == len(samples)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["total_shards"] == 3
    assert [s["name"] for s in manifest["shards"]] == sorted(_tars(out))
    assert sum(s["kept"] for s in manifest["shards"]) == kept
    stats = json.loads((out / "stats.json").read_text())
    assert stats["totals"]["generated"] == 150 and stats["totals"]["kept"] == kept
    assert sum(v["generated"] for v in stats["per_task"].values()) == 150
    assert stats["per_task"]["color_change"]["mean_scores"]["oracle_psnr"] == 100.0
    assert stats["run"]["pairs_per_second"] > 0
    assert set(stats["stages"]) >= {"shapeworld_source", "shapeworld_expert", "threshold_filter"}
    # Drops are recorded with their rule, in the index and the stats.
    dropped = index.filter(pa.compute.invert(index["kept"])).to_pylist()
    for row in dropped:
        assert row["drop_stage"] == "threshold_filter" and row["drop_rule"] and row["drop_detail"]
    assert sum(stats["drop_reasons"].values()) == 150 - kept
    assert not list(out.glob("*.tmp")) and not (out / ".build.lock").exists()


def test_rerun_skips_refuses_and_overwrites(default_run, tmp_path, capsys):
    out = default_run
    before = _tars(out)
    assert _cli("--out", str(out), "--num-samples", "150", "--workers", "1", "writer.samples_per_shard=50") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _tars(out) == before
    # Another config into the same directory: refused, untouched.
    assert _cli("--out", str(out), "--num-samples", "150", "writer.samples_per_shard=50",
                "shapeworld_expert.resolution=32") == 2
    assert "another config" in capsys.readouterr().err
    assert _tars(out) == before
    # A foreign shard without a manifest is refused too.
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    assert _cli("--out", str(tmp_path), "--num-samples", "10") == 2
    assert "without a manifest" in capsys.readouterr().err
    assert _cli("--out", str(tmp_path), "--num-samples", "10", "--overwrite") == 0
    assert len(list(read_shards(tmp_path))) > 0


def test_bad_input_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli("--out", str(out), 'threshold_filter.rules=["oracle_psnr >> 3"]') == 2
    err = capsys.readouterr().err
    assert "bad threshold rule" in err and err.count("\n") == 1
    assert not out.exists()


def _reference(tmp_path_factory, n: int, per: int) -> Path:
    ref = tmp_path_factory.mktemp("reference")
    build(load_config(None, [f"writer.samples_per_shard={per}"], n), ref, progress=False, echo=lambda *_: None)
    return ref


def test_killed_run_resumes_to_the_same_output(tmp_path, tmp_path_factory):
    """SIGKILL a real run after a few shards; the rerun completes it with no duplicates or losses."""
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "x2edit.cli", "build-data", "--out", str(out), "--num-samples", "480",
            "--workers", "1", "--no-progress", "writer.samples_per_shard=24"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.tar"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"], "the run must have been interrupted"
    listed = {s["name"] for s in manifest["shards"]}
    assert listed <= set(_tars(out)), "the manifest only lists committed shards"
    assert len(_tars(out)) < 20
    # Rerun the same command: it skips committed shards and finishes the set.
    assert subprocess.run(args, cwd=REPO, capture_output=True).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 20
    stats = json.loads((out / "stats.json").read_text())
    assert stats["run"]["resumed_shards"] >= 3
    keys = [s.key for s in read_shards(out, decode=False)]
    assert len(keys) == len(set(keys))
    index = read_index(out)
    assert index.num_rows == 480 and len(set(index["key"].to_pylist())) == 480
    # Byte-identical to an uninterrupted run.
    assert _tars(out) == _tars(_reference(tmp_path_factory, 480, 24))


def test_interrupted_shard_leaves_no_half_shard(tmp_path, monkeypatch):
    """A crash while writing a shard leaves only a .tmp file, which the rerun removes and redoes."""
    import x2edit.data_pipeline.shard_jobs as shard_jobs

    cfg = load_config(None, ["writer.samples_per_shard=20"], 80)
    real = shard_jobs.write_tar
    calls = {"n": 0}

    def crash_on_third(path, records):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(Path(str(path) + ".tmp"), "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        return real(path, records)

    monkeypatch.setattr(shard_jobs, "write_tar", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build(cfg, tmp_path, progress=False, echo=lambda *_: None)
    assert (tmp_path / "shard-000002.tar.tmp").exists() and not (tmp_path / "shard-000002.tar").exists()
    assert [Path(p).name for p in shard_paths(tmp_path)] == ["shard-000000.tar", "shard-000001.tar"]
    monkeypatch.setattr(shard_jobs, "write_tar", real)
    stats = build(cfg, tmp_path, progress=False, echo=lambda *_: None)
    assert stats["run"]["resumed_shards"] == 2 and stats["run"]["shards_this_run"] == 2
    assert not list(tmp_path.glob("*.tmp"))
    assert read_index(tmp_path).num_rows == 80


def test_two_workers_write_the_same_shards(default_run, tmp_path):
    assert _cli("--out", str(tmp_path), "--num-samples", "150", "--workers", "2", "writer.samples_per_shard=50") == 0
    assert _tars(tmp_path) == _tars(default_run)
    assert read_index(tmp_path).equals(read_index(default_run))


# ---------------------------------------------------------------------------------------------
# Other sources: existing pairs re-scored and re-sharded.


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _pairs(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        src = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
        tgt = src.copy()
        tgt[4:12, 4:12] = 255 - tgt[4:12, 4:12]
        out.append((src, tgt))
    return out


def _rescore_config(tmp_path: Path, source: dict) -> Path:
    cfg = {"num_samples": None, "batch_size": 4, "writer": {"samples_per_shard": 4},
           "stages": [source, {"type": "task_sampler"}, {"type": "pixel_scorer"},
                      {"type": "threshold_filter", "rules": ["changed_ratio > 0.05"]}]}
    path = tmp_path / "rescore.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_parquet_source_skips_corrupt_images(tmp_path, caplog):
    pairs = _pairs(6)
    rows = {"image": [_png(s) for s, _ in pairs], "edited": [_png(t) for _, t in pairs],
            "prompt": [f"invert square {i}" for i in range(6)], "kind": ["color_change"] * 6}
    rows["image"][2] = b"definitely not an image"
    rows["kind"][4] = "teleportation"  # not a task: dropped with the reason
    pq.write_table(pa.table(rows), tmp_path / "pairs.parquet")
    cfg = _rescore_config(tmp_path, {"type": "parquet_source", "path": str(tmp_path / "pairs.parquet"),
                                     "instruction_column": "prompt", "task_column": "kind",
                                     "target_column": "edited"})
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        assert _cli("--out", str(tmp_path / "out"), "--config", str(cfg), "--workers", "1") == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["totals"] == {"generated": 6, "kept": 4, "dropped": 2, "skipped_corrupt": 1}
    assert stats["drop_reasons"] == {"parquet_source: corrupt source image": 1, "task_sampler: unknown task": 1}
    assert "pairs.parquet:2" in stats["corrupt_inputs"][0]["source_id"]
    assert "cannot identify image" in stats["corrupt_inputs"][0]["reason"]
    assert any("corrupt input pairs.parquet:2" in r.message for r in caplog.records)
    samples = list(read_shards(tmp_path / "out"))
    assert len(samples) == 4 and all(s.task == "color_change" for s in samples)
    assert all(s.scores["changed_ratio"] == pytest.approx(64 / 576, abs=2 / 576) for s in samples)
    assert np.array_equal(samples[0].target, pairs[0][1])


def test_webdataset_source_reads_truncated_tars(tmp_path):
    pairs = _pairs(8)
    for part in range(2):
        with tarfile.open(tmp_path / f"in-{part}.tar", "w") as tf:
            for i in range(4):
                src, tgt = pairs[part * 4 + i]
                for ext, data in [("jpg", _png(src)), ("tgt.png", _png(tgt)), ("txt", b"invert the square")]:
                    info = tarfile.TarInfo(f"s{part}{i}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    data = (tmp_path / "in-1.tar").read_bytes()
    (tmp_path / "in-1.tar").write_bytes(data[: len(data) // 2])  # truncated mid-file
    cfg = _rescore_config(tmp_path, {"type": "webdataset_source", "urls": str(tmp_path / "in-{0..1}.tar"),
                                     "instruction_key": "txt", "target_key": "tgt.png"})
    assert _cli("--out", str(tmp_path / "out"), "--config", str(cfg), "--workers", "1") == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    trunc = stats["inputs"]["truncated_inputs"]
    assert len(trunc) == 1 and trunc[0]["file"].endswith("in-1.tar")
    readable = trunc[0]["readable_samples"]
    assert 0 < readable < 4
    assert stats["totals"]["generated"] == 4 + readable
    assert len(list(read_shards(tmp_path / "out"))) == 4 + readable


def test_progress_bar_and_table(tmp_path, capsys):
    assert main(["build-data", "--out", str(tmp_path), "--num-samples", "30", "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "pair/s" in captured.err and "kept=" in captured.err and "dropped=" in captured.err
    assert "task" in captured.out and "generated" in captured.out and "mean oracle_psnr" in captured.out


def test_training_reader_loads_the_shards(default_run):
    """The training issue's reader (format "x2edit") reads what build-data wrote, all 15 tasks."""
    data = pytest.importorskip("x2edit.training.data")
    reader = data.build_reader({"format": "x2edit", "path": str(default_run), "filters": ["oracle_psnr >= 40"]})
    samples = list(reader)
    assert len(samples) == read_index(default_run).filter(read_index(default_run)["kept"]).num_rows
    assert {s.task for s in samples} == set(TASK_NAMES)
    assert reader.stats.kept == len(samples)
