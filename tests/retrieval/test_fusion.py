"""Gated multi-LoRA fusion: per-sample gates in one kernel call per layer, and each fusion's gates."""

import pytest
import torch
from autolora_helpers import KOHYA_MODULES, RES, random_factors, tiny_pipe

from x2edit import kernels
from x2edit.adapters import adapter_layers, load_community_lora
from x2edit.adapters.fusion import FUSIONS, Gated, KLoRA, make_fusion
from x2edit.retrieval.encoder import module_set
from x2edit.retrieval.flow import LoraFlow
from x2edit.retrieval.fusion import GateConfig, GateNet


@pytest.fixture
def three(tmp_path):
    """A tiny pipeline with three community LoRAs (ranks 1, 2, 3) on the kohya-able modules."""
    pipe = tiny_pipe()
    for j in range(3):
        load_community_lora(pipe.transformer, random_factors_file(tmp_path, j), f"L{j}")
    return pipe


def random_factors_file(tmp_path, j):
    from x2edit.retrieval.formats import write_lora

    return write_lora(tmp_path / f"L{j}.safetensors", random_factors(KOHYA_MODULES, rank=j + 1, seed=j, std=0.2), "peft")


def test_each_fusions_gates(three):
    tf, sigma = three.transformer, torch.tensor([0.5, 0.25])
    names = ["L0", "L1", "L2"]
    layers = len(list(adapter_layers(tf)))

    def gates(kind, step=0, **kw):
        f = (Gated(names, **kw) if kind == "gated" else make_fusion(kind, names, **kw)).bind(tf)
        return [(g, w) for g, w in [(torch.stack([torch.stack([fn(lay)[n] for n in names], -1)
                                                  for _, lay in adapter_layers(tf)]), w)
                                    for fn, w in f.plan(sigma, step)]]

    (g, w), = gates("sum", weights=[1.0, 0.5, 2.0])
    assert g.shape == (layers, 2, 3) and w == 1.0
    assert torch.equal(g, torch.tensor([1.0, 0.5, 2.0]).expand_as(g))
    (g, _), = gates("average")
    assert torch.allclose(g, torch.full_like(g, 1 / 3))
    for step in range(4):
        (g, _), = gates("switch", step)
        assert torch.equal(g[..., step % 3], torch.ones_like(g[..., 0])) and g.sum() == g[..., step % 3].sum()
    passes = gates("composite")
    assert len(passes) == 3 and all(abs(w - 1 / 3) < 1e-9 for _, w in passes)
    for j, (g, _) in enumerate(passes):
        assert torch.equal(g, torch.nn.functional.one_hot(torch.tensor(j), 3).float().expand_as(g))
    (g, _), = gates("klora")
    expected = []
    for _, lay in adapter_layers(tf):
        scores = [lay.adapters[n].delta_weight().abs().flatten().topk(64).values.sum() for n in names]
        expected.append(int(torch.stack(scores).argmax()))
    assert g[:, 0].argmax(-1).tolist() == expected and torch.equal(g.sum(-1), torch.ones(layers, 2))
    assert len(set(expected)) > 1  # the test model makes different layers pick different LoRAs
    # The learned gate starts as the plain sum ...
    gate = GateNet(GateConfig([m for m, _, _ in module_set(tf)], lora_dim=5, text_dim=0, hidden=8))
    emb = torch.randn(3, 5)
    (g, _), = gates("gated", gate=gate, embeddings=emb)
    assert torch.equal(g, torch.ones_like(g))
    # ... and, once trained, gates each layer, noise level and LoRA apart.
    with torch.no_grad():
        gate.mlp[-1].weight.normal_()
    (g, _), = gates("gated", gate=gate, embeddings=emb)
    assert (g[0] - g[1]).abs().max() > 1e-3 and (g[:, 0] - g[:, 1]).abs().max() > 1e-3
    assert (g[..., 0] - g[..., 1]).abs().max() > 1e-3 and ((g > 0) & (g < 2)).all()
    assert set(FUSIONS) == {"sum", "average", "switch", "composite", "klora", "gated"}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_k_loras_cost_one_kernel_call_per_layer(three, k, monkeypatch, image16):
    tf, names = three.transformer, ["L0", "L1", "L2"][:k]
    flow = LoraFlow(three)
    fusion = make_fusion("sum", names).bind(tf)
    calls = []
    real = kernels.lora_linear
    monkeypatch.setattr(kernels, "lora_linear", lambda *a, **kw: calls.append(a[3].shape[0]) or real(*a, **kw))
    src = flow.tokens([image16])
    sigma = torch.tensor([0.5])
    with torch.no_grad(), flow.only(names):
        from x2edit.adapters import routing_context

        with routing_context(tf, timestep=sigma) as state:
            state.adapter_gates = fusion.plan(sigma, 0)[0][0]
            flow._forward(src, src, sigma, flow.encode(["x"]), (RES, RES))
    held = [lay for _, lay in adapter_layers(tf) if any(n in lay.adapters for n in names)]
    assert len(calls) == len(held) == len(KOHYA_MODULES)
    assert max(calls) == k  # all k LoRAs stacked as k experts of each call


def test_composite_is_the_mean_of_the_single_lora_changes(three, image16):
    flow = LoraFlow(three)
    src = flow.tokens([image16, image16[::-1].copy()])
    sigma, text = torch.tensor([0.5, 0.3]), flow.encode(["a", "b"])
    names = ["L0", "L1"]
    with torch.no_grad():
        comp = flow.velocity_change(src, src, sigma, text, names, make_fusion("composite", names).bind(
            three.transformer).plan(sigma, 0), (RES, RES))
        singles = [flow.velocity_change(src, src, sigma, text, [n], [(None, 1.0)], (RES, RES)) for n in names]
        both = flow.velocity_change(src, src, sigma, text, names, [(None, 1.0)], (RES, RES))
    torch.testing.assert_close(comp, (singles[0] + singles[1]) / 2, atol=1e-5, rtol=1e-4)
    assert (both - (singles[0] + singles[1])).abs().max() > 1e-4  # the network is not linear in its LoRAs


def test_klora_needs_loaded_loras(three):
    with pytest.raises(ValueError, match="not loaded"):
        KLoRA(["L0", "nope"]).bind(three.transformer)
    with pytest.raises(ValueError, match="unknown fusion"):
        make_fusion("blend", ["L0"])
