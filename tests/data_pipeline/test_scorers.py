"""Scorers, filters and answer parsing, on known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from x2edit.data_pipeline import metrics
from x2edit.data_pipeline.chat import clean_instruction, parse_scores
from x2edit.data_pipeline.sample import Sample
from x2edit.data_pipeline.shapeworld import ShapeWorld
from x2edit.data_pipeline.stages.base import build_params
from x2edit.data_pipeline.stages.filters import Rule, ThresholdFilter
from x2edit.data_pipeline.stages.scorers import (
    ClipScorer,
    OracleScorer,
    PixelScorer,
    VlmJudge,
    clip_scores,
    viescore,
)


def _stage(cls, **params):
    st = cls(build_params(cls, params, cls.type_name))
    st.validate()
    return st


def _sw_sample(task="color_change", seed=0, keep_exact=True) -> Sample:
    pair = ShapeWorld(64).sample(seed, task)
    s = Sample(key="k", source=pair.source, target=pair.target.copy(), mask=pair.mask, task=task,
               instruction=pair.instruction, provenance=dict(pair.provenance))
    if keep_exact:
        s.extra["exact_target"] = pair.target
    return s


def test_oracle_exact_and_perturbed():
    oracle = _stage(OracleScorer, tolerance=8)
    exact = _sw_sample()
    off = _sw_sample(keep_exact=False)  # regenerated from provenance
    off.target = off.target.copy()
    off.target[:8] = np.clip(off.target[:8].astype(int) + 20, 0, 255).astype(np.uint8)  # 8 of 64 rows off by <= 20
    other = Sample(key="x", source=exact.source, target=exact.target)
    oracle.process([exact, off, other])
    assert exact.scores == {"oracle_psnr": 100.0, "oracle_match": 1.0}
    err = np.abs(off.target.astype(int) - exact.target.astype(int))
    mse = float((err.astype(float) ** 2).mean())
    assert off.scores["oracle_psnr"] == pytest.approx(10 * math.log10(255**2 / mse))
    assert off.scores["oracle_match"] == pytest.approx(float((err.max(-1) <= 8).mean()))
    assert off.scores["oracle_match"] <= 56 / 64 + 1e-9
    assert other.scores["oracle_psnr"] is None and other.notes["oracle_psnr"] == "not a Shape World sample"


def test_pixel_metrics_known_values():
    src = np.full((20, 20, 3), 100, np.uint8)
    tgt = src.copy()
    tgt[:5, :5] = 200  # the edit
    tgt[10, 10] = 110  # drift outside, below the change tolerance
    mask = np.zeros((20, 20), bool)
    mask[:6, :6] = True
    s = Sample(key="a", source=src, target=tgt, mask=mask)
    _stage(PixelScorer).process([s])
    outside = ~mask
    # One outside pixel is off by 10 in every channel: MSE = 100 / (number of outside pixels).
    assert s.scores["psnr_outside"] == pytest.approx(10 * math.log10(255**2 / (100 / outside.sum())))
    assert s.scores["changed_ratio"] == pytest.approx(25 / 400)
    assert s.scores["mask_ratio"] == pytest.approx(36 / 400)
    assert s.scores["leak_ratio"] == 0.0
    assert 0.9 < s.scores["ssim_outside"] < 1.0
    whole = Sample(key="b", source=src, target=tgt, mask=np.ones((20, 20), bool))
    _stage(PixelScorer).process([whole])
    assert whole.scores["psnr_outside"] is None and "whole image" in whole.notes["psnr_outside"]
    nomask = Sample(key="c", source=src, target=tgt)
    _stage(PixelScorer).process([nomask])
    assert nomask.provenance["mask_estimated"] and nomask.scores["mask_ratio"] == pytest.approx(49 / 400)


def test_ssim_and_psnr_basics():
    rng = np.random.default_rng(0)
    a = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    assert metrics.psnr(a, a) == metrics.PSNR_CAP
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a.astype(int) + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    assert 0.9 < metrics.ssim(a, noisy) < 0.99  # busy image: the noise is small against its variance
    flat = np.full((32, 32, 3), 128, np.uint8)
    noisy_flat = np.clip(flat.astype(int) + rng.normal(0, 20, flat.shape), 0, 255).astype(np.uint8)
    assert 0.0 < metrics.ssim(flat, noisy_flat) < 0.5
    assert metrics.psnr(a, a, np.zeros((32, 32), bool)) is None


def test_threshold_filter_records_reasons():
    f = _stage(ThresholdFilter, rules=["q >= 5", "r < 1"])
    a, b, c, d = (Sample(key=k) for k in "abcd")
    a.scores = {"q": 6.0, "r": 0.5}
    b.scores = {"q": 4.0, "r": 0.5}
    c.scores = {"q": 6.0, "r": 2.0}
    d.set_score("q", None, "unparseable judge answer: empty answer")
    d.scores["r"] = 0.0
    f.process([a, b, c, d])
    assert a.kept
    assert b.dropped == ("threshold_filter", "q >= 5", "q = 4")
    assert c.dropped == ("threshold_filter", "r < 1", "r = 2")
    assert d.dropped[1] == "q >= 5" and "is null: unparseable" in d.dropped[2]
    keep_null = _stage(ThresholdFilter, rules=["q >= 5"], on_null="keep")
    e = Sample(key="e")
    e.set_score("q", None, "x")
    keep_null.process([e])
    assert e.kept


@pytest.mark.parametrize("text", ["q >= 5", "q>=5", " clip_image_sim < 0.25 ", "x == -1e-3", "y != .5"])
def test_rules_parse(text):
    r = Rule.parse(text)
    assert r.holds(r.value) == (r.op in (">=", "<=", "=="))


@pytest.mark.parametrize("text", ["q => 5", "q >= ", ">= 5", "q >= five", "q >= 5 and r < 2", "1q > 2", ""])
def test_bad_rules(text):
    with pytest.raises(ValueError, match="bad threshold rule"):
        Rule.parse(text)


@pytest.mark.parametrize("answer,expected", [
    ('{"score": [8, 6], "reasoning": "fine"}', [8.0, 6.0]),
    ('Sure!\n```json\n{"score": [7.5, 9], "reasoning": "ok"}\n```', [7.5, 9.0]),
    ('{"score": "[3, 4]", "reasoning": "stringified as upstream"}', [3.0, 4.0]),
    ('<think>The edit {is} fine</think>{"scores": [10, 0]}', [10.0, 0.0]),
    ("score: [2, 5] because the sky is wrong", [2.0, 5.0]),
    ('{"reasoning": "no", "score": [0, 10]} trailing text', [0.0, 10.0]),
])
def test_parse_scores(answer, expected):
    assert parse_scores(answer) == (expected, None)


@pytest.mark.parametrize("answer,why", [
    ("", "empty answer"),
    ("I think it is an eight out of ten.", "no score list"),
    ('{"score": [8]}', "expected 2 scores, got 1"),
    ('{"score": [8, 11]}', "outside 0..10"),
    ('{"score": [8, -1]}', "outside 0..10"),
    ('{"score": ["good", "bad"]}', "not a list of numbers"),
    ('{"score": "eight"}', "not a list of numbers"),
    ('{"score": [true, 3]}', "not a list of numbers"),
    ("`[2@`[2@`[NMx;qO", "no score list"),
])
def test_unparseable_answers_give_reasons(answer, why):
    scores, reason = parse_scores(answer)
    assert scores is None and why in reason


def test_viescore_aggregation():
    v = viescore([8.0, 6.0], [9.0, 7.0])
    assert v["judge_sc"] == 6.0 and v["judge_pq"] == 7.0
    assert v["judge_overall"] == pytest.approx(math.sqrt(42))
    half = viescore(None, [9.0, 7.0])
    assert half["judge_sc"] is None and half["judge_overall"] is None and half["judge_pq"] == 7.0


def test_vlm_judge_from_answers(tmp_path):
    """The judge's flow on scripted answers (the model-backed run is in test_models)."""
    judge = _stage(VlmJudge, path=str(tmp_path))
    answers = iter(['{"score": [8, 6], "reasoning": "good"}', '{"score": [9, 7]}',  # sample 1
                    "no idea", '```json\n{"score": [5, 5]}\n```'])  # sample 2: SC unparseable
    judge.model = object()
    judge.ask = lambda prompt, images: next(answers)
    a, b = _sw_sample(), _sw_sample(seed=1)
    judge.process([a, b])
    assert a.scores["judge_overall"] == pytest.approx(math.sqrt(42)) and a.scores["judge_success"] == 8.0
    assert b.scores["judge_sc"] is None and b.scores["judge_pq"] == 5.0 and b.scores["judge_overall"] is None
    assert b.notes["judge_sc"].startswith("unparseable judge answer: no score list")
    assert b.kept


