"""benchmarks/lora_kernels.py: refuses without a GPU; its rows, tables and end-to-end line work in small.

The real measurements need CUDA. Here the same functions run on CPU at tiny sizes with a wall-clock
timer (Triton through the interpreter), so that a GPU run does not fail on a bug in the script.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "lora_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def wall_timer(calls):
    calls[0]()
    start = time.perf_counter()
    for call in calls:
        call()
    return 1e3 * (time.perf_counter() - start) / len(calls)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_clearly_without_cuda(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_rows_and_tables_in_small(bench, tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("peft")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = bench.bench_linears(
        wall_timer, device, dtype=torch.float32, linears={"tiny 24->40": (24, 40)}, token_counts={"tiny": 33},
        lora_ranks=(4,), l2_bytes=1, log=lambda line: None,
    )  # fmt: skip
    impls = {(r.group.split()[0], r.impl) for r in rows}
    assert impls >= {("lora", "base"), ("lora", "peft"), ("lora", "torch unfused"), ("lora", "ours"),
                     ("moe-lora", "x2edit loop"), ("moe-lora", "ours"), ("multi-lora", "ours")}  # fmt: skip
    assert all(r.ms > 0 and r.ratio > 0 for r in rows)
    assert all(r.met is not None for r in rows if r.impl == "ours")
    env = bench.environment()
    json_path, md_path = bench.write_results(tmp_path, env, rows, {"skipped": "test"})
    data = json.loads(json_path.read_text())
    assert len(data["rows"]) == len(rows) and data["targets"]["moe"] == 1.25
    md = md_path.read_text()
    assert "| moe-lora 1+12 top-2 r64 | tiny 24->40 | tiny | ours |" in md and "Skipped: test" in md


def test_end_to_end_line_in_small(bench, tmp_path):
    pytest.importorskip("triton")
    try:
        import x2edit.adapters  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"x2edit.adapters not importable yet: {exc}")
    tiny = dict(bench.FLUX_DEV_CONFIG, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, in_channels=8,
                axes_dims_rope=(4, 6, 6))  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = bench.bench_e2e(
        wall_timer, device, dtype=torch.float32, config=tiny, cases={"tiny": (16, 16, 8)}
    )
    case = result["cases"]["tiny"]
    assert case["base_output_finite"]
    assert case["moe_lora_triton_ms"] > 0 and case["moe_lora_torch_ms"] > 0 and isinstance(case["met"], bool)
    md = bench.markdown(bench.environment(), [], result)
    assert "| tiny |" in md
