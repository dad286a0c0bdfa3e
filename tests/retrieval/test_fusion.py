"""Gated multi-LoRA fusion: per-sample gates in one kernel call per layer, and each fusion's gates."""

import pytest
import torch
from autolora_helpers import KOHYA_MODULES, RES, random_factors, tiny_pipe

from x2edit import kernels
from x2edit.adapters import adapter_layers, load_community_lora
from x2edit.adapters.fusion import FUSIONS, Gated, KLoRA, Switch, is_attention_layer, make_fusion
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
    for step in range(4):  # tau=1: one LoRA per step (the paper's default tau=5 is tested below)
        (g, _), = gates("switch", step, tau=1)
        assert torch.equal(g[..., step % 3], torch.ones_like(g[..., 0])) and g.sum() == g[..., step % 3].sum()
    passes = gates("composite")
    assert len(passes) == 3 and all(abs(w - 1 / 3) < 1e-9 for _, w in passes)
    for j, (g, _) in enumerate(passes):
        assert torch.equal(g, torch.nn.functional.one_hot(torch.tensor(j), 3).float().expand_as(g))
    (g, _), = gates("topk_select")  # what "klora" was before it followed the paper: any k, fixed over steps
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
    assert set(FUSIONS) == {"sum", "average", "switch", "composite", "klora", "topk_select", "gated"}


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


def test_switch_changes_lora_every_tau_steps(three):
    """LoRA Switch hands over to the next LoRA every tau steps (5 by default, the paper's), cycling."""
    names, sigma = ["L0", "L1", "L2"], torch.tensor([0.5])

    def active(fusion, step):
        g = fusion.layer_gates(sigma, step)  # (L, 1, 3)
        on = (g != 0).any(1).any(0).nonzero().flatten().tolist()
        assert len(on) == 1
        return on[0]

    f = make_fusion("switch", names, tau=3).bind(three.transformer)
    assert [active(f, t) for t in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]
    f = make_fusion("switch", names).bind(three.transformer)
    assert f.tau == 5 and [active(f, t) for t in range(11)] == [0] * 5 + [1] * 5 + [2]
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="tau"):
            Switch(names, tau=bad)
    with pytest.raises(ValueError, match="no option"):
        make_fusion("sum", names, tau=3)


# The two LoRAs of the K-LoRA tests share their factors; the style one's B is multiplied per module, so in
# module m dW_style = c[m] * dW_subject: the per-layer score ratio S_c / S_s = 1 / c[m], known exactly.
STYLE_MULTIPLIER = {"transformer_blocks.0.attn.to_q": 1.0, "transformer_blocks.0.attn.to_k": 0.125,
                    "transformer_blocks.0.attn.to_v": 4.0, "transformer_blocks.0.attn.to_out.0": 1.0,
                    "single_transformer_blocks.0.proj_out": 1.0, "x_embedder": 1.0, "proj_out": 1.0}


@pytest.fixture
def subject_style(tmp_path):
    from x2edit.retrieval.formats import write_lora

    pipe = tiny_pipe()
    subject = random_factors(KOHYA_MODULES, rank=2, seed=7, std=0.2)
    style = {m: (A, B * STYLE_MULTIPLIER[m], scale) for m, (A, B, scale) in subject.items()}
    for name, factors in (("subject", subject), ("style", style)):
        path = write_lora(tmp_path / f"{name}.safetensors", factors, "peft")
        load_community_lora(pipe.transformer, path, name)
    return pipe


def klora_choice(tf, fusion, sigma, step):
    """{module: [per sample: 0 subject acts, 1 style acts, 2 both act]} from the fusion's gates."""
    fn, _ = fusion.plan(sigma, step)[0]
    out = {}
    for name, layer in adapter_layers(tf):
        g = torch.stack([fn(layer)["subject"], fn(layer)["style"]], -1)  # (B, 2)
        out[name] = [2 if (row != 0).all() else int(row.nonzero()) for row in g]
    return out


