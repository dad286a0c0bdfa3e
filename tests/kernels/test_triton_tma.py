"""The Hopper matmul kernel (`x2edit.kernels.triton_tma`): taken where its descriptors apply, persistent over
every tile, and equal to the reference in every layout (on CPU through the Triton interpreter, which
runs tensor descriptors and the persistent loop; speed and the warp-specialised configurations are
only known compiled on an H100/H200, see benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from x2edit.kernels import lora_linear, lora_linear_reference, triton_lora, triton_tma, use_backend  # noqa: E402
from x2edit.kernels.env import is_hopper  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda" and not is_hopper(torch.device("cuda")):
    pytest.skip("the TMA kernel needs a Hopper GPU", allow_module_level=True)


@pytest.fixture
def tma_calls(monkeypatch):
    """Counts launches of the TMA kernel (the portable kernel runs where it does not apply)."""
    calls = []
    real = triton_lora.tma_fused

    def spy(*args, **kwargs):
        calls.append(kwargs.get("blocks"))
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_lora, "tma_fused", spy)
    with use_backend("triton_tma"):
        yield calls


def inputs(gen, M, K, N, E, r, gates, dtype=torch.float32, P=1):
    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(DEVICE, dtype)

    g = None
    if gates == "topk":
        probs = torch.randn(M, E, generator=gen, dtype=torch.float64).softmax(-1)
        top = probs.topk(2, dim=-1)
        g = torch.zeros_like(probs).scatter(-1, top.indices, top.values).to(DEVICE, torch.float32)
    return [rnd(M, K), rnd(N, K, std=K**-0.5), rnd(N), rnd(E, r, K, std=K**-0.5), rnd(E, N // P, r, std=r**-0.5), g]


def reference(t, scale, P=1):
    return lora_linear_reference(*[v.double().cpu() if v is not None else None for v in t], scale, out_blocks=P)


def test_descriptors_apply_to_forward_and_backward_and_every_tile_is_written(tma_calls, gen, seed):
    # 70 x 72 outputs in 32 x 32 tiles: 9 tiles for 3 persistent programs, 3 tiles each.
    t = inputs(gen, 70, 48, 72, 1, 8, None)
    out = torch.full((70, 72), float("nan"), device=DEVICE)
    with torch.no_grad():
        lora_linear(*t, 0.5, out=out)
    assert len(tma_calls) == 1 and torch.isfinite(out).all(), f"unwritten tiles (seed {seed})"
    torch.testing.assert_close(out.double().cpu(), reference(t, 0.5), atol=1e-4, rtol=1e-4)
    x = t[0].clone().requires_grad_(True)
    lora_linear(x, *t[1:], 0.5).sum().backward()  # dx = dy W + dt A_cat: the weight read transposed
    assert len(tma_calls) == 3
    xr = t[0].double().cpu().requires_grad_(True)
    lora_linear_reference(xr, *[v.double().cpu() if v is not None else None for v in t[1:]], 0.5).sum().backward()
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, atol=2e-4, rtol=2e-4)


def test_gathered_rows_of_grouped_gates(tma_calls, gen, seed, monkeypatch):
    # Per-token top-2 of 6 experts in the grouped layout: rows are gathered and scattered through the
    # token order (pointer loads), the weight still comes through its descriptor.
    monkeypatch.setattr(triton_lora, "DENSE_RANK_LIMIT", 0)
    t = inputs(gen, 53, 40, 44, 6, 16, "topk")
    out = torch.full((53, 44), float("nan"), device=DEVICE)
    with torch.no_grad():
        lora_linear(*t, 0.8, out=out)
    assert len(tma_calls) == 1 and torch.isfinite(out).all(), f"seed {seed}"
    torch.testing.assert_close(out.double().cpu(), reference(t, 0.8), atol=1e-4, rtol=1e-4)


def test_block_stacked_adapters_and_bfloat16(tma_calls, gen, seed):
    t = inputs(gen, 37, 64, 48, 3, 8, None, dtype=torch.bfloat16, P=3)
    with torch.no_grad():
        y = lora_linear(*t, 1.0, out_blocks=3)
    assert tma_calls == [(16, 8)]  # (output columns, rank columns) per block
    want = reference(t, 1.0, P=3)
    assert (y.double().cpu() - want).norm() / want.norm() < 1e-2, f"seed {seed}"


def test_operands_without_aligned_rows_take_the_portable_kernel(tma_calls, gen, seed):
    t = inputs(gen, 21, 45, 29, 1, 4, None)  # 45 float32 = 180 bytes per weight row: no descriptor
    with torch.no_grad():
        y = lora_linear(*t, 0.5)
    assert tma_calls == []
    torch.testing.assert_close(y.double().cpu(), reference(t, 0.5), atol=1e-4, rtol=1e-4)
    assert not triton_tma.eligible(t[0], t[1], (t[1].stride(0), t[1].stride(1)))
    w = torch.empty(32, 48, device=DEVICE)
    assert triton_tma.eligible(t[0], w, (48, 1)) and triton_tma.eligible(t[0], w, (1, 48))
