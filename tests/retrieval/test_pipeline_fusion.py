"""The pipeline side: the LoRA flow is the pipeline's one-step edit, fuse_loras, and auto-LoRA calls."""

import shutil

import numpy as np
import pytest
import torch
from autolora_helpers import KOHYA_MODULES, RES, random_factors, tiny_pipe
from PIL import Image

from x2edit.adapters import AdapterConfig, inject_adapters, load_community_lora, set_adapters
from x2edit.cli import main
from x2edit.pipeline_lora import layer_weight
from x2edit.retrieval.flow import LoraFlow
from x2edit.retrieval.formats import write_lora
from x2edit.testing import randomize_adapters

EDITOR = AdapterConfig(kind="lora", rank=4, reading="residual", source_start=0.5, targets="x2edit")


def _editor_pipe(tmp_path, n_loras=2):
    """A tiny one-step residual editor (as x2edit-tiny's, randomised) and n community LoRAs beside it."""
    pipe = tiny_pipe()
    inject_adapters(pipe.transformer, EDITOR, "default")
    randomize_adapters(pipe.transformer, "default", std=0.1)
    files = [write_lora(tmp_path / f"L{j}.safetensors", random_factors(KOHYA_MODULES, rank=2, seed=10 + j, std=0.3),
                        "peft") for j in range(n_loras)]
    for j, f in enumerate(files):
        pipe.load_lora_weights(f, adapter_name=f"L{j}")
    return pipe, files


def _call(pipe, image, **kw):
    out = pipe(image=Image.fromarray(image), prompt="give the picture a sepia tone", output_type="np", **kw).images[0]
    return np.round(out * 255).astype(np.int64)


@pytest.mark.parametrize("steps", [1, 3])
def test_the_lora_flow_is_the_pipelines_edit(tmp_path, image16, steps):
    """With the editing adapter at weight 0 the pipeline's reading of direct LoRAs is source - s dF: one
    Euler step of the LoRA flow (``x2edit.retrieval.flow``), the form the pool's LoRAs are trained in; n steps
    of the pipeline (``num_inference_steps``) are n steps of the flow (the residual reading from the source
    follows the straight path: a reading that re-anchored each step at the source kept ~1/n of the change)."""
    pipe, _ = _editor_pipe(tmp_path)
    set_adapters(pipe.transformer, ["default", "L0", "L1"], [0.0, 1.0, 1.0])
    out = _call(pipe, image16, num_inference_steps=steps)
    flow = LoraFlow(pipe)
    mine = flow.edit([image16], ["give the picture a sepia tone"], ["L0", "L1"], lambda s, k: [(None, 1.0)],
                     steps=steps)[0]
    assert np.abs(out - mine).max() <= 1
    assert np.abs(mine.astype(int) - image16).mean() > 2  # the LoRAs do change the image


def test_fuse_loras_sum_is_set_adapters_and_the_gate_moves_it(tmp_path, image16, tiny_encoder):
    pipe, _ = _editor_pipe(tmp_path)
    plain = _call(pipe, image16)  # both LoRAs active at weight 1, editing adapter on: the stock sum
    pipe.fuse_loras(["L0", "L1"], fusion="sum")
    np.testing.assert_array_equal(_call(pipe, image16), plain)
    pipe.fuse_loras(["L0", "L1"], fusion="sum", weights=[1.0, 0.0])
    only0 = _call(pipe, image16)
    pipe.unfuse_loras()
    set_adapters(pipe.transformer, ["default", "L0"])
    np.testing.assert_array_equal(_call(pipe, image16), only0)
    # switch at the one step: the first LoRA alone; composite: two passes, their mean
    pipe.fuse_loras(["L0", "L1"], fusion="switch")
    np.testing.assert_array_equal(_call(pipe, image16), only0)
    pipe.fuse_loras(["L0", "L1"], fusion="composite")
    assert np.abs(_call(pipe, image16) - plain).max() > 0
    assert sorted(pipe.get_active_adapters()) == ["L0", "L1", "default"]


def test_composite_in_the_pipeline_is_the_mean_of_the_single_lora_edits(tmp_path, image16):
    """With the editing adapter at weight 0 each one-step edit is source - s dF, linear in dF: the two
    passes of LoRA Composite average to the mean of the two single-LoRA edits."""
    pipe, _ = _editor_pipe(tmp_path)
    singles = []
    for name in ("L0", "L1"):
        set_adapters(pipe.transformer, ["default", name], [0.0, 1.0])
        singles.append(_call(pipe, image16))
    set_adapters(pipe.transformer, ["default", "L0", "L1"], [0.0, 1.0, 1.0])
    pipe.fuse_loras(["L0", "L1"], fusion="composite")
    comp = _call(pipe, image16)
    inside = np.all([(o > 0) & (o < 255) for o in (*singles, comp)], axis=0)  # outputs are clipped to [0, 255]
    assert inside.mean() > 0.5
    assert np.abs(comp - (singles[0] + singles[1]) / 2)[inside].max() <= 1
    assert np.abs(singles[0] - singles[1])[inside].max() > 4


