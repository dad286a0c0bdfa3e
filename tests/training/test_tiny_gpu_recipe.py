"""x2edit-tiny release 4's GPU recipe (x2edit/training/recipes/tiny_gpu.sh) end to end on CPU with --smoke.

The same script, configs and commands a GPU run uses, with a few steps on tiny pools, so the recipe
cannot rot between the GPU sessions that run it for real.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_gpu_recipe_runs_every_stage_and_writes_the_few_files_a_device_run_returns(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "x2edit" / "training" / "recipes" / "tiny_gpu.sh"), str(out), "--smoke"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    returned = sorted(p.name for p in out.iterdir() if p.is_file())
    assert returned == ["demo.png", "eval_grid.png", "log.txt", "report.json", "report.md", "x2edit-tiny.tar.gz"]
    assert all((out / name).stat().st_size < 16e6 for name in returned)  # what a device run can send back

    report = json.loads((out / "report.json").read_text())
    assert list(report["stage_seconds"]) == ["base", "adapter", "bundle", "eval", "eval_classifier", "demo"]
    assert report["base"]["steps"] == report["adapter"]["steps"] == 2 and report["base"]["samples_seen"] == 8
    assert report["eval_labels"]["mean"]["n"] == 15 and "met" in report["bar"]["labels"]

    with tarfile.open(out / "x2edit-tiny.tar.gz") as tar:
        tar.extractall(tmp_path / "shipped", filter="data")
    from x2edit.adapters import adapter_config
    from x2edit.registry import load_pipeline

    pipe = load_pipeline(tmp_path / "shipped" / "x2edit-tiny")
    config = adapter_config(pipe.transformer)
    assert config.source_start == 0.5 and config.reading == "residual" and pipe.default_num_inference_steps == 1


@pytest.mark.parametrize("name", ["base", "adapter", "adapter_multistep"])
def test_gpu_configs_load(name):
    from x2edit.training.config import load_config

    cfg = load_config(ROOT / "configs" / "x2edit_tiny" / "gpu" / f"{name}.yaml")
    assert cfg.tf32 and cfg.data.pool > 0 and cfg.optim.decay_steps > 0
    assert cfg.batch_size >= 512  # GPU-sized batches
