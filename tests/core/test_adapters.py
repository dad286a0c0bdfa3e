"""MoE-LoRA math, routing, gradients, injection, save/load, merge/unmerge and export."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from x2edit.adapters import (
    AdapterConfig,
    AdapterLinear,
    adapter_layers,
    adapter_summary,
    balance_loss,
    export_diffusers_lora,
    inject_adapters,
    load_adapter,
    merge_adapter,
    routing_context,
    save_adapter,
    unmerge_adapter,
)
from x2edit.adapters.inject import make_adapter
from x2edit.testing import randomize_adapters, tiny_flux_inputs, tiny_flux_transformer


def _layer(config, K=13, N=11, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = AdapterLinear(nn.Linear(K, N))
    layer.add_adapter("default", make_adapter(config, K, N))
    layer.to(dtype)
    with torch.no_grad():
        for p in layer.adapters["default"].parameters():
            p.normal_(0, 0.3)
    return layer


def _loop_reference(layer, x, task_ids):
    """X2Edit-style per-expert loop, written from the definition (no shared code with the layer)."""
    ad = layer.adapters["default"]
    cfg, router = ad.config, ad.router
    B, T, _ = x.shape
    y = x @ layer.base_layer.weight.T + layer.base_layer.bias
    if cfg.router == "token_topk":
        h = x
        if router.task_embedding is not None:
            h = torch.cat([x, router.task_embedding.weight[task_ids][:, None, :].expand(B, T, -1)], -1)
        logits = h @ router.gate.weight.T + (0 if router.gate.bias is None else router.gate.bias)
    else:
        logits = router.logits[task_ids][:, None, :].expand(B, T, -1)
    probs = logits.softmax(-1)
    k = cfg.top_k or cfg.num_experts
    top_p, top_i = probs.topk(k, dim=-1)
    for e in range(cfg.num_experts):
        chosen = top_i == e  # (B, T, k)
        sel = chosen.any(-1)
        if not sel.any():
            continue
        w = (top_p * chosen).sum(-1)[sel]  # (n,)
        xe = x[sel]
        y[sel] = y[sel] + cfg.scaling * w[:, None] * (xe @ ad.lora_A[e].T @ ad.lora_B[e].T)
    if cfg.shared_expert:
        y = y + cfg.scaling * (x @ ad.lora_A[-1].T @ ad.lora_B[-1].T)
    return y


@pytest.mark.parametrize("router,top_k,shared,task_dim,bias", [
    ("token_topk", 2, True, None, True), ("token_topk", 1, False, 0, True), ("token_topk", None, True, 5, True),
    ("token_topk", 2, True, None, False), ("task", 2, True, None, True), ("task", None, False, None, True)])
def test_moe_lora_matches_per_expert_loop(router, top_k, shared, task_dim, bias):
    cfg = AdapterConfig(kind="moe_lora", rank=3, alpha=5.0, num_experts=5, top_k=top_k, shared_expert=shared,
                        router=router, num_task_slots=16, task_embed_dim=task_dim, gate_bias=bias)
    layer = _layer(cfg)
    x = torch.randn(3, 7, 13, dtype=torch.float64)
    task_ids = torch.tensor([4, 0, 14])
    with routing_context(layer, task_ids=task_ids) as state:
        y = layer(x)
    torch.testing.assert_close(y, _loop_reference(layer, x, task_ids), rtol=1e-10, atol=1e-10)
    assert len(state.aux_losses) == 1
    # the adapter really contributes
    assert (y - layer.base_layer(x)).abs().max() > 1e-3


def test_plain_lora_layer():
    cfg = AdapterConfig(kind="lora", rank=4, alpha=8.0)
    layer = _layer(cfg)
    x = torch.randn(5, 13, dtype=torch.float64)
    ad = layer.adapters["default"]
    expected = layer.base_layer(x) + 2.0 * (x @ ad.lora_A[0].T @ ad.lora_B[0].T)
    torch.testing.assert_close(layer(x), expected)


def test_top_k_gates_are_sparse_and_not_renormalised():
    cfg = AdapterConfig(rank=2, num_experts=6, top_k=2, shared_expert=False)
    router = _layer(cfg).adapters["default"].router
    x = torch.randn(2, 9, 13, dtype=torch.float64)
    gates, _ = router(x, torch.tensor([1, 2]))
    assert ((gates != 0).sum(-1) == 2).all()
    assert (gates.sum(-1) < 1).all()  # X2Edit keeps the raw top-k softmax weights


def test_balance_loss_is_one_when_balanced_and_larger_when_collapsed():
    E = 4
    uniform = torch.full((8, E), 1 / E)
    gates = torch.zeros(8, E)
    gates[torch.arange(8), torch.arange(8) % E] = 1  # each expert used equally
    assert balance_loss(uniform, gates, 1).item() == pytest.approx(1.0)
    collapsed_p = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).expand(8, E)
    collapsed_g = torch.zeros(8, E)
    collapsed_g[:, 0] = 1
    assert balance_loss(collapsed_p, collapsed_g, 1).item() == pytest.approx(4 * 0.97)


def test_routing_needs_task_ids_of_the_batch():
    layer = _layer(AdapterConfig(rank=2, num_experts=3))
    x = torch.randn(2, 4, 13, dtype=torch.float64)
    with pytest.raises(ValueError, match="routing_context"):
        layer(x)
    with routing_context(layer, task_ids=[1, 2, 3]), pytest.raises(ValueError, match="3 task ids for a batch of 2"):
        layer(x)
    assert layer.routing is None  # the context is cleared afterwards


@pytest.fixture
def moe_model():
    model = tiny_flux_transformer(0)
    inject_adapters(model, AdapterConfig(rank=4, num_experts=3, top_k=2))
    randomize_adapters(model)
    return model


def test_injection_presets_and_summary():
    model = tiny_flux_transformer(0)
    base_params = sum(p.numel() for p in model.parameters())
    names = inject_adapters(model, AdapterConfig(kind="lora", rank=2, targets="x2edit"))
    assert names == ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                     "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.to_out.0",
                     "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                     "single_transformer_blocks.0.attn.to_v"]
    s = adapter_summary(model)
    assert s["adapter_params"] == 7 * 2 * (32 + 32) and s["trainable_params"] == s["adapter_params"]
    assert s["total_params"] == base_params + s["adapter_params"]
    model2 = tiny_flux_transformer(0)
    assert len(inject_adapters(model2, AdapterConfig(kind="lora", rank=2, targets="attn_ff"))) == 17
    with pytest.raises(ValueError, match="no linear layer"):
        inject_adapters(tiny_flux_transformer(0), AdapterConfig(kind="lora", rank=2, targets=[r"nothing\.here"]))


@pytest.mark.parametrize("name", ["eval", "to", "", "a.b", 3])
def test_bad_adapter_names_are_refused_before_any_layer_is_wrapped(name):
    model = tiny_flux_transformer(0)
    with pytest.raises(ValueError, match="invalid adapter name"):
        inject_adapters(model, AdapterConfig(kind="lora", rank=2), adapter_name=name)
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())


def test_gradients_reach_only_adapter_parameters(moe_model):
    with routing_context(moe_model, task_ids=[3, 7]) as state:
        out = moe_model(**tiny_flux_inputs())[0]
    (out.square().mean() + 0.01 * state.balance_loss).backward()
    for name, p in moe_model.named_parameters():
        if ".adapters." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_save_load_round_trip(moe_model, tmp_path):
    path = save_adapter(moe_model, tmp_path / "a.safetensors")
    fresh = tiny_flux_transformer(0)
    cfg = load_adapter(fresh, path)
    assert cfg.num_experts == 3 and cfg.rank == 4
    with routing_context(moe_model, task_ids=[3, 7]):
        a = moe_model(**tiny_flux_inputs())[0]
    with routing_context(fresh, task_ids=[3, 7]):
        b = fresh(**tiny_flux_inputs())[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _assert_untouched(model):
    assert not list(adapter_layers(model))


def test_load_refuses_bad_files(moe_model, tmp_path):
    good = save_adapter(moe_model, tmp_path / "good.safetensors")
    tensors = load_file(good)
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        header = f.metadata()

    other_base = tiny_flux_transformer(0, num_layers=2)
    with pytest.raises(ValueError, match="different base model: num_layers=1 .this model: 2."):
        load_adapter(other_base, good)
    _assert_untouched(other_base)

    cases = {
        "unknown": ({**tensors, "transformer_blocks.0.attn.to_q.extra": torch.zeros(1)}, header, "no place for"),
        "missing": ({k: v for k, v in tensors.items() if "to_k" not in k}, header, "lacks"),
        "shape": ({**tensors, "transformer_blocks.0.attn.to_q.lora_A": torch.zeros(5, 4, 32)}, header, "has shape"),
        "nan": ({**tensors, "transformer_blocks.0.attn.to_q.lora_B": torch.full_like(
            tensors["transformer_blocks.0.attn.to_q.lora_B"], float("nan"))}, header, "non-finite"),
        "foreign": (tensors, {}, "not an x2edit adapter"),
        "badconfig": (tensors, {**header, "config": json.dumps({"rank": 4, "colour": 1})}, "unknown adapter config"),
    }
    for name, (t, meta, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(t, str(path), metadata=meta)
        model = tiny_flux_transformer(0)
        with pytest.raises(ValueError, match=message):
            load_adapter(model, path)
        _assert_untouched(model)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_adapter(tiny_flux_transformer(0), tmp_path / "corrupt.safetensors")
    with pytest.raises(FileNotFoundError):
        load_adapter(tiny_flux_transformer(0), tmp_path / "absent.safetensors")


def test_save_refuses_non_finite_weights(moe_model, tmp_path):
    layer = next(layer for _, layer in adapter_layers(moe_model))
    with torch.no_grad():
        layer.adapters["default"].lora_B[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        save_adapter(moe_model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.fixture
def task_model():
    model = tiny_flux_transformer(0)
    inject_adapters(model, AdapterConfig(rank=4, num_experts=4, top_k=2, router="task"))
    randomize_adapters(model, std=0.2)
    return model


def test_merge_equals_unmerged_and_unmerge_restores(task_model):
    base = {n: p.detach().clone() for n, p in task_model.named_parameters() if "base_layer" in n}
    inputs = tiny_flux_inputs(batch=2)
    with routing_context(task_model, task_ids=[4, 4]):
        unmerged = task_model(**inputs)[0]
    merge_adapter(task_model, task="color_change")
    with pytest.raises(ValueError, match="already merged"):
        merge_adapter(task_model, task="color_change")
    with routing_context(task_model, task_ids=[4, 4]):
        merged = task_model(**inputs)[0]
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    changed = [n for n, p in task_model.named_parameters() if n in base and not torch.equal(p, base[n])]
    assert changed  # the base weights really moved
    unmerge_adapter(task_model)
    for n, p in task_model.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], rtol=1e-6, atol=1e-6)


def test_merge_refusals(moe_model, task_model):
    with pytest.raises(ValueError, match="token-level router"):
        merge_adapter(moe_model, task="color_change")
    with pytest.raises(ValueError, match="say which task"):
        merge_adapter(task_model)
    layers = [layer for _, layer in adapter_layers(task_model)]
    before = [layer.base_layer.weight.clone() for layer in layers]
    with torch.no_grad():
        layers[-1].adapters["default"].lora_B.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        merge_adapter(task_model, task=0)
    for layer, w in zip(layers, before):
        assert torch.equal(layer.base_layer.weight, w) and not layer.merged


def test_export_is_a_plain_lora_equal_to_the_task_mixture(task_model, tmp_path):
    path = export_diffusers_lora(task_model, tmp_path, task="color_change")
    state = load_file(path)
    a = state["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    assert a.shape == (2 * 4 + 4, 32)  # top-2 experts + shared expert, rank 4 each
    # Plain LoRA math on one layer equals the MoE layer for that task.
    name, layer = next(iter(adapter_layers(task_model)))
    x = torch.randn(1, 5, 32)
    with routing_context(task_model, task_ids=[4]):
        moe = layer(x)
    b = state[f"transformer.{name}.lora_B.weight"]
    torch.testing.assert_close(layer.base_layer(x) + x @ a.T @ b.T, moe, rtol=1e-5, atol=1e-5)


def test_x2edit_placement_on_full_size_flux_matches_upstream_parameter_count():
    """X2Edit's MoE-LoRA on FLUX.1-dev is ~0.99B parameters, ~8.3% of the 11.9B base (meta device: no memory)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                       num_attention_heads=24, joint_attention_dim=4096,
                                       pooled_projection_dim=768, guidance_embeds=True)
        inject_adapters(model, AdapterConfig(kind="moe_lora", rank=64, num_experts=12, top_k=2,
                                             shared_expert=True))  # the default placement is X2Edit's
    s = adapter_summary(model)
    assert s["adapted_layers"] == 19 * 4 + 38 * 3
    assert 0.98e9 < s["adapter_params"] < 1.0e9
    assert 0.080 < s["adapter_share"] < 0.086