def test_gated_fusion_in_the_pipeline(tmp_path, image16, tiny_encoder, tiny_gate):
    """A gate trained on another model's LoRAs is refused by layer; one for this base runs per layer."""
    from x2edit.retrieval.fusion import GateConfig, GateNet, LearnedGate

    pipe, _ = _editor_pipe(tmp_path)
    plain = _call(pipe, image16)
    gate = GateNet.load(tiny_gate)
    with torch.no_grad():
        gate.mlp[-1].bias.fill_(-1.0)  # gates 2 sigmoid(-1) = 0.54: every LoRA about halved
    gate.save(tmp_path / "g.safetensors")
    pipe.fuse_loras(["L0", "L1"], fusion=LearnedGate(tmp_path / "g.safetensors", encoder=tiny_encoder))
    halved = _call(pipe, image16)
    assert np.abs(halved - plain).max() > 0
    pipe.fuse_loras(["L0", "L1"], fusion="average")  # 0.5 each: near the gated 0.54
    assert np.abs(halved - _call(pipe, image16)).mean() < np.abs(halved - plain).mean()
    other = GateNet(GateConfig(["transformer_blocks.9.attn.to_q"], lora_dim=384, text_dim=0))
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="another base"):
        pipe.fuse_loras(["L0"], fusion=LearnedGate(tmp_path / "other.safetensors", encoder=tiny_encoder))
    with pytest.raises(ValueError, match="LearnedGate"):  # the core does not build the learned gate by name
        pipe.fuse_loras(["L0"], fusion="gated")
    with pytest.raises(ValueError, match="trained on the embeddings of weight encoder"):  # the shipped encoder
        LearnedGate(tiny_gate)


def test_auto_lora_retrieves_loads_fuses_and_removes(tmp_path, image16, tiny_encoder, tiny_gate):
    from x2edit.retrieval.index import LoraIndex, build_index, search

    pipe, files = _editor_pipe(tmp_path, n_loras=0)
    folder = tmp_path / "loras"
    for j in range(3):
        write_lora(folder / f"F{j}.safetensors", random_factors(KOHYA_MODULES, rank=2, seed=20 + j, std=0.3), "kohya")
    build_index(folder, tmp_path / "i.parquet", tiny_encoder)
    hits = search(tmp_path / "i.parquet", "give the picture a sepia tone", k=2)
    out = _call(pipe, image16, lora_index=LoraIndex(tmp_path / "i.parquet"), auto_lora_top_k=2, auto_lora_fusion="sum",
                auto_lora_min_score=-1.0)  # every hit used (a random encoder's scores are not calibrated)
    assert [h["path"] for h in pipe.retrieved_loras] == [h["path"] for h in hits]
    assert all(h["used"] for h in pipe.retrieved_loras)
    assert pipe.get_active_adapters() == ["default"]  # loaded for the call, removed after it
    for j, h in enumerate(hits):
        load_community_lora(pipe.transformer, h["file"], f"M{j}")
    np.testing.assert_array_equal(out, _call(pipe, image16))  # the same as loading the two hits by hand
    with pytest.raises(ValueError, match="needs lora_index"):
        _call(pipe, image16, auto_lora_top_k=2)
    with pytest.raises(ValueError, match="LoraIndex"):  # a path is not an index: the core does not open files
        _call(pipe, image16, lora_index=tmp_path / "i.parquet")


def test_edit_cli_fuses_loras(tmp_path, image16, tiny_base_dir):
    src = tmp_path / "in.png"
    Image.fromarray(image16).save(src)
    files = [write_lora(tmp_path / f"L{j}.safetensors", random_factors(KOHYA_MODULES, rank=2, seed=j), "peft")
             for j in range(2)]
    base = ["edit", "--image", str(src), "--instruction", "sepia please", "--base", str(tiny_base_dir), "--steps", "2"]
    outs = {}
    for fusion in ("sum", "average"):
        out = tmp_path / f"{fusion}.png"
        assert main([*base, "--out", str(out), "--lora", str(files[0]), "--lora", str(files[1]),
                     "--fusion", fusion]) == 0
        outs[fusion] = np.asarray(Image.open(out), dtype=int)
    assert np.abs(outs["sum"] - outs["average"]).max() > 0
    assert main([*base, "--out", str(tmp_path / "x.png"), "--fusion", "sum"]) == 2
    assert main([*base, "--out", str(tmp_path / "x.png"), "--auto-lora", str(tmp_path / "none.parquet")]) == 2
    assert RES == image16.shape[0]


