"""The trainer on a tiny pixel-space FLUX model and Shape World, CPU: modes, resume, bad input."""

import json

import pytest
import torch

from x2edit.adapters import adapter_names, read_adapter_header
from x2edit.testing import randomize_adapters
from x2edit.training.config import load_config
from x2edit.training.trainer import Trainer, TrainingError, batch_indices

TINY = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
        "axes_dims_rope": [4, 6, 6]}


def _config(tmp_path, **over):
    base = {"mode": "t2i", "output_dir": str(tmp_path / "run"), "steps": 4, "batch_size": 4, "checkpoint_every": 2,
            "validate_every": 0, "log_every": 1, "data": {"resolution": 32}, "model": {"transformer": TINY,
            "max_text_tokens": 16}, "optim": {"lr": 1e-3}}
    items = [f"{k}={json.dumps(v)}" for k, v in over.items()]
    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base))
    return load_config(path, items)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny base pretrained for a few t2i steps (a saved pipeline directory)."""
    tmp = tmp_path_factory.mktemp("base")
    out = Trainer(_config(tmp, steps=3, checkpoint_every=0)).train()
    assert (out / "pipeline" / "model_index.json").is_file()
    return out / "pipeline"


def _edit_config(tmp_path, base_dir, **over):
    return _config(tmp_path, mode="edit", **{"model.base": str(base_dir),
                   "adapter": {"rank": 4, "num_experts": 3, "top_k": 2}, **over})


def test_t2i_pretraining_learns_and_saves(tmp_path):
    losses = []
    Trainer(_config(tmp_path, steps=30, checkpoint_every=0, batch_size=8)).train(
        on_step=lambda s, p: losses.append(p["loss"]))
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 30


@pytest.mark.parametrize("prediction", ["sample", "edm", "flow"])
def test_prediction_type_is_saved_with_the_base_and_followed_by_adapters(tmp_path, prediction):
    from x2edit.schedulers import prediction_type

    base = Trainer(_config(tmp_path / "base", steps=1, checkpoint_every=0,
                           **{"model.prediction_type": prediction})).train() / "pipeline"
    scheduler_config = (base / "scheduler" / "scheduler_config.json").read_text()
    assert (f'"prediction_type": "{prediction}"' in scheduler_config) == (prediction != "flow")
    trainer = Trainer(_edit_config(tmp_path / "edit", base, steps=1, checkpoint_every=0))
    assert trainer.prediction == prediction_type(trainer.pipe.scheduler) == prediction


@pytest.mark.parametrize("prediction", ["sample", "edm"])
def test_x0_readings_are_scored_on_the_velocity_they_imply(tmp_path, monkeypatch, prediction):
    """A model whose output implies the true x0 has zero loss (and a wrong reading would not)."""
    import x2edit.training.trainer as tr
    from x2edit.schedulers import edm_coefficients

    base = Trainer(_config(tmp_path / "base", steps=1, checkpoint_every=0,
                           **{"model.prediction_type": prediction})).train() / "pipeline"
    trainer = Trainer(_edit_config(tmp_path, base, steps=1, checkpoint_every=0, **{"loss.contrastive_weight": 0,
                                                                                        "loss.balance_weight": 0}))
    assert trainer.prediction == prediction
    captured = {}
    real_pair = tr.flow_matching_pair

    def pair(x0, sigmas, generator=None):
        captured.update(x0=x0, sigmas=sigmas)
        captured["xt"], target = real_pair(x0, sigmas, generator=generator)
        return captured["xt"], target

    def exact(**kw):
        x0, xt, s = captured["x0"], captured["xt"], captured["sigmas"].view(-1, 1, 1)
        if prediction == "sample":
            return (x0.clone(),)
        c_skip, c_out = edm_coefficients(s, 0.5)
        return ((x0 - c_skip * xt) / c_out,)

    monkeypatch.setattr(tr, "flow_matching_pair", pair)
    monkeypatch.setattr(trainer.model, "forward", exact)
    loss, parts = trainer.compute_loss(trainer.batch(0), 0)
    assert parts["flow_matching"] < 1e-6


def test_residual_reading_starts_from_the_source(tmp_path, base_dir, monkeypatch):
    """A fresh residual adapter implies x0 = source, so the loss sees the velocity (x_t - source) / sigma;
    the trained adapter file records the reading, and residual adapters are not exported as plain LoRAs."""
    import x2edit.training.trainer as tr

    trainer = Trainer(_edit_config(tmp_path, base_dir, steps=2, checkpoint_every=0,
                                   **{"adapter.reading": "residual", "adapter.router": "task"}))
    captured = {}
    real_pair, real_loss = tr.flow_matching_pair, tr.flow_matching_loss

    def pair(x0, sigmas, generator=None):
        xt, target = real_pair(x0, sigmas, generator=generator)
        captured.update(xt=xt, sigmas=sigmas)
        return xt, target

    def loss(pred, target, sigmas, weighting="none"):
        captured["pred"] = pred
        return real_loss(pred, target, sigmas, weighting)

    monkeypatch.setattr(tr, "flow_matching_pair", pair)
    monkeypatch.setattr(tr, "flow_matching_loss", loss)
    batch = trainer.batch(0)
    ref, _ = trainer._images_to_tokens(batch["source"], reference=True)
    floor = lambda: captured["sigmas"].clamp(min=0.05).view(-1, 1, 1)  # noqa: E731
    trainer.compute_loss(batch, 0)
    torch.testing.assert_close(captured["pred"], (captured["xt"] - ref) / floor())  # fresh: x0 = source

    # A trained adapter: x0 = source + (adapted - base), with both outputs of the same step.
    randomize_adapters(trainer.transformer, std=0.1)
    outputs, real_forward = [], trainer.model.forward

    def spy(**kw):
        out = real_forward(**kw)
        outputs.append(out[0][:, : ref.shape[1]].detach())
        return out

    monkeypatch.setattr(trainer.model, "forward", spy)
    trainer.compute_loss(batch, 0)
    adapted, base = outputs
    assert (adapted - base).abs().max() > 1e-4
    torch.testing.assert_close(captured["pred"], (captured["xt"] - (ref + adapted - base)) / floor())
    monkeypatch.undo()
    trainer = Trainer(_edit_config(tmp_path / "run2", base_dir, steps=2, checkpoint_every=0,
                                   **{"adapter.reading": "residual", "adapter.router": "task"}))
    out = trainer.train()
    assert read_adapter_header(out / "adapter.safetensors")["config"].reading == "residual"
    assert not (out / "lora_per_task").exists()


def test_x0_weighting_scores_the_implied_x0(tmp_path, base_dir):
    """loss.weighting=x0: a fresh residual adapter implies x0 = source, so the loss is MSE(source, target)."""
    trainer = Trainer(_edit_config(tmp_path, base_dir, steps=1, checkpoint_every=0, **{
        "adapter.reading": "residual", "loss.weighting": "x0", "loss.contrastive_weight": 0,
        "loss.balance_weight": 0}))
    batch = trainer.batch(0)
    _, parts = trainer.compute_loss(batch, 0)
    ref, _ = trainer._images_to_tokens(batch["source"], reference=True)
    x0, _ = trainer._images_to_tokens(batch["target"], reference=False)
    assert parts["flow_matching"] == pytest.approx(((ref - x0) ** 2).mean().item(), rel=1e-5)


def test_residual_reading_needs_a_flow_base(tmp_path):
    base = Trainer(_config(tmp_path / "base", steps=1, checkpoint_every=0,
                           **{"model.prediction_type": "sample"})).train() / "pipeline"
    with pytest.raises(ValueError, match="residual needs a flow"):
        Trainer(_edit_config(tmp_path, base, **{"adapter.reading": "residual"}))


def test_edit_training_writes_adapter_with_all_losses(tmp_path, base_dir):
    parts = []
    out = Trainer(_edit_config(tmp_path, base_dir, steps=2, checkpoint_every=0, batch_size=6,
                               **{"data.tasks": ["color_change", "subject_deletion"]})).train(
        on_step=lambda s, p: parts.append(p))
    assert {"flow_matching", "balance", "contrastive"} <= set(parts[0])  # 3 samples per task: partners exist
    header = read_adapter_header(out / "adapter.safetensors")
    assert header["config"].num_experts == 3 and header["user"]["steps"] == 2


def test_task_router_exports_a_lora_per_task(tmp_path, base_dir):
    out = Trainer(_edit_config(tmp_path, base_dir, steps=1, checkpoint_every=0,
                               **{"adapter.router": "task"})).train()
    assert len(list((out / "lora_per_task").glob("*/pytorch_lora_weights.safetensors"))) == 15


def test_resume_continues_exactly(tmp_path, base_dir):
    straight = []
    Trainer(_edit_config(tmp_path / "a", base_dir, steps=4)).train(on_step=lambda s, p: straight.append(p["loss"]))
    first = []
    Trainer(_edit_config(tmp_path / "b", base_dir, steps=2)).train(on_step=lambda s, p: first.append(p["loss"]))
    resumed = []
    Trainer(_edit_config(tmp_path / "b", base_dir, steps=4)).train(
        resume="latest", on_step=lambda s, p: resumed.append(p["loss"]))
    assert first + resumed == straight


def test_resume_refuses_another_config(tmp_path, base_dir):
    Trainer(_edit_config(tmp_path, base_dir, steps=2)).train()
    with pytest.raises(TrainingError, match="different config"):
        Trainer(_edit_config(tmp_path, base_dir, steps=4, **{"optim.lr": 0.5})).train(resume="latest")
    with pytest.raises(TrainingError, match="no checkpoint"):
        Trainer(_edit_config(tmp_path / "fresh", base_dir, steps=2)).train(resume="latest")


class RunsCode:
    """A pickled object that creates ``marker`` when unpickled: what a malicious checkpoint would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)


