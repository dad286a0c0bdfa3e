"""The Triton LoRA / multi-LoRA / MoE-LoRA linear against a float64 torch reference.

Odd sizes (not multiples of any block), fresh random inputs each run, outputs poisoned with NaN so
that an element the kernel fails to write fails the test. On CPU the kernels run through the
Triton interpreter (TRITON_INTERPRET=1, set in tests/conftest.py); on CUDA they run compiled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from x2edit.kernels import lora_linear, lora_linear_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "gates")


@dataclass(frozen=True)
class Case:
    name: str
    lead: tuple[int, ...]  # x's leading dims
    K: int
    N: int
    E: int
    r: int
    gates: str  # "none" | "dense" | "topk" | "sample" (per-sample gates for a 3-d x)
    bias: bool = True
    scale: float = 0.75


CASES = [
    Case("lora", (37,), 45, 29, 1, 3, "none"),
    Case("lora-3d-nobias", (2, 19), 45, 29, 1, 5, "none", bias=False),
    Case("multi-lora-token-gates", (37,), 45, 29, 3, 5, "dense"),
    Case("multi-lora-sample-gates", (3, 13), 33, 40, 4, 3, "sample"),
    # shared expert (gate 1) + top-2 of 4 routed; R = 100 spans two expand chunks / four rank blocks
    Case("moe-top2-shared", (70,), 67, 45, 5, 20, "topk"),
]
# Rank space wider than one rank block (R = 300 > 256): several shrink programs per row tile.
WIDE = Case("lora-wide-rank", (21,), 40, 70, 1, 300, "none", scale=0.1)


def make_inputs(case: Case, gen: torch.Generator) -> dict[str, torch.Tensor | None]:
    """float64 inputs with O(1) outputs; B is non-zero so the adapter term matters."""
    x = torch.randn(*case.lead, case.K, generator=gen, dtype=torch.float64)
    weight = torch.randn(case.N, case.K, generator=gen, dtype=torch.float64) / math.sqrt(case.K)
    bias = torch.randn(case.N, generator=gen, dtype=torch.float64) if case.bias else None
    lora_A = torch.randn(case.E, case.r, case.K, generator=gen, dtype=torch.float64) / math.sqrt(case.K)
    lora_B = torch.randn(case.E, case.N, case.r, generator=gen, dtype=torch.float64) / math.sqrt(case.r)
    gates = None
    if case.gates == "dense":
        gates = torch.rand(*case.lead, case.E, generator=gen, dtype=torch.float64)
    elif case.gates == "sample":
        gates = torch.rand(case.lead[0], case.E, generator=gen, dtype=torch.float64)
    elif case.gates == "topk":
        # Expert 0 is the shared expert (gate 1); the others are routed top-2 of a softmax,
        # not renormalised (as X2Edit).
        logits = torch.randn(*case.lead, case.E - 1, generator=gen, dtype=torch.float64)
        probs = logits.softmax(-1)
        top = probs.topk(2, dim=-1)
        routed = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
        gates = torch.cat([torch.ones_like(routed[..., :1]), routed], dim=-1)
    return {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B, "gates": gates}


def cast(inputs, dtype, gates_dtype=None, requires_grad=False):
    out = {}
    for k, v in inputs.items():
        if v is None:
            out[k] = None
            continue
        d = (gates_dtype or dtype) if k == "gates" else dtype
        out[k] = v.to(device=DEVICE, dtype=d).requires_grad_(requires_grad)
    return out


def run(fn, t, scale, **kw):
    return fn(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["gates"], scale, **kw)


def reference_of(inputs_cast, scale, dy=None, **kw):
    """float64 reference output (and gradients if dy) on the *rounded* inputs the kernel saw."""
    ref = {k: (v.detach().double().cpu().requires_grad_(dy is not None) if v is not None else None)
           for k, v in inputs_cast.items()}  # fmt: skip
    y = run(lora_linear_reference, ref, scale, **kw)
    grads = {}
    if dy is not None:
        (y * dy.double().cpu()).sum().backward()
        grads = {k: v.grad for k, v in ref.items() if v is not None}
    return y.detach(), grads


def assert_close(actual, expected, atol, rtol, what, seed):
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected, atol=atol, rtol=rtol,
        msg=lambda m: f"{what} (seed {seed}): {m}",
    )  # fmt: skip


@pytest.mark.parametrize("case", [*CASES, WIDE], ids=lambda c: c.name)
def test_forward_float32_matches_float64_reference(case, layout, triton_backend, gen, seed):
    inputs = make_inputs(case, gen)
    t = cast(inputs, torch.float32)
    expected, _ = reference_of(t, case.scale)
    out = torch.full((*case.lead, case.N), float("nan"), device=DEVICE)  # poisoned
    with torch.no_grad():
        y = run(lora_linear, t, case.scale, out=out)
    assert y.data_ptr() == out.data_ptr() and y.shape == (*case.lead, case.N)
    assert torch.isfinite(out).all(), f"unwritten output elements (seed {seed})"
    assert_close(out, expected, 1e-4, 1e-4, "output", seed)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("gate_grad", [True, False], ids=["gates-grad", "gates-fixed"])
def test_gradients_float32_match_float64_reference(case, gate_grad, layout, triton_backend, gen, seed):
    inputs = make_inputs(case, gen)
    t = cast(inputs, torch.float32, requires_grad=True)
    if t["gates"] is not None and not gate_grad:
        t["gates"].requires_grad_(False)  # fixed gates let the grouped path skip unused experts
    dy = torch.randn(*case.lead, case.N, generator=gen, dtype=torch.float64)
    y = run(lora_linear, t, case.scale)
    (y * dy.to(DEVICE, torch.float32)).sum().backward()
    expected, grads = reference_of(t, case.scale, dy)
    assert_close(y, expected, 1e-4, 1e-4, "output", seed)
    for name in NAMES:
        if t[name] is None or not t[name].requires_grad:
            continue
        assert t[name].grad is not None, f"no gradient for {name}"
        assert_close(t[name].grad, grads[name], 2e-4, 2e-4, f"d{name}", seed)


def test_sparse_gate_grad_is_zero_at_zero_gates_and_exact_elsewhere(layout, triton_backend, gen, seed):
    case = CASES[4]
    t = cast(make_inputs(case, gen), torch.float32, requires_grad=True)
    dy = torch.randn(*case.lead, case.N, generator=gen, dtype=torch.float64)
    y = run(lora_linear, t, case.scale, sparse_gate_grad=True)
    (y * dy.to(DEVICE, torch.float32)).sum().backward()
    expected, grads = reference_of(t, case.scale, dy, sparse_gate_grad=True)
    _, exact = reference_of(t, case.scale, dy)
    assert_close(y, expected, 1e-4, 1e-4, "output", seed)
    for name in NAMES:
        assert_close(t[name].grad, grads[name], 2e-4, 2e-4, f"d{name}", seed)
    zero = (t["gates"] == 0).cpu()
    assert zero.any() and (t["gates"].grad.cpu()[zero] == 0).all()
    assert_close(t["gates"].grad.cpu()[~zero], exact["gates"][~zero], 2e-4, 2e-4, "dgates", seed)


def test_gradients_with_broadcast_upstream_gradient(triton_backend, gen, seed):
    # loss = y.sum() hands backward a dy with zero strides; the kernels must read it through strides.
    case = CASES[4]
    t = cast(make_inputs(case, gen), torch.float32, requires_grad=True)
    run(lora_linear, t, case.scale).sum().backward()
    _, grads = reference_of(t, case.scale, torch.ones(*case.lead, case.N, dtype=torch.float64))
    for name in NAMES:
        assert_close(t[name].grad, grads[name], 2e-4, 2e-4, f"d{name}", seed)


# Half precision: inputs rounded to the dtype, compared with float64 on the rounded inputs. The
# kernels accumulate in float32 and round the rank-space codes and the output once each.
HALF_TOL = {torch.bfloat16: 4e-2, torch.float16: 6e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=lambda c: c.name)
def test_half_precision_forward_and_gradients(case, dtype, triton_backend, gen, seed):
    inputs = make_inputs(case, gen)
    # Router gates usually stay float32 beside half activations.
    t = cast(inputs, dtype, gates_dtype=torch.float32, requires_grad=True)
    dy = torch.randn(*case.lead, case.N, generator=gen, dtype=torch.float64).to(dtype).double()
    y = run(lora_linear, t, case.scale)
    assert y.dtype == dtype
    (y * dy.to(DEVICE, dtype)).sum().backward()
    expected, grads = reference_of(t, case.scale, dy)
    tol = HALF_TOL[dtype]
    assert_close(y, expected, tol, tol, "output", seed)
    for name in NAMES:
        if t[name] is None:
            continue
        assert t[name].grad.dtype == t[name].dtype
        # Gradients sum over M (weights) or R (x): allow one more rounding's worth of error.
        assert_close(t[name].grad, grads[name], 2 * tol, 2 * tol, f"d{name}", seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_poisoned_out_is_fully_written(dtype, layout, triton_backend, gen, seed):
    case = CASES[4]
    t = cast(make_inputs(case, gen), dtype)
    out = torch.full((*case.lead, case.N), float("nan"), device=DEVICE, dtype=dtype)
    with torch.no_grad():
        run(lora_linear, t, case.scale, out=out)
    expected, _ = reference_of(t, case.scale)
    assert torch.isfinite(out).all(), f"unwritten output elements (seed {seed})"
    assert_close(out, expected, HALF_TOL[dtype], HALF_TOL[dtype], "output", seed)


def test_non_contiguous_inputs_give_the_same_result(layout, triton_backend, gen, seed):
    # Every operand a strided view: the kernels take strides instead of copying.
    case = CASES[4]
    inputs = make_inputs(case, gen)
    t = cast(inputs, torch.float32)
    M, K, N, E, r = case.lead[0], case.K, case.N, case.E, case.r
    strided = {
        "x": t["x"].t().contiguous().t(),  # (M, K) with strides (1, M)
        "weight": t["weight"].t().contiguous().t(),
        "bias": torch.stack([t["bias"], t["bias"]], dim=1)[:, 0],  # stride 2
        "lora_A": t["lora_A"].permute(2, 0, 1).contiguous().permute(1, 2, 0),
        "lora_B": t["lora_B"].permute(2, 1, 0).contiguous().permute(2, 1, 0),
        "gates": t["gates"].t().contiguous().t(),
    }
    assert not any(v.is_contiguous() for v in strided.values())
    assert strided["x"].shape == (M, K) and strided["lora_B"].shape == (E, N, r)
    expected, _ = reference_of(t, case.scale)
    with torch.no_grad():
        y = run(lora_linear, strided, case.scale)
    assert_close(y, expected, 1e-4, 1e-4, "output", seed)


def test_moe_gates_concentrated_per_tile(layout, triton_backend, gen, seed):
    # Whole runs of tokens use one routed expert and several experts are unused: in the grouped
    # layout most (tile, expert) blocks are skipped, and the result must not change.
    case = Case("moe-top1-blocky", (83,), 50, 36, 6, 16, "topk")
    inputs = make_inputs(case, gen)
    M = case.lead[0]
    gates = torch.zeros(M, case.E, dtype=torch.float64)
    gates[:, 0] = 1.0  # shared
    routed = torch.randint(1, 3, (M,), generator=gen)  # only experts 1 and 2 ever used
    gates[torch.arange(M), routed] = torch.rand(M, generator=gen, dtype=torch.float64) + 0.1
    inputs["gates"] = gates
    t = cast(inputs, torch.float32, requires_grad=True)
    t["gates"].requires_grad_(False)
    dy = torch.randn(M, case.N, generator=gen, dtype=torch.float64)
    y = run(lora_linear, t, case.scale)
    (y * dy.to(DEVICE, torch.float32)).sum().backward()
    expected, grads = reference_of(t, case.scale, dy)
    assert_close(y, expected, 1e-4, 1e-4, "output", seed)
    for name in ("x", "weight", "bias", "lora_A", "lora_B"):
        assert_close(t[name].grad, grads[name], 2e-4, 2e-4, f"d{name}", seed)
    # Unused experts get exactly zero gradient.
    assert (t["lora_A"].grad[3:] == 0).all() and (t["lora_B"].grad[3:] == 0).all()


def test_sparse_per_sample_gates(layout, triton_backend, gen, seed):
    # AutoLoRA-style: each sample picks its own adapters (per-sample gates, most zero); the grouped
    # layout keeps the row order and skips by flags only.
    case = Case("per-sample-top1", (3, 23), 40, 33, 4, 8, "sample")
    inputs = make_inputs(case, gen)
    gates = torch.zeros(3, case.E, dtype=torch.float64)
    gates[0, 1], gates[1, 3], gates[2, 1] = 0.7, 1.3, 0.4
    inputs["gates"] = gates
    t = cast(inputs, torch.float32, requires_grad=True)
    dy = torch.randn(*case.lead, case.N, generator=gen, dtype=torch.float64)
    y = run(lora_linear, t, case.scale)
    (y * dy.to(DEVICE, torch.float32)).sum().backward()
    expected, grads = reference_of(t, case.scale, dy)
    assert_close(y, expected, 1e-4, 1e-4, "output", seed)
    for name in NAMES:
        assert_close(t[name].grad, grads[name], 2e-4, 2e-4, f"d{name}", seed)
