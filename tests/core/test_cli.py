"""The `x2edit` command line: help, info, edit end to end on a saved tiny pipeline, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from x2edit import X2EditPipeline
from x2edit.adapters import AdapterConfig, inject_adapters, save_adapter
from x2edit.cli import COMMANDS, main
from x2edit.testing import randomize_adapters, tiny_sentence_components


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "x2edit.cli", "--help"], capture_output=True, text=True, check=True)
    for name in COMMANDS:
        assert name in out.stdout


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["base_models"]) == {"x2edit-tiny", "x2edit-tiny-fill", "x2edit-tiny-t2i", "flux.1-kontext-dev", "flux.1-dev",
                                        "flux.1-fill-dev"}
    assert len(info["tasks"]) == 15 and info["versions"]["torch"]
    assert info["kernel_backend"] in ("auto", "torch", "triton")


def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "flux.1-kontext-dev" in out and "subject_deletion" in out


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A saved tiny pipeline directory, and a MoE-LoRA adapter file made for it."""
    d = tmp_path_factory.mktemp("tiny")
    pipe = X2EditPipeline(**tiny_sentence_components(0))
    pipe.save_pretrained(d / "base")
    inject_adapters(pipe.transformer, AdapterConfig(rank=4, num_experts=3, top_k=2))
    randomize_adapters(pipe.transformer)
    save_adapter(pipe.transformer, d / "moe.safetensors")
    inject_adapters(pipe.transformer, AdapterConfig(rank=4, num_experts=3, top_k=2, max_sequence_length=16), "len16")
    randomize_adapters(pipe.transformer, "len16")
    save_adapter(pipe.transformer, d / "moe16.safetensors", "len16")  # trained with 16-token instructions
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(d / "src.png")
    return d


def test_edit_end_to_end(tiny_base, capsys):
    out = tiny_base / "out.png"
    args = ["edit", "--image", str(tiny_base / "src.png"), "--instruction", "make the square red", "--out", str(out),
            "--base", str(tiny_base / "base"), "--adapter", str(tiny_base / "moe.safetensors"), "--steps", "2",
            "--seed", "3"]
    assert main(args) == 0
    assert "task=color_change" in capsys.readouterr().out  # classified by the bundled MiniLM classifier
    first = np.asarray(Image.open(out))
    assert first.shape == (24, 32, 3)
    out.unlink()
    assert main([*args, "--task", "color_change"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), first)  # same seed, same task, same pixels