def test_with_loras_keeps_the_loras_already_active_and_puts_everything_back(tmp_path, image16):
    """Issue 23's repro: fuse_loras(["L0", "L1"]), then a with_loras block (as every lora_index= call and the
    app's picked LoRAs go). Inside, the active LoRAs join the block's fusion at their weights; after it the
    active adapters, their weights and the fusion are as before, and so is the next call's output."""
    pipe, _ = _editor_pipe(tmp_path)
    extra = write_lora(tmp_path / "C.safetensors", random_factors(KOHYA_MODULES, rank=2, seed=30, std=0.3), "peft")
    pipe.fuse_loras(["L0", "L1"], fusion="average", weights=[0.7, 1.0])
    before, active = _call(pipe, image16), pipe.get_active_adapters()
    pipe.unfuse_loras()
    pipe.load_lora_weights(extra, adapter_name="C")  # by hand: L0 at 0.7, L1 and C summed with the editor
    set_adapters(pipe.transformer, ["default", "L0", "L1", "C"], [1.0, 0.7, 1.0, 0.5])
    by_hand = _call(pipe, image16)
    pipe.delete_adapters(["C"])
    fusion = pipe.fuse_loras(["L0", "L1"], fusion="average", weights=[0.7, 1.0])

    with pipe.with_loras([extra], fusion="sum", weights=[0.5]) as names:
        assert sorted(pipe.get_active_adapters()) == sorted(["default", "L0", "L1", *names])
        np.testing.assert_array_equal(_call(pipe, image16), by_hand)
    assert pipe.get_active_adapters() == active and pipe._lora_fusion is fusion
    assert [layer_weight(pipe.transformer, n) for n in ("default", "L0", "L1")] == [1.0, 1.0, 1.0]
    np.testing.assert_array_equal(_call(pipe, image16), before)
    with pytest.raises(ValueError, match="1 weights for 2 LoRA files"):
        with pipe.with_loras([extra, extra], weights=[1.0]):
            pass
    assert pipe.get_active_adapters() == active


def test_auto_lora_skips_unrelated_hits_and_near_twins(tmp_path, image16, tiny_encoder):
    """Issue 23, defect 7: hits below the score floor are listed but not fused, and a copy of a LoRA does not
    take a second slot."""
    from x2edit.retrieval.index import LoraIndex, build_index

    pipe, _ = _editor_pipe(tmp_path, n_loras=0)
    plain = _call(pipe, image16)
    folder = tmp_path / "loras"
    for j in range(3):
        write_lora(folder / f"F{j}.safetensors", random_factors(KOHYA_MODULES, rank=2, seed=20 + j, std=0.3), "kohya")
    shutil.copy(folder / "F0.safetensors", folder / "F0_copy.safetensors")
    build_index(folder, tmp_path / "i.parquet", tiny_encoder)
    index = LoraIndex(tmp_path / "i.parquet")
    everything = index.search("give the picture a sepia tone", k=4)
    assert len({round(h["scores"]["weight"], 6) for h in everything}) < 4  # the copy's weights tie with its original
    # (their hybrid scores differ: "F0_copy" is another file name, another text signal)
    distinct = index.search("give the picture a sepia tone", k=4, distinct=True)
    assert len(distinct) == 3 and len({h["title"].replace("_copy", "") for h in distinct}) == 3

    scores = sorted(h["score"] for h in distinct)
    floor = (scores[0] + scores[1]) / 2  # between the lowest hit and the next
    _call(pipe, image16, lora_index=index, auto_lora_top_k=3, auto_lora_fusion="sum", auto_lora_min_score=floor)
    used = [h for h in pipe.retrieved_loras if h["used"]]
    assert len(pipe.retrieved_loras) == 3 and len(used) == 2
    assert all(h["score"] >= floor for h in used)
    (unused,) = [h for h in pipe.retrieved_loras if not h["used"]]
    assert "below the floor" in unused["reason"]
    out = _call(pipe, image16, lora_index=index, auto_lora_top_k=3, auto_lora_fusion="sum", auto_lora_min_score=2.0)
    np.testing.assert_array_equal(out, plain)  # nothing scores 2: nothing is fused
    assert pipe.get_active_adapters() == ["default"]
    with pytest.raises(ValueError, match="auto_lora_min_score= needs lora_index"):
        _call(pipe, image16, auto_lora_min_score=0.5)
