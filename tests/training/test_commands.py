"""bundle -> load by path -> `x2edit demo` and `x2edit eval` on a tiny trained model (few steps)."""

import json

import pytest
from test_trainer import _config

from training.bundle import bundle
from training.trainer import Trainer
from x2edit.adapters import adapter_names
from x2edit.cli import main
from x2edit.registry import load_pipeline


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    base = Trainer(_config(tmp / "b", steps=2, checkpoint_every=0, **{"data.resolution": 64})).train()
    edit = Trainer(_config(tmp / "e", mode="edit", steps=2, checkpoint_every=0, **{
        "model.base": str(base / "pipeline"), "data.resolution": 64,
        "adapter": {"rank": 2, "num_experts": 3, "top_k": 2, "task_embed_dim": 8}})).train()
    return bundle(str(base / "pipeline"), str(edit / "adapter.safetensors"), str(tmp / "tiny"),
                  max_text_tokens=16, classifier_samples=150)


def test_bundle_has_no_sentence_encoder_and_loads_by_path(bundled):
    assert not (bundled / "text_encoder").exists() and (bundled / "task_classifier.safetensors").is_file()
    pipe = load_pipeline(bundled)
    assert adapter_names(pipe.transformer) == ["default"]
    assert pipe.tokenizer.model_max_length == 16
    assert pipe.text_encoder.config.hidden_size == 384  # the real all-MiniLM-L6-v2 from its package
    size = sum(f.stat().st_size for f in bundled.rglob("*") if f.is_file())
    assert size < 1e6  # the test model is tiny; the real bundle is checked by tests/x2edit/test_embedded.py


def test_demo_writes_grid_and_metrics(bundled, tmp_path, capsys):
    assert main(["demo", "--base", str(bundled), "--out", str(tmp_path), "--n-per-task", "1", "--steps", "2"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len([k for k in metrics if k not in ("mean", "classifier_accuracy", "routing", "steps")]) == 15
    assert 0 <= metrics["classifier_accuracy"] <= 1 and metrics["mean"]["n"] == 15
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert "edit gain" in capsys.readouterr().out


def test_eval_shapeworld(bundled, tmp_path):
    assert main(["eval", "--base", str(bundled), "--out", str(tmp_path), "--n-per-task", "1", "--steps", "1"]) == 0
    rows = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 15 and "edit_gain_db" in json.loads(rows[0])
    assert main(["eval", "--base", str(bundled), "--out", str(tmp_path), "--adapter", "nope.safetensors"]) == 2
