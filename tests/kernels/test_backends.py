"""Every backend of `lora_linear` against a float64 reference built independently of the kernels.

Backends: "addmm" and "merge" (plain torch), "triton" and "triton_tma" (interpreted on CPU, compiled
on CUDA). Cases cover the gate kinds (none, per token, top-k per token, per sample) with one output
block and with three (block-stacked adapters of a fused q/k/v projection). The expected values do
not use `out_blocks`: block j's adapters are written into a zero (E, N, r) B at block j's rows, so a
backend that lets an adapter reach another block's outputs fails. Layer widths are multiples of 4
here so that the Hopper kernel's descriptors apply (odd widths are tested in test_lora_linear.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from x2edit.kernels import lora_linear, lora_linear_reference, use_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "gates")


@dataclass(frozen=True)
class Case:
    name: str
    lead: tuple[int, ...]
    K: int
    N: int  # output features of the whole layer (P blocks of N / P)
    E: int  # adapters per block
    r: int
    gates: str  # "none" | "dense" | "topk" | "sample"
    scale: float = 0.75


CASES = [
    Case("lora", (37,), 44, 36, 1, 5, "none"),
    Case("multi-token", (2, 19), 40, 48, 3, 4, "dense"),
    Case("moe-topk", (53,), 48, 24, 5, 7, "topk"),
    Case("multi-sample", (3, 13), 36, 60, 2, 3, "sample"),
]


def make_inputs(case: Case, P: int, gen: torch.Generator) -> dict:
    E = case.E * P

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    t = {
        "x": rnd(*case.lead, case.K),
        "weight": rnd(case.N, case.K, std=case.K**-0.5),
        "bias": rnd(case.N),
        "lora_A": rnd(E, case.r, case.K, std=case.K**-0.5),
        "lora_B": rnd(E, case.N // P, case.r, std=case.r**-0.5),
        "gates": None,
    }
    if case.gates == "dense":
        t["gates"] = torch.rand(*case.lead, E, generator=gen, dtype=torch.float64)
    elif case.gates == "sample":
        t["gates"] = torch.rand(case.lead[0], E, generator=gen, dtype=torch.float64)
    elif case.gates == "topk":
        probs = torch.randn(*case.lead, E, generator=gen, dtype=torch.float64).softmax(-1)
        top = probs.topk(2, dim=-1)
        t["gates"] = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
    return t


def block_diagonal(lora_B: torch.Tensor, P: int) -> torch.Tensor:
    """(E, N / P, r) block-stacked up projections -> the equivalent dense (E, N, r) with zeros."""
    E, Nb, r = lora_B.shape
    full = lora_B.new_zeros(E, P * Nb, r)
    for j in range(P):
        rows = slice(j * Nb, (j + 1) * Nb)
        full[j * E // P : (j + 1) * E // P, rows] = lora_B[j * E // P : (j + 1) * E // P]
    return full


def expected(t: dict, P: int, scale: float, dy: torch.Tensor | None):
    """float64 output (and gradients) of the dense equivalent, on the inputs the backend saw."""
    ref = {k: (v.detach().double().cpu().requires_grad_(dy is not None) if v is not None else None)
           for k, v in t.items()}  # fmt: skip
    B_full = block_diagonal(ref["lora_B"], P)
    y = lora_linear_reference(ref["x"], ref["weight"], ref["bias"], ref["lora_A"], B_full, ref["gates"], scale)
    grads = {}
    if dy is not None:
        (y * dy.double().cpu()).sum().backward()
        grads = {k: v.grad for k, v in ref.items() if v is not None}
    return y.detach(), grads


def close(actual, wanted, tol, what, seed):
    torch.testing.assert_close(actual.detach().double().cpu(), wanted, atol=tol, rtol=tol,
                               msg=lambda m: f"{what} (seed {seed}): {m}")  # fmt: skip


@pytest.mark.parametrize("P", [1, 3], ids=["one-block", "qkv-blocks"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_and_gradients_match_the_dense_reference(case, P, fast_backend, gen, seed):
    if fast_backend == "merge" and case.gates in ("dense", "topk"):
        pytest.skip("merge takes gates that are constant per sample (tested to refuse per-token gates below)")
    inputs = make_inputs(case, P, gen)
    t = {k: (v.to(DEVICE, torch.float32).requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    dy = torch.randn(*case.lead, case.N, generator=gen, dtype=torch.float64)
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["gates"], case.scale, out_blocks=P)
    (y * dy.to(DEVICE, torch.float32)).sum().backward()
    want, grads = expected(t, P, case.scale, dy)
    close(y, want, 1e-4, "output", seed)
    for name in NAMES:
        if t[name] is None:
            continue
        got = t[name].grad
        want_grad = grads[name]  # for lora_B: through the block-diagonal scatter, at the block positions
        close(got, want_grad, 2e-4, f"d{name}", seed)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=lambda c: c.name)
def test_inference_with_a_poisoned_out_buffer(case, fast_backend, gen, seed):
    P = 3
    t = {k: (v.to(DEVICE, torch.float32) if v is not None else None) for k, v in make_inputs(case, P, gen).items()}
    out = torch.full((*case.lead, case.N), float("nan"), device=DEVICE)
    with torch.no_grad():
        y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["gates"], case.scale,
                        out=out, out_blocks=P)  # fmt: skip
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(out).all(), f"unwritten outputs (seed {seed})"
    close(out, expected(t, P, case.scale, None)[0], 1e-4, "output", seed)


def test_bfloat16_blocks(fast_backend, gen, seed):
    case, P = CASES[2], 3
    t = {k: (v.to(DEVICE, torch.bfloat16) if v is not None else None) for k, v in make_inputs(case, P, gen).items()}
    t["gates"] = t["gates"].float()  # router gates stay float32 beside bf16 activations
    if fast_backend == "merge":
        t["gates"] = None
    y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["gates"], case.scale, out_blocks=P)
    assert y.dtype == torch.bfloat16
    want = expected(t, P, case.scale, None)[0]
    rel = (y.double().cpu() - want).norm() / want.norm()
    assert rel < 1e-2, f"relative error {rel:.2e} (seed {seed})"


def test_merge_refuses_per_token_gates():
    x, w = torch.randn(5, 8), torch.randn(4, 8)
    A, B, g = torch.randn(2, 3, 8), torch.randn(2, 4, 3), torch.rand(5, 2)
    with use_backend("merge"), pytest.raises(RuntimeError, match="per token"):
        lora_linear(x, w, None, A, B, g)


def test_out_blocks_validation():
    x, w = torch.randn(5, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="must divide"):
        lora_linear(x, w, None, torch.randn(2, 3, 8), torch.randn(2, 2, 3), out_blocks=3)  # E = 2
    with pytest.raises(ValueError, match=r"expected lora_A \(3, 3, 8\) and lora_B \(3, 2, 3\)"):
        lora_linear(x, w, None, torch.randn(3, 3, 8), torch.randn(3, 6, 3), out_blocks=3)  # B not per block
    with pytest.raises(TypeError, match="out_blocks"):
        lora_linear(x, w, None, torch.randn(3, 3, 8), torch.randn(3, 2, 3), out_blocks=1.5)

