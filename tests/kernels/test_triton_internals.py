"""The grouped layout's pieces: row grouping, tile-activity flags, and that the kernels obey them.

A wrong flag would silently drop an adapter's contribution, and a flag that is never read would
make the grouped path as slow as the dense one, so both directions are checked here.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from x2edit.kernels import triton_lora  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def topk_gates(M, E, k, gen):
    logits = torch.randn(M, E, generator=gen)
    top = logits.topk(k, dim=1)
    return torch.zeros(M, E).scatter(1, top.indices, top.values.sigmoid() + 0.01)


def flags_in_torch(gates, perm, r, block_r):
    """Expected flags: any non-zero gate among FLAG_ROWS sorted rows x one rank block."""
    M, E = gates.shape
    rows = triton_lora.FLAG_ROWS
    used = gates[perm.long()] != 0  # (M, E) in sorted order
    cols = used.repeat_interleave(r, dim=1)  # (M, R): column c belongs to expert c // r
    n_chunks, n_rb = -(-M // rows), -(-(E * r) // block_r)
    padded = torch.zeros(n_chunks * rows, n_rb * block_r, dtype=torch.bool)
    padded[:M, : E * r] = cols
    return padded.view(n_chunks, rows, n_rb, block_r).any(dim=3).any(dim=1).to(torch.int8)


def test_group_rows_is_a_permutation_that_groups_equal_expert_sets(seed, gen):
    gates = topk_gates(101, 7, 2, gen).to(DEVICE)
    perm = triton_lora._group_rows(gates).cpu()
    gates = gates.cpu()
    assert perm.dtype == torch.int64
    assert torch.equal(perm.sort().values, torch.arange(101))
    sets = [tuple((gates[i] != 0).nonzero().flatten().tolist()) for i in perm.tolist()]
    # each distinct expert set occupies one contiguous run of the sorted order
    runs = [s for i, s in enumerate(sets) if i == 0 or s != sets[i - 1]]
    assert len(runs) == len(set(sets)), f"expert sets split into several runs (seed {seed})"


@pytest.mark.parametrize("M,E,r,block_r", [(37, 5, 3, 16), (64, 4, 16, 16), (50, 9, 20, 32)])
def test_tile_flags_match_torch(M, E, r, block_r, seed, gen):
    gates = topk_gates(M, E, 2, gen)
    gates[3, :] = 0.0
    gates[5, E - 1] = float("nan")  # NaN must count as used, so that it propagates
    perm = triton_lora._group_rows(gates.to(DEVICE))
    flags = triton_lora._tile_flags(gates.to(DEVICE), perm, M, E * r, r, block_r)
    assert torch.equal(flags.cpu(), flags_in_torch(gates, perm.cpu(), r, block_r)), f"seed {seed}"
    # per-sample gates keep the row order: flags over the rows as they are
    flags = triton_lora._tile_flags(gates.to(DEVICE), None, M, E * r, r, block_r)
    assert torch.equal(flags.cpu(), flags_in_torch(gates, torch.arange(M), r, block_r)), f"seed {seed}"


def test_route_keys_are_expert_bitmasks(gen):
    M, E = 77, 40  # more experts than key bits: only the first 31 count
    gates = topk_gates(M, E, 5, gen)
    gates[0, :] = 0.0
    keys = torch.empty(M, dtype=torch.int32, device=DEVICE)
    triton_lora._route_key_kernel[(1,)](
        gates.to(DEVICE), keys, M, E, gates.stride(0), gates.stride(1), BLOCK_M=128, BLOCK_E=64
    )
    bits = torch.where(torch.arange(E) < 31, 1 << torch.arange(E).clamp(max=30), 0)
    expected = ((gates != 0).long() * bits).sum(dim=1)
    assert torch.equal(keys.cpu().long(), expected)


def test_kernels_skip_exactly_the_flagged_blocks(seed, gen):
    # Hand the kernels a plan whose flags are all zero: the adapter term must vanish (the flags
    # are read), and the base matmul must still be complete (nothing else is skipped).
    M, K, N, E, r = 40, 24, 20, 3, 16
    x = torch.randn(M, K, generator=gen).to(DEVICE)
    w = torch.randn(N, K, generator=gen).to(DEVICE)
    A = torch.randn(E, r, K, generator=gen).to(DEVICE)
    B = torch.randn(E, N, r, generator=gen).to(DEVICE)
    gates = torch.ones(M, E, device=DEVICE)
    perm = torch.arange(M, device=DEVICE).flip(0)
    flags = torch.zeros((-(-M // triton_lora.FLAG_ROWS), E), dtype=torch.int8, device=DEVICE)
    plan = triton_lora._Plan(16, perm, flags)
    A_strides = (A.stride(0), A.stride(1), A.stride(2))
    _, u = triton_lora._shrink(x, A, A_strides, gates, 1.0, E * r, r, plan, store_t=False, skip=True)
    assert (u == 0).all()
    _, u_dense = triton_lora._shrink(x, A, A_strides, gates, 1.0, E * r, r, plan, store_t=False, skip=False)
    assert (u_dense != 0).any()
    y = torch.full((M, N), float("nan"), device=DEVICE)
    B_strides = (B.stride(0), B.stride(2), B.stride(1))
    triton_lora._fused(x, w, (w.stride(0), w.stride(1)), None, u_dense, B, B_strides, y, r, plan)
    torch.testing.assert_close(y, x @ w.t(), atol=1e-4, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}")


def test_grouping_leaves_few_experts_per_tile_for_top2_of_12(gen):
    # The X2Edit routing at FLUX's token count (4096 image + 512 text): shared + top-2 of 12 routed.
    # After grouping, most (64-row tile, expert) blocks are empty (about 4 of 13 experts per tile,
    # against all 13 unsorted); this is where the grouped path's speed comes from. The flags are
    # computed in torch here (the kernel's equality with torch is tested above).
    M, E, r = 4608, 13, 64
    routed = topk_gates(M, 12, 2, gen)
    gates = torch.cat([torch.ones(M, 1), routed], dim=1)
    perm = triton_lora._group_rows(gates)
    flags = flags_in_torch(gates, perm, r, block_r=64)  # one rank block per expert
    share = flags.view(-1, 4, E).amax(dim=1).float().mean().item()  # 4 flag rows = a 64-row tile
    assert share < 0.45, f"grouped tiles still use {share:.0%} of the experts"
