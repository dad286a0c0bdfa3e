"""bundle -> load by path -> `x2edit demo` and `x2edit eval` on a tiny trained model (few steps)."""

import json
from types import SimpleNamespace

import pytest
from test_trainer import _config

from x2edit.adapters import adapter_names
from x2edit.cli import main
from x2edit.registry import load_pipeline
from x2edit.training.bundle import bundle
from x2edit.training.trainer import Trainer


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    base = Trainer(_config(tmp / "b", steps=2, checkpoint_every=0, **{"data.resolution": 64})).train()
    edit = Trainer(_config(tmp / "e", mode="edit", steps=2, checkpoint_every=0, **{
        "model.base": str(base / "pipeline"), "data.resolution": 64,
        "adapter": {"rank": 2, "num_experts": 3, "top_k": 2, "task_embed_dim": 8}})).train()
    path = bundle(str(base / "pipeline"), str(edit / "adapter.safetensors"), str(tmp / "tiny"),
                  max_text_tokens=16, classifier_samples=150, num_inference_steps=3)
    return SimpleNamespace(path=path, base=base / "pipeline")


def test_bundle_has_no_sentence_encoder_and_loads_by_path(bundled):
    bundled = bundled.path
    assert not (bundled / "text_encoder").exists() and (bundled / "task_classifier.safetensors").is_file()
    pipe = load_pipeline(bundled)
    assert adapter_names(pipe.transformer) == ["default"]
    assert pipe.default_num_inference_steps == 3  # the bundle's own step count, from x2edit_embedded.json
    assert pipe.tokenizer.model_max_length == 16
    assert pipe.default_max_area == 64 * 64  # the training resolution, from x2edit_embedded.json
    assert pipe.text_encoder.config.hidden_size == 384  # the real all-MiniLM-L6-v2 from its package
    size = sum(f.stat().st_size for f in bundled.rglob("*") if f.is_file())
    assert size < 1e6  # the test model is tiny; the real bundle is checked by tests/x2edit/test_embedded.py


