"""Training data readers, score filters, aspect buckets and the batch sampler, on real files."""

import io
import json
import re
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from x2edit.training.buckets import BucketBatchSampler, assign_bucket, fit_pair, fit_to_bucket, make_buckets
from x2edit.training.data import (
    EditDataset,
    NoSamplesError,
    ScoreFilter,
    build_reader,
    list_readers,
    load_samples,
    normalize_task,
    parse_score,
)

# -- helpers: tiny real images and tars --------------------------------------------------------


def _img(color, size=(24, 16)):
    return Image.new("RGB", size, color)


def _encode(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _noisy_png(size=(64, 64), seed=0):
    rng = np.random.default_rng(seed)
    return _encode(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)))


def _write_tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _own_sample(key, color, task="color_change", scores=None, instruction=None):
    meta = {"instruction": instruction or f"make it {key}", "task": task, "scores": scores or {"sc": 8.0},
            "provenance": {"generator": "shapeworld", "seed": 1, "source_id": key}}
    return [(f"{key}.src.png", _encode(_img(color))), (f"{key}.tgt.png", _encode(_img(color[::-1]))),
            (f"{key}.json", json.dumps(meta).encode())]


def _up_sample(key, meta, size=(24, 16)):
    return [(f"{key}.1.0.jpg", _encode(_img((200, 10, 10), size), "JPEG")),
            (f"{key}.2.jpg", _encode(_img((10, 10, 200), size), "JPEG")), (f"{key}.json", json.dumps(meta).encode())]


# -- x2edit shards -----------------------------------------------------------------------------


def test_own_shards_values_and_corrupt_members(tmp_path):
    members = _own_sample("a", (255, 0, 0)) + _own_sample("b", (0, 255, 0), task="Subject Deletion",
                                                          scores={"sc": 6, "overall": 7.5})
    members += [("c.src.png", b"not a png"), *_own_sample("c", (1, 2, 3))[1:]]  # undecodable source
    cut = _noisy_png((48, 32))[:1500]  # header fine (same aspect as the target), pixel data cut short
    members += [("d.src.png", cut), *_own_sample("d", (1, 2, 3))[1:]]
    members += _own_sample("e", (9, 9, 9))[1:]  # no e.src.png
    _write_tar(tmp_path / "shard-000.tar", members)

    reader = build_reader({"format": "x2edit", "path": str(tmp_path)})
    samples = list(reader)
    assert [s.key for s in samples] == ["a", "b"]
    a, b = samples
    assert a.source.mode == "RGB" and a.source.getpixel((3, 3)) == (255, 0, 0)
    assert a.target.getpixel((3, 3)) == (0, 0, 255)
    assert (a.instruction, a.task, a.scores) == ("make it a", "color_change", {"sc": 8.0})
    assert a.origin == str(tmp_path / "shard-000.tar")
    assert (b.task, b.scores) == ("subject_deletion", {"sc": 6.0, "overall": 7.5})
    assert reader.stats.seen == 5 and reader.stats.kept == 2
    assert reader.stats.dropped_by_reason == {"decode_error": 2, "missing_member": 1}
    assert "e.json" not in reader.stats.examples["missing_member"][0]
    assert "no src.png" in reader.stats.examples["missing_member"][0]

    # the index reads headers only: the cut PNG passes it and yields None when loaded
    ds = EditDataset({"format": "x2edit", "path": str(tmp_path / "shard-000.tar")})
    assert [r.key for r in ds.records] == ["a", "b", "d"] and ds.sizes == [(24, 16), (24, 16), (48, 32)]
    assert ds.stats.dropped_by_reason == {"decode_error": 1, "missing_member": 1}
    assert ds[0].source.getpixel((0, 0)) == (255, 0, 0) and ds[2] is None


def test_own_shards_refuse_non_numeric_scores(tmp_path):
    _write_tar(tmp_path / "s.tar", _own_sample("a", (1, 1, 1), scores={"sc": "8"}) + _own_sample("b", (2, 2, 2))
               + _own_sample("c", (3, 3, 3), scores={"sc": None, "pq": 7}))  # null: the scorer could not score
    reader = build_reader({"format": "x2edit", "path": str(tmp_path / "s.tar")})
    assert [(s.key, s.scores) for s in reader] == [("b", {"sc": 8.0}), ("c", {"pq": 7.0})]
    assert reader.stats.dropped_by_reason == {"bad_metadata": 1}
    filtered = build_reader({"format": "x2edit", "path": str(tmp_path / "s.tar"), "filters": ["sc > 1"]})
    assert [s.key for s in filtered] == ["b"]
    assert filtered.stats.dropped_by_reason == {"bad_metadata": 1, "missing_score: sc": 1}
    assert "non-numeric scores" in reader.stats.examples["bad_metadata"][0]


