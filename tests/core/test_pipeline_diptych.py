"""X2EditDiptychPipeline: stock FluxFill behaviour with stock arguments, and the diptych edit (canvas, mask,
template, crop, sizes, one-step start, routing, adapters, refusals) on tiny seeded components."""

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline
from PIL import Image

from x2edit.adapters import AdapterConfig, adapter_names, inject_adapters
from x2edit.pipeline_diptych import (
    DIPTYCH_TEMPLATE,
    X2EditDiptychPipeline,
    fill_channels,
    fill_transformer_from,
)
from x2edit.pixel_vae import PixelShuffleVAE
from x2edit.testing import (
    randomize_adapters,
    tiny_fill_components,
    tiny_flux_transformer,
    tiny_sentence_components,
)

KW = dict(num_inference_steps=2, max_sequence_length=16)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _pipes(seed=0):
    ours, stock = X2EditDiptychPipeline(**tiny_fill_components(seed)), FluxFillPipeline(**tiny_fill_components(seed))
    for p in (ours, stock):
        p.set_progress_bar_config(disable=True)
    return ours, stock


def _sentence_fill(seed=0):
    """The x2edit-tiny layout (one sentence encoder, the exact pixel VAE) with a Fill transformer."""
    comps = tiny_sentence_components(seed)
    comps["vae"] = PixelShuffleVAE(factor=2)  # latents (12, H/2, W/2): encode-decode is exact
    comps["transformer"] = fill_transformer_from(tiny_flux_transformer(seed, in_channels=48), 12, 2)
    pipe = X2EditDiptychPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(w=40, h=24, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("output_type", ["np", "pt", "latent"])
def test_stock_arguments_give_stock_output(output_type):
    ours, stock = _pipes()
    image = torch.rand(1, 3, 32, 32, generator=_gen(1))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    kw = dict(prompt="a cat", image=image, mask_image=mask, guidance_scale=5.0, height=32, width=32,
              output_type=output_type, **KW)
    a, b = ours(**kw, generator=_gen()).images, stock(**kw, generator=_gen()).images
    assert a.shape == b.shape
    assert np.abs(np.asarray(a) - np.asarray(b)).max() == 0


def test_edit_is_the_right_half_of_a_fill_call_on_the_diptych():
    """edit() = stock Fill on [source | source] with the right half masked and the templated prompt, cropped."""
    ours, stock = _pipes()
    src = _image(40, 24)
    out = ours.edit(src, "make the square red", output_type="np", generator=_gen(3), guidance_scale=5.0, **KW).images
    pixels = torch.from_numpy(np.array(src)).permute(2, 0, 1)[None].float() / 255
    canvas = torch.cat([pixels, pixels], -1)
    mask = torch.zeros(1, 1, 24, 80)
    mask[..., 40:] = 1
    ref = stock(prompt=DIPTYCH_TEMPLATE.format(instruction="make the square red"), image=canvas, mask_image=mask,
                height=24, width=80, guidance_scale=5.0, output_type="np", generator=_gen(3), **KW).images
    assert out.shape == (1, 24, 40, 3)
    np.testing.assert_allclose(out, ref[:, :, 40:], atol=1e-6)
    # the template matters: a bare instruction gives another image
    bare = ours.edit(src, "make the square red", template="{instruction}", output_type="np", generator=_gen(3),
                     guidance_scale=5.0, **KW).images
    assert np.abs(bare - out).max() > 1e-4


def test_any_size_and_aspect_within_max_area():
    ours, _ = _pipes()
    tall = ours.edit(_image(24, 56), "x", **KW).images[0]
    assert tall.size == (24, 56)  # any aspect ratio, not ICEdit's 512 width
    capped = ours.edit(_image(64, 32), "x", max_area=512, **KW).images[0]
    assert capped.size[0] * capped.size[1] <= 512 and capped.size[0] % 4 == 0 and capped.size[1] % 4 == 0
    assert ours.edit(_image(64, 32), "x", width=32, **KW).images[0].size == (32, 16)  # one side keeps the ratio


def test_batches_keep_each_source_with_its_instruction():
    ours, _ = _pipes()
    a, b = _image(seed=1), _image(seed=2)
    together = ours.edit([a, b], ["make it red", "make it blue"], num_images_per_prompt=2, output_type="pt",
                         generator=[_gen(i) for i in range(4)], **KW).images
    assert together.shape == (4, 3, 24, 40)
    alone = ours.edit(b, "make it blue", output_type="pt", generator=_gen(2), **KW).images
    torch.testing.assert_close(together[2:3], alone, atol=1e-5, rtol=0)


def test_one_step_start_from_the_source_returns_it_at_full_size_when_the_model_changes_nothing():
    """A base trained to edit in one step from the source starts from [source | source] at that noise level;
    a model predicting zero velocity lands on the source, returned at the caller's size, pixel for pixel."""
    pipe = _sentence_fill()
    pipe.default_source_start = 0.5
    torch.nn.init.zeros_(pipe.transformer.proj_out.weight)
    torch.nn.init.zeros_(pipe.transformer.proj_out.bias)
    src = _image(160, 96, seed=5)
    out = pipe.edit(src, "make it red", max_area=24 * 40, max_sequence_length=16).images[0]
    assert out.size == src.size
    assert np.array_equal(np.asarray(out), np.asarray(src))
    with pytest.raises(ValueError, match="one step"):
        pipe.edit(src, "make it red", num_inference_steps=4)
    with pytest.raises(ValueError, match="one step"):
        pipe.edit(src, "make it red", strength=0.5)


def test_fill_transformer_from_starts_as_the_original():
    """Zero-initialised condition channels: the Fill copy on [x, any condition] equals the original on x."""
    torch.manual_seed(0)
    base = tiny_flux_transformer(0)
    c = base.config.in_channels // 4
    fill = fill_transformer_from(base, c, 2)
    assert fill.config.in_channels == fill_channels(c, 2) == 8 * c + 16
    x, cond = torch.randn(1, 6, 4 * c), torch.randn(1, 6, fill.config.in_channels - 4 * c)
    kw = dict(timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]), pooled_projections=torch.randn(1, 32),
              encoder_hidden_states=torch.randn(1, 3, 32), txt_ids=torch.zeros(3, 3), img_ids=torch.zeros(6, 3),
              return_dict=False)
    torch.testing.assert_close(fill(hidden_states=torch.cat([x, cond], 2), **kw)[0], base(hidden_states=x, **kw)[0])
    with pytest.raises(ValueError, match="Fill model already"):
        fill_transformer_from(fill, c, 2)


