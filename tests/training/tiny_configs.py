"""A tiny training config (a 1+1-block transformer from scratch, 32 px Shape World, 2 steps of 2), written to a
YAML file and loaded with ``key=value`` overrides as ``x2edit train`` loads them: the in-context modes' tests."""

import json

import yaml

from x2edit.training.config import load_config

TINY = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
        "axes_dims_rope": [4, 6, 6]}


def tiny_config(tmp_path, mode: str, **over):
    base = {"mode": mode, "output_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "checkpoint_every": 0,
            "validate_every": 0, "log_every": 1, "data": {"resolution": 32},
            "model": {"transformer": TINY, "max_text_tokens": 48}, "optim": {"lr": 1e-3}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(base))
    return load_config(tmp_path / "cfg.yaml", [f"{k}={json.dumps(v)}" for k, v in over.items()])