@pytest.mark.parametrize("change,message", [
    ({"--image": "absent.png"}, "image not found"),
    ({"--image": "junk.png"}, "not an image"),
    ({"--image": "signature_then_garbage.png"}, "corrupt or truncated"),
    ({"--instruction": "  "}, "instruction is empty"),
    ({"--task": "recolor"}, "unknown task"),
    ({"--out": "out.gif"}, "--out must end in"),
    ({"--out": "missing_dir/out.png"}, "output directory does not exist"),
    ({"--steps": "0"}, "--steps must be >= 1"),
    ({"--base": "flux.1-fill-dev", "--mode": "edit"}, "flux.1-fill-dev is a Fill model: use mode diptych or incontext"),
    ({"--base": "base", "--mode": "diptych"}, "is an editing base: use mode edit"),
    ({"--base": "nonexistent_dir/"}, "not found"),
    ({"--adapter": "absent.safetensors"}, "adapter file not found"),
    ({"--adapter": "junk.png"}, "not a readable safetensors"),
    ({"--lora": "absent.safetensors"}, "LoRA file not found"),
    ({"--lora": "junk.png"}, "not a readable safetensors"),
    ({"--lora": "moe.safetensors"}, "is an x2edit adapter: pass it with --adapter"),
    ({"--max-area": "0"}, "--max-area must be >= 1"),
    ({"--mode": "incontext"}, "needs the set's joint caption"),
    ({"--mode": "incontext", "--caption": "a blue square, then a red one"}, "task tag"),
    ({"--caption": "[EDIT] x [LEFT] a [RIGHT] b"}, "--caption is the joint caption of --mode incontext"),
    ({"--best-of": "2"}, "--best-of N needs a judge"),
    ({"--best-of": "0"}, "--best-of must be >= 1"),
    ({"--judge": "absent_vlm"}, "--judge picks among --best-of N outputs"),
    ({"--best-of": "2", "--judge": "absent_vlm"}, "is not a directory"),
    ({"--device": "cuda:7"}, "not available here" if not torch.cuda.is_available() else "does not exist"),
    ({"--device": "gpu"}, "unknown device 'gpu'"),
])
def test_edit_bad_input_exits_2_with_one_line_and_no_output(tiny_base, capsys, monkeypatch, change, message):
    (tiny_base / "junk.png").write_bytes(b"garbage")
    (tiny_base / "signature_then_garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    if "--base" not in change:  # refused before any model is loaded
        import x2edit.registry

        monkeypatch.setattr(x2edit.registry, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    opts = {"--image": "src.png", "--instruction": "make it red", "--out": "bad_out.png",
            "--base": str(tiny_base / "base"), "--steps": "1", **change}
    argv = ["edit"]
    for k, v in opts.items():
        argv += [k, v if k in ("--instruction", "--steps", "--task", "--max-area", "--device", "--mode", "--best-of",
                               "--caption")
                 or v.startswith(("/", "x2edit", "flux")) else str(tiny_base / v)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tiny_base / opts["--out"]).exists()
    assert not list(tiny_base.glob(".*tmp*"))


def test_edit_encodes_the_instruction_to_the_adapters_trained_length(tiny_base, monkeypatch):
    """x2edit edit passes no max_sequence_length: the pipeline takes the adapter's (else 512, cut to the
    tokenizer's 77 here)."""
    from diffusers import FluxTransformer2DModel

    lengths, forward = [], FluxTransformer2DModel.forward

    def spy(self, *args, **kwargs):
        lengths.append(kwargs["encoder_hidden_states"].shape[1])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "forward", spy)
    for adapter, expected in [("moe.safetensors", 77), ("moe16.safetensors", 16)]:
        lengths.clear()
        assert main(["edit", "--image", str(tiny_base / "src.png"), "--instruction", "make it red", "--out",
                     str(tiny_base / "len.png"), "--base", str(tiny_base / "base"), "--adapter", str(tiny_base / adapter),
                     "--steps", "1", "--task", "color_change"]) == 0
        assert lengths == [expected]


def test_edit_reads_a_photo_at_the_embedded_models_working_size_and_returns_it_at_full_size(tmp_path, capsys, caplog):
    """x2edit-tiny knows 64 px Shape World: a 3000x2000 photo used to be edited at full size (61 s, 1.8 GB), then
    came back as a 72x48 thumbnail. The model reads it at 64x64's area (72x48 on its grid) and the result is the
    photo at 3000x2000 plus the model's change, upsampled: no warning, since nothing is lost. --max-area sets
    the working area, not the output's size."""
    stripes = np.where(np.arange(3000) % 2, 192, 64).astype(np.uint8)  # detail no 72x48 image can carry
    photo = np.stack([np.tile(stripes, (2000, 1))] * 3, axis=-1)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    argv = ["edit", "--image", str(tmp_path / "photo.png"), "--instruction", "make the square red",
            "--out", str(tmp_path / "out.png")]
    with caplog.at_level("WARNING", logger="x2edit.pipeline"):
        assert main(argv) == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == photo.shape and not caplog.records
    assert "3000x2000" in capsys.readouterr().out
    # the photo's own pixels plus a smooth change: the 1-pixel stripes survive (an upsampled 72x48 loses them)
    change = out.astype(int) - photo
    assert np.abs(np.diff(change, axis=1)).mean() < 4 < np.abs(np.diff(photo.astype(int), axis=1)).mean()
    assert main([*argv, "--max-area", "8192"]) == 0
    assert Image.open(tmp_path / "out.png").size == (3000, 2000)


@pytest.mark.parametrize("base", [[], ["--base", "x2edit-tiny-t2i"]], ids=["fill", "t2i"])
def test_edit_incontext_makes_the_right_panel_of_a_set_offline(tmp_path, capsys, monkeypatch, base):
    """x2edit edit --mode incontext on the embedded bases: the right panel of [source | ?] under the caption, by
    Fill (x2edit-tiny-fill, one step) or SDEdit-style (x2edit-tiny-t2i with its IC-LoRA, its own 10 steps)."""
    import x2edit.incontext
    from x2edit.pipeline import X2EditPipeline

    steps, call = [], X2EditPipeline.__call__
    monkeypatch.setattr(X2EditPipeline, "__call__",
                        lambda self, *a, **k: steps.append(k.get("num_inference_steps")) or call(self, *a, **k))
    captions, edit_as_set = [], x2edit.incontext.edit_as_set
    monkeypatch.setattr(x2edit.incontext, "edit_as_set", lambda p, i, c, **k: captions.append(c) or edit_as_set(p, i, c, **k))
    src = tmp_path / "src.png"
    Image.new("RGB", (96, 64), (200, 40, 40)).save(src)
    out = tmp_path / "out.png"
    assert main(["edit", "--mode", "incontext", *base, "--image", str(src), "--instruction", "make the background blue",
                 "--caption", "[EDIT] make the background blue [LEFT] a red scene [RIGHT] a red scene on blue",
                 "--out", str(out)]) == 0
    made = np.asarray(Image.open(out))
    assert "incontext" in capsys.readouterr().out and made.shape[0] * made.shape[1] <= 64 * 64
    assert steps == ([10] if base else [])  # the text-to-image bundle's own step count; Fill is no X2EditPipeline
    assert captions == ["[EDIT] make the background blue [LEFT] a red scene [RIGHT] a red scene on blue"]
    assert (made != (200, 40, 40)).any()  # the right panel was made, not the given one copied back


def test_klora_takes_exactly_two_loras_before_anything_loads(tmp_path, capsys):
    """K-LoRA (the paper's) fuses a subject LoRA and a style LoRA: any other count is refused in one line."""
    src = tmp_path / "src.png"
    Image.new("RGB", (32, 32)).save(src)
    base = ["edit", "--image", str(src), "--instruction", "x", "--out", str(tmp_path / "o.png"), "--fusion", "klora"]
    for extra in (["--lora", str(tmp_path / "a.safetensors")], ["--auto-lora", str(tmp_path / "absent.parquet")]):
        assert main([*base, *extra]) == 2
        assert "klora (K-LoRA) fuses exactly two LoRAs" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