def test_demo_writes_grid_and_metrics(bundled, tmp_path, capsys):
    assert main(["demo", "--base", str(bundled.path), "--out", str(tmp_path), "--n-per-task", "1", "--steps", "2"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len([k for k in metrics if k not in ("mean", "classifier_accuracy", "routing", "mode", "steps")]) == 15
    assert 0 <= metrics["classifier_accuracy"] <= 1 and metrics["mean"]["n"] == 15
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert "edit gain" in capsys.readouterr().out


@pytest.mark.parametrize("argv, mode, steps", [(["--mode", "diptych"], "diptych", 1),
                                               (["--mode", "incontext"], "incontext", 1),
                                               (["--mode", "incontext", "--base", "x2edit-tiny-t2i"], "incontext", 10)],
                         ids=["diptych", "incontext-fill", "incontext-t2i"])
def test_demo_runs_every_mode_on_the_embedded_models(tmp_path, argv, mode, steps, monkeypatch):
    """Each mode on its embedded base, offline; the set modes edit by ``inpaint_set`` (a mutation that edits
    incontext pairs with the diptych entry instead fails the call count)."""
    import x2edit.incontext

    calls, inpaint = [], x2edit.incontext.inpaint_set
    monkeypatch.setattr(x2edit.incontext, "inpaint_set", lambda *a, **k: calls.append(a[2]) or inpaint(*a, **k))
    assert main(["demo", *argv, "--out", str(tmp_path), "--n-per-task", "1"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["mode"], metrics["steps"], metrics["mean"]["n"]) == (mode, steps, 15)
    assert len(calls) == (15 if mode == "incontext" else 0)
    assert all(c.startswith("[EDIT] ") and "[LEFT]" in c and "[RIGHT]" in c for c in calls)


def test_eval_shapeworld(bundled, tmp_path):
    assert main(["eval", "--base", str(bundled.path), "--out", str(tmp_path), "--n-per-task", "1", "--steps", "1"]) == 0
    rows = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 15 and "edit_gain_db" in json.loads(rows[0])
    assert "router_accuracy" not in json.loads((tmp_path / "metrics.json").read_text())
    assert main(["eval", "--base", str(bundled.path), "--out", str(tmp_path), "--adapter", "nope.safetensors"]) == 2


def test_eval_with_classifier_routing_reports_the_routers_accuracy(bundled, tmp_path):
    assert main(["eval", "--base", str(bundled.path), "--out", str(tmp_path), "--n-per-task", "2", "--steps", "1",
                 "--routing", "classifier"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    routed = load_pipeline(bundled.path).task_classifier([r["instruction"] for r in rows])
    assert [r["routed"] for r in rows] == routed
    accuracy = json.loads((tmp_path / "metrics.json").read_text())["router_accuracy"]
    assert accuracy == sum(r["routed"] == r["task"] for r in rows) / 30


def test_ablation_benchmark_smoke(bundled, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    import ablation_shapeworld

    assert ablation_shapeworld.main(["--base", str(bundled.base), "--out", str(tmp_path), "--steps", "2",
                                     "--batch-size", "4", "--seeds", "0", "--n-per-task", "1", "--eval-steps", "1",
                                     "--variants", "lora", "moe+con"]) == 0
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert set(result["edit_gain_db"]) == {"lora", "moe+con"} and result["lora_rank"] >= 1
    params = result["cost"]
    assert abs(params["lora"]["trainable_params"] / params["moe+con"]["trainable_params"] - 1) < 0.15
    assert "| mean |" in (tmp_path / "ablation.md").read_text()


def test_ablation_benchmark_residual_reading(bundled, tmp_path):
    import sys
    from pathlib import Path

    from x2edit.adapters import read_adapter_header

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    import ablation_shapeworld

    assert ablation_shapeworld.main(["--base", str(bundled.base), "--out", str(tmp_path), "--steps", "1",
                                     "--batch-size", "2", "--seeds", "0", "--n-per-task", "1", "--eval-steps", "1",
                                     "--variants", "moe", "--reading", "residual"]) == 0
    header = read_adapter_header(tmp_path / "moe_seed0" / "adapter.safetensors")
    assert header["config"].reading == "residual"
    assert "residual reading" in (tmp_path / "ablation.md").read_text()


def test_ablation_benchmark_one_step_recipe(bundled, tmp_path):
    """--source-start: every variant trains and edits as x2edit-tiny does (one step from the source, the
    edit-relative loss); the eval takes the adapter's own single step."""
    import sys
    from pathlib import Path

    import yaml

    from x2edit.adapters import read_adapter_header

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    import ablation_shapeworld

    assert ablation_shapeworld.main(["--base", str(bundled.base), "--out", str(tmp_path), "--steps", "2",
                                     "--batch-size", "2", "--seeds", "0", "--n-per-task", "1", "--variants", "moe",
                                     "--reading", "residual", "--source-start", "0.5"]) == 0
    run = tmp_path / "moe_seed0"
    assert read_adapter_header(run / "adapter.safetensors")["config"].source_start == 0.5
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["loss"]["weighting"] == "x0_edit" and config["optim"]["decay_steps"] == 1
    assert "one step from the source at sigma 0.5" in (tmp_path / "ablation.md").read_text()


@pytest.fixture(scope="module")
def editing_base(tmp_path_factory):
    """A tiny base trained to edit in one step without reference tokens (x2edit train mode edit_base)."""
    tmp = tmp_path_factory.mktemp("edit_base")
    base = Trainer(_config(tmp / "b", steps=1, checkpoint_every=0, **{"data.resolution": 64})).train()
    return Trainer(_config(tmp / "e", mode="edit_base", steps=1, checkpoint_every=0, **{
        "model.base": str(base / "pipeline"), "data.resolution": 64, "model.source_start": 0.5,
        "model.reference_tokens": False, "loss.weighting": "x0_edit"})).train() / "pipeline"


def test_ablation_benchmark_on_an_editing_base(editing_base, tmp_path):
    """On an editing base every variant edits as its base (one step), with the shared extra signals, and the
    table gives standard errors over the seeds."""
    import sys
    from pathlib import Path

    import yaml

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    import ablation_shapeworld

    assert ablation_shapeworld.main(["--base", str(editing_base), "--out", str(tmp_path), "--steps", "2",
                                     "--batch-size", "2", "--seeds", "0", "1", "--n-per-task", "1",
                                     "--variants", "lora", "moe", "--mask-weight", "1", "--local-weight", "2"]) == 0
    config = yaml.safe_load((tmp_path / "moe_seed1" / "config.yaml").read_text())
    assert config["loss"]["weighting"] == "x0_edit" and config["loss"]["mask_weight"] == 1.0
    assert config["data"]["task_weights"]["color_change"] == 2.0 and config["adapter"]["source_start"] is None
    result = json.loads((tmp_path / "ablation.json").read_text())
    gains = [r["table"]["mean"]["edit_gain_db"] for r in result["runs"]["moe"]]
    import numpy as np

    assert result["edit_gain_db"]["moe"]["mean"]["stderr"] == pytest.approx(np.std(gains, ddof=1) / np.sqrt(2))
    assert "standard error over seeds [0, 1]" in (tmp_path / "ablation.md").read_text()


def test_change_floor_benchmark(editing_base, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    import change_floor

    assert change_floor.main(["--base", str(editing_base), "--floors", "0", "0.5", "--n-per-task", "1",
                              "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "change_floor.json").read_text())["rows"]
    assert [r["floor"] for r in rows] == [0.0, 0.5]
    assert rows[1]["exact_outside"] >= rows[0]["exact_outside"] and rows[1]["exact_outside"] > 0.9
    assert "| 0.500 |" in (tmp_path / "change_floor.md").read_text()
