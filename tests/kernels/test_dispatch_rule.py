"""What "auto" picks on a GPU, from the shipped measurements and the cost rule (no GPU needed).

`x2edit.kernels.dispatch.auto_backend` reads no tensor, so the choice for any CUDA call shape is tested
here. The measurements are the committed H200 results in benchmarks/results/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from x2edit import kernels
from x2edit.kernels import dispatch
from x2edit.kernels.checks import LoRAShapes
from x2edit.kernels.dispatch import CostModel, GpuTable, TableRow, auto_backend, gpu_table, merge_is_cheaper
from x2edit.kernels.env import device_slug

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
H200 = gpu_table("NVIDIA H200")
PROBE = json.loads((RESULTS / "2026-11-28-h200-gemm-diagnosis.json").read_text())
FULL = json.loads((RESULTS / "2026-11-28-h200-kernels-full.json").read_text())


def shapes(M, K, N, E=1, r=16, gates="none", blocks=1, samples=1) -> LoRAShapes:
    lead = (samples, M // samples) if gates == "sample" else (M,)
    return LoRAShapes(lead=lead, M=M, K=K, N=N, E=E, r=r, gates_per_sample=gates == "sample", blocks=blocks,
                      has_gates=gates != "none")  # fmt: skip


def test_the_h200_table_is_the_committed_measurement():
    assert H200 is not None and H200.gpu == "NVIDIA H200"
    names = {"addmm": "torch 2-pass inplace r{}", "merge": "torch merge-per-call r{}", "triton": "triton fused r{}"}
    by_shape = {(d["K"], d["N"], d["M"]): d["ms"] for d in PROBE["kernel_diag"]}
    assert len(H200.rows) == 9
    for row in H200.rows:
        measured = by_shape[(row.K, row.N, row.M)]
        for backend, name in names.items():
            assert math.isclose(row.ms[backend], measured[name.format(row.R)], rel_tol=1e-4), (row, backend)
        assert row.backend == min(names, key=row.ms.get), row  # the fastest measured path


def test_the_cost_rule_reproduces_every_clear_h200_choice():
    # Where addmm and merge were within 3% of each other the choice is a tie; elsewhere the rule
    # (with the table's fitted constants) must pick what measured faster.
    clear = [row for row in H200.rows if max(row.ms["addmm"], row.ms["merge"]) > 1.03 * min(row.ms["addmm"], row.ms["merge"])]
    assert len(clear) == 6
    for row in clear:
        fastest = "merge" if row.ms["merge"] < row.ms["addmm"] else "addmm"
        rule = "merge" if merge_is_cheaper(row.M, row.K, row.N, row.R, 2, cost=H200.cost) else "addmm"
        assert rule == fastest, row


def _full_benchmark_groups():
    """(group, linear, tokens) -> {impl: ms} of the committed full H200 benchmark."""
    groups: dict[tuple, dict] = {}
    for row in FULL["rows"]:
        groups.setdefault((row["group"], row["linear"], row["tokens"], row["M"]), {})[row["impl"]] = row["ms"]
    return groups


LINEARS = {"attn q/k/v/out 3072->3072": (3072, 3072), "ff up 3072->12288": (3072, 12288),
           "ff down 12288->3072": (12288, 3072), "single in 3072->21504": (3072, 21504),
           "single out 15360->3072": (15360, 3072)}  # fmt: skip


def _call_of(group: str, linear: str, M: int) -> LoRAShapes:
    K, N = LINEARS[linear]
    if group.startswith("lora"):
        return shapes(M, K, N, 1, int(group.split("r")[-1]))
    if group.startswith("moe"):
        return shapes(M, K, N, 13, 64, "token")
    return shapes(M, K, N, 4, 16, "token")


def test_auto_never_takes_triton_where_torch_measured_faster_on_the_h200():
    groups = _full_benchmark_groups()
    torch_impls = ("torch unfused", "peft", "torch dense")
    checked = 0
    for (group, linear, _tokens, M), ms in groups.items():
        if "ours" not in ms or not any(ms.get(i, math.inf) < ms["ours"] for i in torch_impls):
            continue
        for grad in (False, True):
            assert auto_backend(_call_of(group, linear, M), 2, grad, H200, hopper=True) not in dispatch.TRITON_BACKENDS
        checked += 1
    for row in H200.rows:  # the probe: triton slower than the torch paths in every row
        assert auto_backend(shapes(row.M, row.K, row.N, 1, row.R), 2, False, H200, hopper=True) == row.backend
        checked += 1
    assert checked == 30 + 9  # 30 of the 50 benchmark groups had a faster torch row; 9 probe rows


@pytest.mark.parametrize("gates", ["none", "sample", "token"])
@pytest.mark.parametrize("grad", [False, True])
def test_an_unknown_gpu_gets_the_torch_paths(gates, grad):
    for M in (1, 77, 4608, 8704, 65536):
        for K, N in LINEARS.values():
            for E, r in ((1, 1), (1, 64), (4, 16), (13, 64)):
                choice = auto_backend(shapes(M, K, N, E, r, gates), 2, grad, None, hopper=True)
                assert choice in ("addmm", "merge")
                if choice == "merge":
                    assert gates != "token" and not grad


def test_training_and_per_token_gates_never_merge():
    call = shapes(4608, 3072, 3072, 1, 64)
    assert auto_backend(call, 2, False, H200) == "merge"  # the measured row
    assert auto_backend(call, 2, True, H200) == "addmm"  # training: merging would need dW in full
    assert auto_backend(shapes(4608, 3072, 3072, 13, 64, "token"), 2, False, H200) == "addmm"


def test_per_sample_gates_pay_one_merged_weight_per_sample():
    # A task-routed MoE-LoRA at FLUX's 3072 x 3072 and 4608 tokens: one weight merges, eight do not.
    one = shapes(4608, 3072, 3072, 13, 64, "sample", samples=1)
    eight = shapes(4608, 3072, 3072, 13, 64, "sample", samples=8)
    assert auto_backend(one, 2, False, H200) == "merge"
    assert auto_backend(eight, 2, False, H200) == "addmm"


def test_merge_is_cheaper_follows_tokens_against_weight_size():
    # Few tokens: adding the low-rank term costs less than rewriting the weight; many: the reverse.
    assert not merge_is_cheaper(64, 3072, 3072, 16)
    assert merge_is_cheaper(16384, 3072, 3072, 16)
    # A merge kept for the 28 steps of a denoising loop is cheaper already at few tokens.
    assert merge_is_cheaper(1024, 3072, 3072, 16, calls=28) and not merge_is_cheaper(1024, 3072, 3072, 16)


def test_a_measured_triton_row_is_taken_only_where_it_can_run(monkeypatch):
    row = dict(gates="token", K=3072, N=3072, M=4608, R=832, grad=False)
    table = GpuTable("test GPU", CostModel(), (TableRow(backend="triton_tma", **row),))
    call = shapes(4608, 3072, 3072, 13, 64, "token")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert auto_backend(call, 2, False, table, hopper=True) == "triton_tma"
    assert auto_backend(call, 2, False, table, hopper=False) == "addmm"  # not a Hopper: the rule
    assert auto_backend(call, 2, True, table, hopper=True) == "addmm"  # the row is for inference
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert auto_backend(call, 2, False, table, hopper=True) == "addmm"


def test_rows_match_within_their_tolerances():
    table = GpuTable("test GPU", CostModel(), (TableRow("none", 3072, 3072, 4608, 64, "triton"),))
    assert table.lookup("none", 3072, 3072, 4608 * 1.4, 64, False, 1) is not None
    assert table.lookup("none", 3072, 3072, 4608 * 1.6, 64, False, 1) is None
    assert table.lookup("none", 3072, 3072, 4608, 128, False, 1) is not None
    assert table.lookup("none", 3072, 3072, 4608, 160, False, 1) is None
    assert table.lookup("sample", 3072, 3072, 4608, 64, False, 1) is None
    assert table.lookup("none", 3072, 3072, 4608, 64, False, 3) is None
    assert table.lookup("none", 3072, 3072, 0, 64, False, 1) is None


def test_every_shipped_table_loads_and_is_named_for_its_gpu():
    files = [p for p in dispatch.MEASURED_DIR.glob("*.json") if not p.name.endswith("-configs.json")]
    assert files
    for path in files:
        table = GpuTable.from_dict(json.loads(path.read_text()))
        assert path.stem == device_slug(table.gpu)
    with pytest.raises(ValueError, match="unknown backend"):
        GpuTable.from_dict({"gpu": "x", "rows": [dict(gates="none", K=1, N=1, M=1, R=1, backend="cuda")]})


def test_lora_linear_hands_the_training_flag_to_the_dispatch(monkeypatch):
    seen = []

    def spy(x, shapes=None, grad=False):
        seen.append((shapes.gate_kind, shapes.blocks, grad))
        return "torch"

    monkeypatch.setattr(dispatch, "resolve_backend", spy)
    x, w = torch.randn(2, 5, 8), torch.randn(6, 8)
    A, B = torch.randn(3, 2, 8, requires_grad=True), torch.randn(3, 2, 2)
    kernels.lora_linear(x, w, None, A, B, torch.rand(2, 3), out_blocks=3)
    with torch.no_grad():
        kernels.lora_linear(x, w, None, A, B, None, out_blocks=3)
    assert seen == [("sample", 3, True), ("none", 3, False)]
