"""Triton kernels for the fused LoRA / gated multi-LoRA / MoE-LoRA linear.

    y = x W^T + b + scale * sum_e g[m, e] * (x A_e^T) B_e^T
    x (M, K), W (N, K), b (N,), A (E, r, K), B (E, N, r), g (M, E)

All three adapter kinds are one computation in "rank space": stack the adapters' rank columns into
R = E * r columns (column c belongs to expert c // r), then
  1. shrink:        t = x A_cat^T                       (M, R)   A_cat = A.reshape(E * r, K)
                    u = scale * g[:, c // r] * t        (M, R)   gate applied in rank space
  2. fused matmul:  y = x W^T + u B_cat^T + b           (M, N)   B_cat[n, c] = B[c // r, n, c % r]
The second kernel adds the low-rank product inside the base matmul, before its single store, so y
is written once and never re-read. The shrink reads x once more; while E * r <= 256 one program per
row tile covers the whole rank space, so that is a single extra pass over x.

Sparse gates (top-k routing: most g[m, e] exactly 0) with E * r > 256 are "grouped": a flag per
(16 rows, rank block) says whether any gate under it is non-zero, and both kernels skip the rank
blocks whose flags are all zero, so a tile pays only for the experts its tokens use. Per-token gates
first get a row order that puts tokens with the same set of experts together (rows are gathered
and scattered by that order inside the kernels; nothing is copied); per-sample gates need none.
Skipping is exact: a zero gate makes the skipped contribution exactly zero. Without gates, or with
E * r <= 256, every expert is computed densely (cheaper than sorting at that size).

Backward reuses the same two kernels on transposed operands (all operands are passed with strides):
  v  = dy B_cat                      (M, R)  shrink with "A" = B_cat^T
  dt = scale * g * v                 (M, R)  its gated output
  dx = dy W + dt A_cat               (M, K)  fused matmul with "W" = W^T, "B" = A_cat^T
  dA = dt^T x,  dB = dy^T u,  dW = dy^T x,  db = sum(dy),  dg[m, e] = scale * sum_{c in e} t v
dA, dB and dW are plain torch matmuls (dense in rank space).

Block-stacked adapters (out_blocks = P > 1, the q/k/v adapters of a fused projection): rank column c
reaches only output block c // (R / P); the matmul kernel's epilogue visits only the rank columns of
the blocks its tile covers, and the backward's v = dy B_cat reads only dy's columns of the same block.

Launch configurations come from `x2edit.kernels.tuning` (shipped per GPU name, else tuned once per key).
The matmul kernel here is the portable one (pointer loads, one program per tile); on Hopper the
"triton_tma" backend runs `x2edit.kernels.triton_tma`'s persistent kernel with tensor-memory descriptors
where the operands allow it, with the same epilogue.

This module imports triton; `x2edit.kernels.dispatch` imports it only when a Triton backend is taken.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from x2edit.kernels.checks import LoRAShapes
from x2edit.kernels.reference import lora_linear_dense
from x2edit.kernels.triton_parts import (
    add_bias,
    dot,
    dtype_name,
    input_precision,
    lowrank_epilogue,
    next_pow2,
    tile_coords,
    upcast_dot,
)
from x2edit.kernels.triton_tma import FUSED_TMA
from x2edit.kernels.triton_tma import eligible as tma_eligible
from x2edit.kernels.triton_tma import fused as tma_fused
from x2edit.kernels.tuning import KernelConfig, Tuner

# Rows per tile-activity flag. Every BLOCK_M is a multiple of it, so one flag table serves every
# autotuned tile size (a kernel ORs the BLOCK_M // FLAG_ROWS flags under its tile).
FLAG_ROWS = 16
# E * r above which sparse gates are grouped; at or below it, all experts are computed densely (the
# whole rank space fits one shrink tile, and sorting would cost more than it saves).
DENSE_RANK_LIMIT = 256
# Widest rank block: dense mode reads x once for up to 256 rank columns; grouped mode uses one
# block per expert (r <= 128) so that a block is skipped exactly when its expert is unused.
MAX_DENSE_BLOCK_R = 256
MAX_GROUPED_BLOCK_R = 128
# Rank columns per tl.dot in the fused kernel's low-rank loop (bounds its shared-memory tiles).
MAX_EXPAND_CHUNK = 64

# --------------------------------------------------------------------------------------------------
# Launch configurations (see `x2edit.kernels.tuning`). The first of each list is the "fixed" one (tests,
# unknown GPUs in fixed mode): moderate tiles that fit every dtype's shared-memory budget.

FUSED = Tuner(
    "fused",
    [
        KernelConfig.of(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=w, num_stages=st)
        for m, n, k, w, st in [  # for Hopper / Ampere; few, because each one compiles per variant
            (64, 64, 32, 4, 3),
            (128, 256, 64, 8, 3),
            (128, 128, 64, 8, 4),
            (128, 128, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (128, 128, 32, 4, 4),  # float32 operands: half the K tile keeps shared memory in budget
        ]
    ],
    interpreter_config=KernelConfig.of(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1),
)

# The shrink's accumulator is (BLOCK_M, BLOCK_R) float32 in registers: keep it <= 64 KiB per program,
# or it spills. The key's fourth entry is the rank block.
SHRINK = Tuner(
    "shrink",
    [
        KernelConfig.of(BLOCK_M=m, BLOCK_K=k, num_warps=w, num_stages=st)
        for m, k, w, st in [  # the rank block is fixed by the caller
            (32, 64, 4, 3),
            (32, 128, 4, 4),
            (64, 64, 4, 4),
            (64, 128, 8, 3),
            (128, 64, 8, 3),
        ]
    ],
    fits=lambda c, key: c["BLOCK_M"] * key[3] <= 16384,
    interpreter_config=KernelConfig.of(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=1),
)
TUNERS = (FUSED, SHRINK, FUSED_TMA)


# --------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _route_key_kernel(
    g_ptr,  # (M, E) gates
    key_ptr,  # (M,) int32 output: bitmask of the experts e < 31 with a non-zero gate
    M,
    E,
    stride_gm,
    stride_ge,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    mask_m = offs_m < M
    g = tl.load(
        g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_e[None, :] * stride_ge,
        mask=mask_m[:, None] & (offs_e < E)[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_E)
    bit = tl.where(offs_e < 31, 1 << tl.minimum(offs_e, 30), 0)  # (BLOCK_E,) int32
    key = tl.sum(tl.where(g != 0, bit[None, :], 0), axis=1)
    tl.store(key_ptr + offs_m, key, mask=mask_m)


@triton.jit
def _tile_flags_kernel(
    g_ptr,  # (M, E) gates
    row_idx_ptr,  # (M,) int64: position i of the sorted order holds token row_idx[i]
    flags_ptr,  # (cdiv(M, FLAG_ROWS), cdiv(R, BLOCK_R)) int8 output
    M,
    R,
    RANK,
    stride_gm,
    stride_ge,
    stride_fm,
    FLAG_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_PERM: tl.constexpr,
):
    # One program per (FLAG_ROWS sorted rows, rank block): flag = any gate under it is non-zero.
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_i = pid_c * FLAG_ROWS + tl.arange(0, FLAG_ROWS)
    mask_m = offs_i < M
    if HAS_PERM:
        rows = tl.load(row_idx_ptr + offs_i, mask=mask_m, other=0).to(tl.int64)
    else:
        rows = offs_i.to(tl.int64)
    cols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_c = cols < R
    # Each gate is read once per rank column of its expert: tiny next to the matmuls.
    g = tl.load(
        g_ptr + rows[:, None] * stride_gm + (cols // RANK)[None, :] * stride_ge,
        mask=mask_m[:, None] & mask_c[None, :],
        other=0.0,
    )
    nonzero = (g != 0).to(tl.int32)  # NaN gates count as non-zero, so NaN propagates
    flag = tl.max(tl.max(nonzero, axis=1), axis=0)
    tl.store(flags_ptr + pid_c * stride_fm + pid_r, flag.to(tl.int8))


@triton.jit
def _shrink_kernel(
    x_ptr,  # (M, K) activations (or dy in backward)
    a_ptr,  # low-rank operand: element (c, k) at (c // RANK) * stride_ae + (c % RANK) * stride_aj + k' * stride_ak
    g_ptr,  # (M, E) gates, unused without HAS_GATES
    t_ptr,  # (M, R) output: ungated x A^T, written only with STORE_T
    u_ptr,  # (M, R) output: scale * g * x A^T
    row_idx_ptr,  # (M,) int64 row order, unused without HAS_PERM
    flags_ptr,  # tile-activity flags, unused without HAS_FLAGS
    M,
    K,
    R,
    RANK,
    K_BLOCK,  # BLOCKED: columns of x per block (k' = k % K_BLOCK); rank columns per block is R_BLOCK
    R_BLOCK,
    scale,
    stride_xm,
    stride_xk,
    stride_ae,
    stride_aj,
    stride_ak,
    stride_gm,
    stride_ge,
    stride_tm,
    stride_um,
    stride_fm,
    HAS_GATES: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_FLAGS: tl.constexpr,
    STORE_T: tl.constexpr,
    BLOCKED: tl.constexpr,  # block-diagonal operand: rank block j meets only x's column block j
    FLAG_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Program (pid_m, pid_r) computes rows [pid_m*BLOCK_M, +BLOCK_M) (in sorted order when HAS_PERM)
    # of rank columns [pid_r*BLOCK_R, +BLOCK_R).
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_i < M
    if HAS_PERM:
        rows = tl.load(row_idx_ptr + offs_i, mask=mask_m, other=0).to(tl.int64)
    else:
        rows = offs_i.to(tl.int64)
    cols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_c = cols < R
    a_col_off = (cols // RANK).to(tl.int64) * stride_ae + (cols % RANK).to(tl.int64) * stride_aj  # (BLOCK_R,)

    k_lo = 0
    k_hi = tl.cdiv(K, BLOCK_K)
    if BLOCKED:
        # These rank columns belong to blocks [j_lo, j_hi]: only x's columns of those blocks meet them.
        j_lo = (pid_r * BLOCK_R) // R_BLOCK
        j_hi = (tl.minimum(pid_r * BLOCK_R + BLOCK_R, R) - 1) // R_BLOCK
        k_lo = (j_lo * K_BLOCK) // BLOCK_K
        k_hi = tl.cdiv((j_hi + 1) * K_BLOCK, BLOCK_K)
    if HAS_FLAGS:
        # Skip the whole K loop when no token of this tile uses this rank block: t = u = 0 there.
        chunks = pid_m * (BLOCK_M // FLAG_ROWS) + tl.arange(0, BLOCK_M // FLAG_ROWS)
        f = tl.load(flags_ptr + chunks * stride_fm + pid_r, mask=chunks < tl.cdiv(M, FLAG_ROWS), other=0)
        k_hi = k_lo + (k_hi - k_lo) * (tl.max(f.to(tl.int32), axis=0) > 0).to(tl.int32)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for kk in range(k_lo, k_hi):
        offs_k = kk * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xk = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        mask_a = mask_k[:, None] & mask_c[None, :]
        if BLOCKED:
            mask_a = mask_a & ((offs_k // K_BLOCK)[:, None] == (cols // R_BLOCK)[None, :])
            k_in = (offs_k % K_BLOCK).to(tl.int64)
        else:
            k_in = offs_k.to(tl.int64)
        ak = tl.load(a_ptr + k_in[:, None] * stride_ak + a_col_off[None, :], mask=mask_a, other=0.0)  # (BLOCK_K, BLOCK_R)
        acc = dot(xk, ak, acc, INPUT_PRECISION, UPCAST_DOT)

    mask = mask_m[:, None] & mask_c[None, :]
    if STORE_T:
        tl.store(t_ptr + rows[:, None] * stride_tm + cols[None, :], acc.to(t_ptr.dtype.element_ty), mask=mask)
    if HAS_GATES:
        g = tl.load(
            g_ptr + rows[:, None] * stride_gm + (cols // RANK)[None, :].to(tl.int64) * stride_ge,
            mask=mask,
            other=0.0,
        ).to(tl.float32)  # (BLOCK_M, BLOCK_R): each token's gate of the column's expert
        acc = acc * (g * scale)
    else:
        acc = acc * scale
    tl.store(u_ptr + rows[:, None] * stride_um + cols[None, :], acc.to(u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_kernel(
    x_ptr,  # (M, K) activations (dy in backward)
    w_ptr,  # base operand: element (n, k) at n * stride_wn + k * stride_wk
    bias_ptr,  # (N,) with stride_bias, unused without HAS_BIAS
    u_ptr,  # (M, R) gated low-rank codes from the shrink, contiguous along R
    up_ptr,  # low-rank up operand: element (n, c) at (c // RANK) * stride_upe + (c % RANK) * stride_upj + n' * stride_upn
    y_ptr,  # (M, N) output
    row_idx_ptr,
    flags_ptr,
    M,
    N,
    K,
    R,
    RANK,
    N_BLOCK,  # output columns per block (N without blocks); n' = n % N_BLOCK
    R_BLOCK,  # rank columns per block (R without blocks)
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_um,
    stride_upe,
    stride_upj,
    stride_upn,
    stride_bias,
    stride_ym,
    stride_yn,
    stride_fm,
    HAS_BIAS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_FLAGS: tl.constexpr,
    BLOCKED: tl.constexpr,
    FLAG_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EXPAND_CHUNK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_i < M
    if HAS_PERM:
        rows = tl.load(row_idx_ptr + offs_i, mask=mask_m, other=0).to(tl.int64)
    else:
        rows = offs_i.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n64 = offs_n.to(tl.int64)

    # 1. Base matmul: acc = x W^T over K.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = kk * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xk = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        wk = tl.load(
            w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n64[None, :] * stride_wn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_N)
        acc = dot(xk, wk, acc, INPUT_PRECISION, UPCAST_DOT)

    # 2. Low-rank epilogue (acc += u B_cat^T), 3. bias, one rounding to the output dtype, one store.
    acc = lowrank_epilogue(
        acc, pid_m, rows, mask_m, offs_n, mask_n, u_ptr, up_ptr, flags_ptr, M, N, R, RANK, N_BLOCK, R_BLOCK,
        stride_um, stride_upe, stride_upj, stride_upn, stride_fm, HAS_FLAGS, BLOCKED, FLAG_ROWS, BLOCK_R,
        EXPAND_CHUNK, INPUT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    acc = add_bias(acc, bias_ptr, offs_n, mask_n, stride_bias, HAS_BIAS)
    tl.store(
        y_ptr + rows[:, None] * stride_ym + offs_n64[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


# --------------------------------------------------------------------------------------------------
# Launch wrappers: check, allocate, grid.


class _Plan:
    """How one call's rank space is laid out: rank block width, row order and tile flags.

    dense:   perm None, flags None: every tile computes every rank column.
    grouped: flags (cdiv(M, FLAG_ROWS), cdiv(R, block_r)) int8 mark the blocks to compute; perm
             (M,) int64 is the sorted row order for per-token gates, None for per-sample gates
             (whose tiles are already homogeneous: a tile spans at most two samples).
    """

    def __init__(self, block_r: int, perm: torch.Tensor | None, flags: torch.Tensor | None):
        self.block_r = block_r
        self.expand_chunk = min(block_r, MAX_EXPAND_CHUNK)
        self.perm = perm
        self.flags = flags

    @classmethod
    def build(cls, gates: torch.Tensor | None, M: int, E: int, r: int, gates_per_sample: bool) -> _Plan:
        R = E * r
        if gates is None or R <= DENSE_RANK_LIMIT:
            return cls(min(max(16, next_pow2(R)), MAX_DENSE_BLOCK_R), None, None)
        # One block per expert (for r a power of two <= 128), so unused experts are skipped.
        block_r = min(max(16, next_pow2(r)), MAX_GROUPED_BLOCK_R)
        perm = None if gates_per_sample else _group_rows(gates)
        return cls(block_r, perm, _tile_flags(gates, perm, M, R, r, block_r))


def _group_rows(gates: torch.Tensor) -> torch.Tensor:
    """(M,) int64 row order that puts tokens using the same set of experts next to each other.

    The key is the bitmask of non-zero gates (of the first 31 experts); sorting it groups equal
    sets, and neighbouring keys share their highest expert, so a tile straddling two sets still
    uses few experts. The order affects only speed: every row is computed the same way wherever
    it lands.
    """
    M, E = gates.shape
    keys = torch.empty(M, device=gates.device, dtype=torch.int32)
    block_m, block_e = 128, max(2, next_pow2(E))
    _route_key_kernel[(triton.cdiv(M, block_m),)](
        gates, keys, M, E, gates.stride(0), gates.stride(1), BLOCK_M=block_m, BLOCK_E=block_e
    )
    return torch.sort(keys).indices  # int32 keys: half the radix passes of int64


def _tile_flags(
    gates: torch.Tensor, perm: torch.Tensor | None, M: int, R: int, r: int, block_r: int
) -> torch.Tensor:
    n_chunks, n_rb = triton.cdiv(M, FLAG_ROWS), triton.cdiv(R, block_r)
    flags = torch.empty((n_chunks, n_rb), device=gates.device, dtype=torch.int8)
    _tile_flags_kernel[(n_chunks, n_rb)](
        gates, perm if perm is not None else flags, flags, M, R, r, gates.stride(0), gates.stride(1),
        flags.stride(0), FLAG_ROWS=FLAG_ROWS, BLOCK_R=block_r, HAS_PERM=perm is not None,
    )  # fmt: skip
    return flags


def _shrink(
    x: torch.Tensor,  # (M, K)
    a: torch.Tensor,  # low-rank operand (any layout)
    a_strides: tuple[int, int, int],  # (expert, rank row, k) strides of `a`
    gates: torch.Tensor | None,  # (M, E)
    scale: float,
    R: int,
    r: int,
    plan: _Plan,
    store_t: bool,
    skip: bool,
    blocks: tuple[int, int] | None = None,  # (columns of x, rank columns) per block: block-diagonal `a`
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """t = x a^T (only if store_t) and u = scale * g * t, both (M, R) in x's dtype."""
    M, K = x.shape
    u = torch.empty((M, R), device=x.device, dtype=x.dtype)
    t = torch.empty((M, R), device=x.device, dtype=x.dtype) if store_t else u  # u: unused placeholder
    use_flags = skip and plan.flags is not None
    g = gates if gates is not None else u  # placeholder pointer, never read without HAS_GATES
    f = plan.flags if use_flags else u
    perm = plan.perm if plan.perm is not None else u
    k_block, r_block = blocks or (K, R)

    def launch(config: KernelConfig) -> None:
        grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(R, plan.block_r))
        _shrink_kernel[grid](
            x, a, g, t, u, perm, f,
            M, K, R, r, k_block, r_block, scale,
            x.stride(0), x.stride(1), *a_strides,
            g.stride(0), g.stride(1), t.stride(0), u.stride(0), f.stride(0),
            HAS_GATES=gates is not None, HAS_PERM=plan.perm is not None, HAS_FLAGS=use_flags, STORE_T=store_t,
            BLOCKED=blocks is not None, FLAG_ROWS=FLAG_ROWS, BLOCK_R=plan.block_r,
            INPUT_PRECISION=input_precision(x.dtype), UPCAST_DOT=upcast_dot(x.dtype), **config.kwargs,
        )  # fmt: skip

    # The key: a new token count within the same power of two does not re-tune.
    key = (next_pow2(M), K, R, plan.block_r, dtype_name(x.dtype), blocks is not None)
    launch(SHRINK.pick(key, x.device, launch))
    return (t if store_t else None), u


