"""Static adapters cost the base matmul: merged exactly, used merged, restored bit for bit.

- ``merge_adapter`` / ``unmerge_adapter`` (permanent): unmerging restores the base weights bitwise.
- ``static_merge`` (for a block, e.g. a pipeline call): plain LoRAs and task-routed MoE-LoRAs with
  one task per call run on a transient merged weight (no low-rank kernel call), give the unmerged
  outputs, and never write the base weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from x2edit import kernels
from x2edit.adapters import (
    AdapterConfig,
    AdapterLinear,
    adapter_layers,
    inject_adapters,
    merge_adapter,
    routing_context,
    set_adapters,
    static_merge,
    unmerge_adapter,
)
from x2edit.adapters import layers as layers_module
from x2edit.adapters.inject import make_adapter
from x2edit.testing import randomize_adapters, tiny_flux_inputs, tiny_flux_transformer

TASK_MOE = AdapterConfig(rank=4, num_experts=4, top_k=2, router="task")
TOKEN_MOE = AdapterConfig(rank=4, num_experts=4, top_k=2)
LORA = AdapterConfig(kind="lora", rank=3, alpha=6.0)


def randomize(model, name, std=0.2, seed=0):
    randomize_adapters(model, name, std=std, seed=seed)


def model_with(*configs, dtype=torch.float32):
    model = tiny_flux_transformer(0)
    for i, (name, config) in enumerate(configs):
        inject_adapters(model, config, adapter_name=name)
        randomize(model, name, seed=i)
    model.requires_grad_(False)  # inference: adapters are static only while nothing needs their gradient
    return model.to(dtype)


def inputs_in(dtype, batch=2):
    return {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in tiny_flux_inputs(batch=batch).items()}


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def assert_bitwise(model, before):
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), f"{n} changed"


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every kernels.lora_linear call's (E, out_blocks)."""
    calls = []
    real = kernels.lora_linear

    def spy(x, weight, bias, lora_A, lora_B, *args, **kwargs):
        calls.append((lora_A.shape[0], kwargs.get("out_blocks", 1)))
        return real(x, weight, bias, lora_A, lora_B, *args, **kwargs)

    monkeypatch.setattr(kernels, "lora_linear", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_restores_the_base_weights_bit_for_bit(dtype):
    model = model_with(("default", TASK_MOE), ("style", LORA), dtype=dtype)
    before = base_weights(model)
    merge_adapter(model, "default", task=3)
    merge_adapter(model, "style")
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    unmerge_adapter(model, "default")  # out of order: the weight is recomputed from the original
    with routing_context(model, task_ids=[3, 3]):
        partly = model(**inputs_in(dtype))[0]
    unmerge_adapter(model, "style")
    assert_bitwise(model, before)
    assert all(not layer.merged and layer._pre_merge is None for _, layer in adapter_layers(model))
    # With only "style" merged the model computed "default" unmerged beside it: same as nothing merged.
    with routing_context(model, task_ids=[3, 3]):
        unmerged = model(**inputs_in(dtype))[0]
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(partly, unmerged, atol=tol, rtol=tol)


def test_static_adapters_run_merged_and_leave_the_base_untouched(kernel_calls, monkeypatch):
    model = model_with(("default", TASK_MOE), ("style", LORA))
    set_adapters(model, ["default", "style"], [1.0, 0.6])
    inputs = tiny_flux_inputs(batch=2)
    with torch.no_grad(), routing_context(model, task_ids=[5, 5]):
        expected = model(**inputs)[0]
    layers = sum(1 for _ in adapter_layers(model))
    assert len(kernel_calls) == layers  # unmerged: one low-rank call per adapted layer
    builds = []
    real_merged = layers_module._merged
    monkeypatch.setattr(layers_module, "_merged", lambda *a: builds.append(1) or real_merged(*a))
    before = base_weights(model)
    kernel_calls.clear()
    with torch.no_grad(), static_merge(model, calls=28), routing_context(model, task_ids=[5, 5]):
        first = model(**inputs)[0]
        second = model(**inputs)[0]
    assert kernel_calls == [] and len(builds) == layers  # merged once per layer, reused by the second call
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=1e-5)
    assert_bitwise(model, before)
    assert all(layer.static is None for _, layer in adapter_layers(model))  # the block is closed


def test_a_change_inside_the_block_rebuilds_the_merged_weight():
    model = model_with(("default", TASK_MOE), ("style", LORA))
    inputs = tiny_flux_inputs(batch=1)

    def unmerged(task):
        with torch.no_grad(), routing_context(model, task_ids=[task]):
            return model(**inputs)[0]

    want3, want7 = unmerged(3), unmerged(7)
    set_adapters(model, ["default", "style"], [1.0, 0.5])
    want7_half = unmerged(7)
    set_adapters(model, ["default", "style"], [1.0, 1.0])
    with torch.no_grad(), static_merge(model, calls=28):
        with routing_context(model, task_ids=[3]):
            torch.testing.assert_close(model(**inputs)[0], want3, atol=1e-5, rtol=1e-5)
        with routing_context(model, task_ids=[7]):  # another task: another merged weight
            torch.testing.assert_close(model(**inputs)[0], want7, atol=1e-5, rtol=1e-5)
            set_adapters(model, ["default", "style"], [1.0, 0.5])
            torch.testing.assert_close(model(**inputs)[0], want7_half, atol=1e-5, rtol=1e-5)