@pytest.mark.parametrize("where", ["inside_member", "member_boundary"])
def test_truncated_tar_uses_readable_samples(tmp_path, where):
    members = sum((_own_sample(k, (i * 40, 0, 0)) for i, k in enumerate("abcd")), [])
    full = _write_tar(tmp_path / "full.tar", members).read_bytes()
    # member offsets: each sample is 3 members; cut inside / right after c's first member's data
    with tarfile.open(tmp_path / "full.tar") as tf:
        c_src = tf.getmember("c.src.png")
    cut = c_src.offset_data + 100 if where == "inside_member" else c_src.offset_data + 512 * (-(-c_src.size // 512))
    (tmp_path / "full.tar").unlink()
    (tmp_path / "cut.tar").write_bytes(full[:cut])
    for use_index in (False, True):
        reader = build_reader({"format": "x2edit", "path": str(tmp_path)})
        keys = [r.key for r in reader.index()] if use_index else [s.key for s in reader]
        assert keys == ["a", "b"]
        assert reader.stats.dropped_by_reason["truncated_shard"] == 1
        assert "2 samples read before it" in reader.stats.examples["truncated_shard"][0]


# -- upstream X2Edit shards --------------------------------------------------------------------


@pytest.mark.parametrize("value, reduce, expected", [
    (7, "mean", 7.0), ("7.5", "mean", 7.5), ("[7.5, 8.0]", "mean", 7.75), ("['8', '9']", "mean", 8.5),
    ([6, "9"], "min", 6.0), ("[6, 9]", "sum", 15.0), ("(3, 5)", "max", 5.0), (" 4 ", "mean", 4.0),
    ("None", "mean", None), ("", "mean", None), ("[]", "mean", None), ("[7, 'x']", "mean", None),
    (True, "mean", None), (float("nan"), "mean", None), ("[[1, 2]]", "mean", None), ("__import__('os')", "mean", None),
    ({"a": 1}, "mean", None),
])
def test_parse_score(value, reduce, expected):
    assert parse_score(value, reduce) == expected


def test_upstream_shards_scores_tasks_and_filters(tmp_path):
    metas = {
        "000": {"instruction": "make the car red", "task": "Color Change", "score_7b": "[7, 8]",
                "score": "['8', '9']", "liqe_score": 3.5, "aesthetic_score_v2_5": "5.25", "label": "step1x"},
        "001": {"instruction": "remove the man", "task": "subject-deletion", "score_7b": "[9, 10]"},
        "002": {"instruction": "zoom in", "task": "CAMERA_MOVE", "score": "None"},
        "003": {"instruction": "make it night", "task": "tone transform", "score_7b": "[3, 4]"},
    }
    _write_tar(tmp_path / "up.tar", sum((_up_sample(k, m) for k, m in metas.items()), []))
    reader = build_reader({"format": "x2edit_upstream", "path": str(tmp_path / "*.tar")})
    samples = {s.key: s for s in reader}
    assert samples["000"].scores == {"score_7b": 7.5, "score": 8.5, "liqe_score": 3.5, "aesthetic_score_v2_5": 5.25}
    assert [s.task for s in samples.values()] == ["color_change", "subject_deletion", "camera_move", "tone_transform"]
    assert samples["002"].scores == {}
    src = np.asarray(samples["000"].source, dtype=int)
    assert abs(src[..., 0].mean() - 200) < 6 and src[..., 2].mean() < 20  # JPEG: close to the written red

    filtered = build_reader({"format": "x2edit_upstream", "path": str(tmp_path), "filters": ["score_7b >= 7"],
                             "list_reduce": "min"})
    assert [s.key for s in filtered] == ["000", "001"]
    assert filtered.stats.dropped_by_reason == {"missing_score: score_7b": 1, "filter: score_7b >= 7": 1}
    assert filtered.stats.examples["filter: score_7b >= 7"] == [f"{tmp_path / 'up.tar'}:003: score_7b = 3"]

    only = build_reader({"format": "x2edit_upstream", "path": str(tmp_path), "score_keys": ["liqe_score"]})
    assert next(iter(only)).scores == {"liqe_score": 3.5}


def test_unknown_task_labels(tmp_path):
    # 色调变化 ("tone change") is a plausible VLM label outside upstream's table (which has 色调变换)
    metas = {"k0": {"instruction": "erase it", "task": "色调变化"}, "k1": {"instruction": "red", "task": "color_change"}}
    _write_tar(tmp_path / "up.tar", sum((_up_sample(k, m) for k, m in metas.items()), []))
    cfg = {"format": "x2edit_upstream", "path": str(tmp_path)}
    with pytest.raises(ValueError, match=r"up.tar:k0: unknown task label '色调变化'"):
        list(build_reader(cfg))
    (scanned,) = [s for s in build_reader(cfg).scan() if s.outcome != "kept"]  # inspect shows it, not raise
    assert (scanned.outcome, scanned.detail) == ("unknown_task", "'色调变化' (on_unknown_task: error: training stops here)")
    skip = build_reader({**cfg, "on_unknown_task": "skip"})
    assert [s.key for s in skip] == ["k1"] and skip.stats.dropped_by_reason == {"unknown_task": 1}
    aliased = build_reader({**cfg, "task_aliases": {"色调变化": "tone_transform"}})
    assert [s.task for s in aliased] == ["tone_transform", "color_change"]
    as_other = build_reader({**cfg, "on_unknown_task": "other", "on_other_task": "train"})
    assert [s.task for s in as_other] == ["other", "color_change"]
    with pytest.raises(ValueError, match=r"task_aliases\['removal'\]: unknown task 'deletion'"):
        build_reader({**cfg, "task_aliases": {"removal": "deletion"}})
    assert normalize_task(" Low-Level ") == "low_level"


# -- filters and empty results -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["sc >> 7", "sc >= abc", "__import__('os').system('x') > 1", "7 <= sc", "sc", "",
                                  "sc >= 7 and 1"])
def test_bad_filter_expressions_are_refused_at_construction(tmp_path, text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        build_reader({"format": "x2edit", "path": str(tmp_path), "filters": [text]})


def test_filter_parse_and_no_samples_error(tmp_path):
    f = ScoreFilter.parse("  overall>6.5 ")
    assert (f.score, f.op, f.value, str(f)) == ("overall", ">", 6.5, "overall > 6.5")
    assert f.holds(6.6) and not f.holds(6.5)
    assert ScoreFilter.parse("clip_sim != -1e-3").value == -0.001

    _write_tar(tmp_path / "s.tar", _own_sample("a", (1, 1, 1), scores={"sc": 5}) + _own_sample("b", (2, 2, 2)))
    reader = build_reader({"format": "x2edit", "path": str(tmp_path), "filters": ["sc >= 9", "overall > 1"]})
    with pytest.raises(NoSamplesError, match=r"seen 2, kept 0.*filters: 'sc >= 9', 'overall > 1'"):
        list(reader)
    assert reader.stats.dropped_by_reason == {"filter: sc >= 9": 2}
    with pytest.raises(NoSamplesError):
        EditDataset(reader)


# -- folders, JSONL, parquet -------------------------------------------------------------------


def test_paired_folder(tmp_path):
    targets, controls = tmp_path / "edited", tmp_path / "control"
    targets.mkdir(), controls.mkdir()
    for name, color in [("a", (10, 20, 30)), ("b", (40, 50, 60)), ("c", (1, 1, 1)), ("d", (2, 2, 2))]:
        _img(color).save(targets / f"{name}.png")
        if name != "c":
            (targets / f"{name}.txt").write_text(f"  edit {name}\n")
    _img((7, 7, 7)).save(controls / "a.png")
    _img((8, 8, 8)).save(controls / "b.jpg")  # same stem, other extension
    _img((9, 9, 9)).save(controls / "c.png")  # c has no caption, d no source
    reader = build_reader({"format": "paired_folder", "path": str(targets), "control_path": str(controls),
                           "task": "Style Change"})
    samples = list(reader)
    assert [(s.key, s.instruction, s.task) for s in samples] == [("a", "edit a", "style_change"),
                                                                 ("b", "edit b", "style_change")]
    assert samples[0].source.getpixel((0, 0)) == (7, 7, 7) and samples[0].target.getpixel((0, 0)) == (10, 20, 30)
    assert reader.stats.dropped_by_reason == {"missing_caption": 1, "missing_image": 1}


def test_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    _img((100, 0, 0)).save(tmp_path / "img" / "t1.png")
    _img((0, 100, 0)).save(tmp_path / "img" / "s1.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG garbage")
    _img((0, 0, 1), (48, 16)).save(tmp_path / "img" / "wide.png")
    lines = [
        {"image_path": "img/t1.png", "control_path": "img/s1.png", "caption": "make it red", "task": "color change",
         "scores": {"sc": "[8, 9]"}},
        {"image_path": "img/bad.png", "control_path": "img/s1.png", "caption": "x"},
        {"image_path": "img/t1.png", "control_path": "img/missing.png", "caption": "x"},
        {"image_path": "img/t1.png", "caption": "no control"},
        {"image_path": "img/wide.png", "control_path": "img/s1.png", "caption": "3:1 target for a 3:2 source"},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join([*map(json.dumps, lines), "{not json"]) + "\n\n")
    reader = build_reader({"format": "jsonl", "path": str(tmp_path / "data.jsonl")})
    (s,) = list(reader)
    assert (s.key, s.instruction, s.task, s.scores) == ("1", "make it red", "color_change", {"sc": 8.5})
    assert s.source.getpixel((0, 0)) == (0, 100, 0) and s.target.getpixel((0, 0)) == (100, 0, 0)
    assert reader.stats.dropped_by_reason == {"decode_error": 2, "bad_metadata": 2, "aspect_mismatch": 1}
    assert reader.stats.seen == 6
    assert reader.stats.examples["aspect_mismatch"] == [f"{tmp_path / 'data.jsonl'}:5: source 24x16 and target "
                                                        "48x16 have different aspect ratios"]
    ds = EditDataset({"format": "jsonl", "path": str(tmp_path)})
    assert [r.key for r in ds.records] == ["1"]
    assert ds.stats.dropped_by_reason == {"decode_error": 2, "bad_metadata": 2, "aspect_mismatch": 1}


def test_parquet_image_cells_and_column_map(tmp_path):
    _img((0, 0, 90)).save(tmp_path / "src_on_disk.png")
    hf_image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image() storage
    table = pa.table({
        "input_image": pa.array([{"bytes": _encode(_img((1, 2, 3))), "path": "ignored.png"},
                                 {"bytes": _encode(_img((4, 5, 6))), "path": None},
                                 {"bytes": None, "path": "src_on_disk.png"}, {"bytes": None, "path": None}],
                                type=hf_image),
        "edited_image": [_encode(_img((9, 9, 9)))] * 4,
        "edit_prompt": ["a", "b", "c", "d"], "task": ["color_change", "Text Change", None, None],
        "quality": ["[7, 9]", "3", "9", "9"],
    })
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=2)
    cfg = {"format": "parquet", "path": str(tmp_path / "train.parquet"),
           "columns": {"source": "input_image", "target": "edited_image", "instruction": "edit_prompt",
                       "task": "task"}, "score_columns": ["quality"], "filters": ["quality > 5"]}
    reader = build_reader(cfg)
    samples = list(reader)
    assert [(s.key, s.task, s.scores["quality"]) for s in samples] == [("0", "color_change", 8.0), ("2", None, 9.0)]
    assert samples[1].source.getpixel((0, 0)) == (0, 0, 90) and samples[0].target.getpixel((0, 0)) == (9, 9, 9)
    assert samples[0].source.getpixel((0, 0)) == (1, 2, 3)
    assert reader.stats.dropped_by_reason == {"filter: quality > 5": 1, "missing_image": 1}

    ds = EditDataset(cfg)  # index: bytes cells become (file, row group, row) references, paths stay paths
    assert [type(r.source).__name__ for r in ds.records] == ["ParquetCell", "PosixPath"]
    assert ds.records[1].target.row_group == 1 and ds[1].target.getpixel((0, 0)) == (9, 9, 9)
    assert ds[0].source.getpixel((0, 0)) == (1, 2, 3)

    (tmp_path / "paths").mkdir()
    pq.write_table(pa.table({"s": ["../src_on_disk.png"], "t": ["../src_on_disk.png"], "p": ["same"]}),
                   tmp_path / "paths" / "p.parquet")
    (s,) = build_reader({"format": "parquet", "path": str(tmp_path / "paths"),
                         "columns": {"source": "s", "target": "t", "instruction": "p"}})
    assert s.source.getpixel((0, 0)) == (0, 0, 90) and s.task is None

    with pytest.raises(ValueError, match=r"no column\(s\) \['prompt'\]"):
        list(build_reader({**cfg, "columns": {**cfg["columns"], "instruction": "prompt"}}))
    with pytest.raises(ValueError, match=r"missing role\(s\) \['target'\]"):
        build_reader({"format": "parquet", "path": str(tmp_path), "columns": {"source": "a", "instruction": "b"}})


