"""Edits read on the source's grid come back at the caller's resolution (the source plus the model's
change), and a base trained to edit (``edit_base``) records how it reads its source."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from x2edit import X2EditPipeline
from x2edit.adapters import AdapterConfig, inject_adapters
from x2edit.pixel_vae import PixelShuffleVAE
from x2edit.testing import tiny_flux_transformer, tiny_sentence_components

ONE_STEP = AdapterConfig(rank=4, num_experts=3, top_k=2, router="task", reading="residual", source_start=0.5)
DIRECT = AdapterConfig(rank=4, num_experts=3, top_k=2, router="task", source_start=0.5)  # one call per step
KW = dict(max_sequence_length=16, guidance_scale=1.0, task="color_change")


def _pipe(adapter=ONE_STEP):
    """A tiny pixel-space pipeline (exact VAE: 'unchanged' is exact) with a working area of 16x16 pixels."""
    comps = tiny_sentence_components(0)
    comps["vae"] = PixelShuffleVAE(factor=2)
    comps["transformer"] = tiny_flux_transformer(0, in_channels=48, guidance_embeds=False)
    pipe = X2EditPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    pipe.default_max_area = 16 * 16
    if adapter is not None:
        inject_adapters(pipe.transformer, adapter)
    return pipe


def _photo(w=80, h=60, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _change_only_token(pipe, token: int, amount: float):
    """Make the model change exactly one target token by ``amount`` (in latent units), nothing else."""
    real = pipe.transformer.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        v = torch.zeros_like(out[0] if isinstance(out, tuple) else out.sample)
        v[:, token] = -amount / 0.5  # x0 = sample - sigma * v at sigma 0.5
        return (v,) if isinstance(out, tuple) else type(out)(sample=v)

    pipe.transformer.forward = forward


def test_an_edit_comes_back_at_the_sources_size_and_unchanged_pixels_stay_exact():
    pipe, photo = _pipe(), _photo()
    out = pipe(image=photo, prompt="make it red", **KW).images[0]
    assert out.size == photo.size  # 80x60, though the model works at 16x12
    np.testing.assert_array_equal(np.asarray(out), np.asarray(photo))  # a fresh residual adapter changes nothing
    for kind, shape in (("np", (1, 60, 80, 3)), ("pt", (1, 3, 60, 80))):
        assert tuple(pipe(image=photo, prompt="make it red", output_type=kind, **KW).images.shape) == shape
    assert pipe(image=photo, prompt="make it red", height=30, **KW).images[0].size == (40, 30)
    assert pipe(image=photo, prompt="make it red", output_type="latent", **KW).images.shape[1] == (12 // 4) * (16 // 4)


def test_the_change_is_upsampled_where_the_model_made_it_and_nowhere_else():
    pipe, photo = _pipe(DIRECT), _photo()
    _change_only_token(pipe, token=0, amount=0.5)  # the top-left 4x4 working pixels, 20x20 of the photo
    out = np.asarray(pipe(image=photo, prompt="make it red", **KW).images[0]).astype(int)
    changed = np.abs(out - np.asarray(photo).astype(int)).max(-1) > 0
    assert changed[:15, :15].all()  # inside the token's footprint (bilinear: its edge blends)
    assert not changed[:, 25:].any() and not changed[25:, :].any()


def test_the_change_floor_keeps_the_picture_where_the_model_changes_little():
    pipe, photo = _pipe(DIRECT), _photo()
    _change_only_token(pipe, token=0, amount=0.02)  # about 2.5 grey levels
    source = np.asarray(photo).astype(int)
    kept = lambda: np.abs(np.asarray(pipe(image=photo, prompt="x", **KW).images[0]).astype(int) - source).max()  # noqa: E731
    assert kept() > 0
    pipe.change_floor = 0.015  # in [0, 1] pixel units: the 0.01 change (0.02 in [-1, 1]) is below it
    assert kept() == 0


def test_a_base_without_reference_tokens_starts_from_the_source_and_sees_only_it(transformer_inputs):
    pipe, photo = _pipe(adapter=None), _photo(16, 12)
    pipe.default_source_start, pipe.reference_tokens = 0.5, False
    with transformer_inputs(pipe) as seen:
        out = pipe(image=photo, prompt="make it red", output_type="np", **KW).images
    assert len(seen) == 1 and seen[0]["hidden_states"].shape[1] == (12 // 4) * (16 // 4)  # target tokens only
    torch.testing.assert_close(seen[0]["timestep"], torch.full_like(seen[0]["timestep"], 0.5))
    assert out.shape == (1, 12, 16, 3)
    pipe.default_source_start = None
    with pytest.raises(ValueError, match="no noise level to start from"):
        pipe(image=photo, prompt="make it red", **KW)


def test_an_adapter_on_an_editing_base_inherits_its_one_step_form():
    pipe = _pipe(adapter=AdapterConfig(rank=4, num_experts=3, top_k=2, router="task"))
    assert pipe.source_start() is None
    pipe.default_source_start = 0.4
    assert pipe.source_start() == 0.4
    pipe.reference_tokens = False
    residual = _pipe()
    residual.default_source_start, residual.reference_tokens = 0.5, False
    with pytest.raises(ValueError, match="reference tokens"):
        residual(image=_photo(16, 12), prompt="make it red", **KW)


def test_a_saved_editing_base_is_loaded_with_the_settings_it_records(tmp_path):
    from x2edit.registry import EMBEDDED_META, load_pipeline

    _pipe(adapter=None).save_pretrained(tmp_path)
    (tmp_path / EMBEDDED_META).write_text(json.dumps({"source_start": 0.5, "reference_tokens": False,
                                                      "num_inference_steps": 1, "max_area": 256}))
    pipe = load_pipeline(tmp_path)
    assert (pipe.default_source_start, pipe.reference_tokens, pipe.default_max_area) == (0.5, False, 256)
    assert pipe.text_encoder is not None  # the directory's own text encoder (no "text_encoder" key to replace it)
    (tmp_path / EMBEDDED_META).write_text(json.dumps({"source_start": 1.5}))
    with pytest.raises(ValueError, match="source_start must be a noise level"):
        load_pipeline(tmp_path)
    (tmp_path / EMBEDDED_META).write_text(json.dumps({"reference_tokens": "no"}))
    with pytest.raises(ValueError, match="reference_tokens must be true or false"):
        load_pipeline(tmp_path)
