"""The torch references agree with each other and with a by-hand LoRA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from x2edit.kernels import lora_linear_reference, moe_lora_loop_reference


def test_single_adapter_is_a_classic_lora(gen):
    M, K, N, r, scale = 11, 13, 7, 4, 0.5
    x, w, b = (
        torch.randn(M, K, generator=gen),
        torch.randn(N, K, generator=gen),
        torch.randn(N, generator=gen),
    )
    A, B = torch.randn(r, K, generator=gen), torch.randn(N, r, generator=gen)
    expected = F.linear(x, w, b) + scale * (x @ A.t()) @ B.t()
    y = lora_linear_reference(x, w, b, A[None], B[None], None, scale)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_gates_weight_each_adapter(gen):
    M, K, N, E, r = 9, 10, 6, 3, 2
    x, w = (
        torch.randn(M, K, generator=gen, dtype=torch.float64),
        torch.randn(N, K, generator=gen, dtype=torch.float64),
    )
    A = torch.randn(E, r, K, generator=gen, dtype=torch.float64)
    B = torch.randn(E, N, r, generator=gen, dtype=torch.float64)
    g = torch.rand(M, E, generator=gen, dtype=torch.float64)
    expected = x @ w.t() + sum(g[:, e, None] * ((x @ A[e].t()) @ B[e].t()) for e in range(E))
    torch.testing.assert_close(lora_linear_reference(x, w, None, A, B, g), expected)


def test_loop_reference_equals_dense_reference_with_gradients(gen, seed):
    # Top-2 of 6 with two experts never chosen (the loop skips them; the dense reference multiplies
    # them by zero); gradients agree too, including for the gates.
    M, K, N, E, r = 40, 12, 9, 6, 3
    dt = torch.float64
    x = torch.randn(M, K, generator=gen, dtype=dt, requires_grad=True)
    w, b = torch.randn(N, K, generator=gen, dtype=dt), torch.randn(N, generator=gen, dtype=dt)
    A = torch.randn(E, r, K, generator=gen, dtype=dt, requires_grad=True)
    B = torch.randn(E, N, r, generator=gen, dtype=dt, requires_grad=True)
    logits = torch.randn(M, E, generator=gen, dtype=dt)
    logits[:, 4:] = -1e9
    top = logits.softmax(-1).topk(2, dim=-1)
    g = torch.zeros(M, E, dtype=dt).scatter(-1, top.indices, top.values).requires_grad_(True)
    outs, grads = [], []
    for fn in (lora_linear_reference, moe_lora_loop_reference):
        y = fn(x, w, b, A, B, g, 0.3)
        outs.append(y)
        grads.append(torch.autograd.grad((y * y).sum(), (x, A, B, g)))
    torch.testing.assert_close(outs[0], outs[1], msg=lambda m: f"seed {seed}: {m}")
    for ga, gb in zip(grads[0], grads[1]):
        # the loop reference never sees zero gates, so it has no gradient there: compare where g != 0
        if ga.shape == g.shape:
            ga, gb = ga * (g != 0), gb * (g != 0)
        torch.testing.assert_close(ga, gb, msg=lambda m: f"seed {seed}: {m}")
