"""x2edit train mode incontext (IC-LoRA): 2-panel [before | after] sets under a joint caption, a task LoRA
trained as text-to-image on the canvas, validated by training-free inpainting of the right panel."""

import json

import pytest
from tiny_configs import tiny_config

from x2edit.adapters import read_adapter_header
from x2edit.incontext import check_caption
from x2edit.training.trainer import Trainer


def _config(tmp_path, **over):
    return tiny_config(tmp_path, **{"mode": "t2i", **over})


@pytest.fixture(scope="module")
def t2i_base(tmp_path_factory):
    return Trainer(_config(tmp_path_factory.mktemp("t2i"))).train() / "pipeline"


def test_incontext_trains_a_task_lora_on_captioned_sets(t2i_base, tmp_path):
    cfg = _config(tmp_path, mode="incontext", validate_every=2, **{"model.base": str(t2i_base),
                  "adapter": {"kind": "lora", "rank": 2}, "data.validation_pairs": 1})
    trainer = Trainer(cfg)
    batch = trainer.batch(0)
    assert batch["source"] is None and batch["target"][0].shape == (32, 64, 3)
    for text in batch["text"]:
        check_caption(text, 2)
        assert text.startswith("[EDIT] ")
    out = trainer.train()
    assert read_adapter_header(out / "adapter.safetensors")["config"].kind == "lora"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val/edit_gain_db" in row for row in logged) and (out / "validation").is_dir()


def test_incontext_refuses_what_it_cannot_train_on(t2i_base, tmp_path):
    for over, message in [({"loss.weighting": "x0_edit"}, "x0_edit"), ({"loss.mask_weight": 1.0}, "mask_weight")]:
        with pytest.raises(ValueError, match=message):
            _config(tmp_path, mode="incontext", **{"model.base": str(t2i_base), **over})
    # an adapter is encoded at its base's budget (48 here), as the pipeline encodes it at inference
    longer = Trainer(_config(tmp_path, mode="incontext", **{"model.base": str(t2i_base), "model.max_text_tokens": 64,
                                                             "adapter": {"rank": 2}}))
    assert longer.pipe.tokenizer.model_max_length == 48
    one_step = tmp_path / "one_step"
    import shutil

    shutil.copytree(t2i_base, one_step)
    (one_step / "x2edit_embedded.json").write_text('{"source_start": 0.5, "reference_tokens": false}')
    with pytest.raises(ValueError, match="IC-LoRA trains on a text-to-image base"):
        Trainer(_config(tmp_path, mode="incontext", **{"model.base": str(one_step), "adapter": {"rank": 2}}))


def test_build_data_shards_are_panel_sets_the_incontext_trainer_reads(t2i_base, tmp_path):
    """x2edit build-data writes each Shape World pair's scene captions (a 2-panel set); the reader carries them and
    mode incontext trains from the shards. Shards without captions are refused, naming the sample."""
    import io
    import tarfile

    from x2edit.cli import main
    from x2edit.training.data import EditDataset
    from x2edit.training.trainer import TrainingError

    shards = tmp_path / "shards"
    assert main(["build-data", "--no-progress", "--out", str(shards), "--num-samples", "8", "--workers", "1",
                 "writer.samples_per_shard=8"]) == 0
    ds = EditDataset({"format": "x2edit", "path": str(shards)})
    assert all(r.captions is not None and all(r.captions) for r in ds.records)
    spec = {"format": "x2edit", "path": str(shards)}
    cfg = _config(tmp_path, mode="incontext", **{"model.base": str(t2i_base), "adapter": {"kind": "lora", "rank": 2},
                                                 "data.source": spec, "data.resolution": 32})
    trainer = Trainer(cfg)
    batch = trainer.batch(0)
    for text in batch["text"]:
        check_caption(text, 2)
    trainer.train()

    # the same shards with the captions taken out of every sample's JSON
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in shards.glob("*.tar"):
        with tarfile.open(tar) as src, tarfile.open(bare / tar.name, "w") as dst:
            for m in src.getmembers():
                data = src.extractfile(m).read()
                if m.name.endswith(".json"):
                    meta = json.loads(data)
                    meta.pop("captions", None)
                    data = json.dumps(meta).encode()
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
    cfg = _config(tmp_path / "b", mode="incontext", **{"model.base": str(t2i_base), "adapter": {"rank": 2},
                                                      "data.source": {"format": "x2edit", "path": str(bare)},
                                                      "data.resolution": 32})
    with pytest.raises(TrainingError, match="needs each pair's scene captions"):
        Trainer(cfg).batch(0)


def test_three_panel_color_sets_from_build_data_train_the_incontext_mode(t2i_base, tmp_path):
    """configs/build_data/shapeworld_color_sets.yaml writes one object in 3 colours per sample (src, tgt and
    panel2.png, 3 captions, the joint caption); the reader carries the third panel and the caption; mode
    incontext trains on 3-panel canvases under that caption. A sample that lost its third panel is dropped,
    named; sets of two sizes in one batch are refused."""
    import tarfile
    from pathlib import Path

    from x2edit.cli import main
    from x2edit.data_pipeline.shards import read_shards, shard_paths
    from x2edit.training.data import EditDataset
    from x2edit.training.trainer import TrainingError, _incontext_batch

    config = Path(__file__).parents[2] / "configs" / "build_data" / "shapeworld_color_sets.yaml"
    shards = tmp_path / "sets"
    assert main(["build-data", "--no-progress", "--config", str(config), "--out", str(shards), "--num-samples", "6",
                 "--workers", "1"]) == 0
    written = list(read_shards(shard_paths(shards)))
    assert len(written) == 6 and all(len(s.panels) == 1 and s.meta["panels"] == 3 for s in written)
    ds = EditDataset({"format": "x2edit", "path": str(shards)})
    sample = ds[0]
    assert len(sample.panels) == 1 and sample.panels[0].size == sample.target.size and len(sample.captions) == 3
    check_caption(sample.set_caption, 3)

    cfg = _config(tmp_path, mode="incontext", **{"model.base": str(t2i_base), "adapter": {"kind": "lora", "rank": 2},
                                                 "data.source": {"format": "x2edit", "path": str(shards)},
                                                 "data.resolution": 32})
    trainer = Trainer(cfg)
    batch = trainer.batch(0)
    assert all(t.shape == (32, 96, 3) for t in batch["target"])  # [panel 1 | panel 2 | panel 3]
    assert all(text.startswith("[COLORS] one scene, the ") and "[PANEL-3]" in text for text in batch["text"])
    trainer.train()

    pair = {"captions": ("a", "b"), "origin": "x"}
    with pytest.raises(TrainingError, match="mixes sets of 2 and 3 panels"):
        _incontext_batch({"source": batch["target"][:2], "target": batch["target"][:2], "text": ["x", "y"]},
                         [pair, {**pair, "panels": [batch["target"][0]], "set_caption": sample.set_caption}])

    # the same shard with one sample's third panel taken out: that sample is dropped, the rest read
    (tar,) = Path(shard_paths(shards)[0]).parent.glob("shard-*.tar")
    cut = tmp_path / "cut" / tar.name
    cut.parent.mkdir()
    with tarfile.open(tar) as src, tarfile.open(cut, "w") as dst:
        lost = None
        for m in src.getmembers():
            if m.name.endswith(".panel2.png") and lost is None:
                lost = m.name.split(".")[0]
                continue
            dst.addfile(m, src.extractfile(m))
    ds = EditDataset({"format": "x2edit", "path": str(cut.parent)})
    assert len(ds) == 5 and lost in str(ds.stats.examples.get("missing_member"))
