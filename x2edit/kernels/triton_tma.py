"""The Hopper matmul kernel of the "triton_tma" backend: y = x W^T + u B_cat^T + b, persistent.

The portable kernel (`x2edit.kernels.triton_lora._fused_kernel`) loads its tiles through pointers and runs
one program per output tile; on an H200 it ran at 1.44-1.88x cuBLAS. This one is written the way
Hopper matmuls reach cuBLAS speed:

- **tensor-memory descriptors** (TMA): the base weight, and x and y where their layout allows, are
  read and written through host-built `TensorDescriptor`s, so whole tiles move by the copy engine
  (out-of-bounds parts of a tile read as zero and are not written: no masks in the K loop);
- **persistent tiles**: one program per multiprocessor walks the output tiles in grouped order
  (`tl.range(start, tiles, NUM_SMS)`), so launch and tail costs are paid once per SM, not per tile;
- **warp specialisation**, where the Triton version supports it on Hopper (`WARP_SPECIALIZE`, one
  of the tuned configurations; a configuration that does not compile is skipped by the tuner).

The low-rank epilogue, the bias and the single rounding are `x2edit.kernels.triton_parts`', shared with the
portable kernel. Rows gathered by a token order (grouped per-token gates) are loaded and stored
through pointers (TMA cannot gather rows on Hopper); the weight still comes by TMA.

Eligible operands (`eligible`): the base operand has a unit stride along one of its two dimensions,
its other stride and its address 16-byte aligned (TMA's rule); FLUX's layers all are. Anything else
runs the portable kernel. Under TRITON_INTERPRET=1 the same code runs on CPU (the tests); its speed
is only known from a GPU run (`benchmarks/gpu_check.sh`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from x2edit.kernels.env import interpreter_enabled
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
from x2edit.kernels.tuning import KernelConfig, Tuner

# Under the interpreter, a few "SMs" so that each program walks several tiles.
INTERPRETER_SMS = 3


def _fits(config: KernelConfig, key: tuple) -> bool:
    # Shared-memory budget of the pipelined K loop: stages x (x tile + w tile) <= 160 KiB.
    itemsize = 4 if key[5] == "float32" else 2
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    return config.num_stages * (bm + bn) * bk * itemsize <= 160 * 1024


FUSED_TMA = Tuner(
    "fused_tma",
    [
        KernelConfig.of(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, WARP_SPECIALIZE=ws, num_warps=w, num_stages=st)
        for m, n, k, w, st, ws in [
            (128, 128, 64, 8, 3, False),
            (128, 256, 64, 8, 3, False),
            (128, 128, 64, 4, 4, False),
            (128, 128, 64, 8, 4, True),
            (128, 256, 64, 8, 3, True),
            (128, 128, 32, 8, 3, False),  # float32 operands
        ]
    ],
    fits=_fits,
    interpreter_config=KernelConfig.of(
        BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, WARP_SPECIALIZE=False, num_warps=4, num_stages=1
    ),
)


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _layout(w: torch.Tensor, w_strides: tuple[int, int]) -> str | None:
    """ "nk" (rows are output columns), "kn" (rows are the reduction) or None (no TMA descriptor)."""
    stride_wn, stride_wk = w_strides
    item = w.element_size()
    if not _aligned(w):
        return None
    if stride_wk == 1 and (stride_wn * item) % 16 == 0:
        return "nk"
    if stride_wn == 1 and (stride_wk * item) % 16 == 0:
        return "kn"
    return None


def _rows_tma(t: torch.Tensor) -> bool:
    """Whether a (rows, cols) activation can be read or written by tiles through a descriptor."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and _aligned(t)


def eligible(x: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, int]) -> bool:
    """Whether this kernel can run the call (its base operand fits a tensor-memory descriptor)."""
    return _layout(w, w_strides) is not None and x.dtype == w.dtype