def test_build_reader_errors(tmp_path):
    assert list_readers() == ["jsonl", "paired_folder", "parquet", "x2edit", "x2edit_upstream"]
    with pytest.raises(ValueError, match="data format 'webdataset' is unknown: expected one of jsonl"):
        build_reader({"format": "webdataset", "path": "x"})
    with pytest.raises(ValueError, match="unknown option.*control for data format 'paired_folder'"):
        build_reader({"format": "paired_folder", "path": str(tmp_path), "control": "y"})
    with pytest.raises(ValueError, match="needs option.*control_path"):
        build_reader({"format": "paired_folder", "path": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="nothing found"):
        list(build_reader({"format": "x2edit", "path": str(tmp_path / "nope-*.tar")}))


# -- buckets and the batch sampler -------------------------------------------------------------


def test_make_and_assign_buckets():
    buckets = make_buckets(area=512 * 512, multiple=16, max_ratio=2.0)
    assert (512, 512) in buckets and (368, 704) in buckets and (704, 368) in buckets
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert all(max(w / h, h / w) <= 2.0 for w, h in buckets)
    assert buckets == sorted(buckets, key=lambda b: b[0] / b[1]) and len(buckets) == len(set(buckets))
    assert assign_bucket((1000, 1000), buckets) == (512, 512)
    assert (720, 352) not in buckets  # 2.045 > max_ratio
    assert assign_bucket((2000, 1000), buckets) == (704, 368)
    assert assign_bucket((1000, 3000), buckets) == (368, 704)
    assert set(buckets) == {(h, w) for w, h in buckets}
    assert assign_bucket((300, 200), [(64, 64), (96, 64), (64, 96)]) == (96, 64)
    with pytest.raises(ValueError, match="area"):
        make_buckets(area=100, multiple=16)


def test_fit_pair_resizes_and_center_crops_identically():
    # 200x100: left quarter red, middle half green, right quarter blue -> (64, 64) keeps the green middle
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, :50] = (255, 0, 0)
    a[:, 50:150] = (0, 255, 0)
    a[:, 150:] = (0, 0, 255)
    src = Image.fromarray(a)
    tgt = src.resize((400, 200), Image.Resampling.NEAREST)  # same aspect, twice the resolution
    s, t = fit_pair(src, tgt, (64, 64))
    assert s.size == t.size == (64, 64)
    assert s.getpixel((32, 32)) == t.getpixel((32, 32)) == (0, 255, 0)
    assert s.getpixel((1, 32))[1] > 200 and s.getpixel((62, 32))[1] > 200  # crop edges fall in the green half
    wide = fit_to_bucket(src, (96, 32))  # 3:1 bucket: full width kept, rows cropped
    assert wide.size == (96, 32) and wide.getpixel((2, 16))[0] > 200 and wide.getpixel((93, 16))[2] > 200