@pytest.mark.parametrize("router", ["token_topk", "task"])
def test_gradient_checkpointing_replays_the_routing(router):
    """enable_gradient_checkpointing: backward recomputes each block with its forward-time task ids, even after
    the routing context has closed (or another one is open), and the balance loss is counted once."""
    from x2edit.adapters import enable_gradient_checkpointing

    def grads(checkpointing):
        model = tiny_flux_transformer(0)
        inject_adapters(model, AdapterConfig(rank=2, num_experts=3, top_k=2, router=router))
        randomize_adapters(model, std=0.2)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        with routing_context(model, task_ids=[3, 7]) as state:
            out = model(**tiny_flux_inputs())[0]
        loss = out.square().mean() + 0.5 * state.balance_loss
        with routing_context(model, task_ids=[0, 0]):  # the next batch's routing must not leak into backward
            loss.backward()
        moe_layers = sum(1 for _ in adapter_layers(model))
        assert len(state.aux_losses) == moe_layers  # once per layer, not again in the recomputation
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(".router." in n and g.abs().sum() > 0 for n, g in plain.items())  # the balance term reaches the gate


def test_upstream_router_form_shares_one_task_embedding_and_has_no_gate_bias(tmp_path):
    """shared_task_embedding / gate_bias=False (upstream X2Edit): one 16 x D table for all layers, saved once and
    shared again after loading; a bias-free gate."""
    config = AdapterConfig(rank=2, num_experts=3, top_k=2, task_embed_dim=5, shared_task_embedding=True,
                           gate_bias=False)
    model = tiny_flux_transformer(0)
    inject_adapters(model, config)
    routers = [layer.adapters["default"].router for _, layer in adapter_layers(model)]
    assert len(routers) == 7 and all(r.task_embedding is routers[0].task_embedding for r in routers)
    assert all(r.gate.bias is None for r in routers)
    separate = tiny_flux_transformer(0)
    inject_adapters(separate, AdapterConfig(rank=2, num_experts=3, top_k=2, task_embed_dim=5, gate_bias=False))
    assert adapter_summary(separate)["adapter_params"] - adapter_summary(model)["adapter_params"] == 6 * 16 * 5

    randomize_adapters(model, std=0.2)
    path = save_adapter(model, tmp_path / "shared.safetensors")
    assert sum(k.endswith("task_embedding.weight") for k in load_file(str(path))) == 1
    loaded = tiny_flux_transformer(0)
    load_adapter(loaded, path)
    inputs = tiny_flux_inputs()
    with routing_context(model, task_ids=[1, 5]):
        expected = model(**inputs)[0]
    with routing_context(loaded, task_ids=[1, 5]):
        torch.testing.assert_close(loaded(**inputs)[0], expected)
    tables = {id(layer.adapters["default"].router.task_embedding) for _, layer in adapter_layers(loaded)}
    assert len(tables) == 1
    with pytest.raises(ValueError, match="shared_task_embedding .* needs router='token_topk'"):
        AdapterConfig(router="task", shared_task_embedding=True)