def test_resume_refuses_a_pickled_object_in_the_optimizer_state(tmp_path, base_dir):
    """optimizer.pt loads with weights_only: a shared checkpoint cannot run code when resumed."""
    config = dict(steps=2, **{"optim.ema_decay": 0.9})
    Trainer(_edit_config(tmp_path, base_dir, **config)).train()
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("step_*")
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)  # what x2edit writes loads so, EMA included
    assert {"optimizer", "lr_scheduler", "ema"} <= set(state)
    marker = tmp_path / "code_ran"
    state["extra"] = RunsCode(marker)
    torch.save(state, ckpt / "optimizer.pt")
    with pytest.raises(TrainingError, match="optimizer.pt holds pickled objects"):
        Trainer(_edit_config(tmp_path, base_dir, **{**config, "steps": 4})).train(resume="latest")
    assert not marker.exists()


def test_fingerprint_leaves_out_settings_at_their_default(tmp_path):
    """A new setting at its default (as after an upgrade) keeps the fingerprint; a change does not."""
    import dataclasses

    from x2edit.training.config import DataConfig

    cfg = _config(tmp_path)
    assert cfg.fingerprint() == _config(tmp_path, **{"data.buckets": False, "model.prediction_type": "flow"}).fingerprint()
    assert cfg.fingerprint() != _config(tmp_path, **{"model.prediction_type": "sample"}).fingerprint()
    assert cfg.fingerprint() != _config(tmp_path, **{"optim.betas": [0.9, 0.99]}).fingerprint()

    @dataclasses.dataclass
    class NewerDataConfig(DataConfig):  # a later release adds a setting
        jitter: float = 0.0

    newer = dataclasses.replace(cfg, data=NewerDataConfig(**dataclasses.asdict(cfg.data)))
    assert newer.fingerprint() == cfg.fingerprint()