def _sampler_data():
    sizes = [(64, 64)] * 20 + [(128, 64)] * 13 + [(64, 128)] * 7
    tasks = [["color_change", "style_change", "text_change", "camera_move"][i % 4] for i in range(20)]
    tasks += ["color_change"] * 6 + ["low_level"] * 5 + ["action_change"] * 2 + ["tone_transform"] * 7
    return sizes, tasks, [(64, 64), (96, 48), (48, 96)]


def test_bucket_batch_sampler_is_deterministic_and_bucket_pure():
    sizes, tasks, buckets = _sampler_data()
    s = BucketBatchSampler(sizes, buckets, 4, seed=3)
    first = list(s)
    assert first == list(BucketBatchSampler(sizes, buckets, 4, seed=3))
    assert first != list(BucketBatchSampler(sizes, buckets, 4, seed=4))
    s.set_epoch(1)
    assert list(s) != first and sorted(map(sorted, s)) != sorted(map(sorted, first))
    assert sorted(i for b in first for i in b) == list(range(40)) and len(s) == len(first) == 5 + 4 + 2
    for batch in first:
        assert len({assign_bucket(sizes[i], buckets) for i in batch}) == 1
    dropped = list(BucketBatchSampler(sizes, buckets, 4, seed=3, drop_last=True))
    assert all(len(b) == 4 for b in dropped) and len(dropped) == 5 + 3 + 1


