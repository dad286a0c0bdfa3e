"""The app's handlers, called directly (no server): edit, task override, progress, batch, LoRAs, bad input."""

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from x2edit.app.handlers import INDEX_HELP, AppConfig, Editor, parse_file_size
from x2edit.cli import main
from x2edit.retrieval.index import search


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def output_files(editor) -> set:
    return {p for p in editor.output_dir.iterdir() if p.is_file()}


def test_edit_saves_a_lossless_result_routed_by_the_classifier(editor, example):
    record = editor.edit(example, "please paint the plus sign bubblegum-pink")
    assert record.result.endswith(".png") and Image.open(record.result).format == "PNG"
    assert Image.open(record.result).size == (64, 64)
    assert np.array_equal(pixels(record.source), pixels(example))  # the source as read, kept for the history
    assert np.abs(pixels(record.result) - pixels(example)).max() > 0  # the model changed something
    assert record.task_choice == "auto" and record.task == next(iter(editor.classify(record.instruction)))
    assert record.scores[record.task] == max(record.scores.values()) and 0 < sum(record.scores.values()) <= 1
    assert record.settings["steps"] == 1 and record.settings["seed"] == 0  # x2edit-tiny: one step from the source
    assert editor.steps_setting() == (1, True)  # one by default, from the source
    again = editor.edit(example, "please paint the plus sign bubblegum-pink")
    assert np.array_equal(pixels(again.result), pixels(record.result))
    more = editor.edit(example, "please paint the plus sign bubblegum-pink", steps=3)  # more steps on request
    assert more.settings["steps"] == 3 and not np.array_equal(pixels(more.result), pixels(record.result))


def test_task_override_routes_the_edit_to_that_task(editor, example):
    auto = editor.edit(example, "please paint the plus sign bubblegum-pink")
    forced = editor.edit(example, "please paint the plus sign bubblegum-pink", task="camera_move")
    assert forced.task == "camera_move" and forced.task_choice == "camera_move" and forced.scores == {}
    assert auto.task != "camera_move"
    # the MoE-LoRA routes by task: another task's experts give another image
    assert np.abs(pixels(forced.result) - pixels(auto.result)).max() > 0


def test_random_seed_is_drawn_and_recorded(editor, example):
    seeds = {editor.edit(example, "zoom in", seed=None).settings["seed"] for _ in range(2)}
    assert len(seeds) == 2 and all(isinstance(s, int) and s >= 0 for s in seeds)


def test_progress_follows_the_denoising_steps(tmp_path):
    """A multi-step base: the pipeline's step callback reports every step, in order, ending at 1."""
    from x2edit import X2EditPipeline
    from x2edit.pixel_vae import PixelShuffleVAE
    from x2edit.testing import tiny_flux_transformer, tiny_sentence_components

    components = tiny_sentence_components(0)
    components["vae"] = PixelShuffleVAE(factor=2)
    components["transformer"] = tiny_flux_transformer(0, in_channels=48, guidance_embeds=False)
    X2EditPipeline(**components).save_pretrained(tmp_path / "base")
    editor = Editor(AppConfig(base=str(tmp_path / "base")), tmp_path / "out")
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(tmp_path / "out" / "in.png")
    calls = []
    record = editor.edit(tmp_path / "out" / "in.png", "make it red", task="color_change", steps=3,
                         progress=lambda fraction, desc="": calls.append((fraction, desc)))
    steps = [(f, d) for f, d in calls if d.startswith("step")]
    assert steps == [(1 / 3, "step 1/3"), (2 / 3, "step 2/3"), (1.0, "step 3/3")]
    assert calls[0][1].startswith("loading") and record.settings["steps"] == 3
    assert editor.steps_setting() == (28, False)  # FLUX's default, free to change


