"""Shard writing (atomic, WebDataset layout) and tolerant reading."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np

from x2edit.data_pipeline.sample import Sample
from x2edit.data_pipeline.shards import ReadReport, read_shard, sample_record, write_tar


def _samples(n: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        s = Sample(key=f"k-{i:04d}", source=(rng.random((16, 16, 3)) * 255).astype(np.uint8),
                   target=(rng.random((16, 16, 3)) * 255).astype(np.uint8), mask=rng.random((16, 16)) > 0.5,
                   instruction=f"make thing {i} blue", task="color_change")
        s.set_score("psnr_outside", 31.5)
        s.set_score("judge_sc", None, "unparseable judge answer: empty answer")
        s.provenance["seed"] = i
        out.append(s)
    return out


def test_roundtrip(tmp_path):
    samples = _samples(3)
    path = tmp_path / "shard-000000.tar"
    assert write_tar(path, (sample_record(s) for s in samples)) == 3
    assert not list(tmp_path.glob("*.tmp"))
    with tarfile.open(path) as tf:
        names = tf.getnames()
    assert names[:4] == ["k-0000.json", "k-0000.mask.png", "k-0000.src.png", "k-0000.tgt.png"]
    report = ReadReport()
    back = list(read_shard(path, report))
    assert report.ok and report.samples == 3
    for s, b in zip(samples, back):
        assert b.key == s.key
        assert np.array_equal(b.source, s.source) and np.array_equal(b.target, s.target)
        assert np.array_equal(b.mask, s.mask)
        assert b.instruction == s.instruction and b.task == "color_change"
        assert b.meta["task_id"] == 4 and b.meta["width"] == 16
        assert b.scores == {"psnr_outside": 31.5, "judge_sc": None}
        assert b.meta["score_notes"]["judge_sc"].startswith("unparseable")


def test_same_samples_same_bytes(tmp_path):
    write_tar(tmp_path / "a.tar", (sample_record(s) for s in _samples(2)))
    write_tar(tmp_path / "b.tar", (sample_record(s) for s in _samples(2)))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_truncated_tar_yields_readable_samples_and_reports(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, (sample_record(s) for s in _samples(5)))
    data = path.read_bytes()
    # Cut in the middle of the 4th sample's members.
    with tarfile.open(path) as tf:
        cut = [m for m in tf.getmembers() if m.name.startswith("k-0003")][1].offset_data + 10
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    report = ReadReport()
    back = list(read_shard(tmp_path / "cut.tar", report))
    assert [b.key for b in back] == ["k-0000", "k-0001", "k-0002"]
    assert len(report.truncated) == 1 and report.truncated[0]["samples_read"] == 3
    assert report.incomplete and report.incomplete[0]["key"] == "k-0003"
    assert "truncated" in report.summary()


def test_incomplete_sample_is_skipped(tmp_path):
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in [("a.src.png", b"x"), ("a.json", b"{}"), ("b.json", json.dumps({"k": 1}).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    report = ReadReport()
    assert list(read_shard(path, report, decode=False)) == []
    assert {i["key"] for i in report.incomplete} == {"a", "b"}
