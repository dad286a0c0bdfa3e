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
    # Two samples per process, one of each task: a same-task partner exists only across processes. One step
    # from the source (no noise), so a single process can recompute the features of all four samples.
    edit_cfg = {"mode": "edit", "output_dir": str(tmp_path / "edit"), "steps": 2, "batch_size": 2,
                "checkpoint_every": 0, "validate_every": 0, "log_every": 1, "data": {"resolution": 32,
                "tasks": ["color_change", "subject_deletion"]},
                "model": {"base": str(tmp_path / "base" / "pipeline"), "max_text_tokens": 16},
                "adapter": {"rank": 2, "num_experts": 3, "top_k": 2, "task_embed_dim": 4, "source_start": 0.5}}
    (tmp_path / "edit.yaml").write_text(yaml.safe_dump(edit_cfg))
    run = subprocess.run([torchrun, "--nproc_per_node", "2", x2edit, "train", "--config", str(tmp_path / "edit.yaml")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    logs = [json.loads(line) for line in (tmp_path / "edit" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2]  # one writer: the main process
    assert all("train/contrastive" in r for r in logs)  # the partner came from the other process
    assert (tmp_path / "edit" / "adapter.safetensors").is_file()

    # The value: rank 0's anchors (samples 0, 1) against all four samples' target-token features.
    assert logs[0]["train/contrastive"] == pytest.approx(_rank0_contrastive(tmp_path, edit_cfg), rel=1e-4)


def _rank0_contrastive(tmp_path, edit_cfg):
    """Step 0's contrastive loss of rank 0 in a 2 x 2 run, recomputed in one process from a batch of 4."""
    import torch
    import torch.nn.functional as F

    import x2edit.training.trainer as tr
    from x2edit.training.config import config_from_dict

    cfg = config_from_dict({**edit_cfg, "output_dir": str(tmp_path / "single"), "batch_size": 4})
    trainer = tr.Trainer(cfg)
    features = []
    real = tr.contrastive_loss

    def spy(h, *args, **kwargs):
        features.append(h.detach())
        return real(h, *args, **kwargs)

    tr.contrastive_loss = spy
    try:
        batch = trainer.batch(0)  # samples 0..3: rank 0 held 0, 1 and rank 1 held 2, 3
        trainer.compute_loss(batch, 0)
    finally:
        tr.contrastive_loss = real
    tasks = batch["task"]
    assert tasks[:2].tolist() == tasks[2:].tolist() and tasks[0] != tasks[1]
    values = []
    for h in features:  # written from the definition: -log(sum_pos e^(-d2/T) / sum_(j != i) e^(-d2/T))
        z = F.normalize(h.flatten(1).double(), dim=-1)
        d2 = torch.cdist(z, z) ** 2
        per_anchor = []
        for i in (0, 1):
            others = [j for j in range(4) if j != i]
            pos = [j for j in others if tasks[j] == tasks[i]]
            w = torch.exp(-d2[i] / cfg.loss.contrastive_temperature)
            per_anchor.append(-torch.log(w[pos].sum() / w[others].sum()))
        values.append(torch.stack(per_anchor).mean())
    return torch.stack(values).mean().item()