def _fused(
    x: torch.Tensor,  # (M, K)
    w: torch.Tensor,  # base operand
    w_strides: tuple[int, int],  # (n, k) strides of the base operand
    bias: torch.Tensor | None,  # (N,)
    u: torch.Tensor,  # (M, R) contiguous
    up: torch.Tensor,  # low-rank up operand
    up_strides: tuple[int, int, int],  # (expert, rank col, n) strides of `up`
    y: torch.Tensor,  # (M, N) output
    r: int,
    plan: _Plan,
    blocks: tuple[int, int] | None = None,  # (output columns, rank columns) per block
    tma: bool = False,
) -> torch.Tensor:
    """y = x w^T + u up^T + bias, written once into y (with the Hopper kernel where `tma` allows it)."""
    M, K = x.shape
    N = y.shape[1]
    R = u.shape[1]
    if tma and tma_eligible(x, w, w_strides):
        tma_fused(
            x, w, w_strides, bias, u, up, up_strides, y, r, perm=plan.perm, flags=plan.flags,
            block_r=plan.block_r, expand_chunk=plan.expand_chunk, flag_rows=FLAG_ROWS, blocks=blocks,
        )  # fmt: skip
        return y
    f = plan.flags if plan.flags is not None else u
    perm = plan.perm if plan.perm is not None else u
    b = bias if bias is not None else u
    n_block, r_block = blocks or (N, R)

    def launch(config: KernelConfig) -> None:
        grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
        _fused_kernel[grid](
            x, w, b, u, up, y, perm, f,
            M, N, K, R, r, n_block, r_block,
            x.stride(0), x.stride(1), *w_strides, u.stride(0), *up_strides,
            b.stride(0), y.stride(0), y.stride(1), f.stride(0),
            HAS_BIAS=bias is not None, HAS_PERM=plan.perm is not None, HAS_FLAGS=plan.flags is not None,
            BLOCKED=blocks is not None, FLAG_ROWS=FLAG_ROWS, BLOCK_R=plan.block_r, EXPAND_CHUNK=plan.expand_chunk,
            INPUT_PRECISION=input_precision(x.dtype), UPCAST_DOT=upcast_dot(x.dtype), **config.kwargs,
        )  # fmt: skip

    key = (next_pow2(M), N, K, R, plan.block_r, dtype_name(x.dtype))
    launch(FUSED.pick(key, x.device, launch))
    return y


