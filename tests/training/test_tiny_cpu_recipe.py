"""x2edit-tiny release 5's CPU recipe (x2edit/training/recipes/tiny_cpu.sh) end to end with --smoke, and its
resume: a second run after a stop skips what is done and continues a training stage from its checkpoint."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "x2edit" / "training" / "recipes" / "tiny_cpu.sh"


def _run(out: Path) -> subprocess.CompletedProcess:
    run = subprocess.run(["bash", str(SCRIPT), str(out), "--smoke"], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable}, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_tiny_cpu_recipe_runs_every_stage_and_resumes_after_a_stop(tmp_path):
    out = tmp_path / "out"
    _run(out)
    assert sorted(p.name for p in out.iterdir()) == ["demo.png", "eval_grid.png", "log.txt", "report.json",
                                                     "report.md", "work", "x2edit-tiny"]
    report = json.loads((out / "report.json").read_text())
    assert list(report["stage_seconds"]) == ["base", "adapter", "bundle", "eval", "eval_classifier", "demo"]
    assert report["base"]["steps"] == report["adapter"]["steps"] == 2
    assert 0 <= report["router_accuracy"] <= 1 and "met" in report["bar"]["classifier"]

    from x2edit.adapters import adapter_config
    from x2edit.registry import load_pipeline

    pipe = load_pipeline(out / "x2edit-tiny")
    assert (pipe.default_source_start, pipe.reference_tokens, pipe.change_floor) == (0.5, False, 0.04)
    assert adapter_config(pipe.transformer).kind == "moe_lora" and pipe.task_classifier.hidden is not None

    # A stop after the base's first checkpoint: the stage resumes from it; what is complete is not redone.
    shutil.rmtree(out / "work" / "base" / "pipeline")
    for name in ("x2edit-tiny", "eval_labels", "eval_classifier", "demo"):
        shutil.rmtree(out / "work" / name)
    log = _run(out).stdout
    assert "--resume latest" in log.split("== adapter")[0]
    assert "== adapter: done before" in log
    assert (out / "work" / "base" / "pipeline" / "model_index.json").is_file()


def test_release_configs_load():
    from x2edit.training.config import load_config

    base = load_config(ROOT / "configs" / "x2edit_tiny" / "edit_base.yaml")
    assert base.mode == "edit_base" and base.model.source_start == 0.5 and not base.model.reference_tokens
    adapter = load_config(ROOT / "configs" / "x2edit_tiny" / "adapter_on_edit_base.yaml")
    assert adapter.mode == "edit" and adapter.adapter.kind == "moe_lora" and adapter.loss.contrastive_weight > 0
    assert base.time_budget_s + adapter.time_budget_s <= 2 * 3600  # the release's 2-hour budget on 2 cores
