"""The embedded x2edit-tiny model that ships in the package: present, small, loads offline, edits."""

import pytest
import torch

from x2edit.adapters import adapter_config
from x2edit.registry import BASE_MODELS, load_pipeline

TINY = BASE_MODELS["x2edit-tiny"]


def test_bundle_is_present_and_well_under_20_mb():
    assert TINY.available, f"x2edit-tiny is missing from {TINY.path}"
    size = sum(f.stat().st_size for f in TINY.path.rglob("*") if f.is_file())
    assert size < 16e6


@pytest.fixture(scope="module")
def tiny():
    pipe = load_pipeline("x2edit-tiny", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_offline_with_its_moe_lora(tiny):
    cfg = adapter_config(tiny.transformer, "default")
    assert cfg.kind == "moe_lora" and cfg.router == "token_topk"
    assert tiny.text_encoder.config.hidden_size == 384 and tiny.text_encoder_2 is None


def test_edits_held_out_pairs_of_every_task(tiny):
    """Runs offline on one held-out pair per task and gives finite images and a full metrics table.
    (Its quality is asserted below, on 20 pairs per task.)"""
    import numpy as np

    from x2edit.data_pipeline.shapeworld import ShapeWorld
    from x2edit.training.evaluation import edit_metrics, run_edits, summarize

    pairs = list(ShapeWorld(resolution=64).eval_pairs(n_per_task=1))
    outputs = run_edits(tiny, pairs, tasks=[p.task for p in pairs])  # its own single step from the source
    assert all(o.shape == (64, 64, 3) and o.dtype == np.uint8 for o in outputs)
    table = summarize([{"task": p.task, **edit_metrics(o, p.source, p.target, p.mask)} for p, o in zip(pairs, outputs)])
    assert len(table) == 16 and np.isfinite(table["mean"]["edit_gain_db"])


def test_shipped_quality_on_the_held_out_split(tiny):
    """The README's claim for the shipped model (release 5): on 20 held-out pairs per task (labels routing)
    the mean edit gain is +2.32 dB (release 3: +0.36), 13 of 15 tasks are above zero, and each whole-image
    task gains more than 1 dB. One step per edit: about 15 s on 2 cores."""
    from x2edit.training.eval_command import evaluate_shapeworld

    table, *_ = evaluate_shapeworld(tiny, n_per_task=20)
    assert table["mean"]["edit_gain_db"] > 2.0
    assert sum(row["edit_gain_db"] > 0 for task, row in table.items() if task != "mean") >= 13
    whole = ("style_change", "background_change", "tone_transform", "camera_move", "low_level", "subject_driven")
    assert all(table[t]["edit_gain_db"] > 1.0 for t in whole), {t: table[t]["edit_gain_db"] for t in whole}


def test_cli_edit_uses_the_embedded_default(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from x2edit.cli import main
    from x2edit.data_pipeline.shapeworld import ShapeWorld

    pair = ShapeWorld(resolution=64).sample(seed=0, split="eval")
    Image.fromarray(pair.source).save(tmp_path / "src.png")
    assert main(["edit", "--image", str(tmp_path / "src.png"), "--instruction", pair.instruction,
                 "--out", str(tmp_path / "out.png")]) == 0  # no --base: x2edit-tiny
    assert np.asarray(Image.open(tmp_path / "out.png")).shape == (64, 64, 3)
    assert "task=" in capsys.readouterr().out


def test_cli_adapter_replaces_the_embedded_one(tmp_path, tiny):
    """`x2edit edit --adapter FILE` on the default base edits with FILE alone (it used to clash)."""
    import numpy as np
    from PIL import Image

    from x2edit.adapters import adapter_names, save_adapter
    from x2edit.cli import main
    from x2edit.data_pipeline.shapeworld import ShapeWorld

    save_adapter(tiny.transformer, tmp_path / "mine.safetensors", "default")
    pair = ShapeWorld(resolution=64).sample(seed=1, split="eval")
    Image.fromarray(pair.source).save(tmp_path / "src.png")
    assert main(["edit", "--image", str(tmp_path / "src.png"), "--instruction", pair.instruction, "--adapter",
                 str(tmp_path / "mine.safetensors"), "--out", str(tmp_path / "out.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "out.png")).shape == (64, 64, 3)
    fresh = load_pipeline("x2edit-tiny")
    with pytest.raises(ValueError):  # a failed load removes nothing
        fresh.load_adapter(tmp_path / "src.png", adapter_name="other", replace=True)
    assert adapter_names(fresh.transformer) == ["default"]
    fresh.load_adapter(tmp_path / "mine.safetensors", adapter_name="mine", replace=True)
    assert adapter_names(fresh.transformer) == ["mine"]