def test_moe_lora_routes_by_the_instruction_not_the_template():
    pipe = _sentence_fill()
    inject_adapters(pipe.transformer, AdapterConfig(rank=4, num_experts=3, top_k=2, targets="attn_ff"))
    randomize_adapters(pipe.transformer, std=0.2)
    seen = []
    pipe.set_task_classifier(lambda prompts: seen.extend(prompts) or ["color_change"] * len(prompts))
    out = pipe.edit(_image(), "make it red", output_type="np", generator=_gen(), **KW).images
    assert seen == ["make it red"]
    other = pipe.edit(_image(), "make it red", task="style_change", output_type="np", generator=_gen(), **KW).images
    assert np.abs(out - other).max() > 1e-5  # the task reaches the routers


def test_save_and_load_through_the_registry(tmp_path):
    from x2edit.registry import load_pipeline

    pipe = _sentence_fill()
    inject_adapters(pipe.transformer, AdapterConfig(kind="lora", rank=4))
    randomize_adapters(pipe.transformer, std=0.2)
    pipe.default_guidance_scale = 1.0
    before = pipe.edit(_image(), "make it red", output_type="np", generator=_gen(), **KW).images
    pipe.save_pretrained(tmp_path / "fill")
    (tmp_path / "fill" / "x2edit_embedded.json").write_text('{"template": "Diptych: {instruction}", "guidance_scale": 1.0}')
    loaded = load_pipeline(tmp_path / "fill")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, X2EditDiptychPipeline) and adapter_names(loaded.transformer) == ["default"]
    assert loaded.diptych_template == "Diptych: {instruction}"
    after = loaded.edit(_image(), "make it red", template=DIPTYCH_TEMPLATE, output_type="np", generator=_gen(),
                        **KW).images
    np.testing.assert_allclose(after, before, atol=1e-5)
    (tmp_path / "fill" / "x2edit_embedded.json").write_text('{"reference_tokens": false}')
    with pytest.raises(ValueError, match="another kind of pipeline"):
        load_pipeline(tmp_path / "fill")


