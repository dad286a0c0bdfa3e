"""Pieces shared by the Triton matmul kernels (`x2edit.kernels.triton_lora`, `x2edit.kernels.triton_tma`).

- `dot`: tl.dot with the interpreter's bfloat16 workaround;
- `tile_coords`: the grouped (L2-friendly) order of output tiles;
- `lowrank_epilogue`: acc += u B_cat^T for one output tile, skipping rank blocks that no token of
  the tile uses, and with block-stacked adapters (out_blocks > 1) only the rank columns of the output
  blocks the tile covers;
- `add_bias`: the bias, added in float32 before the epilogue's single rounding.

Rank column c belongs to adapter c // RANK; with blocks, to output block c // R_BLOCK, and output
column n to block n // N_BLOCK (R_BLOCK = E / P * RANK, N_BLOCK = N / P).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from x2edit.kernels.env import interpreter_enabled


def input_precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input precision: float32 follows torch's matmul setting, so every backend agrees
    (exact fp32 unless TF32 is allowed); half-precision operands use the tensor cores as they are."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether `dot` must upcast bfloat16 operands (only under the interpreter, see `dot`)."""
    return dtype == torch.bfloat16 and interpreter_enabled()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST is set only under the Triton interpreter with bfloat16 operands: its dot multiplies
    # bfloat16's raw bits as integers. bf16 x bf16 products are exact in float32, so the upcast
    # computes what the tensor cores do.
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # GROUP_M row tiles in a row share each column tile of W while it is in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def lowrank_epilogue(
    acc,  # (BLOCK_M, BLOCK_N) float32 accumulator of the base matmul
    pid_m,
    rows,  # (BLOCK_M,) int64 rows of u (and of y) this tile holds
    mask_m,
    offs_n,  # (BLOCK_N,) output columns
    mask_n,
    u_ptr,  # (M, R) gated low-rank codes, contiguous along R
    up_ptr,  # up operand: element (c, n) at (c // RANK) * stride_upe + (c % RANK) * stride_upj + n' * stride_upn
    flags_ptr,  # tile-activity flags, unused without HAS_FLAGS
    M,
    N,
    R,
    RANK,
    N_BLOCK,  # output columns per block (N without blocks)
    R_BLOCK,  # rank columns per block (R without blocks)
    stride_um,
    stride_upe,
    stride_upj,
    stride_upn,
    stride_fm,
    HAS_FLAGS: tl.constexpr,
    BLOCKED: tl.constexpr,
    FLAG_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EXPAND_CHUNK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n64 = offs_n.to(tl.int64)
    rb_lo = 0
    rb_hi = tl.cdiv(R, BLOCK_R)
    if BLOCKED:
        # Only the rank columns of the output blocks this tile covers can reach it.
        n_first = tl.min(offs_n, axis=0)
        n_last = tl.minimum(tl.max(offs_n, axis=0), N - 1)
        rb_lo = (n_first // N_BLOCK) * R_BLOCK // BLOCK_R
        rb_hi = tl.cdiv((n_last // N_BLOCK + 1) * R_BLOCK, BLOCK_R)
        n_in = (offs_n % N_BLOCK).to(tl.int64)  # column inside its block: B is (E, N / P, r)
        n_blk = offs_n // N_BLOCK
    else:
        n_in = offs_n64
    n_chunks = tl.cdiv(M, FLAG_ROWS)
    for rb in range(rb_lo, rb_hi):
        sub_iters = BLOCK_R // EXPAND_CHUNK
        if HAS_FLAGS:
            # Skip a rank block that no token of this tile uses: its u is exactly zero.
            chunks = pid_m * (BLOCK_M // FLAG_ROWS) + tl.arange(0, BLOCK_M // FLAG_ROWS)
            f = tl.load(flags_ptr + chunks * stride_fm + rb, mask=chunks < n_chunks, other=0)
            sub_iters = sub_iters * (tl.max(f.to(tl.int32), axis=0) > 0).to(tl.int32)
        for s in range(0, sub_iters):
            cols = rb * BLOCK_R + s * EXPAND_CHUNK + tl.arange(0, EXPAND_CHUNK)
            mask_c = cols < R
            uk = tl.load(
                u_ptr + rows[:, None] * stride_um + cols[None, :],
                mask=mask_m[:, None] & mask_c[None, :],
                other=0.0,
            )  # (BLOCK_M, EXPAND_CHUNK)
            up_col_off = (cols // RANK).to(tl.int64) * stride_upe + (cols % RANK).to(tl.int64) * stride_upj
            mask_b = mask_c[:, None] & mask_n[None, :]
            if BLOCKED:
                mask_b = mask_b & ((cols // R_BLOCK)[:, None] == n_blk[None, :])
            bk = tl.load(
                up_ptr + up_col_off[:, None] + n_in[None, :] * stride_upn, mask=mask_b, other=0.0
            )  # (EXPAND_CHUNK, BLOCK_N)
            acc = dot(uk, bk, acc, INPUT_PRECISION, UPCAST_DOT)
    return acc


@triton.jit
def add_bias(acc, bias_ptr, offs_n, mask_n, stride_bias, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n.to(tl.int64) * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc
