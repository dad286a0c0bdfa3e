"""IC-LoRA image sets: captions with their tags, tiling, whole-set generation, and image-conditioned generation
both training-free (SDEdit-style, on the text-to-image pipeline) and through a Fill pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image

from x2edit import X2EditPipeline
from x2edit.incontext import (
    check_caption,
    generate_set,
    inpaint_set,
    joint_caption,
    position_tags,
    split,
    tile,
)
from x2edit.pipeline_diptych import X2EditDiptychPipeline
from x2edit.testing import tiny_fill_components, tiny_kontext_components

KW = dict(num_inference_steps=3, max_sequence_length=16, guidance_scale=3.5)
CAPTION = joint_caption("EDIT", "make it red", ["a blue square", "a red square"])


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _panel(seed, w=16, h=16):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def t2i():
    pipe = X2EditPipeline(**tiny_kontext_components(0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_captions_carry_a_task_tag_and_the_position_tags_in_order():
    assert CAPTION == "[EDIT] make it red [LEFT] a blue square [RIGHT] a red square"
    assert position_tags(3) == ["[PANEL-1]", "[PANEL-2]", "[PANEL-3]"]
    check_caption("[MOVIE-SHOTS] a chase [PANEL-1] a [PANEL-2] b [PANEL-3] c", 3)
    for caption, n, message in [("make it red [LEFT] a [RIGHT] b", 2, "task tag"),
                                ("[EDIT] make it red [LEFT] a", 2, r"\[RIGHT\] is missing"),
                                ("[EDIT] x [RIGHT] b [LEFT] a", 2, r"\[RIGHT\] is missing"),
                                ("[EDIT] x [PANEL-1] a [PANEL-3] c", 3, r"\[PANEL-2\] is missing"),
                                ("[edit] x [LEFT] a [RIGHT] b", 2, "task tag")]:
        with pytest.raises(ValueError, match=message) as e:
            check_caption(caption, n)
        assert "\n" not in str(e.value)


def test_tile_and_split_are_inverse_and_refuse_mixed_sizes():
    panels = [_panel(i) for i in range(3)]
    canvas = tile(panels)
    assert canvas.shape == (16, 48, 3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(split(canvas, 3), panels))
    with pytest.raises(ValueError, match="one size"):
        tile([_panel(0), _panel(1, w=8)])


def test_a_whole_set_is_one_canvas_split_into_panels(t2i):
    panels = generate_set(t2i, CAPTION, 2, (16, 16), generator=_gen(), **KW)
    whole = t2i(prompt=CAPTION, height=16, width=32, generator=_gen(), output_type="pil", **KW).images[0]
    assert [p.size for p in panels] == [(16, 16)] * 2
    assert np.array_equal(np.hstack([np.asarray(p) for p in panels]), np.asarray(whole))
    with pytest.raises(ValueError, match="task tag"):
        generate_set(t2i, "a blue square and a red square", 2, (16, 16), **KW)


def test_sdedit_keeps_the_given_panel_and_conditions_the_made_one_on_it(t2i):
    left = _panel(1)
    out = inpaint_set(t2i, [left, None], CAPTION, generator=_gen(), **KW)
    assert np.array_equal(np.asarray(out[0]), np.asarray(left))  # kept, pixel for pixel
    other = inpaint_set(t2i, [_panel(2), None], CAPTION, generator=_gen(), **KW)
    # the made panel depends on the given one: the loop put the given panel back at every step
    assert np.abs(np.asarray(out[1], dtype=int) - np.asarray(other[1], dtype=int)).max() > 0
    free = generate_set(t2i, CAPTION, 2, (16, 16), generator=_gen(), **KW)
    assert np.abs(np.asarray(out[1], dtype=int) - np.asarray(free[1], dtype=int)).max() > 0


def test_edit_as_set_fits_the_source_and_runs_the_callers_callback_after_the_put_back(t2i):
    """The app's and the CLI's entry: [image | ?] at the working area; a step callback (the app's progress) runs
    on every step of the SDEdit loop without displacing the loop's own put-back (the given panel stays exact)."""
    from x2edit.incontext import edit_as_set

    seen = []
    made = edit_as_set(t2i, _panel(1, w=64, h=32), CAPTION, max_area=32 * 16, generator=_gen(),
                       callback_on_step_end=lambda p, i, t, k: seen.append((i, tuple(k))) or {}, **KW)
    assert made.size == (32, 16) and [i for i, _ in seen] == [0, 1, 2] and all(k == ("latents",) for _, k in seen)
    plain = edit_as_set(t2i, _panel(1, w=64, h=32), CAPTION, max_area=32 * 16, generator=_gen(), **KW)
    assert np.array_equal(np.asarray(made), np.asarray(plain))
    with pytest.raises(ValueError, match="needs the position tags"):
        edit_as_set(t2i, _panel(1), "[EDIT] make it red", generator=_gen(), **KW)


def test_fill_makes_the_masked_panel_as_a_stock_fill_call(t2i):
    fill = X2EditDiptychPipeline(**tiny_fill_components(0))
    fill.set_progress_bar_config(disable=True)
    left = _panel(3)
    out = inpaint_set(fill, [left, None], CAPTION, method="fill", generator=_gen(), **KW)
    pixels = torch.from_numpy(tile([left, np.zeros((16, 16, 3), np.uint8)])).permute(2, 0, 1)[None].float() / 255
    mask = torch.zeros(1, 1, 16, 32)
    mask[..., 16:] = 1
    ref = fill(prompt=CAPTION, image=pixels, mask_image=mask, height=16, width=32, generator=_gen(), output_type="np",
               **KW).images[0]
    want = (np.clip(ref, 0, 1) * 255).round().astype(np.uint8)[:, 16:]
    assert np.array_equal(np.asarray(out[1]), want) and np.array_equal(np.asarray(out[0]), np.asarray(left))
    for pipe, method, message in [(t2i, "fill", "needs a Fill pipeline"), (fill, "sdedit", "text-to-image pipeline"),
                                  (t2i, "repaint", "unknown method")]:
        with pytest.raises(ValueError, match=message):
            inpaint_set(pipe, [left, None], CAPTION, method=method, **KW)
    with pytest.raises(ValueError, match="some panels given and some to make"):
        inpaint_set(t2i, [left, left], CAPTION, **KW)
    with pytest.raises(ValueError, match="grid"):
        inpaint_set(t2i, [_panel(0, w=6, h=6), None], CAPTION, **KW)


def test_a_one_step_fill_base_starts_the_made_panel_from_the_given_one():
    """x2edit-tiny-fill's reading: the panel to make starts as a copy of the nearest given panel at the base's
    noise level, one step; a model that changes nothing returns that copy."""
    from x2edit.pipeline_diptych import fill_transformer_from
    from x2edit.pixel_vae import PixelShuffleVAE
    from x2edit.testing import tiny_flux_transformer, tiny_sentence_components

    comps = tiny_sentence_components(0)
    comps["vae"] = PixelShuffleVAE(factor=2)
    comps["transformer"] = fill_transformer_from(tiny_flux_transformer(0, in_channels=48), 12, 2)
    pipe = X2EditDiptychPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    pipe.default_source_start = 0.5
    torch.nn.init.zeros_(pipe.transformer.proj_out.weight)
    torch.nn.init.zeros_(pipe.transformer.proj_out.bias)
    left = _panel(4)
    out = inpaint_set(pipe, [left, None, None], "[SET] x [PANEL-1] a [PANEL-2] b [PANEL-3] c", method="fill",
                      max_sequence_length=16)
    assert all(np.array_equal(np.asarray(o), np.asarray(left)) for o in out)