def test_bad_input_is_refused_before_any_output(editor, example, tmp_path):
    broken = editor.output_dir / "uploads" / "broken.png"
    broken.parent.mkdir(exist_ok=True)
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not image data" * 8)
    outside = tmp_path / "elsewhere.png"
    shutil.copy(example, outside)
    before = output_files(editor)
    cases = [
        (dict(source=example, instruction="   "), "instruction is empty"),
        (dict(source=broken, instruction="zoom in"), "broken.png is corrupt or truncated"),
        (dict(source=outside, instruction="zoom in"), "not one the app can read"),
        (dict(source="/etc/hostname", instruction="zoom in"), "not one the app can read"),
        (dict(source=None, instruction="zoom in"), "no image"),
        (dict(source=example, instruction="zoom in", task="zoom"), "unknown task"),
        (dict(source=example, instruction="zoom in", steps=0), "steps must be"),
        (dict(source=example, instruction="zoom in", base="sdxl-turbo"), "unknown base"),
        (dict(source=example, instruction="zoom in", adapter="/tmp/other.safetensors"), "unknown adapter"),
        (dict(source=example, instruction="zoom in", loras=[(str(outside), 1.0)]), "not a LoRA of this app's index"),
        (dict(source=example, instruction="zoom in", fusion="median"), "unknown fusion"),
    ]
    for kwargs, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            editor.edit(**kwargs)
    assert output_files(editor) == before
    assert str(broken.parent) not in str(pytest.raises(ValueError, editor.read_image, broken).value)  # no app paths


def test_batch_edits_every_image_and_zips_the_results(editor, example):
    other = str(sorted((editor.output_dir / "examples").glob("tone_transform_*.png"))[0])
    calls = []
    records, archive = editor.edit_batch([example, other], "zoom in", progress=lambda f, desc="": calls.append(f))
    assert [r.instruction for r in records] == ["zoom in", "zoom in"]
    single = editor.edit(other, "zoom in")
    assert np.array_equal(pixels(records[1].result), pixels(single.result))  # a batch item is the single edit
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        assert len(names) == 2 and names[1].startswith("002_tone_transform")
        with z.open(names[0]) as f:
            assert np.array_equal(np.asarray(Image.open(f).convert("RGB"), np.int16), pixels(records[0].result))
    assert calls == sorted(calls) and calls[-1] == 1.0
    with pytest.raises(ValueError, match="no images"):
        editor.edit_batch([], "zoom in")


def test_lora_search_is_the_index_search(editor, lora_index):
    hits = editor.search_loras("a night scene")
    expected = search(lora_index, "a night scene", k=5)
    assert [(h["file"], h["score"]) for h in hits] == [(h["file"], h["score"]) for h in expected]
    assert len(hits) == 3 and all(h["file"] in editor.lora_files for h in hits)
    with pytest.raises(ValueError, match="query is empty"):
        editor.search_loras("  ")


def test_a_picked_lora_changes_the_edit_by_its_weight_and_is_removed_after(editor, example, lora_index):
    pipe = editor.pipeline()
    adapters = pipe.get_list_adapters()
    file = search(lora_index, "striped", k=1)[0]["file"]
    plain = editor.edit(example, "zoom in")
    with_lora = editor.edit(example, "zoom in", loras=[(file, 1.0)], fusion="average")
    weight_zero = editor.edit(example, "zoom in", loras=[(file, 0.0)], fusion="average")
    after = editor.edit(example, "zoom in")
    assert np.abs(pixels(with_lora.result) - pixels(plain.result)).max() > 0
    assert np.abs(pixels(weight_zero.result) - pixels(plain.result)).max() <= 1  # weight 0: no change
    assert np.array_equal(pixels(after.result), pixels(plain.result))  # nothing left behind
    assert pipe.get_list_adapters() == adapters
    assert with_lora.settings["loras"] == [[Path(file).name, 1.0]] and with_lora.settings["fusion"] == "average"


def test_without_an_index_the_panel_says_how_to_build_one(tmp_path):
    with pytest.raises(ValueError) as e:
        Editor(AppConfig(), tmp_path).search_loras("night")
    assert str(e.value) == INDEX_HELP and "x2edit lora index" in INDEX_HELP and "--lora-index" in INDEX_HELP