def test_klora_selects_per_attention_layer_and_step(subject_style):
    """K-LoRA: the subject acts iff S_c / gamma > (1.5 t/T + 0.5) S_s, per attention layer and per step.

    Per-layer ratios S_c / S_s = 1 / c: to_q 1, to_k 8, to_v 0.25, the rest 1. gamma = the mean of the
    full-sum ratios without those at 3 x the mean or more: mean(1, 8, 0.25, 1, 1, 1, 1) = 1.89, so 8 is left
    out and gamma = mean(1, 0.25, 1, 1, 1, 1) = 0.875. to_q: subject iff 1 / 0.875 = 1.143 > 0.5 + 1.5 t/T,
    i.e. t/T < 0.43 (steps 0-4 of 10); to_k (9.1) always subject; to_v (0.29) always style.
    """
    tf = subject_style.transformer
    q, k, v, o = (f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0"))
    others = ["single_transformer_blocks.0.proj_out", "x_embedder", "proj_out"]
    assert all(map(is_attention_layer, (q, k, v, o))) and not any(map(is_attention_layer, others))

    f = make_fusion("klora", ["subject", "style"], steps=10).bind(tf)
    sigma = torch.tensor([0.5])
    per_step = [klora_choice(tf, f, sigma, t) for t in range(10)]
    assert [c[q][0] for c in per_step] == [0] * 5 + [1] * 5  # the choice flips as the style factor grows
    assert abs(f.gamma - 0.875) < 1e-5  # the flip at step 5 pins gamma: 1 would put it at 4, 1.89 at 1
    assert all(c[k] == [0] and c[v] == [1] for c in per_step)  # ... and differs between layers
    assert [c[o][0] for c in per_step] == [0] * 5 + [1] * 5
    assert all(c[m] == [2] for c in per_step for m in others)  # outside attention both LoRAs act
    # Without steps, t/T = 1 - sigma, per sample: early (sigma 0.9) the subject, late (sigma 0.2) the style.
    f = make_fusion("klora", ["subject", "style"]).bind(tf)
    c = klora_choice(tf, f, torch.tensor([0.9, 0.2]), 0)
    assert c[q] == [0, 1] and c[k] == [0, 0] and c[v] == [1, 1] and all(c[m] == [2, 2] for m in others)
    # Gates are the LoRA's weight where it acts; the weights do not move the choice (gamma scales with them).
    f = make_fusion("klora", ["subject", "style"], [2.0, 0.5]).bind(tf)
    fn, _ = f.plan(torch.tensor([0.9, 0.2]), 0)[0]
    layer = dict(adapter_layers(tf))[q]
    assert fn(layer)["subject"].tolist() == [2.0, 0.0] and fn(layer)["style"].tolist() == [0.0, 0.5]
    assert klora_choice(tf, f, torch.tensor([0.9, 0.2]), 0) == c
    # attention_only=False selects in every layer holding both (ratio 1 there, like to_q).
    f = make_fusion("klora", ["subject", "style"], attention_only=False).bind(tf)
    assert all(klora_choice(tf, f, torch.tensor([0.9, 0.2]), 0)[m] == [0, 1] for m in others)
    # Pattern "s*" (the paper's supplement): S* = (1.5 t/T + 1.275) mod 1.5: 1.275 at t = 0 (> 1.143: style),
    # 0.075 at t/T = 0.2 (subject).
    f = make_fusion("klora", ["subject", "style"], pattern="s*", steps=10).bind(tf)
    assert [klora_choice(tf, f, sigma, t)[q][0] for t in (0, 2)] == [1, 0]


def test_klora_top_k_is_the_product_of_the_ranks(three):
    """K defaults to r_c * r_s (ranks 1 and 3 here: K = 3) and S_c, S_s are the sums of the K largest |dW|."""
    tf = three.transformer
    f = KLoRA(["L0", "L2"]).bind(tf)
    for _, layer in adapter_layers(tf):
        row = f.slots[id(layer)]
        want = [layer.adapters[n].delta_weight().abs().flatten().topk(3).values.sum() for n in ("L0", "L2")]
        torch.testing.assert_close(f.scores[row], torch.stack(want))
    assert f.selects.tolist() == [is_attention_layer(n) for n in f.layer_names]


def test_klora_arguments(three):
    with pytest.raises(ValueError, match="exactly two"):
        make_fusion("klora", ["L0", "L1", "L2"])
    with pytest.raises(ValueError, match="exactly two"):
        KLoRA(["L0"])
    for bad in ({"pattern": "t"}, {"steps": 0}, {"top_k": 0}, {"tau": 5}):
        with pytest.raises(ValueError):
            make_fusion("klora", ["L0", "L1"], **bad)