def test_dynamic_adapters_stay_in_the_kernel_beside_merged_ones(kernel_calls):
    # Token routing changes the mix per token, and two tasks in one batch give two mixes: neither
    # merges. The plain LoRA beside them still does, so only the MoE's experts reach the kernel.
    model = model_with(("moe", TOKEN_MOE), ("style", LORA))
    inputs = tiny_flux_inputs(batch=2)
    with torch.no_grad(), routing_context(model, task_ids=[1, 2]):
        expected = model(**inputs)[0]
    kernel_calls.clear()
    with torch.no_grad(), static_merge(model, calls=28), routing_context(model, task_ids=[1, 2]):
        got = model(**inputs)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert kernel_calls and all(E == 4 + 1 for E, _ in kernel_calls)  # 4 routed + shared, no LoRA

    task_model = model_with(("default", TASK_MOE))
    kernel_calls.clear()
    with torch.no_grad(), static_merge(task_model, calls=28), routing_context(task_model, task_ids=[1, 2]):
        task_model(**inputs)
    assert len(kernel_calls) == sum(1 for _ in adapter_layers(task_model))  # two tasks: not merged


def test_training_is_never_merged(kernel_calls):
    model = model_with(("default", TASK_MOE))
    model.requires_grad_(False)
    for _, layer in adapter_layers(model):
        layer.adapters["default"].requires_grad_(True)
    inputs = tiny_flux_inputs(batch=1)
    grads, calls = [], []
    for block in (lambda: static_merge(model, calls=28), torch.enable_grad):
        model.zero_grad()
        kernel_calls.clear()
        with block(), routing_context(model, task_ids=[2]):
            model(**inputs)[0].square().mean().backward()
        calls.append(len(kernel_calls))
        grads.append([p.grad.clone() for _, layer in adapter_layers(model) for p in layer.adapters["default"].parameters()
                      if p.grad is not None])  # fmt: skip
    assert calls[0] == calls[1] > 0  # inside the block too, every layer ran its low-rank term
    assert grads[0] and len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_the_cost_rule_decides_per_layer():
    # One call over a handful of tokens: adding the rank-8 term costs less than rewriting a 64 x 64
    # weight; over many calls the merge pays for itself.
    layer = AdapterLinear(nn.Linear(64, 64))
    layer.add_adapter("a", make_adapter(AdapterConfig(kind="lora", rank=8), 64, 64))
    layer.requires_grad_(False)
    x = torch.randn(1, 4, 64)
    assert not kernels.merge_is_cheaper(4, 64, 64, 8, 4, calls=1)
    assert kernels.merge_is_cheaper(4, 64, 64, 8, 4, calls=1000)
    for calls, merged in ((1, False), (1000, True)):
        with torch.no_grad(), static_merge(layer, calls=calls) as state:
            layer(x)
        assert (state._weights[id(layer)][1] is not None) == merged
    with pytest.raises(ValueError, match="calls"):
        with static_merge(layer, calls=0):
            pass


def test_the_pipeline_runs_static_adapters_merged_for_its_loop(monkeypatch):
    """X2EditPipeline wraps its loop in static_merge: with merging cheaper (forced here; on a GPU the cost rule
    decides), a task-routed MoE-LoRA is folded into transient weights for the whole call, gives the unmerged
    edit, and leaves the base weights bit for bit."""
    import numpy as np
    from PIL import Image

    from x2edit import X2EditPipeline
    from x2edit.testing import tiny_kontext_components

    pipe = X2EditPipeline(**tiny_kontext_components(0))
    pipe.set_progress_bar_config(disable=True)
    inject_adapters(pipe.transformer, TASK_MOE)
    randomize(pipe.transformer, "default")
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    call = dict(image=source, prompt="make it red", task="color_change", num_inference_steps=2,
                max_sequence_length=16, output_type="np")
    unmerged = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    before = base_weights(pipe.transformer)
    built = []
    real = layers_module.StaticMerge.weight

    def spy(self, layer, key, x, R, build):
        merged = real(self, layer, key, x, R, build)
        built.append(merged is not None)
        return merged

    monkeypatch.setattr(kernels, "merge_is_cheaper", lambda *a, **k: True)
    monkeypatch.setattr(layers_module.StaticMerge, "weight", spy)
    merged = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert built and all(built)  # every adapted layer ran on its merged weight
    np.testing.assert_allclose(merged, unmerged, atol=1e-4)
    after = base_weights(pipe.transformer)
    assert all(torch.equal(before[n], after[n]) for n in before)