def test_nan_loss_stops_naming_step_and_checkpoint(tmp_path, base_dir):
    trainer = Trainer(_edit_config(tmp_path, base_dir, steps=6))
    real = trainer.compute_loss

    def poisoned(batch, step):
        loss, parts = real(batch, step)
        if step == 3:
            return loss * float("nan"), {**parts, "loss": float("nan")}
        return loss, parts

    trainer.compute_loss = poisoned
    with pytest.raises(TrainingError, match=r"loss is nan at step 3; last good checkpoint: .*step_0000002"):
        trainer.train()


@pytest.mark.parametrize("over,message", [
    ({"colour": 1}, "unknown config key 'colour'"),
    ({"optim": {"lr": "fast"}}, "optim.lr: expected float"),
    ({"adapter": {"rank": 0}}, "rank must be a positive integer"),
    ({"mode": "video"}, "mode must be"),
    ({"mode": "edit"}, "needs model.base"),
    ({"model.prediction_type": "epsilon"}, "prediction_type must be"),
    ({"data.self_reference": 1.5}, "self_reference is a fraction"),
    ({"loss.weighting": "snr"}, "loss.weighting must be"),
])
def test_config_errors_before_training(tmp_path, over, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **over)


@pytest.mark.parametrize("fraction,expect_ref", [(0.0, False), (1.0, True)])
def test_self_reference_puts_the_target_in_context(tmp_path, monkeypatch, fraction, expect_ref):
    """In-context pretraining: the transformer also sees the target itself as Kontext reference tokens."""
    trainer = Trainer(_config(tmp_path, steps=1, checkpoint_every=0, **{"data.self_reference": fraction}))
    seen = {}
    real = trainer.model.forward

    def spy(**kw):
        seen.update(hidden=kw["hidden_states"], ids=kw["img_ids"])
        return real(**kw)

    monkeypatch.setattr(trainer.model, "forward", spy)
    batch = trainer.batch(0)
    trainer.compute_loss(batch, 0)
    x0, ids = trainer._images_to_tokens(batch["target"], reference=False)
    n = x0.shape[1]
    assert seen["hidden"].shape[1] == (2 * n if expect_ref else n)
    if expect_ref:
        assert torch.equal(seen["hidden"][:, n:], x0)  # the clean target, not its noisy copy
        assert (seen["ids"][n:, 0] == 1).all() and (seen["ids"][:n, 0] == 0).all()