def test_default_placement_is_x2edits():
    assert AdapterConfig().targets == "x2edit"


def test_a_merged_adapter_keeps_its_weight_until_unmerged(task_model):
    """Unmerging subtracts the update at the current weight: changing a merged adapter's weight in between would
    leave the base weights corrupted, so set_adapters refuses it (and leaves everything as it was)."""
    from x2edit.adapters import set_adapters

    before = {n: layer.base_layer.weight.clone() for n, layer in adapter_layers(task_model)}
    merge_adapter(task_model, "default", task="color_change")
    with pytest.raises(ValueError, match="merged into the base weights: unmerge it before changing its weight"):
        set_adapters(task_model, ["default"], [0.5])
    set_adapters(task_model, ["default"], [1.0])  # the same weight is fine
    unmerge_adapter(task_model, "default")
    for n, layer in adapter_layers(task_model):
        torch.testing.assert_close(layer.base_layer.weight, before[n], rtol=0, atol=1e-6)


def test_token_router_keeps_no_token_task_concatenation_for_backward():
    """The gate's token and task columns are applied apart: backward keeps one float32 copy of the tokens, not of
    [tokens ; task embedding] (which is twice as wide at FLUX size)."""
    from x2edit.adapters import TokenTopKRouter

    router = TokenTopKRouter(in_features=64, num_experts=4, top_k=2, task_embed_dim=64)
    x = torch.randn(2, 50, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gates, _ = router(x, torch.tensor([3, 9]))
    big = [n for n in saved.values() if n >= x.numel() * 4]
    assert big == [x.numel() * 4]  # the float32 tokens, once
    h = torch.cat([x.float(), router.task_embedding(torch.tensor([3, 9]))[:, None].expand(-1, 50, -1)], -1)
    expected = torch.softmax(router.gate(h), -1)
    kept = gates.float() != 0
    torch.testing.assert_close(gates.float()[kept], expected[kept], rtol=1e-2, atol=1e-3)  # the same gate


def test_a_baked_adapter_stays_when_the_others_are_unmerged(task_model):
    """delete_adapter(keep_merged=True) bakes an adapter into the base: unmerging another adapter afterwards must
    restore the base *with* the baked update, not the weight from before the first merge."""
    from x2edit.adapters.inject import make_adapter

    layers = [layer for _, layer in adapter_layers(task_model)]
    original = [layer.base_layer.weight.clone() for layer in layers]
    for layer in layers:
        lora = make_adapter(AdapterConfig(kind="lora", rank=2), layer.in_features, layer.out_features)
        torch.nn.init.normal_(lora.lora_B, std=0.1)
        layer.add_adapter("style", lora)
    style = [layer.adapters["style"].delta_weight() for layer in layers]
    merge_adapter(task_model, "default", task="color_change")
    for layer in layers:
        layer.merge("style")
        layer.delete_adapter("style", keep_merged=True)  # as unload_lora_weights after fuse_lora
    unmerge_adapter(task_model, "default")
    for layer, w, d in zip(layers, original, style):
        torch.testing.assert_close(layer.base_layer.weight, (w.float() + d).to(w.dtype), rtol=0, atol=1e-6)


# -- DoRA and LoRA biases (community LoRAs), against PEFT's own layer -----------------------------------
def _peft_pair(use_dora=False, lora_bias=False, K=13, N=11, r=3, alpha=6, seed=0):
    """(PEFT lora.Linear, x2edit AdapterLinear) on the same float64 base with the same adapter "a" (scale 2)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    from x2edit.adapters.layers import DoRA, LoRA

    torch.manual_seed(seed)
    base = nn.Linear(K, N).double()
    config = LoraConfig(r=r, lora_alpha=alpha, use_dora=use_dora, lora_bias=lora_bias, init_lora_weights=False)
    peft = PeftLinear(nn.Linear(K, N).double(), "a", config, r=r, lora_alpha=alpha)
    peft.base_layer.load_state_dict(base.state_dict())
    layer = AdapterLinear(nn.Linear(K, N).double())
    layer.base_layer.load_state_dict(base.state_dict())
    adapter = DoRA(K, N, r, alpha / r) if use_dora else LoRA(K, N, r, alpha / r, bias=lora_bias)
    with torch.no_grad():
        if lora_bias:
            peft.lora_B["a"].bias.normal_(0, 0.5)
            adapter.lora_bias.copy_(peft.lora_B["a"].bias)
        if use_dora:  # a magnitude other than ||W + s B A||, where the DoRA would be a plain LoRA
            peft.lora_magnitude_vector["a"].weight.mul_(1 + 0.5 * torch.rand(N, dtype=torch.float64))
            adapter.magnitude.copy_(peft.lora_magnitude_vector["a"].weight)
        adapter.lora_A.copy_(peft.lora_A["a"].weight[None])
        adapter.lora_B.copy_(peft.lora_B["a"].weight[None])
    layer.add_adapter("a", adapter)
    return peft, layer


@pytest.mark.parametrize("kind", ["dora", "lora_bias"])
def test_dora_and_lora_bias_layers_match_peft(kind):
    """Forward (at weight 1 and at a set_adapters weight), inside static_merge, merge and unmerge, as PEFT's layer."""
    from x2edit.adapters import static_merge

    peft, layer = _peft_pair(use_dora=kind == "dora", lora_bias=kind == "lora_bias")
    x = torch.randn(2, 5, 13, dtype=torch.float64)
    base = layer.base_layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), peft(x), rtol=0, atol=1e-6)
        assert (layer(x) - base).abs().max() > 0.1
        peft.set_scale("a", 0.4)
        layer.adapter_weights["a"] = 0.4
        torch.testing.assert_close(layer(x), peft(x), rtol=0, atol=1e-6)
        with static_merge(nn.Sequential(layer), calls=1):
            torch.testing.assert_close(layer(x), peft(x), rtol=0, atol=1e-6)
    before = (layer.base_layer.weight.clone(), layer.base_layer.bias.clone())
    peft.merge()
    layer.merge("a")
    torch.testing.assert_close(layer.base_layer.weight, peft.base_layer.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.base_layer.bias, peft.base_layer.bias, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), peft(x), rtol=0, atol=1e-6)
    layer.unmerge("a")
    assert torch.equal(layer.base_layer.weight, before[0]) and torch.equal(layer.base_layer.bias, before[1])


