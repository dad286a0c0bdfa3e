"""Adapters on q, k, v survive diffusers' QKV fusion as one block-stacked kernel call.

``fuse_qkv_projections`` runs diffusers' own fusion (``to_qkv``, ``to_added_qkv``) and wraps each fused
linear so that the adapters of the projections it replaced -- X2Edit's MoE-LoRA, plain LoRAs,
community LoRA files loaded before or after fusing -- are computed in ONE ``x2edit.kernels.lora_linear``
call with ``out_blocks=3``. Fused and unfused models agree, forward and backward.
"""

from __future__ import annotations

import pytest
import torch

from x2edit import kernels
from x2edit.adapters import (
    AdapterConfig,
    FusedAdapterLinear,
    fuse_qkv_projections,
    inject_adapters,
    load_community_lora,
    merge_adapter,
    routing_context,
    static_merge,
)
from x2edit.testing import randomize_adapters, tiny_flux_inputs, tiny_flux_transformer

MOE = AdapterConfig(rank=4, num_experts=3, top_k=2)  # token routing, X2Edit's placement
TASK_MOE = AdapterConfig(rank=4, num_experts=3, top_k=2, router="task")
# A LoRA on q and k of both streams but not on v: the v blocks get zero adapters.
QK_LORA = AdapterConfig(kind="lora", rank=2, alpha=3.0,
                        targets=[r"transformer_blocks\.\d+\.attn\.(to_q|to_k|add_q_proj|add_k_proj)",
                                 r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k)"])  # fmt: skip


def randomize(model, name, std=0.2, seed=0):
    randomize_adapters(model, name, std=std, seed=seed)


def model_with(*configs, seed=0):
    model = tiny_flux_transformer(seed)
    for i, (name, config) in enumerate(configs):
        inject_adapters(model, config, adapter_name=name)
        randomize(model, name, seed=i)
    return model


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = kernels.lora_linear

    def spy(x, weight, *args, **kwargs):
        calls.append((tuple(weight.shape), kwargs.get("out_blocks", 1)))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(kernels, "lora_linear", spy)
    return calls


def run(model, inputs, task_ids):
    with routing_context(model, task_ids=task_ids):
        return model(**inputs)[0]


def test_fused_model_equals_unfused_forward_and_backward(kernel_calls):
    model = model_with(("default", MOE), ("style", QK_LORA))
    inputs = tiny_flux_inputs(batch=2)
    unfused = run(model, inputs, [1, 4])
    unfused.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    wrapped = fuse_qkv_projections(model)
    # 1 double block (to_qkv + to_added_qkv) and 1 single block (to_qkv)
    assert sorted(wrapped) == ["single_transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.attn.to_added_qkv",
                               "transformer_blocks.0.attn.to_qkv"]  # fmt: skip
    kernel_calls.clear()
    fused = run(model, inputs, [1, 4])
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    # One call per fused projection (3 blocks of 32 outputs), none from q, k or v on their own; the
    # image stream's output projection keeps its own call.
    assert sorted(kernel_calls) == [((32, 32), 1), ((96, 32), 3), ((96, 32), 3), ((96, 32), 3)]
    fused.square().mean().backward()
    for n, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, atol=1e-5, rtol=1e-5, msg=n)


def test_a_community_lora_loaded_after_fusing_takes_effect():
    model = model_with(("default", MOE))
    inputs = tiny_flux_inputs(batch=1)
    fuse_qkv_projections(model)
    g = torch.Generator().manual_seed(3)
    lora = {}  # a diffusers/PEFT-format LoRA file's tensors, on v of the double block only
    for module in ("transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_v_proj"):
        lora[f"transformer.{module}.lora_A.weight"] = torch.randn(2, 32, generator=g) * 0.3
        lora[f"transformer.{module}.lora_B.weight"] = torch.randn(32, 2, generator=g) * 0.3
    before = run(model, inputs, [2])
    load_community_lora(model, lora, adapter_name="community")
    fused = run(model, inputs, [2])
    assert not torch.allclose(fused, before, atol=1e-4)  # the new LoRA is computed
    model.unfuse_qkv_projections()  # diffusers' own unfuse: back to q, k, v with their adapters
    torch.testing.assert_close(fused, run(model, inputs, [2]), atol=1e-5, rtol=1e-5)


def test_static_merge_on_fused_projections():
    model = model_with(("default", TASK_MOE), ("style", QK_LORA))
    model.requires_grad_(False)
    inputs = tiny_flux_inputs(batch=2)
    with torch.no_grad():
        want = run(model, inputs, [6, 6])
    fuse_qkv_projections(model)
    fused = [m for m in model.modules() if isinstance(m, FusedAdapterLinear)]
    before = [m.base_layer.weight.clone() for m in fused]
    with torch.no_grad(), static_merge(model, calls=28):
        got = run(model, inputs, [6, 6])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(m.base_layer.weight, w) for m, w in zip(fused, before))


def test_merging_a_part_after_fusing_is_refused():
    model = model_with(("default", TASK_MOE))
    fuse_qkv_projections(model)
    merge_adapter(model, task=1)  # changes to_q's weight, not the fused copy diffusers made
    with pytest.raises(RuntimeError, match="merged or unmerged after the projections were fused"):
        run(model, tiny_flux_inputs(batch=1), [1])