def test_self_reference_is_refused_for_edit_training(tmp_path, base_dir):
    with pytest.raises(ValueError, match="self_reference is for t2i"):
        _edit_config(tmp_path, base_dir, **{"data.self_reference": 0.5})


def test_batch_indices_are_a_pure_function_of_step():
    a = batch_indices(5, 4, rank=1, world=2, size=10, seed=0)
    assert a == batch_indices(5, 4, rank=1, world=2, size=10, seed=0)
    epoch = [i for s in range(5) for r in range(2) for i in batch_indices(s, 1, r, 2, 10, 0)]
    assert sorted(epoch) == list(range(10))  # one epoch covers every sample once
    assert batch_indices(0, 3, 0, 1, 2**40, 0) == [0, 1, 2]


def test_adapter_names_after_edit_training(tmp_path, base_dir):
    trainer = Trainer(_edit_config(tmp_path, base_dir, steps=1, checkpoint_every=0))
    assert adapter_names(trainer.transformer) == ["default"]


@pytest.mark.parametrize("mode", ["t2i", "edit"])
def test_validation_writes_grid_and_metric(tmp_path, base_dir, mode):
    over = {"steps": 1, "checkpoint_every": 0, "validate_every": 1}
    cfg = _config(tmp_path, **over) if mode == "t2i" else _edit_config(tmp_path, base_dir, **over)
    out = Trainer(cfg).train()
    assert (out / "validation" / "step_0000001.png").stat().st_size > 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    key = "val/psnr" if mode == "t2i" else "val/edit_gain_db"
    assert any(key in row and row[key] == row[key] for row in logged)  # present and not NaN