# --------------------------------------------------------------------------------------------------
# Autograd


def _blocks(shapes_P: int, N: int, R: int) -> tuple[int, int] | None:
    """(output columns, rank columns) per block, or None without blocks."""
    return None if shapes_P == 1 else (N // shapes_P, R // shapes_P)


def _forward(x2, weight, bias, lora_A, lora_B, gates2, scale, y, need_dg, skip, gates_per_sample, P, tma):
    """Forward launches; returns (u, t, plan) for the backward (t only when need_dg).

    x2 (M, K), weight (N, K), bias (N,) | None, lora_A (E, r, K), lora_B (E, N / P, r),
    gates2 (M, E) | None, y (M, N) output. `skip`: the shrink may skip unused rank blocks (not
    when the exact dL/dg at zero gates is needed: it needs the skipped t).
    """
    M = x2.shape[0]
    E, _, r = lora_B.shape
    N = weight.shape[0]
    plan = _Plan.build(gates2, M, E, r, gates_per_sample)
    # A_cat[c, k] = A[c // r, c % r, k]
    t, u = _shrink(
        x2, lora_A, (lora_A.stride(0), lora_A.stride(1), lora_A.stride(2)), gates2, scale, E * r, r, plan,
        store_t=need_dg, skip=skip,
    )  # fmt: skip
    # B_cat[n, c] = B[c // r, n % (N / P), c % r] (zero outside c's block)
    _fused(
        x2, weight, (weight.stride(0), weight.stride(1)), bias, u,
        lora_B, (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1)), y, r, plan,
        blocks=_blocks(P, N, E * r), tma=tma,
    )  # fmt: skip
    return u, t, plan