def test_file_sizes():
    assert parse_file_size("20mb") == 20 * 1024**2 and parse_file_size("500 KB") == 500 * 1024
    assert parse_file_size(1234) == 1234 and parse_file_size("1.5gb") == int(1.5 * 1024**3)
    for bad in ("20zz", "-1mb", "", "mb"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_file_size(bad)


def test_cli_checks_its_options_before_loading(tmp_path, capsys, monkeypatch):
    assert main(["app", "--max-file-size", "20zz"]) == 2
    assert "20zz" in capsys.readouterr().err
    assert main(["app", "--lora-index", str(tmp_path / "none.parquet")]) == 2
    assert "x2edit lora index" in capsys.readouterr().err
    assert main(["app", "--base", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "gradio", None)  # as if the app extra were not installed
    assert main(["app"]) == 2
    assert "pip install 'x2edit[app]'" in capsys.readouterr().err


def test_modes_offer_their_bases_and_the_diptych_mode_edits(editor, example):
    """The app's mode selector: each mode lists its own bases; a diptych base edits through X2EditDiptychPipeline."""
    assert editor.mode_choices() == ["edit", "diptych", "incontext"]
    assert "x2edit-tiny-fill" in editor.base_choices("diptych") and "x2edit-tiny-fill" not in editor.base_choices("edit")
    assert editor.mode_of("x2edit-tiny") == "edit" and editor.mode_of("x2edit-tiny-fill") == "diptych"
    record = editor.edit(example, "make the background blue", base="x2edit-tiny-fill")
    assert record.settings["mode"] == "diptych" and Path(record.result).is_file()
    assert type(editor.pipeline("x2edit-tiny-fill")).__name__ == "X2EditDiptychPipeline"


CAPTION = "[EDIT] make the background blue [LEFT] a red circle on white [RIGHT] a red circle on blue"


@pytest.mark.parametrize("base, steps", [("x2edit-tiny-fill", 1), ("x2edit-tiny-t2i", 10)])
def test_the_incontext_mode_makes_the_right_panel_under_the_set_caption(editor, example, base, steps, monkeypatch):
    """incontext: by Fill on the Fill base, SDEdit-style on the text-to-image base with its IC-LoRA; the record
    keeps the mode and the caption (the history reloads them)."""
    import x2edit.incontext

    captions, edit_as_set = [], x2edit.incontext.edit_as_set
    monkeypatch.setattr(x2edit.incontext, "edit_as_set", lambda p, i, c, **k: captions.append(c) or edit_as_set(p, i, c, **k))
    assert editor.base_choices("incontext") == ["x2edit-tiny-fill", "x2edit-tiny-t2i", "flux.1-fill-dev"]
    assert "x2edit-tiny-t2i" not in editor.base_choices("edit") + editor.base_choices("diptych")
    ticks = []
    record = editor.edit(example, "make the background blue", base=base, mode="incontext", caption=CAPTION,
                         progress=lambda f, desc="": ticks.append(desc))
    assert (record.settings["mode"], record.settings["caption"], record.settings["steps"]) == ("incontext", CAPTION, steps)
    assert Image.open(record.result).size == (64, 64)
    assert np.abs(pixels(record.result) - pixels(example)).max() > 0
    assert f"step {steps}/{steps}" in ticks  # the app's progress callback ran inside the set's loop
    assert captions == [CAPTION]  # made as a set under its caption, not by the editing layouts


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "incontext", "base": "x2edit-tiny-fill"}, "needs the set's joint caption"),
    ({"mode": "incontext", "base": "x2edit-tiny-fill", "caption": "a blue square, then a red one"}, "task tag"),
    ({"base": "x2edit-tiny-t2i", "caption": "[EDIT] x [RIGHT] b"}, "\\[LEFT\\] is missing"),
    ({"mode": "incontext", "base": "x2edit-tiny", "caption": CAPTION}, "x2edit-tiny is an editing base: use mode edit, or a base for mode incontext"),
    ({"mode": "edit", "base": "x2edit-tiny-t2i"}, "x2edit-tiny-t2i is a text-to-image base: use mode incontext, or a base for mode edit"),
    ({"mode": "collage"}, "unknown mode 'collage'"),
])
def test_bad_mode_settings_are_refused_before_any_edit(editor, example, kwargs, message):
    before = output_files(editor)
    with pytest.raises(ValueError, match=message):
        editor.edit(example, "make the background blue", **kwargs)
    assert output_files(editor) == before
