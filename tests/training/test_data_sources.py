"""Several data sources in one run: the weighted mixture (a pure function of seed and step), the
trainer on a mixed-layout, multi-source config of upstream X2Edit shards beside our own, exact resume."""

import numpy as np
import pytest
from test_trainer import _edit_config, base_dir  # noqa: F401  (base_dir: the module's tiny pretrained base)
from upstream_writers import write_upstream_dataset

from x2edit.data_pipeline.sample import Sample
from x2edit.data_pipeline.shards import sample_record, write_tar
from x2edit.training.config import load_config
from x2edit.training.data import OTHER_TASK_ID
from x2edit.training.trainer import ReaderSource, SourceMixture, Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("x2edit_dataset")
    write_upstream_dataset(root)
    own = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    samples = []
    for i, task in enumerate(["color_change", "color_change", "subject_deletion", "subject_deletion"]):
        s = Sample(key=f"own-{i}", source=rng.integers(0, 255, (16, 24, 3), dtype=np.uint8),
                   target=rng.integers(0, 255, (16, 24, 3), dtype=np.uint8), instruction=f"own edit {i}", task=task)
        s.set_score("judge_sc", 8.0)
        samples.append(s)
    write_tar(own / "shard-000000.tar", (sample_record(s) for s in samples))
    return root, own


def _sources(root, own):
    return [
        {"format": "x2edit_upstream", "path": str(root / "step1x_score_72"), "filter_preset": "x2edit_upstream",
         "weight": 2},                                                                    # layout A
        {"format": "x2edit_upstream", "path": [str(root / "bagel_stage1"), str(root / "delete")]},  # layouts B, C
        {"format": "x2edit", "path": str(own), "filters": ["judge_sc >= 7"], "weight": 1},   # our own shards
    ]


def test_source_mixture_is_a_pure_function_that_follows_the_weights():
    mix = SourceMixture([3, 1], seed=5)
    located = [mix.locate(n) for n in range(2 * SourceMixture.CHUNK + 100)]
    # the k-th batch of a source is its k-th draw: counting in order gives the same numbers
    seen = [0, 0]
    for s, k in located:
        assert k == seen[s]
        seen[s] += 1
    assert abs(seen[0] / sum(seen) - 0.75) < 0.02
    fresh = SourceMixture([3, 1], seed=5)   # a resumed run locates a late batch first
    assert [fresh.locate(n) for n in (8000, 17, 4096)] == [located[8000], located[17], located[4096]]
    assert [m.locate(n) for m in [SourceMixture([3, 1], seed=6)] for n in range(64)] != located[:64]
    assert SourceMixture([2.5], seed=0).locate(123) == (0, 123)
    with pytest.raises(ValueError, match="positive"):
        SourceMixture([1, 0], seed=0)


def test_sources_config_is_checked(tmp_path):
    spec = {"format": "x2edit", "path": "x"}
    with pytest.raises(ValueError, match="data.source .* or data.sources .*not both"):
        load_config(None, ["model.base=b", f"data.source={spec}", f"data.sources={[spec]}"])
    with pytest.raises(ValueError, match=r"data.sources\[1\].weight must be a positive number, got 0"):
        load_config(None, ["model.base=b", f"data.sources={[spec, {**spec, 'weight': 0}]}"])
    with pytest.raises(ValueError, match=r"data.sources\[0\]: expected a reader mapping"):
        load_config(None, ["model.base=b", "data.sources=[x]"])
    cfg = load_config(None, ["model.base=b", f"data.sources={[spec]}", "data.buckets=true"])
    assert cfg.data.readers == [spec]


def test_reader_source_batches_come_from_one_source_each_and_repeat(tmp_path, data):
    root, own = data
    over = {"batch_size": 2, "data.sources": _sources(root, own), "data.resolution": 32}
    a = ReaderSource(_sources(root, own), _edit_config(tmp_path, "base", **over))
    b = ReaderSource(_sources(root, own), _edit_config(tmp_path, "base", **over))
    assert [len(ds) for ds in a.datasets] == [4, 8, 4]  # step1x after upstream's filter; bagel 3 + deletion 5; own
    plans = [a.batch(n) for n in range(40)]
    assert plans == [b.batch(n) for n in range(40)]
    bounds = [*a.offsets, len(a)]
    sources = [{next(s for s in range(3) if bounds[s] <= i < bounds[s + 1]) for i in batch} for batch in plans]
    assert all(len(s) == 1 for s in sources)                       # one source per batch
    counts = np.bincount([next(iter(s)) for s in sources], minlength=3)
    assert counts[0] > counts[1] > 0 and counts[2] > 0             # weight 2 : 1 : 1
    layouts = {a.datasets[1].records[i - bounds[1]].origin.split("/")[-3] for p in plans for i in p
               if bounds[1] <= i < bounds[2]}
    assert layouts == {"bagel_stage1", "delete"}
    item = a[plans[0][0]]
    assert item["source"].shape == item["target"].shape == (32, 32, 3) and isinstance(item["task"], int)


def test_other_labels_train_in_slot_15_only_with_the_slots_for_it(tmp_path, data):
    root, _ = data
    spec = {"format": "x2edit_upstream", "path": str(root / "Kontext_aspect1"), "on_other_task": "train"}
    cfg = _edit_config(tmp_path, "base", batch_size=4, **{"data.source": spec, "data.resolution": 16})
    src = ReaderSource([spec], cfg)
    assert sorted(src[i]["task"] for i in range(len(src))) == [11, 12, OTHER_TASK_ID, OTHER_TASK_ID]
    with pytest.raises(ValueError, match="adapter.num_task_slots must be > 15"):
        ReaderSource([spec], _edit_config(tmp_path, "base", **{"data.source": spec, "adapter.num_task_slots": 15}))


def test_mixed_layout_multi_source_training_resumes_exactly(tmp_path, data, base_dir):  # noqa: F811
    root, own = data
    # buckets; no contrastive loss: the tiny step1x source has no two samples of one task to pair
    over = {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "data.sources": _sources(root, own),
            "data.resolution": 32, "data.buckets": True, "loss.contrastive_weight": 0}
    straight = []
    trainer = Trainer(_edit_config(tmp_path / "a", base_dir, **over))
    texts = [trainer.batch(s)["text"] for s in range(4)]
    trainer.train(on_step=lambda s, p: straight.append(p["loss"]))
    assert len(straight) == 4 and all(np.isfinite(straight))
    first, resumed = [], []
    Trainer(_edit_config(tmp_path / "b", base_dir, **{**over, "steps": 2})).train(
        on_step=lambda s, p: first.append(p["loss"]))
    again = Trainer(_edit_config(tmp_path / "b", base_dir, **over))
    assert [again.batch(s)["text"] for s in range(4)] == texts
    again.train(resume="latest", on_step=lambda s, p: resumed.append(p["loss"]))
    assert first + resumed == straight
