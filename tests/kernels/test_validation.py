"""Bad input gets a clear error and degenerate input a correct result, on both backends."""

from __future__ import annotations

import pytest
import torch

from x2edit.kernels import lora_linear, lora_linear_reference, use_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    if request.param == "triton":
        pytest.importorskip("triton")
    with use_backend(request.param):
        yield request.param


def inputs(M=7, K=9, N=5, E=2, r=3, dtype=torch.float32):
    def rnd(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype)

    return dict(x=rnd(M, K), weight=rnd(N, K), bias=rnd(N), lora_A=rnd(E, r, K), lora_B=rnd(E, N, r),
                gates=torch.rand(M, E, device=DEVICE))  # fmt: skip


def call(**kw):
    t = inputs()
    t.update(kw)
    return lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["gates"], 0.5,
                       out=t.get("out"))  # fmt: skip


@pytest.mark.parametrize(
    "override,error,match",
    [
        ({"x": torch.randn(7, 8)}, ValueError, "in_features"),
        ({"weight": torch.randn(5, 9, 1)}, ValueError, "weight must be"),
        ({"lora_A": torch.randn(2, 3, 8)}, ValueError, "adapter shapes"),
        ({"lora_B": torch.randn(2, 6, 3)}, ValueError, "adapter shapes"),
        ({"lora_B": torch.randn(2, 5, 4)}, ValueError, "adapter shapes"),
        ({"lora_A": torch.randn(3, 9)}, ValueError, "unsqueeze"),
        ({"lora_A": torch.randn(2, 0, 9), "lora_B": torch.randn(2, 5, 0)}, ValueError, "rank must be >= 1"),
        (
            {"lora_A": torch.randn(0, 3, 9), "lora_B": torch.randn(0, 5, 3)},
            ValueError,
            "at least one adapter",
        ),
        ({"bias": torch.randn(6)}, ValueError, "bias must be"),
        ({"gates": torch.rand(7, 3)}, ValueError, "gates must be"),
        ({"gates": torch.rand(6, 2)}, ValueError, "gates must be"),
        ({"weight": torch.randn(5, 9, dtype=torch.float64)}, TypeError, "weight has dtype"),
        ({"lora_B": torch.randn(2, 5, 3).half()}, TypeError, "lora_B has dtype"),
        ({"gates": torch.rand(7, 2, dtype=torch.float64)}, TypeError, "gates must be float32"),
        ({"x": torch.ones(7, 9, dtype=torch.int64)}, TypeError, "floating-point"),
        ({"out": torch.empty(7, 6)}, ValueError, "out must be"),
        ({"out": torch.empty(5, 7).t()}, ValueError, "contiguous"),
    ],
)
def test_bad_input_raises_a_clear_error(backend, override, error, match):
    override = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in override.items()}
    with pytest.raises(error, match=match):
        call(**override)


def test_out_with_autograd_is_refused(backend):
    t = inputs()
    t["lora_A"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="autograd"):
        lora_linear(
            t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], out=torch.empty(7, 5, device=DEVICE)
        )


def test_scale_must_be_a_number(backend):
    with pytest.raises(TypeError, match="scale"):
        t = inputs()
        lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], None, torch.tensor(1.0))


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_batch_gives_an_empty_output_and_gradients(backend, lead):
    K, N, E, r = 9, 5, 2, 3
    x = torch.randn(*lead, K, device=DEVICE, requires_grad=True)
    A = torch.randn(E, r, K, device=DEVICE, requires_grad=True)
    gates = torch.rand(*lead, E, device=DEVICE)
    y = lora_linear(x, torch.randn(N, K, device=DEVICE), None, A, torch.randn(E, N, r, device=DEVICE), gates)
    assert y.shape == (*lead, N)
    y.sum().backward()
    assert x.grad.shape == x.shape and (A.grad == 0).all()


def test_zero_input_features_give_the_bias(backend):
    M, N, E, r = 4, 6, 2, 3
    bias = torch.randn(N, device=DEVICE)
    y = lora_linear(torch.randn(M, 0, device=DEVICE), torch.randn(N, 0, device=DEVICE), bias,
                    torch.randn(E, r, 0, device=DEVICE), torch.randn(E, N, r, device=DEVICE))  # fmt: skip
    torch.testing.assert_close(y, bias.expand(M, N))


def test_vector_input_and_per_sample_gates(backend):
    # x of shape (K,) -> (N,); per-sample gates (B, E) for x (B, T, K) equal per-token gates.
    t = inputs()
    y = lora_linear(t["x"][0], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["gates"][0], 0.5)
    ref = lora_linear_reference(
        t["x"][:1], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["gates"][:1], 0.5
    )
    torch.testing.assert_close(y, ref[0], atol=1e-4, rtol=1e-4)
    x3 = t["x"][:6].reshape(2, 3, 9)
    g_sample = torch.rand(2, 2, device=DEVICE)
    y3 = lora_linear(x3, t["weight"], t["bias"], t["lora_A"], t["lora_B"], g_sample, 0.5)
    g_token = g_sample[:, None, :].expand(2, 3, 2).contiguous()
    ref3 = lora_linear_reference(x3, t["weight"], t["bias"], t["lora_A"], t["lora_B"], g_token, 0.5)
    torch.testing.assert_close(y3, ref3, atol=1e-4, rtol=1e-4)