class _LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, lora_A, lora_B, gates2, scale, sparse_gate_grad, gates_per_sample, P, tma):
        y = torch.empty((x2.shape[0], weight.shape[0]), device=x2.device, dtype=x2.dtype)
        need_dg = gates2 is not None and ctx.needs_input_grad[5]
        ctx.sparse_gate_grad = sparse_gate_grad
        ctx.skip = not need_dg or sparse_gate_grad
        u, t, plan = _forward(
            x2, weight, bias, lora_A, lora_B, gates2, scale, y, need_dg, ctx.skip, gates_per_sample, P, tma
        )
        ctx.save_for_backward(x2, weight, lora_A, lora_B, gates2, u, t, plan.perm, plan.flags)
        ctx.scale = scale
        ctx.block_r = plan.block_r
        ctx.has_bias = bias is not None
        ctx.P, ctx.tma = P, tma
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, gates2, u, t, perm, flags = ctx.saved_tensors
        need_dx, need_dw, need_db, need_da, need_db_lora, need_dg = ctx.needs_input_grad[:6]
        M, K = x2.shape
        E, Nb, r = lora_B.shape
        N, R, P = weight.shape[0], E * r, ctx.P
        dx = dw = db = da = dB = dg = None

        plan = _Plan(ctx.block_r, perm, flags)  # the forward's layout (same gates)

        if need_dx or need_da or need_dg:
            # v = dy B_cat: "A" operand element (c, n) = B[c // r, n % (N / P), c % r], block-diagonal;
            # dt = scale * g * v.
            v, dt = _shrink(
                dy, lora_B, (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1)), gates2, ctx.scale, R, r,
                plan, store_t=need_dg, skip=ctx.skip, blocks=_blocks(P, N, R),
            )  # fmt: skip
            if need_dx:
                # dx = dy W + dt A_cat: base operand element (k, n) = W[n, k]; up operand (k, c) = A[c // r, c % r, k].
                dx = torch.empty((M, K), device=x2.device, dtype=x2.dtype)
                _fused(
                    dy, weight, (weight.stride(1), weight.stride(0)), None, dt,
                    lora_A, (lora_A.stride(0), lora_A.stride(1), lora_A.stride(2)), dx, r, plan, tma=ctx.tma,
                )  # fmt: skip
            if need_da:
                da = (dt.t() @ x2).view(E, r, K)  # (R, K)
            if need_dg:
                tv = (t.float() * v.float()).view(M, E, r).sum(dim=2)  # (M, E)
                if ctx.sparse_gate_grad:  # skipped blocks left t = v = 0: define dg = 0 at every g = 0
                    tv = tv * (gates2 != 0)
                dg = (ctx.scale * tv).to(gates2.dtype)
        if need_db_lora:
            # dB of adapter group j = dy's block j^T u's block j: (P, N / P, R / P) -> (E, N / P, r)
            dyb = dy.reshape(M, P, Nb).permute(1, 2, 0)  # (P, N / P, M)
            ub = u.view(M, P, R // P).transpose(0, 1)  # (P, M, R / P)
            dB = torch.bmm(dyb, ub).view(P, Nb, E // P, r).permute(0, 2, 1, 3).reshape(E, Nb, r)
        if need_dw:
            dw = dy.t() @ x2  # (N, K)
        if need_db and ctx.has_bias:
            db = dy.sum(dim=0, dtype=torch.float32).to(dy.dtype)
        return dx, dw, db, da, dB, dg, None, None, None, None, None


def lora_linear_triton(
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
    tma: bool = False,
) -> torch.Tensor:
    """Triton path of `x2edit.kernels.lora_linear`; arguments already validated by `check_lora_inputs`.

    tma: use `x2edit.kernels.triton_tma`'s Hopper matmul kernel wherever the operands allow it.
    """
    if shapes.M == 0 or shapes.N == 0 or shapes.K == 0:
        # Nothing for a kernel to do (empty batch or empty layer): the reference gives the exact
        # result (an empty tensor, or just the bias when K == 0) with autograd.
        return lora_linear_dense(x, weight, bias, lora_A, lora_B, gates, scale, shapes, out, sparse_gate_grad)
    x2 = x.reshape(shapes.M, shapes.K)  # a view when x's layout allows, else a copy
    gates2 = gates.reshape(shapes.M, shapes.E) if gates is not None else None
    P = shapes.blocks
    # Triton launches on the current CUDA device: make it x's (autograd does so for the backward).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if out is not None:  # validated: no autograd with out=
            y2 = out.view(shapes.M, shapes.N)
            _forward(
                x2, weight, bias, lora_A, lora_B, gates2, scale, y2, False, True, shapes.gates_per_sample, P, tma
            )
            return out
        y = _LoRALinearFunction.apply(
            x2, weight, bias, lora_A, lora_B, gates2, scale, sparse_gate_grad, shapes.gates_per_sample, P, tma
        )
    return y.view(*shapes.lead, shapes.N)
