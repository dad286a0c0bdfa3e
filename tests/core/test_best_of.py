"""Best-of-N: N seeds through pipe.edit, the judge's favourite kept; refusals; the VLM judge's scoring form."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from x2edit.best_of import best_of_n
from x2edit.pipeline_diptych import X2EditDiptychPipeline
from x2edit.testing import tiny_fill_components

KW = dict(num_inference_steps=2, max_sequence_length=16, guidance_scale=5.0)


@pytest.fixture(scope="module")
def pipe():
    p = X2EditDiptychPipeline(**tiny_fill_components(0))  # sampled from noise: each seed gives another image
    p.set_progress_bar_config(disable=True)
    return p


def _source():
    return Image.fromarray((np.random.default_rng(0).random((24, 32, 3)) * 255).astype("uint8"))


def test_the_judges_favourite_seed_is_kept(pipe):
    redness = lambda source, out, text: float(np.asarray(out, dtype=float)[..., 0].mean())  # noqa: E731
    best = best_of_n(pipe, _source(), "make it red", 3, redness, seed=5, **KW)
    assert best.seeds == [5, 6, 7] and len(set(best.scores)) == 3
    assert best.chosen == int(np.argmax(best.scores)) and best.edit_seconds > 0 and best.judge_seconds >= 0
    direct = pipe.edit(_source(), "make it red", generator=torch.Generator().manual_seed(best.seeds[best.chosen]),
                       **KW).images[0]
    assert np.array_equal(np.asarray(best.image), np.asarray(direct))


def test_unscored_outputs_keep_the_first_seed_with_a_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="x2edit.best_of"):
        best = best_of_n(pipe, _source(), "make it red", 2, lambda *a: None, seed=3, **KW)
    assert best.chosen == 0 and best.scores == [None, None] and "scored none" in caplog.text


def test_deterministic_models_and_bad_n_are_refused(pipe):
    with pytest.raises(ValueError, match="N >= 1"):
        best_of_n(pipe, _source(), "x", 0, lambda *a: 1.0)
    pipe.default_source_start = 0.5
    try:
        with pytest.raises(ValueError, match="deterministically in one step"):
            best_of_n(pipe, _source(), "x", 2, lambda *a: 1.0)
    finally:
        pipe.default_source_start = None


def test_vlm_judge_scores_an_edit_as_viescore_overall(monkeypatch):
    from x2edit.data_pipeline.stages.scorers import VlmJudge

    judge = VlmJudge(VlmJudge.Params(path="unused"))
    judge.model = object()  # set up: no model loads
    answers = iter(['{"score": [8, 6], "reasoning": "ok"}', '{"score": [9, 4]}'])
    monkeypatch.setattr(judge, "ask", lambda prompt, images: next(answers))
    assert judge.score_edit(_source(), _source(), "make it red") == pytest.approx((6 * 4) ** 0.5)
    monkeypatch.setattr(judge, "ask", lambda prompt, images: "no idea")
    assert judge.score_edit(_source(), _source(), "make it red") is None
