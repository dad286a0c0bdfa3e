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
