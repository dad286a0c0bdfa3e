"""The diptych training modes (ICEdit's in-context form): canvases, template, prompt dropout, the Fill
condition as the pipeline builds it, the right-half loss, the saved Fill base, the icedit preset."""

import json

import numpy as np
import pytest
import torch
from tiny_configs import tiny_config

from x2edit.adapters import read_adapter_header
from x2edit.pipeline_diptych import DIPTYCH_TEMPLATE, X2EditDiptychPipeline
from x2edit.training.config import load_config
from x2edit.training.trainer import Trainer, _diptych_batch, _right_half_tokens


def _config(tmp_path, **over):
    return tiny_config(tmp_path, **{"mode": "diptych_base", **over})


@pytest.fixture(scope="module")
def fill_base(tmp_path_factory):
    """A tiny Fill base trained 2 steps in diptych_base mode from a new model, one step from the source."""
    tmp = tmp_path_factory.mktemp("fill")
    out = Trainer(_config(tmp, **{"model.source_start": 0.5})).train()
    return out / "pipeline"


def test_a_diptych_batch_is_source_source_and_source_target_with_the_template():
    s, t = np.zeros((4, 6, 3), np.uint8), np.full((4, 6, 3), 9, np.uint8)
    b = _diptych_batch({"source": [s], "target": [t], "text": ["make it red"], "task": None}, "D: {instruction}")
    assert b["source"][0].shape == (4, 12, 3) and (b["source"][0] == 0).all()
    assert (b["target"][0][:, :6] == 0).all() and (b["target"][0][:, 6:] == 9).all()
    assert b["text"] == ["D: make it red"]
    assert _right_half_tokens(np.zeros((16, 32, 3)), 8, "cpu").tolist() == [False, False, True, True] * 2


def test_the_saved_fill_base_records_its_reading_and_edits(fill_base):
    from x2edit.registry import load_pipeline

    meta = json.loads((fill_base / "x2edit_embedded.json").read_text())
    assert meta["source_start"] == 0.5 and meta["template"] == DIPTYCH_TEMPLATE and meta["num_inference_steps"] == 1
    pipe = load_pipeline(fill_base)
    assert isinstance(pipe, X2EditDiptychPipeline) and pipe.transformer.config.in_channels == 448
    from PIL import Image

    out = pipe.edit(Image.new("RGB", (32, 32), (200, 30, 30)), "make it blue").images[0]
    assert out.size == (32, 32)


def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(fill_base, tmp_path):
    """The trainer's input for a pair (noisy canvas + Fill condition, canvas ids, noise level) equals the input
    X2EditDiptychPipeline.edit gives the transformer for the same source: training matches inference."""
    from PIL import Image

    trainer = Trainer(_config(tmp_path, **{"model.base": str(fill_base), "model.source_start": 0.5}))
    item = trainer.source[0]
    batch = _diptych_batch({"source": [item["source"]], "target": [item["target"]], "text": [item["text"]],
                            "task": None}, trainer.pipe.diptych_template)
    seen = []
    hook = trainer.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        trainer.compute_loss(batch, 0)
        trainer.pipe.edit(Image.fromarray(item["source"]), item["text"], max_sequence_length=48)
    finally:
        hook.remove()
    train, infer = seen
    torch.testing.assert_close(train["hidden_states"], infer["hidden_states"])
    torch.testing.assert_close(train["img_ids"], infer["img_ids"])
    torch.testing.assert_close(train["timestep"].float(), infer["timestep"].float())
    torch.testing.assert_close(train["encoder_hidden_states"], infer["encoder_hidden_states"])


def test_right_half_loss_and_prompt_dropout(fill_base, tmp_path):
    trainer = Trainer(_config(tmp_path / "a", **{"model.base": str(fill_base), "loss.diptych_region": "right",
                                                 "data.prompt_dropout": 0.5}))
    texts = [t for step in range(20) for t in trainer.batch(step)["text"]]
    assert 0 < texts.count("") < len(texts)  # about half dropped, the rest templated
    assert all(t.startswith("A diptych") for t in texts if t)
    assert [trainer.batch(s)["text"] for s in range(3)] == [trainer.batch(s)["text"] for s in range(3)]  # resumable
    batch = trainer.batch(0)
    right, _ = trainer.compute_loss(batch, 0)
    whole = Trainer(_config(tmp_path / "b", **{"model.base": str(fill_base), "data.prompt_dropout": 0.5}))
    canvas, _ = whole.compute_loss(batch, 0)
    assert right.item() != pytest.approx(canvas.item())  # the left half's tokens are left out of one


def test_bad_diptych_settings_are_refused(tmp_path, fill_base):
    cases = [({"mode": "edit_base", "model.diptych_template": "x {instruction}"}, "diptych modes"),
             ({"model.diptych_template": "no slot"}, "{instruction}"),
             ({"loss.diptych_region": "left"}, "canvas or right"),
             ({"loss.mask_weight": 1.0}, "do not support"),
             ({"mode": "diptych"}, "needs model.base"),
             ({"data.prompt_dropout": 1.0}, "prompt_dropout")]
    for over, message in cases:
        with pytest.raises(ValueError, match=message):
            _config(tmp_path, **over)
    kontext = tmp_path / "kontext"
    from x2edit import X2EditPipeline
    from x2edit.testing import tiny_sentence_components

    X2EditPipeline(**tiny_sentence_components(0)).save_pretrained(kontext)
    with pytest.raises(ValueError, match="not a Fill model"):
        Trainer(_config(tmp_path, mode="diptych", **{"model.base": str(kontext), "adapter": {"rank": 2}}))


def test_icedit_preset_trains_a_top1_moe_lora_with_x_embedder(fill_base, tmp_path):
    from x2edit.adapters import export_diffusers_lora
    from x2edit.cli import main

    cfg = load_config(None, [], preset="icedit")
    a = cfg.adapter
    assert (cfg.mode, a.kind, a.rank, a.num_experts, a.top_k, a.shared_expert, a.task_embed_dim) == (
        "diptych", "moe_lora", 32, 4, 1, False, 0)
    assert "x_embedder" in a.target_patterns and cfg.data.prompt_dropout == 0.1 and cfg.loss.balance_weight == 0
    out = tmp_path / "run"
    assert main(["train", "--preset", "icedit", f"model.base={fill_base}", f"output_dir={out}", "steps=1",
                 "batch_size=2", "checkpoint_every=0", "validate_every=0", "log_every=1", "data.resolution=32",
                 "model.max_text_tokens=48", "mixed_precision=no", "adapter.rank=2",
                 "model.gradient_checkpointing=false"]) == 0
    from safetensors import safe_open

    assert read_adapter_header(out / "adapter.safetensors")["config"].top_k == 1
    with safe_open(str(out / "adapter.safetensors"), framework="pt") as f:
        assert any(k.startswith("x_embedder.") for k in f.keys())
    trainer = Trainer(_config(tmp_path / "t", mode="diptych", **{"model.base": str(fill_base),
                                                                   "adapter": {"rank": 2, "num_experts": 4, "top_k": 1,
                                                                               "task_embed_dim": 0}}))
    with pytest.raises(ValueError, match="token"):  # a per-token router is no plain LoRA
        export_diffusers_lora(trainer.transformer, tmp_path / "lora")
