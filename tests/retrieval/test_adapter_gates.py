"""AdapterLinear takes per-sample gates for named adapters from outside (RoutingState.adapter_gates) and
folds them into its one kernel call: what a multi-LoRA fusion and the stacked pool trainer use."""

import torch
import torch.nn as nn

from x2edit import kernels
from x2edit.adapters import AdapterLinear, LoRA, RoutingState


def _layer_with_loras(ranks=(2, 4, 3), seed=0):
    torch.manual_seed(seed)
    layer = AdapterLinear(nn.Linear(8, 6))
    for j, r in enumerate(ranks):
        lora = LoRA(8, 6, r, scaling=0.5 + j)
        with torch.no_grad():
            lora.lora_B.normal_()
        layer.add_adapter(f"l{j}", lora)
    return layer


def test_per_sample_gates_in_one_call_equal_the_per_lora_reference(monkeypatch):
    """y = x W^T + b + sum_j g[b, j] s_j (x A_j^T) B_j^T for LoRAs of ranks 2, 4, 3 (padded in one call)."""
    layer = _layer_with_loras()
    x = torch.randn(2, 5, 8)
    gates = torch.tensor([[1.0, 0.0, 0.5], [0.2, 2.0, 0.0]], requires_grad=True)
    layer.routing = RoutingState(adapter_gates=lambda lay: {f"l{j}": gates[:, j] for j in range(3)})
    calls = []
    real = kernels.lora_linear
    monkeypatch.setattr(kernels, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = layer(x)
    ref = layer.base_layer(x)
    for j in range(3):
        a = layer.adapters[f"l{j}"]
        ref = ref + gates[:, j, None, None] * a.scaling * (x @ a.lora_A[0].T) @ a.lora_B[0].T
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1
    y.sum().backward()  # the gates are trainable through the kernel call
    assert gates.grad is not None and gates.grad.abs().sum() > 0


def test_adapters_a_gate_does_not_name_keep_their_weight():
    layer = _layer_with_loras()
    x = torch.randn(2, 5, 8)
    plain = layer(x)
    layer.routing = RoutingState(adapter_gates=lambda lay: {"l1": torch.zeros(2)})
    off = layer(x)
    a = layer.adapters["l1"]
    torch.testing.assert_close(off, plain - a.scaling * (x @ a.lora_A[0].T) @ a.lora_B[0].T, atol=1e-5, rtol=1e-5)
