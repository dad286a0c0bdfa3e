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
from types import SimpleNamespace

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
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_the_gpu_check_script_refuses_clearly_without_cuda(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(script), str(out)], env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "needs a CUDA GPU" in proc.stderr and "Nothing was run or written" in proc.stderr
    assert not out.exists()
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 64 and "usage:" in usage.stderr
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python3 on a GPU machine: records each call, writes what the real stage would.
echo "$*" >> "$CALLS"
case "$*" in
  *torch.cuda.is_available*) exit 0 ;;
  *"import xdist"*) exit 0 ;;
  "-") cat > /dev/null; echo "gpu Fake GPU" ;;
  *"-m pytest"*) echo "120 passed" ;;
  *lora_kernels.py*)
    out=$(echo "$*" | sed -E 's/.*--out ([^ ]+).*/\\1/')
    if [[ "$*" == *--quick* ]]; then touch "$out/kernels-quick.json" "$out/kernels-quick.md"
    else touch "$out/kernels.json" "$out/kernels.md" "$out/fake-gpu.json" "$out/fake-gpu-configs.json"; fi ;;
esac
"""


def test_the_gpu_check_script_runs_its_stages_within_the_budget(tmp_path):
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls, out = tmp_path / "calls.txt", tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "CALLS": str(calls), "GPU_CHECK_BUDGET": "300"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["env.txt", "fake-gpu-configs.json", "fake-gpu.json", "kernels-quick.json", "kernels-quick.md",
                     "kernels.json", "kernels.md", "tests.txt"]  # fmt: skip
    assert len(files) <= 8  # what the device tool brings back
    log = calls.read_text().splitlines()
    tests = next(line for line in log if "-m pytest tests/kernels" in line)
    quick = next(line for line in log if "--quick" in line)
    full = next(line for line in log if "lora_kernels.py" in line and "--quick" not in line)
    assert "-n 8" in tests and "--no-e2e" in quick and "--no-e2e" not in full
    assert 0 < int(quick.split("--deadline ")[1]) < 110 and 0 < int(full.split("--deadline ")[1]) < 240
    assert "exit status 0" in (out / "tests.txt").read_text()


def test_rows_and_tables_in_small(bench, tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("peft")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = bench.bench_linears(
        wall_timer, device, dtype=torch.float32, linears={"tiny 24->40": (24, 40)}, token_counts={"tiny": 33},
        lora_ranks=(4,), l2_bytes=1, log=lambda line: None,
    )  # fmt: skip
    impls = {(r.group.split()[0], r.impl) for r in rows}
    assert impls >= {("gemm", "base"), ("gemm", "triton"), ("lora", "peft"), ("lora", "torch unfused"),
                     ("lora", "addmm"), ("lora", "merge"), ("lora", "triton"), ("lora", "auto"),
                     ("moe-lora", "x2edit loop"), ("moe-lora", "torch"), ("moe-lora", "addmm"), ("moe-lora", "auto"),
                     ("multi-lora", "triton"), ("multi-lora", "auto")}  # fmt: skip
    assert ("moe-lora", "merge") not in impls  # per-token gates do not merge
    assert all(r.ms > 0 and r.ratio > 0 for r in rows)
    assert all(r.met is not None for r in rows if r.impl in bench.JUDGED)
    training = bench.bench_training(wall_timer, device, dtype=torch.float32, linears={"tiny 24->40": (24, 40)}, M=33,
                                    tokens="tiny", log=lambda line: None)  # fmt: skip
    assert {r.impl for r in training} >= {"base", "torch", "addmm", "triton", "auto"}
    assert all(r.group.startswith("train ") and r.ratio > 0 for r in training)
    env = bench.environment()
    json_path, md_path = bench.write_results(tmp_path, env, rows, {"skipped": "test"}, training)
    data = json.loads(json_path.read_text())
    assert len(data["rows"]) == len(rows) and len(data["training"]) == len(training) and data["targets"]["moe"] == 1.25
    md = md_path.read_text()
    assert "| moe-lora 1+12 top-2 r64 | tiny 24->40 | tiny | auto |" in md and "Skipped: test" in md
    assert "Training step" in md


def row(group, linear, impl, ms, M=4608):
    return SimpleNamespace(group=group, linear=linear, M=M, impl=impl, ms=ms)


def test_the_dispatch_table_takes_triton_only_when_clearly_faster(bench):
    qkv = "attn q/k/v/out 3072->3072"
    rows = [
        row("lora r64", qkv, "addmm", 0.152), row("lora r64", qkv, "merge", 0.141),
        row("lora r64", qkv, "triton_tma", 0.139),  # 1.4% faster than merge: noise, not taken
        row("moe-lora 1+12 top-2 r64", qkv, "addmm", 0.20), row("moe-lora 1+12 top-2 r64", qkv, "triton_tma", 0.14),
        row("train lora r64", qkv, "addmm", 0.50), row("train lora r64", qkv, "triton", 0.52),
        row("gemm r1", qkv, "triton_tma", 0.12),  # a diagnosis row: no table entry
        row("lora r64", qkv, "peft", 0.01),  # not a backend
    ]  # fmt: skip
    table = bench.dispatch_table(rows, "Test GPU", source="test")
    got = {(r["gates"], r["R"], r["grad"]): r["backend"] for r in table["rows"]}
    assert got == {("none", 64, False): "merge", ("token", 832, False): "triton_tma", ("none", 64, True): "addmm"}
    from x2edit.kernels.dispatch import GpuTable

    assert GpuTable.from_dict(table).lookup("token", 3072, 3072, 4608, 832, False, 1).backend == "triton_tma"


def test_tables_are_written_under_the_gpu_name(bench, tmp_path):
    pytest.importorskip("triton")
    paths = bench.write_tables(tmp_path, "NVIDIA H100 80GB HBM3", [row("lora r64", "ff up 3072->12288", "addmm", 0.6)],
                               "kernels.json")  # fmt: skip
    assert [p.name for p in paths] == ["nvidia-h100-80gb-hbm3.json", "nvidia-h100-80gb-hbm3-configs.json"]
    assert json.loads(paths[0].read_text())["rows"][0]["backend"] == "addmm"
    assert json.loads(paths[1].read_text())["gpu"] == "NVIDIA H100 80GB HBM3"


def test_a_passed_deadline_starts_nothing(bench):
    deadline = bench.Deadline(0.0)
    time.sleep(0.01)
    assert bench.bench_linears(wall_timer, "cpu", linears={"t": (8, 8)}, token_counts={"t": 4}, lora_ranks=(2,),
                               deadline=deadline, log=lambda line: None) == []  # fmt: skip
    assert deadline.hit


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
        wall_timer, device, dtype=torch.float32, config=tiny, cases={"tiny": (16, 16, 8)}, log=lambda line: None
    )
    case = result["cases"]["tiny"]
    assert case["base_output_finite"] and not result["truncated"]
    for label in ("moe_lora_auto", "moe_lora_addmm", "moe_lora_triton", "task_moe_lora_auto",
                  "task_moe_lora_static_merge", "fused_qkv_base", "fused_qkv_moe_lora_auto"):  # fmt: skip
        assert case[f"{label}_ms"] > 0, label
    assert isinstance(case["moe_lora_auto_met"], bool) and case["task_static_merge_first_call_ms"] > 0
    md = bench.markdown(bench.environment(), [], result)
    assert "| tiny | task_moe_lora_static_merge |" in md


def test_a_failing_backend_is_recorded_and_the_run_goes_on(bench, monkeypatch):
    real = bench.implementations

    def with_a_broken_one(kind, scale, device):
        impls = real(kind, scale, device)

        def broken(s):
            def call():
                raise RuntimeError("kernels: no launch configuration of fused_tma ran")

            return call

        impls["broken"] = broken
        return impls

    monkeypatch.setattr(bench, "implementations", with_a_broken_one)
    rows = bench.bench_linears(wall_timer, "cpu", dtype=torch.float32, linears={"tiny 8->8": (8, 8)},
                               token_counts={"tiny": 5}, lora_ranks=(2,), l2_bytes=1, log=lambda line: None)  # fmt: skip
    broken = [r for r in rows if r.impl == "broken"]
    assert broken and all(r.ms != r.ms and "no launch configuration" in r.error for r in broken)  # NaN
    assert all(r.ms > 0 for r in rows if r.impl == "auto")
