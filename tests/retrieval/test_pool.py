"""The LoRA pool: stacked training with per-sample gates, exact concept targets, files in real layouts."""

import numpy as np
import pytest
import torch
from autolora_helpers import KOHYA_MODULES, RES, tiny_pipe

from x2edit.adapters import AdapterConfig, inject_adapters
from x2edit.adapters.community import read_lora_header
from x2edit.retrieval.flow import LoraFlow, flow_loss, straight_path
from x2edit.retrieval.pool import PoolConfig, one_hot_gates


def test_each_sample_trains_only_its_own_lora(image16):
    """One forward of a stacked batch: the loss of LoRA a's samples gives LoRA b no gradient, and the
    reverse; with all-ones gates it would (the mutation this catches)."""
    pipe = tiny_pipe()
    for name in ("a", "b"):
        inject_adapters(pipe.transformer, AdapterConfig(kind="lora", rank=2, targets=list(KOHYA_MODULES)), name)
        with torch.no_grad():
            for n, p in pipe.transformer.named_parameters():
                if f".{name}." in n:
                    p.normal_(std=0.1)
    flow = LoraFlow(pipe)
    src = flow.tokens([image16, image16[::-1].copy()])
    tgt = flow.tokens([255 - image16, image16])
    sigma = torch.tensor([0.5, 0.2])
    for owners, ones in ((["a", "b"], False), (["a", "b"], True)):
        gates = one_hot_gates(["a", "b"], owners)
        if ones:
            gates = {n: torch.ones(2) for n in gates}
        x = straight_path(src, tgt, sigma, 0.5)
        delta = flow.velocity_change(x, src, sigma, flow.encode(["p", "q"]), ["a", "b"], [(lambda lay, g=gates: g, 1.0)],
                                     (RES, RES))
        flow_loss(delta, src, tgt, 0.5)[0].backward()  # sample 0 belongs to LoRA a
        grad = {n: sum(p.grad.abs().sum().item() for k, p in pipe.transformer.named_parameters()
                       if f".{n}." in k and p.grad is not None) for n in ("a", "b")}
        pipe.transformer.zero_grad(set_to_none=True)
        assert grad["a"] > 0
        assert (grad["b"] > 0) == ones


def test_the_flow_loss_is_the_one_step_edit_error_relative_to_the_edit():
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    out = torch.randn(3, 4, 5, generator=g)  # a one-step output: x0 = src - s dF
    delta = (src - out) / 0.5
    expected = ((out - tgt) ** 2).flatten(1).mean(1) / ((src - tgt) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(flow_loss(delta, src, tgt, 0.5), expected)
    torch.testing.assert_close(straight_path(src, tgt, torch.tensor([0.5, 0.25, 0.5]), 0.5)[1], (src[1] + tgt[1]) / 2)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="unseen_concepts"):
        PoolConfig(concepts=["tone:warm"], unseen_concepts=["tone:night"])
    with pytest.raises(ValueError, match=r"instances\[0\].targets"):
        PoolConfig(instances=[{"rank": 2, "targets": "everything", "format": "peft"}])
    with pytest.raises(ValueError, match="cannot be written as kohya"):
        PoolConfig(instances=[{"rank": 2, "targets": "x2edit", "format": "kohya"}])


def test_the_tiny_pool(tiny_pool):
    """Roles, folders, formats and measured gains of a pool trained in seconds on the tiny base."""
    pool, m = tiny_pool
    roles = {}
    for e in m["loras"]:
        roles.setdefault(e["role"], []).append(e)
        assert (pool / e["file"]).is_file()
    assert {r: len(v) for r, v in roles.items()} == {"train": 6, "heldout_instance": 3, "unseen_concept": 3,
                                                     "joint": 1, "near_duplicate": 2, "noise": 2}
    assert all(e["file"].startswith("joint/") for e in roles["joint"])
    assert {e["format"] for e in roles["train"]} == {"peft", "kohya", "diffusers"}
    for e in roles["train"] + roles["heldout_instance"]:
        layout, header = read_lora_header(pool / e["file"])
        assert layout == ("kohya/ComfyUI" if e["format"] == "kohya" else "diffusers/PEFT")
        assert any(k.startswith(("ss_", "modelspec.")) for k in header)
    # Training moved the LoRAs toward their targets: a fresh LoRA has gain 0 exactly.
    gains = [e["gain_db"]["1"] for e in m["loras"] if e["role"] in ("train", "heldout_instance", "unseen_concept")]
    assert np.mean(gains) > 0.1, gains
    assert m["summary"]["trained"] == 12 and m["training"]["steps"] == 8


