"""`x2edit train` with 2 CPU processes (torchrun + accelerate over gloo; on GPUs `accelerate launch`
does the same): DDP, per-rank batches and the contrastive loss gathered across processes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_trainer import TINY


@pytest.mark.slow
def test_two_process_edit_training(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    x2edit = shutil.which("x2edit") or str(Path(sys.executable).parent / "x2edit")
    base_cfg = {"mode": "t2i", "output_dir": str(tmp_path / "base"), "steps": 1, "batch_size": 2,
                "checkpoint_every": 0, "validate_every": 0, "data": {"resolution": 32},
                "model": {"transformer": TINY, "max_text_tokens": 16}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base_cfg))
    subprocess.run([x2edit, "train", "--config", str(tmp_path / "base.yaml")], check=True, capture_output=True)
    # One sample per process: a same-task partner exists only if the loss gathers across processes.
    edit_cfg = {"mode": "edit", "output_dir": str(tmp_path / "edit"), "steps": 2, "batch_size": 1,
                "checkpoint_every": 0, "validate_every": 0, "log_every": 1, "data": {"resolution": 32,
                "tasks": ["color_change"]}, "model": {"base": str(tmp_path / "base" / "pipeline"), "max_text_tokens": 16},
                "adapter": {"rank": 2, "num_experts": 3, "top_k": 2, "task_embed_dim": 4}}
    (tmp_path / "edit.yaml").write_text(yaml.safe_dump(edit_cfg))
    run = subprocess.run([torchrun, "--nproc_per_node", "2", x2edit, "train", "--config", str(tmp_path / "edit.yaml")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    logs = [json.loads(line) for line in (tmp_path / "edit" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2]  # one writer: the main process
    assert all("train/contrastive" in r for r in logs)  # the partner came from the other process
    assert (tmp_path / "edit" / "adapter.safetensors").is_file()