@triton.jit
def _fused_tma_kernel(
    x_desc,  # descriptor over x (M, K), block (BLOCK_M, BLOCK_K); None without X_TMA
    x_ptr,  # (M, K) for pointer loads (gathered rows)
    w_desc,  # descriptor over the base operand: (N, K) rows for "nk", (K, N) rows for "kn"
    bias_ptr,
    u_ptr,  # (M, R) gated low-rank codes
    up_ptr,  # low-rank up operand, as in the portable kernel
    y_desc,  # descriptor over y (M, N), block (BLOCK_M, BLOCK_N); None without Y_TMA
    y_ptr,  # (M, N) output
    row_idx_ptr,
    flags_ptr,
    M,
    N,
    K,
    R,
    RANK,
    N_BLOCK,
    R_BLOCK,
    stride_xm,
    stride_xk,
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
    X_TMA: tl.constexpr,
    Y_TMA: tl.constexpr,
    W_KN: tl.constexpr,
    FLAG_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EXPAND_CHUNK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # Persistent: program p takes tiles p, p + NUM_SMS, ... in the grouped (L2-friendly) order.
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_i < M
        if HAS_PERM:
            rows = tl.load(row_idx_ptr + offs_i, mask=mask_m, other=0).to(tl.int64)
        else:
            rows = offs_i.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N

        # 1. Base matmul over K; descriptor loads read out-of-bounds elements as zero.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k_tiles):
            if X_TMA:
                xk = x_desc.load([pid_m * BLOCK_M, kk * BLOCK_K])  # (BLOCK_M, BLOCK_K)
            else:
                offs_k = kk * BLOCK_K + tl.arange(0, BLOCK_K)
                xk = tl.load(
                    x_ptr + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=mask_m[:, None] & (offs_k < K)[None, :],
                    other=0.0,
                )
            if W_KN:
                wk = w_desc.load([kk * BLOCK_K, pid_n * BLOCK_N])  # (BLOCK_K, BLOCK_N)
            else:
                wk = w_desc.load([pid_n * BLOCK_N, kk * BLOCK_K]).T  # (BLOCK_N, BLOCK_K) -> (BLOCK_K, BLOCK_N)
            acc = dot(xk, wk, acc, INPUT_PRECISION, UPCAST_DOT)

        # 2. Low-rank epilogue, 3. bias, one rounding, one store.
        acc = lowrank_epilogue(
            acc, pid_m, rows, mask_m, offs_n, mask_n, u_ptr, up_ptr, flags_ptr, M, N, R, RANK, N_BLOCK,
            R_BLOCK, stride_um, stride_upe, stride_upj, stride_upn, stride_fm, HAS_FLAGS, BLOCKED, FLAG_ROWS,
            BLOCK_R, EXPAND_CHUNK, INPUT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        acc = add_bias(acc, bias_ptr, offs_n, mask_n, stride_bias, HAS_BIAS)
        out = acc.to(y_ptr.dtype.element_ty)
        if Y_TMA:
            y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out)
        else:
            tl.store(
                y_ptr + rows[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn,
                out,
                mask=mask_m[:, None] & mask_n[None, :],
            )


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda" or interpreter_enabled():
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def fused(
    x: torch.Tensor,  # (M, K)
    w: torch.Tensor,  # base operand
    w_strides: tuple[int, int],  # (n, k) strides of the base operand
    bias: torch.Tensor | None,  # (N,)
    u: torch.Tensor,  # (M, R) contiguous
    up: torch.Tensor,  # low-rank up operand
    up_strides: tuple[int, int, int],  # (expert, rank col, n) strides of `up`
    y: torch.Tensor,  # (M, N) output
    r: int,
    *,
    perm: torch.Tensor | None,  # (M,) row order of grouped per-token gates
    flags: torch.Tensor | None,  # tile-activity flags
    block_r: int,
    expand_chunk: int,
    flag_rows: int,
    blocks: tuple[int, int] | None,  # (output columns, rank columns) per block
) -> torch.Tensor:
    """y = x w^T + u up^T + bias with the persistent TMA kernel; the caller checked `eligible`."""
    M, K = x.shape
    N, R = y.shape[1], u.shape[1]
    layout = _layout(w, w_strides)
    stride_wn, stride_wk = w_strides
    x_tma = perm is None and _rows_tma(x)
    y_tma = perm is None and _rows_tma(y)
    f = flags if flags is not None else u
    p = perm if perm is not None else u
    b = bias if bias is not None else u
    n_block, r_block = blocks or (N, R)
    sms = _num_sms(x.device)

    def launch(config: KernelConfig) -> None:
        bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
        x_desc = TensorDescriptor(x, [M, K], [x.stride(0), 1], [bm, bk]) if x_tma else None
        if layout == "nk":
            w_desc = TensorDescriptor(w, [N, K], [stride_wn, 1], [bn, bk])
        else:
            w_desc = TensorDescriptor(w, [K, N], [stride_wk, 1], [bk, bn])
        y_desc = TensorDescriptor(y, [M, N], [y.stride(0), 1], [bm, bn]) if y_tma else None
        grid = (min(sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
        _fused_tma_kernel[grid](
            x_desc, x, w_desc, b, u, up, y_desc, y, p, f,
            M, N, K, R, r, n_block, r_block,
            x.stride(0), x.stride(1), u.stride(0), *up_strides, b.stride(0), y.stride(0), y.stride(1), f.stride(0),
            HAS_BIAS=bias is not None, HAS_PERM=perm is not None, HAS_FLAGS=flags is not None,
            BLOCKED=blocks is not None, X_TMA=x_tma, Y_TMA=y_tma, W_KN=layout == "kn", FLAG_ROWS=flag_rows,
            BLOCK_R=block_r, EXPAND_CHUNK=expand_chunk, INPUT_PRECISION=input_precision(x.dtype),
            UPCAST_DOT=upcast_dot(x.dtype), NUM_SMS=sms, **config.kwargs,
        )  # fmt: skip

    key = (next_pow2(M), N, K, R, block_r, dtype_name(x.dtype), layout, x_tma)
    launch(FUSED_TMA.pick(key, x.device, launch))
    return y