def test_dora_rescales_the_loras_before_it_as_peft_does():
    """PEFT adds each active adapter to the result so far, and a DoRA rescales that result's base part: a plain
    LoRA before the DoRA is rescaled with the base, one after it is not. x2edit folds them into the weight in
    that order."""
    from peft import LoraConfig

    from x2edit.adapters.layers import LoRA

    peft, layer = _peft_pair(use_dora=True)
    peft.update_layer("p", 2, lora_alpha=2, config=LoraConfig(r=2, lora_alpha=2, init_lora_weights=False))
    plain = LoRA(13, 11, 2, 1.0).double()
    with torch.no_grad():
        plain.lora_A.copy_(peft.lora_A["p"].weight[None])
        plain.lora_B.copy_(peft.lora_B["p"].weight[None])
    layer.add_adapter("p", plain)
    x = torch.randn(4, 13, dtype=torch.float64)
    with torch.no_grad():
        for order in (["p", "a"], ["a", "p"]):
            peft.set_adapter(order)
            layer.active_adapters = list(order)
            torch.testing.assert_close(layer(x), peft(x), rtol=0, atol=1e-6)


def test_a_lora_bias_gated_per_sample_and_refusals():
    """An outside per-sample gate multiplies a LoRA's bias with the rest of its update; merging a LoRA bias into
    a layer without a bias is refused (PEFT refuses it too); a DoRA takes one gate for the whole batch."""
    from x2edit.adapters import RoutingState
    from x2edit.adapters.layers import DoRA, LoRA

    torch.manual_seed(0)
    layer = AdapterLinear(nn.Linear(13, 11, bias=False).double())
    lora = LoRA(13, 11, 3, 2.0, bias=True).double()
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.3)
    layer.add_adapter("b", lora)
    x = torch.randn(2, 5, 13, dtype=torch.float64)
    g = torch.tensor([0.0, 0.5], dtype=torch.float64)
    layer.routing = RoutingState(adapter_gates=lambda _: {"b": g})
    with torch.no_grad():
        update = 2.0 * (x @ lora.lora_A[0].T @ lora.lora_B[0].T + lora.lora_bias)
        torch.testing.assert_close(layer(x), layer.base_layer(x) + g[:, None, None] * update)
    layer.routing = None
    with pytest.raises(ValueError, match="has a bias .* has none"):
        layer.merge("b")
    assert layer.merged == {}
    dora = DoRA(13, 11, 3, 2.0).double()
    layer.add_adapter("d", dora)
    layer.routing = RoutingState(adapter_gates=lambda _: {"d": g})
    with pytest.raises(ValueError, match="one gate for the whole batch"):
        layer(x)


def test_a_dora_runs_in_fused_qkv_projections():
    """A DoRA (and a LoRA bias) on q/k/v: the fused projection computes each part's block as the part would."""
    from x2edit.adapters import fuse_qkv_projections, load_community_lora

    model = tiny_flux_transformer(0)
    state = {}
    g = torch.Generator().manual_seed(3)
    for m in ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.attn.to_k"]:
        state[f"transformer.{m}.lora_A.weight"] = torch.randn(2, 32, generator=g) * 0.3
        state[f"transformer.{m}.lora_B.weight"] = torch.randn(32, 2, generator=g) * 0.3
        state[f"transformer.{m}.lora_magnitude_vector"] = torch.rand(32, generator=g) + 0.5
    load_community_lora(model, state, "dora")
    inputs = tiny_flux_inputs()
    with torch.no_grad():
        unfused = model(**inputs)[0]
        assert (unfused - tiny_flux_transformer(0)(**inputs)[0]).abs().max() > 1e-2
        assert fuse_qkv_projections(model)
        torch.testing.assert_close(model(**inputs)[0], unfused, rtol=0, atol=1e-5)