def test_bad_input_is_refused_in_one_line():
    ours, _ = _pipes()
    image = torch.rand(1, 3, 32, 32)
    cases = [
        (lambda: ours(prompt="a", image=image, mask_image=torch.ones(1, 1, 32, 24), **KW), "mask_image is 24x32"),
        (lambda: ours(prompt="a", image=_image(40, 24), mask_image=Image.new("L", (24, 40)), **KW), "the mask must"),
        (lambda: ours.edit(_image(), "  ", **KW), "instruction is empty"),
        (lambda: ours.edit(None, "make it red", **KW), "source image"),
        (lambda: ours.edit(_image(), "make it red", template="no slot", **KW), "{instruction}"),
        (lambda: ours.edit(_image(), "make it red", strength=1.5, **KW), "strength"),
        (lambda: ours.edit([_image(), _image()], ["a", "b", "c"], **KW), "3 instructions"),
        (lambda: ours.edit(_image(), "make it red", task="no_such_task", **KW), "no_such_task"),
        # a source over the hard cap (16.8 MP) is refused, as a PIL image or a tensor; between max_area and the
        # cap it is edited at max_area with one warning, as Kontext's max_area does (test_pipeline_diptych's
        # size tests)
        (lambda: ours.edit(Image.new("RGB", (4097, 4097)), "make it red", **KW), "over the 16.8 MP limit"),
        (lambda: ours.edit(torch.zeros(1, 3, 4097, 4097), "make it red", **KW), "over the 16.8 MP limit"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def test_icedit_lora_layout_loads_on_a_fill_size_model_and_is_refused_elsewhere():
    """ICEdit's released LoRA (diffusers/PEFT keys, rank 32, x_embedder included) on a FLUX.1 Fill-size
    transformer on the meta device; the same file on a FLUX.1 / Kontext-size model is a LoRA for another base."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from x2edit.adapters import load_community_lora

    r = 32
    names = {"x_embedder": (384, 3072), "transformer_blocks.0.attn.to_q": (3072, 3072),
             "single_transformer_blocks.0.proj_mlp": (3072, 12288)}
    g = _gen(7)
    state = {}
    for name, (i, o) in names.items():
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(r, i, generator=g) * 0.01
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(o, r, generator=g) * 0.01

    def model(in_channels):
        with init_empty_weights():
            m = FluxTransformer2DModel(num_layers=1, num_single_layers=1, in_channels=in_channels, out_channels=64)
        for name in names:  # real (zero) weights where the LoRA goes, so its values can be read back
            parent, _, child = name.rpartition(".")
            old = m.get_submodule(name)
            new = torch.nn.Linear(old.in_features, old.out_features)
            torch.nn.init.zeros_(new.weight)
            torch.nn.init.zeros_(new.bias)
            setattr(m.get_submodule(parent) if parent else m, child, new)
        return m

    fill = model(384)
    assert sorted(load_community_lora(fill, dict(state), "icedit")) == sorted(names)
    lora = fill.x_embedder.adapters["icedit"]
    probe = torch.randn(384, generator=g)
    want = state["transformer.x_embedder.lora_B.weight"] @ (state["transformer.x_embedder.lora_A.weight"] @ probe)
    torch.testing.assert_close(lora.scaling * lora.lora_B[0] @ (lora.lora_A[0] @ probe), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="another base model") as e:
        load_community_lora(model(64), dict(state), "icedit")
    assert "\n" not in str(e.value)


def test_a_plain_diptych_lora_exports_to_stock_fill_x_embedder_included(tmp_path):
    """A plain LoRA on a Fill model (x_embedder among its targets, as ICEdit's) exported in diffusers' format
    loads in stock FluxFillPipeline (diffusers + peft) and gives x2edit's output."""
    from x2edit.adapters import export_diffusers_lora

    ours, stock = _pipes()
    targets = ["x_embedder", r"transformer_blocks\.\d+\.attn\.(to_q|to_v)", r"single_transformer_blocks\.\d+\.proj_mlp"]
    inject_adapters(ours.transformer, AdapterConfig(kind="lora", rank=4, targets=targets))
    randomize_adapters(ours.transformer, std=0.3)
    path = export_diffusers_lora(ours.transformer, tmp_path)
    stock.load_lora_weights(path)
    assert any("x_embedder" in name for name, _ in stock.transformer.named_modules() if "lora_A" in name)
    image = torch.rand(1, 3, 32, 32, generator=_gen(2))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:] = 1
    kw = dict(prompt="a cat", image=image, mask_image=mask, height=32, width=32, output_type="np", **KW)
    a, b = ours(**kw, generator=_gen()).images, stock(**kw, generator=_gen()).images
    bare = FluxFillPipeline(**tiny_fill_components(0))
    bare.set_progress_bar_config(disable=True)
    assert np.abs(a - bare(**kw, generator=_gen()).images).max() > 1e-3  # the LoRA changes the output
    np.testing.assert_allclose(a, b, atol=1e-5)
