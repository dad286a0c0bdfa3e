"""``x2edit train`` mode edit_base: the whole transformer trained to edit (the tiny analogue of FLUX.1
Kontext), the edit-region probe, and task weights."""

import json
from collections import Counter

import pytest
import torch
from test_trainer import _config, base_dir  # noqa: F401 (the module-scoped tiny base fixture)

from x2edit.registry import EMBEDDED_META, load_pipeline
from x2edit.tasks import TASK_NAMES
from x2edit.training.config import load_config
from x2edit.training.trainer import TaskDraw, Trainer


def _edit_base(tmp_path, base_dir, **over):  # noqa: F811
    return _config(tmp_path, mode="edit_base", **{"model.base": str(base_dir), "model.source_start": 0.5,
                                                  "model.reference_tokens": False, "loss.weighting": "x0_edit",
                                                  **over})


def test_edit_base_trains_the_whole_transformer_and_saves_how_it_edits(tmp_path, base_dir):  # noqa: F811
    before = {n: p.detach().clone() for n, p in load_pipeline(base_dir).transformer.named_parameters()}
    trainer = Trainer(_edit_base(tmp_path, base_dir, steps=2, checkpoint_every=0))
    seen = []
    trainer.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"].shape),
                                                  with_kwargs=True)
    out = trainer.train()
    assert all(shape[1] == (32 // 8) ** 2 for shape in seen)  # the target tokens only: no reference tokens
    meta = json.loads((out / "pipeline" / EMBEDDED_META).read_text())
    assert meta == {"source_start": 0.5, "reference_tokens": False, "max_area": 32 * 32, "num_inference_steps": 1}
    pipe = load_pipeline(out / "pipeline")
    assert (pipe.default_source_start, pipe.reference_tokens) == (0.5, False)
    after = dict(pipe.transformer.named_parameters())
    moved = [n for n, p in before.items() if not torch.equal(p, after[n])]
    assert len(moved) > 0.9 * len(before)  # every part of the transformer learns (not an adapter)
    assert pipe.source_start() == 0.5 and pipe(image=torch.rand(1, 3, 32, 32), prompt="make it red",
                                               output_type="np").images.shape == (1, 32, 32, 3)


def test_an_adapter_on_an_editing_base_is_trained_in_its_base_form(tmp_path, base_dir):  # noqa: F811
    base = Trainer(_edit_base(tmp_path / "base", base_dir, steps=1, checkpoint_every=0)).train() / "pipeline"
    cfg = _config(tmp_path / "adapter", mode="edit", steps=1, checkpoint_every=0, **{
        "model.base": str(base), "adapter": {"rank": 4, "num_experts": 3, "top_k": 2}, "loss.weighting": "x0_edit"})
    trainer = Trainer(cfg)
    assert (trainer.source_start, trainer.reference) == (0.5, False)
    with pytest.raises(ValueError, match="reads the source from reference tokens"):
        Trainer(_config(tmp_path / "residual", mode="edit", steps=1, **{
            "model.base": str(base), "adapter": {"rank": 4, "num_experts": 3, "top_k": 2, "reading": "residual"}}))


def test_the_mask_probe_changes_what_the_transformer_learns_and_resumes_exactly(tmp_path, base_dir):  # noqa: F811
    def grads(weight):
        trainer = Trainer(_edit_base(tmp_path / f"g{weight}", base_dir, steps=1, **{"loss.mask_weight": weight}))
        loss, parts = trainer.compute_loss(trainer.batch(0), 0)
        loss.backward()
        return parts, torch.cat([p.grad.flatten() for p in trainer.transformer.parameters()])

    plain, g0 = grads(0.0)
    probed, g1 = grads(1.0)
    assert "mask" not in plain and 0 < probed["mask"] < 1.5
    assert plain["flow_matching"] == probed["flow_matching"]
    assert (g0 - g1).abs().max() > 1e-6  # the probe's loss reaches the transformer's weights
    straight, first, resumed = [], [], []
    Trainer(_edit_base(tmp_path / "a", base_dir, steps=4, **{"loss.mask_weight": 1.0})).train(
        on_step=lambda s, p: straight.append(p["loss"]))
    Trainer(_edit_base(tmp_path / "b", base_dir, steps=2, **{"loss.mask_weight": 1.0})).train(
        on_step=lambda s, p: first.append(p["loss"]))
    Trainer(_edit_base(tmp_path / "b", base_dir, steps=4, **{"loss.mask_weight": 1.0})).train(
        resume="latest", on_step=lambda s, p: resumed.append(p["loss"]))
    assert first + resumed == straight  # the probe's weights and moments are in the checkpoint


def test_the_changed_fraction_counts_each_tokens_changed_pixels():
    import numpy as np

    from x2edit.training.losses import changed_fraction

    src = np.zeros((16, 16, 3), np.uint8)
    tgt = src.copy()
    tgt[:8, :4] = 200  # half of the top-left 8x8 token
    tgt[12, 12] = 5  # below the threshold: noise, not an edit
    frac = changed_fraction([src], [tgt], 8)
    assert frac.shape == (1, 4) and frac[0].tolist() == [0.5, 0.0, 0.0, 0.0]


def test_task_weights_draw_tasks_in_proportion_and_per_seed():
    draw = TaskDraw(None, {"color_change": 3.0, "style_change": 0.0})
    counts = Counter(draw(s) for s in range(20000))
    assert "style_change" not in counts and set(counts) == set(TASK_NAMES) - {"style_change"}
    assert abs(counts["color_change"] / 20000 - 3 / 16) < 0.01  # 13 tasks at 1, one at 3
    assert [draw(s) for s in range(50)] == [TaskDraw(None, {"color_change": 3.0, "style_change": 0.0})(s)
                                            for s in range(50)]
    assert TaskDraw(["tone_transform", "camera_move"])(3) == "camera_move"  # unweighted: as before
    assert TaskDraw()(3) is None


@pytest.mark.parametrize("over, message", [
    ({"data.task_weights": {"colour_change": 2}}, "unknown task"),
    ({"data.task_weights": {"color_change": -1}}, "task_weights.color_change must be a number"),
    ({"model.source_start": 0.5, "mode": "edit"}, "needs mode: edit_base or diptych_base"),
    ({"model.reference_tokens": False, "mode": "diptych_base", "model.source_start": 0.5}, "it needs mode: edit_base"),
    ({"model.reference_tokens": False}, "needs model.source_start"),
    ({"loss.mask_weight": 1.0, "mode": "t2i"}, "needs an edit mode"),
])
def test_edit_base_setting_errors_name_the_key(tmp_path, over, message):
    items = [f"{k}={json.dumps(v)}" for k, v in {"mode": "edit_base", "model.base": "x2edit-tiny", **over}.items()]
    with pytest.raises(ValueError, match=message):
        load_config(None, items)


def test_region_weight_counts_the_error_inside_the_edit_more():
    from x2edit.training.losses import x0_error

    x0, source = torch.zeros(1, 4, 3), torch.zeros(1, 4, 3)
    source[0, 0] = 1.0  # the edit changes token 0 only
    inside, outside = x0.clone(), x0.clone()
    inside[0, 0] += 0.1
    outside[0, 3] += 0.1  # the same error, outside the edit
    changed = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    plain = [x0_error(o, x0, source) for o in (inside, outside)]
    weighted = [x0_error(o, x0, source, 1 + 3 * changed) for o in (inside, outside)]
    assert plain[0] == plain[1]
    assert weighted[0] > plain[0] > weighted[1]
    assert torch.allclose(x0_error(inside, x0, source, torch.full((1, 4), 5.0)), plain[0])  # weights: mean 1