@pytest.mark.parametrize("override, message", [
    ("lr=abc", "lr: expected float"), ("family_weights=[1]", "family_weights: expected dict"),
    ("bar_db=true", "bar_db: expected float"), ("nope=1", "unknown PoolConfig key 'nope'"),
    ("family_weights={tone: 0.5}", "family_weights: 'tone'"), ("unseen_concepts=[tone:neon]", "tone"),
])
def test_pool_config_errors_name_the_key(override, message):
    from x2edit.retrieval.config import load
    from x2edit.retrieval.pool import PoolConfig

    with pytest.raises(ValueError, match=message):
        load(PoolConfig, None, [override])


def test_the_pool_resumes_without_unpickling_objects(tiny_base_dir, tmp_path):
    """train_state.pt holds tensors and plain containers and loads with weights_only; one holding any
    other pickled object is refused before it can run code."""
    from pathlib import Path

    from x2edit.retrieval.pool import PoolTrainer, plan_pool

    class RunsCode:
        def __reduce__(self):
            return Path.touch, (tmp_path / "code_ran",)

    config = PoolConfig(base=str(tiny_base_dir), resolution=RES, concepts=["tone:night"], unseen_concepts=[],
                        instances=[{"rank": 2, "targets": "attn", "format": "peft", "alpha_ratio": 1.0}] * 2,
                        joint=[], samples_per_lora=8, loras_per_batch=2, samples_per_lora_in_batch=2, lr=1e-2,
                        bank_size=2, eval_pairs=1, eval_steps=[1], checkpoint_every=1, seed=0)
    trainer = PoolTrainer(config, plan_pool(config))
    trainer.train(tmp_path)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert {"loras", "optimizer", "scheduler", "step"} <= set(state)
    state["extra"] = RunsCode()
    torch.save(state, tmp_path / "train_state.pt")
    with pytest.raises(ValueError, match="train_state.pt holds pickled objects"):
        trainer.train(tmp_path)
    assert not (tmp_path / "code_ran").exists()



def test_files_are_named_as_real_folders_name_them():
    """Issue 23 item 5: accurate, paraphrased, creator, misleading and opaque names; only "accurate" uses the canonical
    words, no name uses the held-out synonym of the unseen-phrasing queries, creator and opaque ones say nothing."""
    from x2edit.data_pipeline.shapeworld.concepts import _words, get_concept
    from x2edit.retrieval.pool import NAMINGS, _file_name, draw_naming, lora_header, lora_words

    concept = get_concept("tone:sepia")
    canonical, held_out = concept.description, _words(concept.family, concept.value)[-1]
    for uid in ("0a1b2c3d", "ffee0011", "12345678"):
        names = {n: _file_name(["tone:sepia"], n, uid) for n in NAMINGS}
        assert canonical in names["accurate"].replace("_", " ")
        for n in ("paraphrased", "creator", "misleading", "opaque"):
            assert canonical not in names[n].replace("_", " ") or n == "paraphrased" and canonical in held_out
        for n, name in names.items():
            assert held_out.replace(" ", "_") not in name, (n, name)
        assert lora_words(["tone:sepia"], "creator", uid) is None and names["opaque"] == f"lora_{uid}.safetensors"
        assert "sepia" not in names["creator"] and "sepia" not in names["misleading"]
        assert lora_header(["tone:sepia"], "peft", 4, 4, "creator", uid)["modelspec.title"] == names["creator"][:-12]
    rng = np.random.default_rng(0)
    drawn = [draw_naming({"accurate": 1, "opaque": 3}, rng) for _ in range(400)]
    assert set(drawn) == {"accurate", "opaque"} and 0.65 < drawn.count("opaque") / 400 < 0.85
