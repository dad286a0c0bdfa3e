"""Output and source sizes of X2EditPipeline: height/width, aspect ratio, max_area and its default."""

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from x2edit import X2EditPipeline
from x2edit.adapters import AdapterConfig, inject_adapters
from x2edit.testing import randomize_adapters, tiny_kontext_components

KW = dict(num_inference_steps=2, max_sequence_length=16, output_type="np")


def _pipe(config=None):
    pipe = X2EditPipeline(**tiny_kontext_components(0))
    pipe.set_progress_bar_config(disable=True)
    if config is not None:
        inject_adapters(pipe.transformer, config)
        randomize_adapters(pipe.transformer, std=0.2)
    return pipe


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _tokens(transformer_inputs, pipe, *args, **kwargs):
    """(target tokens, reference tokens) the transformer saw in the call."""
    with transformer_inputs(pipe) as seen:
        pipe(*args, **{**KW, "num_inference_steps": 1, "output_type": "latent", **kwargs})
    ids = seen[0]["img_ids"]
    return int((ids[:, 0] == 0).sum()), int((ids[:, 0] == 1).sum())


def test_another_aspect_ratio_encodes_the_source_at_its_own_as_stock_kontext(source_image, transformer_inputs):
    """A 24x16 output from a 24x20 source (width x height): the source is not stretched to 16x24 first;
    with no adapter the edit is stock FluxKontextPipeline's, pixel for pixel."""
    pipe = _pipe()
    assert _tokens(transformer_inputs, pipe, source_image, "make it red", height=24, width=16) == (6 * 4, 5 * 6)  # 4x4-pixel tokens
    ours = pipe(source_image, "make it red", height=24, width=16, generator=_gen(0), **KW).images
    stock = FluxKontextPipeline(**tiny_kontext_components(0))
    stock.set_progress_bar_config(disable=True)
    theirs = stock(image=source_image, prompt="make it red", height=24, width=16, max_area=24 * 16, _auto_resize=False,
                   generator=_gen(0), **KW).images
    assert ours.shape == (1, 24, 16, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_one_side_keeps_the_sources_aspect_ratio(source_image):
    pipe = _pipe()
    assert pipe(source_image, "make it red", width=48, max_area=48 * 48, **KW).images.shape == (1, 40, 48, 3)
    assert pipe(source_image, "make it red", height=40, max_area=48 * 48, **KW).images.shape == (1, 40, 48, 3)


def test_max_area_caps_output_and_source_and_never_enlarges(source_image, transformer_inputs):
    pipe = _pipe()
    # 480 px source capped at 240: scale 0.707 -> 14x16 -> 12x16 on the 4-pixel grid
    assert _tokens(transformer_inputs, pipe, source_image, "make it red", max_area=240) == (3 * 4, 3 * 4)
    assert _tokens(transformer_inputs, pipe, source_image, "make it red", max_area=10_000) == (5 * 6, 5 * 6)
    with pytest.raises(ValueError, match="capped at max_area=8 is smaller than the model's 4-pixel grid"):
        pipe(source_image, "make it red", max_area=8, **KW)


@pytest.mark.parametrize("config", [
    AdapterConfig(rank=4, num_experts=3, top_k=2, router="task", reading="residual"),
    AdapterConfig(rank=4, num_experts=3, top_k=2, router="task", source_start=0.5),
], ids=["residual", "source_start"])
def test_adapters_reading_the_source_on_the_output_grid_refuse_to_stretch_it(config, source_image, transformer_inputs):
    pipe = _pipe(config)
    kw = {k: v for k, v in KW.items() if k != "num_inference_steps" or config.source_start is None}
    with pytest.raises(ValueError, match="a 16x24 output would stretch the 24x20 source"):
        pipe(source_image, "make it red", task=0, height=24, width=16, **kw)
    with pytest.raises(ValueError, match="_auto_resize=True"):
        pipe(source_image, "make it red", task=0, _auto_resize=True, **kw)
    # The same aspect ratio at another size: the source is scaled (not stretched) onto the output's grid.
    assert _tokens(transformer_inputs, pipe, source_image, "make it red", task=0, height=40, width=48, max_area=48 * 48,
                   **{k: v for k, v in kw.items() if k != "num_inference_steps"}) == (10 * 12, 10 * 12)


def test_a_batch_of_sources_of_different_aspect_ratios_is_refused(source_image):
    square = Image.new("RGB", (24, 24))
    for auto_resize in (False, True):  # stock's snapping would stretch it too
        with pytest.raises(ValueError, match="source image 1 is 24x24, another aspect ratio than source 0 \\(24x20\\)"):
            _pipe()([source_image, square], ["a", "b"], _auto_resize=auto_resize, **KW)
    same_shape = source_image.resize((48, 40))  # scaled to the first source's size, not stretched
    assert _pipe()([source_image, same_shape], ["a", "b"], **KW).images.shape == (2, 20, 24, 3)


def test_the_default_max_area_caps_with_one_warning_and_max_area_overrides(source_image, caplog):
    pipe = _pipe()
    pipe.default_max_area = 240  # as a bundled model's x2edit_embedded.json sets it (x2edit-tiny: 64x64)
    with caplog.at_level("WARNING", logger="x2edit.pipeline"):
        assert pipe(source_image, "make it red", **KW).images.shape == (1, 12, 16, 3)
        assert pipe(source_image, "make it red", **KW).images.shape == (1, 12, 16, 3)
        assert pipe(source_image, "make it red", max_area=480, **KW).images.shape == (1, 20, 24, 3)
    assert [r.getMessage() for r in caplog.records] == [
        "the source image is 24x20, more than this pipeline's working area of 240 pixels (about 15x15): editing at "
        "16x12; pass max_area= (x2edit edit: --max-area) to change it (reported once per pipeline)"]


@pytest.mark.parametrize("kwargs,message", [
    ({"height": 0}, "height must be a positive integer"),
    ({"width": 2.5}, "width must be a positive integer"),
    ({"max_area": -1}, "max_area must be a positive integer"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt must be a positive integer"),
])
def test_bad_sizes_are_refused(kwargs, message, source_image):
    with pytest.raises(ValueError, match=message):
        _pipe()(source_image, "make it red", **kwargs, **KW)


def test_sizes_of_the_sources_own_aspect_ratio_are_never_refused():
    """Rounding (a derived side, the grid, the area cap) must not read as stretching: sources of every
    shape, capped or not, with no size or one side given."""
    pipe, rng = _pipe(), np.random.default_rng(0)
    for _ in range(2000):
        source = tuple(int(v) for v in rng.integers(8, 4000, 2))
        side = int(rng.integers(8, 4000))
        for height, width in [(None, None), (None, side), (side, None)]:
            try:
                out, encode = pipe._edit_size(source, height, width, int(rng.integers(64, 4000**2)), on_grid=True)
            except ValueError as e:
                assert "smaller than the model's 4-pixel grid" in str(e)  # a sliver capped to nothing
                continue
            assert encode == out


def test_auto_resize_encodes_the_source_at_a_kontext_resolution_as_stock(source_image, transformer_inputs,
                                                                         monkeypatch):
    """_auto_resize=True hands the source to stock's snapping (to the nearest of FLUX.1 Kontext's trained
    resolutions, made tiny here); x2edit's default False keeps it at its own size."""
    import diffusers.pipelines.flux.pipeline_flux_kontext as kontext

    monkeypatch.setattr(kontext, "PREFERRED_KONTEXT_RESOLUTIONS", [(24, 16), (16, 24)])  # (width, height)
    pipe = _pipe()
    assert _tokens(transformer_inputs, pipe, source_image, "make it red", _auto_resize=True) == (5 * 6, 4 * 6)
    assert _tokens(transformer_inputs, pipe, source_image, "make it red") == (5 * 6, 5 * 6)


@pytest.mark.parametrize("image,size", [(None, {"height": 24, "width": 32}),
                                        ("source", {"height": 40, "width": 48})], ids=["text_to_image", "edit"])
def test_a_requested_output_over_the_default_max_area_is_reported_too(image, size, source_image, caplog):
    pipe = _pipe()
    pipe.default_max_area = 480
    with caplog.at_level("WARNING", logger="x2edit.pipeline"):
        pipe(source_image if image else None, "make it red", **size, **KW)
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        f"the requested output is {size['width']}x{size['height']}, more than this pipeline's working area of 480 "
        f"pixels (about 21x21): editing at {'24x20' if image else '24x16'}"]
    caplog.clear()
    for call in ({}, {**size, "max_area": 480}):  # fresh pipelines: the warning comes once per pipeline
        pipe = _pipe()
        pipe.default_max_area = 480
        with caplog.at_level("WARNING", logger="x2edit.pipeline"):
            pipe(None, "make it red", **call, **KW)  # the default side (256) was not asked for; max_area was
        assert not caplog.records