def _mixed_aspect_jsonl(tmp_path, n=12):
    """A JSONL dataset of n pairs, half landscape (48x32) and half portrait (32x48), two tasks."""
    import numpy as np
    from PIL import Image

    lines = []
    for i in range(n):
        size = (48, 32) if i % 2 else (32, 48)
        for kind, value in (("s", 40), ("t", 200)):
            Image.fromarray(np.full((size[1], size[0], 3), value + i, np.uint8)).save(tmp_path / f"{kind}{i}.png")
        lines.append({"image_path": f"t{i}.png", "control_path": f"s{i}.png", "caption": f"edit {i}",
                      "task": ["color_change", "subject_deletion"][(i // 2) % 2]})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return {"format": "jsonl", "path": str(tmp_path / "data.jsonl")}


def test_aspect_ratio_buckets_batch_one_size_and_resume_draws_the_same(tmp_path, base_dir):
    spec = _mixed_aspect_jsonl(tmp_path)
    over = {"steps": 4, "checkpoint_every": 0, "batch_size": 2, "data.source": spec, "data.resolution": 40,
            "data.buckets": True}
    trainer = Trainer(_edit_config(tmp_path / "a", base_dir, **over))
    sizes = set()
    for step in range(8):  # more than one epoch (6 full batches)
        batch = trainer.batch(step)
        shapes = {im.shape for im in batch["source"] + batch["target"]}
        assert len(shapes) == 1  # one bucket per batch, source and target fitted alike
        sizes |= shapes
        assert len(set(batch["task"].tolist())) == 1  # contrastive loss on: batches of same-task pairs
    assert len(sizes) == 2 and all(h % 16 == 0 and w % 16 == 0 for h, w, _ in sizes) and \
        any(h > w for h, w, _ in sizes)
    again = Trainer(_edit_config(tmp_path / "b", base_dir, **over))  # a resumed run rebuilds the plan
    assert [again.batch(s)["text"] for s in (7, 3)] == [trainer.batch(s)["text"] for s in (7, 3)]
    trainer.train()  # and the model trains on mixed sizes
    assert (tmp_path / "a" / "run" / "adapter.safetensors").is_file()


def test_buckets_need_a_reader_source(tmp_path):
    with pytest.raises(ValueError, match="data.buckets needs a reader source"):
        _config(tmp_path, **{"data.buckets": True})


def test_x0_edit_weighting_is_one_for_an_unchanged_source(tmp_path, base_dir):
    """loss.weighting=x0_edit divides each pair's x0 error by its own edit energy: a fresh residual adapter
    returns the source, so every pair scores exactly 1 (= 10^(-0 dB / 10))."""
    trainer = Trainer(_edit_config(tmp_path, base_dir, steps=1, checkpoint_every=0, **{
        "adapter.reading": "residual", "loss.weighting": "x0_edit", "loss.contrastive_weight": 0,
        "loss.balance_weight": 0}))
    _, parts = trainer.compute_loss(trainer.batch(0), 0)
    assert parts["flow_matching"] == pytest.approx(1.0, rel=1e-5)


def test_x0_edit_weighting_needs_edit_pairs(tmp_path):
    with pytest.raises(ValueError, match=r"x0_edit .* needs an edit mode \(edit or edit_base\)"):
        _config(tmp_path, **{"loss.weighting": "x0_edit"})


def test_source_start_trains_on_the_source_at_a_fixed_sigma(tmp_path, base_dir, monkeypatch):
    """adapter.source_start=s: the transformer sees the source tokens as its sample at noise level s (no
    noise), every step; the trained adapter records s for the pipeline."""
    trainer = Trainer(_edit_config(tmp_path, base_dir, steps=2, checkpoint_every=0, **{
        "adapter.reading": "residual", "adapter.source_start": 0.4, "loss.weighting": "x0_edit"}))
    calls, real_forward = [], trainer.model.forward

    def spy(**kw):
        calls.append((kw["hidden_states"].detach().clone(), kw["timestep"].clone()))
        return real_forward(**kw)

    monkeypatch.setattr(trainer.model, "forward", spy)
    for step in range(2):
        batch = trainer.batch(step)
        ref, _ = trainer._images_to_tokens(batch["source"], reference=True)
        calls.clear()
        trainer.compute_loss(batch, step)
        hidden, sigma = calls[0]
        n = ref.shape[1]
        torch.testing.assert_close(hidden[:, :n], ref)  # the sample is the source itself
        torch.testing.assert_close(sigma, torch.full_like(sigma, 0.4))
    monkeypatch.undo()
    out = trainer.train()
    assert read_adapter_header(out / "adapter.safetensors")["config"].source_start == 0.4


def test_learning_rate_is_warmup_stable_decay(tmp_path):
    trainer = Trainer(_config(tmp_path, steps=10, **{"optim.warmup_steps": 2, "optim.decay_steps": 4}))
    assert [trainer._lr_factor(s) for s in range(11)] == [0, 0.5, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0]
    with pytest.raises(ValueError, match="decay_steps must be in 0..steps=10"):
        _config(tmp_path, steps=10, **{"optim.decay_steps": 11})


def test_resume_may_add_a_cooldown(tmp_path, base_dir):
    """A constant-rate run cooled down from a checkpoint equals a run with the decay from the start
    (the rates agree before the decay): WSD, as the x2edit-tiny adapter was trained."""
    straight = []
    Trainer(_edit_config(tmp_path / "a", base_dir, steps=6, **{"optim.decay_steps": 3})).train(
        on_step=lambda s, p: straight.append(p["loss"]))
    first, resumed = [], []
    Trainer(_edit_config(tmp_path / "b", base_dir, steps=6, keep_checkpoints=3)).train(
        on_step=lambda s, p: first.append(p["loss"]))
    Trainer(_edit_config(tmp_path / "b", base_dir, steps=6, checkpoint_every=0, **{"optim.decay_steps": 3})).train(
        resume=str(tmp_path / "b" / "run" / "checkpoints" / "step_0000002"),
        on_step=lambda s, p: resumed.append(p["loss"]))
    assert first[:2] + resumed == straight
    assert resumed[-1] != first[-1]  # the decay did change the last steps


# -- real-FLUX training settings (issue 12) ---------------------------------------------------


@pytest.mark.parametrize("router", ["token_topk", "task"])
def test_gradient_checkpointing_trains_routed_adapters_as_without(tmp_path, base_dir, router):
    """model.gradient_checkpointing with a task-routed MoE-LoRA: backward recomputes the blocks after the routing
    context has closed; the losses (balance and contrastive included) and the trained adapter equal a plain run."""
    over = {"steps": 2, "checkpoint_every": 0, "adapter.router": router,
            "data.tasks": ["color_change", "subject_deletion"]}
    runs = {}
    for ckpt in (False, True):
        parts = []
        trainer = Trainer(_edit_config(tmp_path / str(ckpt), base_dir, **over, **{"model.gradient_checkpointing": ckpt}))
        assert trainer.transformer.is_gradient_checkpointing == ckpt
        trainer.train(on_step=lambda s, p, parts=parts: parts.append(p))
        runs[ckpt] = parts, {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if p.requires_grad}
    (plain, w_plain), (ckpt, w_ckpt) = runs[False], runs[True]
    assert {"balance", "contrastive"} <= set(plain[0])
    for a, b in zip(plain, ckpt):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7) for k in a)
    for name in w_plain:
        torch.testing.assert_close(w_ckpt[name], w_plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_base_that_ships_an_adapter_trains_a_new_one_alone(tmp_path):
    """model.base=x2edit-tiny (which ships its own MoE-LoRA): the new adapter replaces it."""
    from x2edit.adapters import adapter_config

    cfg = _config(tmp_path, mode="edit", steps=1, checkpoint_every=0, batch_size=2, **{
        "model.base": "x2edit-tiny", "model.max_text_tokens": 32, "data.resolution": 64,
        "adapter": {"kind": "lora", "rank": 3}})
    trainer = Trainer(cfg)
    assert adapter_names(trainer.transformer) == ["default"]
    assert adapter_config(trainer.transformer).kind == "lora"  # the new one, not the shipped MoE-LoRA
    out = trainer.train()
    assert read_adapter_header(out / "adapter.safetensors")["config"].rank == 3


def test_base_dtype_and_float32_adapter(tmp_path, base_dir):
    """model.dtype: the frozen base in bf16, the trained adapter (and its file) in float32."""
    from x2edit.training.trainer import base_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = _edit_config(tmp_path, base_dir, steps=1, checkpoint_every=0)
    assert base_dtype(cfg, cuda) == torch.bfloat16 and base_dtype(cfg, cpu) == torch.float32
    assert base_dtype(_config(tmp_path), cuda) == torch.float32  # t2i trains the transformer itself
    trainer = Trainer(_edit_config(tmp_path, base_dir, steps=1, checkpoint_every=0, **{"model.dtype": "bfloat16"}))
    assert trainer.transformer.dtype == torch.bfloat16 and trainer.pipe.text_encoder.dtype == torch.bfloat16
    adapter = [p for p in trainer.transformer.parameters() if p.requires_grad]
    assert adapter and all(p.dtype == torch.float32 for p in adapter)
    before = [p.detach().clone() for p in adapter]
    out = trainer.train()
    assert any((p - b).abs().max() > 0 for p, b in zip(adapter, before))  # float32 weights were updated
    from safetensors import safe_open

    with safe_open(str(out / "adapter.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


@pytest.mark.parametrize("over,message", [
    ({"model.dtype": "int8"}, "model.dtype must be one of"),
    ({"model.dtype": "bfloat16"}, "model.dtype: t2i trains the whole transformer"),
    ({"model.text_encoder_device": "gpu"}, "text_encoder_device must be"),
    ({"adapter.max_sequence_length": 77}, "set model.max_text_tokens instead"),
])
def test_model_setting_errors(tmp_path, over, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **over)


def test_text_encoders_may_stay_on_the_cpu(tmp_path, base_dir):
    trainer = Trainer(_edit_config(tmp_path, base_dir, steps=1, checkpoint_every=0,
                                   **{"model.text_encoder_device": "cpu"}))
    assert trainer.pipe.text_encoder.device.type == "cpu"
    trainer.train()


def test_adapter_records_the_trained_text_length(tmp_path, base_dir):
    out = Trainer(_edit_config(tmp_path, base_dir, steps=1, checkpoint_every=0,
                               **{"model.max_text_tokens": 12})).train()
    assert read_adapter_header(out / "adapter.safetensors")["config"].max_sequence_length == 12


# -- the losses act on what they name (mutation-tested) ---------------------------------------


def _adapter_grads(trainer, batch):
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, parts = trainer.compute_loss(batch, 0)
    loss.backward()
    return parts, {n: p.grad.clone() for n, p in trainer.transformer.named_parameters()
                   if p.requires_grad and p.grad is not None}


def _two_task_trainer(tmp_path, base_dir, **over):
    trainer = Trainer(_edit_config(tmp_path, base_dir, steps=1, checkpoint_every=0, batch_size=4, **{
        "data.tasks": ["color_change", "subject_deletion"], **over}))
    randomize_adapters(trainer.transformer, std=0.1)
    return trainer


def _grads_off_and_on(tmp_path, base_dir, term: str, other: str):
    """(loss parts with the term on, adapter gradients with its weight 0 and 1) on the same batch; ``other``
    (the other auxiliary weight) is 0 in both."""
    batch, grads = None, {}
    for weight in (0.0, 1.0):
        trainer = _two_task_trainer(tmp_path / str(weight), base_dir, **{term: weight, other: 0})
        batch = batch or trainer.batch(0)
        parts, grads[weight] = _adapter_grads(trainer, batch)
    return parts, grads[0.0], grads[1.0]


def test_contrastive_term_changes_the_adapters_gradient(tmp_path, base_dir):
    """Fails if the contrastive term is dropped from the loss (or multiplied by 0)."""
    parts, off, on = _grads_off_and_on(tmp_path, base_dir, "loss.contrastive_weight", "loss.balance_weight")
    assert parts["contrastive"] > 0
    assert any((on[n] - off[n]).abs().max() > 1e-6 for n in off if ".lora_" in n)  # it reaches the experts


def test_balance_term_reaches_the_router_gate(tmp_path, base_dir):
    """Fails if the balance term is dropped from the loss (or multiplied by 0)."""
    parts, off, on = _grads_off_and_on(tmp_path, base_dir, "loss.balance_weight", "loss.contrastive_weight")
    assert parts["balance"] > 0
    gate = [n for n in off if n.endswith("router.gate.weight")]
    assert gate and any((on[n] - off[n]).abs().max() > 1e-7 for n in gate)


@pytest.mark.parametrize("router", ["token_topk", "task"])
def test_training_routes_each_sample_by_its_own_task(tmp_path, base_dir, router):
    """Fails if the trainer routes every sample as one task (e.g. task 0): swapping the labels changes the loss."""
    trainer = _two_task_trainer(tmp_path, base_dir, **{"adapter.router": router, "loss.contrastive_weight": 0,
                                                        "loss.balance_weight": 0})
    batch = trainer.batch(0)
    assert len(set(batch["task"].tolist())) == 2
    with torch.no_grad():
        _, parts = trainer.compute_loss(batch, 0)
        swapped = dict(batch, task=batch["task"].flip(0))
        _, parts_swapped = trainer.compute_loss(swapped, 0)
        zero = dict(batch, task=torch.zeros_like(batch["task"]))
        _, parts_zero = trainer.compute_loss(zero, 0)
    assert parts["flow_matching"] != pytest.approx(parts_swapped["flow_matching"], rel=1e-6)
    assert parts["flow_matching"] != pytest.approx(parts_zero["flow_matching"], rel=1e-6)


def test_contrastive_features_are_the_target_tokens(tmp_path, base_dir, monkeypatch):
    """The contrastive loss sees each double block's target tokens only, not the reference (source) tokens
    appended after them, and exactly those outputs."""
    import x2edit.training.trainer as tr

    trainer = _two_task_trainer(tmp_path, base_dir, **{"loss.balance_weight": 0})
    seen, blocks = [], []
    real_con = tr.contrastive_loss

    def spy(features, *args, **kwargs):
        seen.append(features)
        return real_con(features, *args, **kwargs)

    def hook(module, args, output):
        blocks.append(output[1].detach())

    monkeypatch.setattr(tr, "contrastive_loss", spy)
    handle = trainer.transformer.transformer_blocks[0].register_forward_hook(hook)
    batch = trainer.batch(0)
    x0, _ = trainer._images_to_tokens(batch["target"], reference=False)
    trainer.compute_loss(batch, 0)
    handle.remove()
    n = x0.shape[1]
    assert blocks[0].shape[1] == 2 * n  # target + reference tokens in the stream
    assert [f.shape[1] for f in seen] == [n] * len(trainer.transformer.transformer_blocks)
    torch.testing.assert_close(seen[0].detach(), blocks[0][:, :n])


def test_upstream_preset_is_x2edits_released_settings(tmp_path, base_dir):
    """x2edit train --preset x2edit_upstream: upstream's router form, losses and optimizer; the user's file and
    overrides go on top; the preset trains (tiny rank here) with no balance term in the loss."""
    from x2edit.training.config import list_presets, load_config

    assert "x2edit_upstream" in list_presets()
    cfg = load_config(None, ["mode=edit", "model.base=somewhere"], preset="x2edit_upstream")
    a = cfg.adapter
    assert (a.kind, a.rank, a.alpha, a.num_experts, a.top_k, a.shared_expert, a.router) == (
        "moe_lora", 64, 64, 12, 2, True, "token_topk")
    assert a.shared_task_embedding and not a.gate_bias and not a.renormalize and a.targets == "x2edit"
    assert a.task_embed_dim is None and a.num_task_slots == 16
    assert (cfg.loss.balance_weight, cfg.loss.contrastive_weight, cfg.loss.contrastive_temperature) == (0, 0.2, 0.5)
    assert cfg.optim.lr == 1e-4 and cfg.optim.decay_steps == 0 and cfg.optim.weight_decay == 1e-4
    assert cfg.model.gradient_checkpointing and cfg.loss.timestep_sampling == "uniform" and cfg.batch_size == 4
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("adapter: {rank: 4}\nsteps: 7\n")
    mine = load_config(yaml_file, ["adapter.num_experts=3", "mode=edit", "model.base=x"], preset="x2edit_upstream")
    assert (mine.adapter.rank, mine.adapter.num_experts, mine.steps, mine.loss.contrastive_weight) == (4, 3, 7, 0.2)
    with pytest.raises(ValueError, match="unknown preset 'x2edit_upstraem': available are"):
        load_config(None, [], preset="x2edit_upstraem")

    out = tmp_path / "run"
    from x2edit.cli import main

    assert main(["train", "--preset", "x2edit_upstream", "mode=edit", f"model.base={base_dir}", f"output_dir={out}",
                 "steps=1", "batch_size=4", "checkpoint_every=0", "validate_every=0", "log_every=1", "data.resolution=32",
                 "model.max_text_tokens=16", "mixed_precision=no", "adapter.rank=2", "adapter.num_experts=3",
                 "data.tasks=[color_change, subject_deletion]"]) == 0
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "train/contrastive" in logged and "train/balance" not in logged
    assert read_adapter_header(out / "adapter.safetensors")["config"].shared_task_embedding


def test_time_budget_stops_the_run_and_lands_the_decay_inside_it(tmp_path, monkeypatch):
    """time_budget_s: the loop stops when the budget is spent and saves as at the last step; the WSD decay follows
    the budget when the budget ends first (here a clock that reads 1 s per step: 6 s for a 100-step run)."""
    import time

    trainer = Trainer(_config(tmp_path, steps=100, checkpoint_every=0, time_budget_s=6.0,
                              **{"optim.decay_steps": 50}))
    monkeypatch.setattr(time, "perf_counter", lambda: float(trainer.step))
    rates = []
    out = trainer.train(on_step=lambda s, p: rates.append(trainer.optimizer.param_groups[0]["lr"]))
    assert trainer.step == 6 and (out / "pipeline" / "model_index.json").is_file()
    lr = trainer.config.optim.lr
    # the rate for step k is set when step k-1 ends (clock k-1): full while half the budget is left (decay_steps
    # is half the run), then linearly towards 0 at 6 s; steps_left(k) = min(100 - k, (1 - (k - 1) / 6) * 100)
    assert rates == pytest.approx([lr, lr, lr, lr, lr * 2 / 3, lr / 3], abs=1e-12)


def test_a_resumed_run_keeps_one_time_budget(tmp_path, monkeypatch):
    """The loop's seconds are in the checkpoint: a run resumed (in another session) stops when the budget of
    the whole run is spent, not a fresh budget later (a clock that reads 1 s per step, budget 6 s)."""
    import time

    holder = {}
    monkeypatch.setattr(time, "perf_counter", lambda: float(holder["trainer"].step))
    first = holder["trainer"] = Trainer(_config(tmp_path, steps=3, checkpoint_every=3, time_budget_s=6.0))
    first.train()
    assert json.loads((first.last_checkpoint / "trainer_state.json").read_text())["loop_seconds"] == 3.0
    resumed = holder["trainer"] = Trainer(_config(tmp_path, steps=100, checkpoint_every=3, time_budget_s=6.0))
    resumed.train(resume="latest")
    assert resumed.step == 6  # 3 steps before and 3 after: 6 s in all


def test_time_budget_is_refused_when_not_positive(tmp_path):
    with pytest.raises(ValueError, match="time_budget_s must be a positive number"):
        _config(tmp_path, time_budget_s=0)


@pytest.mark.parametrize("mode", ["edit", "t2i"])
def test_shapeworld_pool_serves_the_same_items_and_repeats(mode):
    """data.pool: pairs 0..N-1 rendered once in worker processes; item i reads pair i mod N, equal to what the
    on-the-fly source renders for it."""
    import numpy as np

    from x2edit.training.trainer import ShapeWorldSource

    tasks = ["color_change", "tone_transform", "subject_deletion"]
    pooled = ShapeWorldSource(32, mode, tasks, pool=5, workers=2)
    fly = ShapeWorldSource(32, mode, tasks)
    per_pair = 2 if mode == "t2i" else 1
    for i in range(5 * per_pair):
        a, b = pooled[i], fly[i]
        assert a["text"] == b["text"] and a["task"] == b["task"] and np.array_equal(a["target"], b["target"])
    again = pooled[5 * per_pair + 1]  # the second epoch repeats the first
    assert np.array_equal(again["target"], fly[1]["target"]) and again["text"] == fly[1]["text"]
    with pytest.raises(ValueError, match="data.pool pre-renders Shape World pairs"):
        from x2edit.training.config import DataConfig

        DataConfig(source={"format": "x2edit", "path": "x"}, pool=10)
