"""benchmarks/train_memory.py: the meta-device estimate (CPU), the refusal without CUDA, the recipe it reads,
and the measured path on a small model where a GPU exists."""

import json
import re
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from benchmarks import train_memory as tm

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "flux_kontext" / "x2edit.yaml"
TINY_ARGS = ["--config", "tiny", "--resolution", "64", "--text-tokens", "8", "--rank", "4", "--experts", "3"]


def tiny_spec(batch=2, resolution=64, contrastive=True, **kw):
    args = Namespace(recipe=RECIPE, config="tiny", batch=[batch], resolution=resolution, text_tokens=8, rank=4,
                     experts=3, checkpointing=kw.get("checkpointing"), contrastive="on" if contrastive else "off",
                     text_encoder=None, optimizer=None)
    return tm.make_specs(args)[0]


def test_estimate_writes_exact_weight_bytes_counted_independently(tmp_path):
    assert tm.main(["--out", str(tmp_path), "--estimate", "--batch", "2", *TINY_ARGS]) == 0
    result = json.loads((tmp_path / "train_memory.json").read_text())
    assert result["mode"] == "estimate" and result["measured"] == []
    (e,) = result["estimates"]
    assert e["kind"] == "estimate (meta device, unmeasured)"
    b = e["bytes"]

    # The base: a real (CPU, float32) tiny transformer, counted here, at 2 bytes a weight.
    from diffusers import FluxTransformer2DModel

    base_params = sum(p.numel() for p in FluxTransformer2DModel(**tm.CONFIGS["tiny"]).parameters())
    assert b["base_weights"] == 2 * base_params
    # The adapter, by formula: X2Edit's placement (q, k, v, out in double blocks; q, k, v in single ones), each
    # a 32 -> 32 linear with 3 routed + 1 shared expert of rank 4, a router Linear(32 + 32 -> 3) reading
    # [token ; task embedding] and a 16 x 32 task embedding; float32.
    cfg, K, r, E = tm.CONFIGS["tiny"], 32, 4, 3
    per_layer = (E + 1) * r * (K + K) + (2 * K) * E + E + 16 * K
    layers = 4 * cfg["num_layers"] + 3 * cfg["num_single_layers"]
    assert e["params"]["adapter_params"] == layers * per_layer
    assert b["adapter_weights"] == b["gradients"] == 4 * layers * per_layer
    assert 8 * layers * per_layer <= b["optimizer_state"] <= 8 * layers * per_layer + 4 * 10 * layers  # + step scalars
    assert b["peak"] >= b["base_weights"] + b["adapter_weights"] + b["activations_at_peak"] > b["base_weights"]

    table = (tmp_path / "train_memory.md").read_text()
    assert "Meta-device estimate, not measured on a GPU" in table and "estimate, unmeasured" in table


def test_live_bytes_follows_allocations_and_frees_and_not_views_of_weights():
    weight = torch.empty(256, 512, device="meta")  # allocated before: W.t() in a linear is no new memory
    x = torch.empty(1000, 1000, device="meta", requires_grad=True)
    with tm.LiveBytes(existing=[weight, x]) as live:
        weight.t()
        assert live.current == 0
        y = (x * 2).exp()  # two (1000, 1000) float32 results; exp keeps only its own for backward
        assert (live.current, live.peak) == (4_000_000, 2 * 4_000_000)
        del y
        assert live.current == 0
        (x * 3).sum().backward()  # backward allocations count too
        assert x.grad is not None and live.current == 4_000_000  # x.grad lives on


def test_flash_stand_in_keeps_q_k_v_out_and_logsumexp_not_the_attention_matrix():
    spec = tiny_spec(batch=2)
    model = tm.build_model(spec, "meta")
    blocks = tm.block_saved_bytes(spec, model, flash=True)
    meta_sdpa = tm.block_saved_bytes(spec, model, flash=False)
    B, H, D = 2, 2, 16
    L = spec.text_tokens + 2 * spec.image_tokens  # text + target + reference tokens
    flash = 4 * B * H * L * D * 2 + B * H * L * 4  # q, k, v, out in bf16; logsumexp in float32
    for kind in ("double", "single"):
        assert blocks[kind]["attention"] == flash
        assert meta_sdpa[kind]["attention"] >= B * H * L * L * 4  # the math path keeps the probabilities
        assert blocks[kind]["saved"] > blocks[kind]["attention"]  # adapters, norms, MLP keep the rest


def test_estimate_grows_with_tokens_and_counts_the_contrastive_features():
    companions = {}
    small, large = tm.estimate(tiny_spec(resolution=64), companions), tm.estimate(tiny_spec(resolution=128), companions)
    assert large["bytes"]["forward_saved_for_backward"] > 3 * small["bytes"]["forward_saved_for_backward"]
    assert large["bytes"]["activations_at_peak"] > small["bytes"]["activations_at_peak"]
    assert large["bytes"]["peak"] > small["bytes"]["peak"]

    on, off = tm.estimate(tiny_spec(batch=4), companions), tm.estimate(tiny_spec(batch=4, contrastive=False), companions)
    assert on["spec"]["contrastive"] and not off["spec"]["contrastive"]
    # The double blocks' target tokens, flattened to float32 for the loss, stay alive until backward.
    cfg = tm.CONFIGS["tiny"]
    features = cfg["num_layers"] * 4 * 16 * 32 * 4  # blocks x batch x target tokens x width x float32
    assert on["bytes"]["forward_saved_for_backward"] - off["bytes"]["forward_saved_for_backward"] >= features


