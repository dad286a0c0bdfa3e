"""Plain-torch references for the LoRA / multi-LoRA / MoE-LoRA linear.

`lora_linear_reference` is the ground truth the Triton kernels are tested against (run in float64)
and the "torch" backend of `x2edit.kernels.lora_linear`. It computes every adapter densely with two
einsums, so it is exact for any gate pattern and differentiable through autograd.

`moe_lora_loop_reference` is the slow path that the kernels replace: one Python iteration per
expert, with the tokens routed to it gathered, transformed and scattered back (the pattern of
X2Edit's released MoE-LoRA). It is here for tests and for the benchmark's comparison row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from x2edit.kernels.checks import LoRAShapes, check_lora_inputs


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gates: torch.Tensor | None = None,
    scale: float = 1.0,
    *,
    out: torch.Tensor | None = None,
    sparse_gate_grad: bool = False,
    out_blocks: int = 1,
) -> torch.Tensor:
    """y = x W^T + b + scale * sum_e gates[..., e] * (x A_e^T) B_e^T, in plain torch.

    Args:
        x: (..., K) activations.
        weight: (N, K) base weight; bias: (N,) or None.
        lora_A: (E, r, K) down projections; lora_B: (E, N, r) up projections.
        gates: (..., E) per-token gates, (B, E) per-sample gates for x of shape (B, T, K), or None
            (all ones).
        scale: multiplier of the adapter sum (alpha / r for a classic LoRA).
        out: optional (..., N) tensor to write the result into (not with autograd).
        sparse_gate_grad: if True, dL/dgates is 0 wherever gates == 0 (see `x2edit.kernels.lora_linear`).
        out_blocks: P > 1: output block j (of N / P features) gets only adapters j * E / P ...
            (j + 1) * E / P - 1, and lora_B is (E, N / P, r) (block-stacked LoRAs of a fused projection).

    Returns:
        (..., N) tensor in x's dtype.
    """
    shapes, gates = check_lora_inputs(x, weight, bias, lora_A, lora_B, gates, scale, out, out_blocks)
    return lora_linear_dense(x, weight, bias, lora_A, lora_B, gates, scale, shapes, out, sparse_gate_grad)


def lora_linear_dense(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gates: torch.Tensor | None,
    scale: float,
    shapes: LoRAShapes,
    out: torch.Tensor | None,
    sparse_gate_grad: bool = False,
) -> torch.Tensor:
    """`lora_linear_reference` on arguments already validated by `check_lora_inputs`."""
    x2 = x.reshape(shapes.M, shapes.K)  # (M, K)
    y = F.linear(x2, weight, bias)  # (M, N)
    t = torch.einsum("mk,erk->mer", x2, lora_A)  # (M, E, r): every adapter's low-rank code
    if gates is not None and sparse_gate_grad:
        gates = gates * (gates != 0)  # same values; d/dgates = 0 where gates == 0
    if gates is not None:
        # Gate in rank space, in the activations' dtype (as a torch layer would).
        t = t * gates.reshape(shapes.M, shapes.E, 1).to(t.dtype)
    P = shapes.blocks
    if P == 1:
        y = y + scale * torch.einsum("mer,enr->mn", t, lora_B)  # (M, N)
    else:  # adapter group j -> output block j
        t = t.reshape(shapes.M, P, shapes.E // P, shapes.r)  # (M, P, E / P, r)
        B = lora_B.reshape(P, shapes.E // P, shapes.N // P, shapes.r)  # (P, E / P, N / P, r)
        y = y + scale * torch.einsum("mper,penr->mpn", t, B).reshape(shapes.M, shapes.N)
    y = y.reshape(*shapes.lead, shapes.N)
    if out is not None:
        return out.copy_(y)
    return y


def moe_lora_loop_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gates: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """The per-expert Python loop that MoE-LoRA layers usually run (the slow baseline).

    For each expert: find the tokens whose gate is non-zero, gather them, apply A_e then B_e, weight
    by the gate and scatter-add back. Same arguments and result as `lora_linear_reference` (gates
    required); differentiable through autograd.
    """
    if gates is None:
        raise ValueError("moe_lora_loop_reference: gates are required (use lora_linear_reference)")
    shapes, gates = check_lora_inputs(x, weight, bias, lora_A, lora_B, gates, scale, None)
    x2 = x.reshape(shapes.M, shapes.K)  # (M, K)
    g2 = gates.reshape(shapes.M, shapes.E)  # (M, E)
    y = F.linear(x2, weight, bias)  # (M, N)
    for e in range(shapes.E):
        idx = torch.nonzero(g2[:, e], as_tuple=True)[0]  # (M_e,) tokens routed to expert e
        if idx.numel() == 0:
            continue
        h = F.linear(F.linear(x2[idx], lora_A[e]), lora_B[e])  # (M_e, N)
        y = y.index_add(0, idx, h * (scale * g2[idx, e, None]).to(h.dtype))
    return y.reshape(*shapes.lead, shapes.N)
