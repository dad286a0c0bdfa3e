"""Plain-torch fast paths of `x2edit.kernels.lora_linear`: the two that beat the Triton kernels on an H200.

    addmm:  y = x W^T + b                          one cuBLAS call, as the layer without adapters
            u = g * (x A_cat^T)                    (M, R) the gated low-rank codes
            y += scale * u B_cat^T                 one in-place addmm_ into y (no second (M, N) tensor)
    merge:  W' = W + scale * B_cat diag(g) A_cat   (N, K), one per sample for per-sample gates
            y = x W'^T + b                         one cuBLAS call on the merged weight

A_cat[c, k] = A[c // r, c % r, k] and B_cat[n, c] = B[c // r, n, c % r] as in the Triton path. With
out_blocks = P > 1 (block-stacked adapters of a fused q/k/v projection) adapter group j only reaches
output block j: the up projection and the merge are then P independent products (a batched matmul).

Both are exact up to rounding and differentiable through autograd. "merge" needs gates that do not
change over the tokens of a sample (None or per sample): it pays K*N per distinct weight instead of
M*(K+N) per call, so it wins for many tokens on narrow layers (`x2edit.kernels.dispatch` decides). It rounds
the merged weight once to the weight's dtype: in bfloat16 that is the same precision loss as
peft's or diffusers' `fuse_lora`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from x2edit.kernels.checks import LoRAShapes


def _up_operand(lora_B: torch.Tensor, shapes: LoRAShapes) -> torch.Tensor:
    """B_cat^T per output block: (P, E / P * r, N / P), rank columns expert-major like A_cat's rows.

    A copy of B for E / P > 1 (the parameters are stored (E, N / P, r)); a view for one adapter per block.
    """
    P, r = shapes.blocks, shapes.r
    Eb, Nb = shapes.E // P, shapes.N // P
    return lora_B.reshape(P, Eb, Nb, r).permute(0, 1, 3, 2).reshape(P, Eb * r, Nb)


def _gates_2d(gates: torch.Tensor, shapes: LoRAShapes, sparse_gate_grad: bool) -> torch.Tensor:
    g = gates.reshape(shapes.M, shapes.E)
    if sparse_gate_grad:
        g = g * (g != 0)  # same values; d/dgates = 0 where gates == 0 (as the reference)
    return g


def lora_linear_addmm(
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
    """cuBLAS base matmul, then the low-rank term added into its output in place (validated arguments)."""
    M, K, N, R, P = shapes.M, shapes.K, shapes.N, shapes.R, shapes.blocks
    x2 = x.reshape(M, K)  # (M, K)
    if out is not None:
        y = out.view(M, N)
        if bias is not None:
            torch.addmm(bias, x2, weight.t(), out=y)
        else:
            torch.mm(x2, weight.t(), out=y)
    else:
        y = F.linear(x2, weight, bias)  # (M, N)
    u = x2 @ lora_A.reshape(R, K).t()  # (M, R): every adapter's low-rank code
    if gates is not None:  # gate in rank space, in the activations' dtype (as the reference)
        g = _gates_2d(gates, shapes, sparse_gate_grad).to(u.dtype)
        u = (u.view(M, shapes.E, shapes.r) * g[:, :, None]).view(M, R)
    up = _up_operand(lora_B, shapes)  # (P, R / P, N / P)
    if P == 1:
        y.addmm_(u, up[0], alpha=scale)
    else:  # block j of y gets the codes of adapter group j only
        y.view(M, P, N // P).transpose(0, 1).baddbmm_(u.view(M, P, R // P).transpose(0, 1), up, alpha=scale)
    return y.view(*shapes.lead, N)


def lora_linear_merge(
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
    """Merge the adapters into the base weight for this call (one weight per sample), one cuBLAS call each.

    Gates must be None or per sample (`shapes.gate_kind` "none" or "sample"); validated arguments.
    """
    if shapes.gate_kind == "token":
        raise RuntimeError(
            "kernels backend 'merge' needs gates that are constant over each sample's tokens (None, or (B, E) "
            "per sample); per-token gates change the weight per token: use 'addmm' or 'auto'"
        )
    M, K, N, R, P, r = shapes.M, shapes.K, shapes.N, shapes.R, shapes.blocks, shapes.r
    if M == 0:  # an empty batch has no gates to merge by; the result (empty) is the same
        return lora_linear_addmm(x, weight, bias, lora_A, lora_B, gates, scale, shapes, out, sparse_gate_grad)
    Nb = N // P
    A = lora_A.reshape(P, R // P, K)  # (P, R / P, K)
    up_t = _up_operand(lora_B, shapes).transpose(1, 2)  # (P, N / P, R / P): B_cat per block
    if shapes.gate_kind == "none":
        if P == 1:
            merged = torch.addmm(weight, up_t[0], A[0], alpha=scale)  # (N, K), rounded once
        else:
            merged = torch.baddbmm(weight.view(P, Nb, K), up_t, A, alpha=scale).view(N, K)
        x2 = x.reshape(M, K)
        if out is None:
            return F.linear(x2, merged, bias).view(*shapes.lead, N)
        if bias is not None:
            torch.addmm(bias, x2, merged.t(), out=out.view(M, N))
        else:
            torch.mm(x2, merged.t(), out=out.view(M, N))
        return out
    # Per-sample gates: x is (S, T, K) and check_lora_inputs expanded the (S, E) gates over T.
    S, T = shapes.lead
    g = _gates_2d(gates, shapes, sparse_gate_grad).view(S, T, shapes.E)[:, 0]  # (S, E)
    g = g.to(x.dtype).view(S, P, 1, R // P // r, 1).expand(S, P, 1, R // P // r, r).reshape(S, P, 1, R // P)
    delta = torch.matmul(up_t * g, A)  # (S, P, N / P, K): each sample's gated update
    merged = (weight.view(1, P, Nb, K) + scale * delta).view(S, N, K)
    wt = merged.transpose(1, 2)  # (S, K, N)
    if out is None:
        y = torch.bmm(x, wt) if bias is None else torch.baddbmm(bias, x, wt)
        return y
    if bias is None:
        torch.bmm(x, wt, out=out)
    else:
        torch.baddbmm(bias, x, wt, out=out)
    return out