def test_checkpointing_keeps_less_for_backward():
    companions = {}
    with_cp = tm.estimate(tiny_spec(batch=2, checkpointing=True), companions)
    without = tm.estimate(tiny_spec(batch=2, checkpointing=False), companions)
    assert with_cp["bytes"]["forward_saved_for_backward"] < without["bytes"]["forward_saved_for_backward"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_measure_refuses_without_cuda_in_one_line(tmp_path, capsys):
    assert tm.main(["--out", str(tmp_path / "out"), "--measure", *TINY_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA" in err
    assert not (tmp_path / "out").exists()


def test_recipe_loads_and_is_what_the_benchmark_runs_by_default():
    from x2edit.registry import get_base_model
    from x2edit.training.config import load_config

    cfg = load_config(RECIPE)
    assert get_base_model(cfg.model.base).name == "flux.1-kontext-dev"
    assert (cfg.mode, cfg.model.dtype, cfg.model.gradient_checkpointing) == ("edit", "auto", True)
    a = cfg.adapter
    assert (a.kind, a.targets, a.rank, a.num_experts, a.top_k, a.shared_expert) == ("moe_lora", "x2edit", 64, 12, 2, True)
    assert (cfg.loss.contrastive_weight, cfg.optim.lr, cfg.data.resolution) == (0.2, 1e-4, 1024)
    assert cfg.batch_size >= 4  # two same-task pairs of two tasks: a pair alone has no negative

    args = Namespace(recipe=RECIPE, config="flux.1-dev", batch=None, resolution=None, text_tokens=None, rank=None,
                     experts=None, checkpointing=None, contrastive=None, text_encoder=None, optimizer=None)
    (spec,) = tm.make_specs(args)
    assert (spec.batch, spec.resolution, spec.image_tokens, spec.text_tokens) == (cfg.batch_size, 1024, 4096, 512)
    assert spec.contrastive_active and spec.checkpointing and spec.adapter == cfg.adapter
    assert spec.text_encoder_on_gpu == (cfg.model.text_encoder_device is None)


def test_full_size_flux_weights_on_the_meta_device():
    """FLUX.1-dev with X2Edit's placement: ~11.9B base parameters in bf16, ~0.99B adapter parameters in float32."""
    args = Namespace(recipe=RECIPE, config="flux.1-dev", batch=None, resolution=None, text_tokens=None, rank=None,
                     experts=None, checkpointing=None, contrastive=None, text_encoder=None, optimizer=None)
    (spec,) = tm.make_specs(args)
    w = tm.weight_bytes(tm.build_model(spec, "meta"))
    assert 11.8e9 < w["base_params"] < 12.0e9 and w["base_weights"] == 2 * w["base_params"]
    assert 0.98e9 < w["adapter_params"] < 1.0e9 and w["adapter_weights"] == 4 * w["adapter_params"]
    companions = tm.companion_weight_bytes()
    # The published parameter counts of FLUX.1's T5-XXL encoder, CLIP-L text model and VAE, in bf16.
    assert companions == {"t5_xxl": 2 * 4_762_310_656, "clip_l": 2 * 123_060_480, "vae": 2 * 83_819_683}


@pytest.mark.slow
def test_readme_quotes_the_recipes_full_size_estimate():
    """The README's number is what the estimate gives for configs/flux_kontext/x2edit.yaml (~40 s)."""
    args = Namespace(recipe=RECIPE, config="flux.1-dev", batch=None, resolution=None, text_tokens=None, rank=None,
                     experts=None, checkpointing=None, contrastive=None, text_encoder=None, optimizer=None)
    (spec,) = tm.make_specs(args)
    e = tm.estimate(spec, tm.companion_weight_bytes())
    assert e["fits_h100_80gb"]["fits"]
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Training on real FLUX"):]
    quoted = float(re.search(r"estimate, not measured on a GPU\)?:? \**([\d.]+) GiB", section).group(1))
    assert abs(quoted - e["bytes"]["peak"] / tm.GIB) < 0.05


@pytest.mark.gpu
def test_measured_path_runs_a_small_model_on_the_gpu(tmp_path):
    # batch 1 runs once (no same-task partner, so no contrastive term); batch 2 with and without it
    assert tm.main(["--out", str(tmp_path), "--measure", "--batch", "1", "2", "--steps", "3",
                    "--contrastive", "both", *TINY_ARGS]) == 0
    result = json.loads((tmp_path / "train_memory.json").read_text())
    assert result["mode"] == "measure" and len(result["measured"]) == len(result["estimates"]) == 3
    for m in result["measured"]:
        assert "error" not in m, m
        b = m["bytes"]
        assert b["max_reserved"] >= b["max_allocated"] > b["allocated_after_build"] + b["gradients"]
        assert m["step_seconds"] > 0 and len(m["step_times"]) == 3
    e = result["estimates"][0]["bytes"]
    m = result["measured"][0]["bytes"]
    assert (m["base_weights"], m["adapter_weights"]) == (e["base_weights"], e["adapter_weights"])
    assert "measured" in (tmp_path / "train_memory.md").read_text()