@pytest.mark.parametrize("answer,expected", [
    ("Instruction: make the car red", "make the car red"),
    ('"Turn the sky purple."\nThis edit changes the sky.', "Turn the sky purple."),
    ("<think>hmm</think>\n\n- remove the dog", "remove the dog"),
    ("1. add a hat", "add a hat"),
    ("把汽车变成红色", "把汽车变成红色"),
])
def test_clean_instruction(answer, expected):
    assert clean_instruction(answer) == (expected, None)


@pytest.mark.parametrize("answer", ["", "   \n", "12345 !!!", "x" * 400])
def test_clean_instruction_rejects(answer):
    text, why = clean_instruction(answer)
    assert text is None and why


def test_clip_scores_math():
    src, tgt = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    cs, ct = np.array([1.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0])
    out = clip_scores(src, tgt, cs, ct)
    assert out["clip_image_sim"] == pytest.approx(0.0)
    # direction: (tgt - src) and (ct - cs) both along (-1, 1, 0).
    assert out["clip_direction"] == pytest.approx(1.0)
    assert out["clip_text_target"] == pytest.approx(1 / math.sqrt(2))
    no_caps = clip_scores(src, 2 * src, instr=tgt)
    assert no_caps["clip_image_sim"] == pytest.approx(1.0) and no_caps["clip_direction"] is None
    assert no_caps["clip_text_target"] == pytest.approx(0.0)


def test_clip_scorer_needs_open_clip(tmp_path):
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"pip install x2edit\[clip\]"):
            _stage(ClipScorer, pretrained=str(tmp_path / "w.pt"))
    else:
        pytest.skip("open_clip is installed")


@pytest.mark.slow
def test_clip_scorer_real(tmp_path):
    """Runs where open_clip is installed: a randomly initialised CLIP saved to disk, loaded by path."""
    open_clip = pytest.importorskip("open_clip")
    import torch

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    scorer = _stage(ClipScorer, pretrained=str(path), model="ViT-B-32", device="cpu")
    scorer.setup()
    a = _sw_sample()
    a.extra["captions"] = ("a red circle on white", "a blue circle on white")
    b = _sw_sample(seed=1)
    scorer.process([a, b])
    for s in (a, b):
        assert -1.0 <= s.scores["clip_image_sim"] <= 1.0
    assert a.scores["clip_direction"] is not None and b.scores["clip_direction"] is None