def _balanced(batch):
    return min(Counter(batch).values()) >= 2


def test_balanced_task_batches_pair_every_task():
    sizes, tasks, buckets = _sampler_data()
    sampler = BucketBatchSampler(sizes, buckets, 4, tasks=tasks, balanced_tasks=True, seed=0)
    batches = list(sampler)
    assert batches == list(BucketBatchSampler(sizes, buckets, 4, tasks=tasks, balanced_tasks=True, seed=0))
    assert sorted(i for b in batches for i in b) == list(range(40))
    # per bucket: 4 tasks x 5 -> 4 batches + 4 singletons; 6/5/2 -> 3 batches + 1; 7 -> 1 batch + 3
    head, tail = batches[:8], batches[8:]
    assert all(len(b) == 4 and _balanced([tasks[i] for i in b]) for b in head)
    assert all(len({assign_bucket(sizes[i], buckets) for i in b}) == 1 for b in batches)
    assert sorted(len(b) for b in tail) == [1, 3, 4]  # partner-less leftovers come last
    assert Counter(tasks[i] for b in tail for i in b) == {"color_change": 1, "style_change": 1, "text_change": 1,
                                                         "camera_move": 1, "low_level": 1, "tone_transform": 3}
    # plain batching breaks pairs: the property is not an accident of the data
    plain = list(BucketBatchSampler(sizes, buckets, 4, seed=0))
    assert any(not _balanced([tasks[i] for i in b]) for b in plain if len(b) == 4)


def test_balanced_task_batches_odd_size_uses_a_triple():
    sizes, tasks, buckets = _sampler_data()
    batches = list(BucketBatchSampler(sizes, buckets, 5, tasks=tasks, balanced_tasks=True, seed=1, drop_last=True))
    assert len(batches) >= 5
    for b in batches:
        counts = sorted(Counter(tasks[i] for i in b).values())
        assert len(b) == 5 and counts in ([2, 3], [5]), counts


def test_edit_dataset_buckets_and_load_samples(tmp_path):
    wide = [(f"w{i}.{s}", _encode(_img((i * 50, 0, 0), (64, 32)))) for i in range(3) for s in ("src.png", "tgt.png")]
    meta = [(f"w{i}.json", json.dumps({"instruction": "x", "task": "color_change", "scores": {}}).encode())
            for i in range(3)]
    _write_tar(tmp_path / "wide.tar", sorted(wide + meta))
    _write_tar(tmp_path / "sq.tar", sum((_own_sample(k, (0, 9, 0)) for k in "pq"), []))
    configs = [{"format": "x2edit", "path": str(tmp_path / "wide.tar")},
               {"format": "x2edit", "path": str(tmp_path / "sq.tar")}]
    ds = EditDataset(configs, buckets=[(32, 32), (48, 24), (24, 48)])
    assert len(ds) == 5 and ds.tasks == ["color_change"] * 5 and ds.stats.kept == 5
    assert ds[0].source.size == ds[0].target.size == (48, 24)
    assert ds[3].source.size == (48, 24)  # 24x16 (ratio 1.5) is nearer 2:1 than 1:1 in log space
    batches = list(ds.batch_sampler(2, seed=1))
    assert sorted(i for b in batches for i in b) == list(range(5))

    samples = load_samples({**configs[1], "filters": ["sc > 7"]}, resolution=16, filters=["sc < 9"])
    assert [s.source.size for s in samples] == [(16, 16)] * 2 and samples[0].source.getpixel((8, 8)) == (0, 9, 0)
    with pytest.raises(NoSamplesError, match="filters: 'sc > 7', 'sc >= 9'"):
        load_samples({**configs[1], "filters": ["sc > 7"]}, filters=["sc >= 9"])


def test_compressed_shards_stream_but_cannot_be_indexed(tmp_path):
    with tarfile.open(tmp_path / "s.tar.gz", "w:gz") as tf:
        for name, data in _own_sample("a", (5, 6, 7)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    cfg = {"format": "x2edit", "path": str(tmp_path)}
    assert [s.source.getpixel((0, 0)) for s in build_reader(cfg)] == [(5, 6, 7)]
    with pytest.raises(ValueError, match="is compressed: an index needs random access"):
        EditDataset(cfg)
