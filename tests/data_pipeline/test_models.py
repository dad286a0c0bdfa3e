"""Model-backed stages on tiny seeded models saved to disk and loaded by path (the real code path)."""

from __future__ import annotations

import json
import logging

import numpy as np

from x2edit.data_pipeline.config import BuildConfig
from x2edit.data_pipeline.runner import build
from x2edit.data_pipeline.sample import Sample
from x2edit.data_pipeline.shapeworld import ShapeWorld
from x2edit.data_pipeline.shards import read_index, read_shards
from x2edit.data_pipeline.stages.base import build_params
from x2edit.data_pipeline.stages.instructions import ChatInstructions

QUIET = {"progress": False, "echo": lambda *_: None}


def _build(tmp_path, stages, n=None, per=4):
    cfg = BuildConfig.from_dict({"num_samples": n, "batch_size": 2, "writer": {"samples_per_shard": per},
                                 "stages": stages})
    return build(cfg, tmp_path / "out", workers=1, **QUIET)


def test_kontext_expert_edits_photos_and_skips_corrupt(tmp_path, tiny_kontext_dir, photo_dir, caplog):
    stages = [
        {"type": "folder_source", "path": str(photo_dir), "size": 32, "instructions_from_txt": True},
        {"type": "task_sampler", "default_weight": 0, "weights": {"color_change": 1}},
        {"type": "diffusers_edit", "path": tiny_kontext_dir, "num_inference_steps": 1, "auto_resize": False,
         "device": "cpu"},
        {"type": "pixel_scorer"},
    ]
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        stats = _build(tmp_path, stages)
    assert stats["totals"] == {"generated": 6, "kept": 5, "dropped": 1, "skipped_corrupt": 1}
    assert stats["corrupt_inputs"][0]["source_id"] == "broken.png"
    assert any("broken.png" in r.message for r in caplog.records)
    samples = list(read_shards(tmp_path / "out"))
    assert len(samples) == 5
    for s in samples:
        assert s.source.shape == s.target.shape == (32, 32, 3)
        assert not np.array_equal(s.source, s.target)  # the (random) model changed the image
        assert s.instruction.startswith("make the picture number")
        assert s.provenance["expert"] == "diffusers_edit" and s.provenance["model"] == tiny_kontext_dir
        assert s.scores["changed_ratio"] > 0
    # Seeded per key: the same key gives the same output.
    again = _build(tmp_path / "again", stages)
    assert again["totals"]["kept"] == 5
    first = {s.key: s.target for s in samples}
    for s in read_shards(tmp_path / "again" / "out"):
        assert np.array_equal(first[s.key], s.target)


def test_fill_expert_repaints_only_the_mask(tmp_path, tiny_fill_dir):
    stages = [
        {"type": "shapeworld_source"},
        {"type": "task_sampler", "default_weight": 0, "weights": {"subject_deletion": 1}},
        {"type": "shapeworld_expert", "resolution": 32},
        {"type": "template_instructions"},
        {"type": "diffusers_inpaint", "path": tiny_fill_dir, "prompt": "an empty background", "dilate": 1,
         "num_inference_steps": 1, "tasks": ["subject_deletion"], "device": "cpu"},
        {"type": "oracle_scorer"},
        {"type": "pixel_scorer"},
    ]
    _build(tmp_path, stages, n=2, per=2)
    samples = list(read_shards(tmp_path / "out"))
    assert len(samples) == 2
    for s in samples:
        assert s.task == "subject_deletion"
        assert np.array_equal(s.target[~s.mask], s.source[~s.mask])  # pasted back outside the (dilated) mask
        assert s.scores["leak_ratio"] == 0.0
        assert s.scores["oracle_psnr"] < 100.0  # a random model is not the exact deletion
        assert s.provenance["expert"] == "diffusers_inpaint"


def test_vlm_judge_on_a_tiny_vlm(tmp_path, tiny_vlm_dir):
    """A tiny random VLM answers gibberish: the scores are null with the reason, and the run goes on."""
    stages = [
        {"type": "shapeworld_source"},
        {"type": "task_sampler"},
        {"type": "shapeworld_expert", "resolution": 32},
        {"type": "template_instructions"},
        {"type": "vlm_judge", "path": tiny_vlm_dir, "max_new_tokens": 12, "device": "cpu"},
        {"type": "threshold_filter", "rules": ["judge_overall >= 5"], "on_null": "keep"},
    ]
    stats = _build(tmp_path, stages, n=2, per=2)
    assert stats["totals"]["kept"] == 2
    for s in read_shards(tmp_path / "out"):
        assert s.scores["judge_overall"] is None and s.scores["judge_sc"] is None
        assert s.meta["score_notes"]["judge_sc"].startswith("unparseable judge answer:")
    rows = read_index(tmp_path / "out").to_pylist()
    assert all(json.loads(r["score_notes"])["judge_pq"] for r in rows)


def _chat_stage(**params):
    st = ChatInstructions(build_params(ChatInstructions, params, "chat_instructions"))
    st.validate()
    st.setup()
    return st


def test_chat_instruction_writer_vlm_and_llm(tiny_vlm_dir, tiny_llm_dir):
    pair = ShapeWorld(32).sample(0, "color_change")
    writer = _chat_stage(path=tiny_vlm_dir, mode="write", max_new_tokens=12, device="cpu")
    s = Sample(key="a", source=pair.source, task="color_change")
    prompt = writer.prompt_for(s)
    assert "Change the color of an object." in prompt and "make the car red" in prompt
    writer.process([s])
    # A random tiny model writes noise: either a cleaned instruction or a recorded drop, never a crash.
    answer = writer.model.generate(prompt, [pair.source], 12)
    from x2edit.data_pipeline.chat import clean_instruction

    text, why = clean_instruction(answer)
    if text is None:
        assert s.dropped == ("chat_instructions", "no usable instruction", why)
    else:
        assert s.instruction == text and s.provenance["instruction_model"] == tiny_vlm_dir
    rewriter = _chat_stage(path=tiny_llm_dir, mode="rewrite", vision=False, max_new_tokens=12, device="cpu")
    r = Sample(key="b", instruction=pair.instruction, task="color_change")
    rewriter.process([r])
    assert "Rewrite this image-editing instruction" in rewriter.prompt_for(Sample(key="c", instruction="x"))
    if r.kept:
        assert r.provenance["original_instruction"] == pair.instruction
    else:
        assert r.dropped[1] == "no usable instruction"
