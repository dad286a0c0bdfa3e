"""X2EditPipeline end to end on tiny seeded FLUX components (CLIP+T5 and sentence-encoder layouts)."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from x2edit import X2EditPipeline
from x2edit.adapters import AdapterConfig, adapter_names, inject_adapters
from x2edit.testing import randomize_adapters, tiny_kontext_components, tiny_sentence_components

KW = dict(num_inference_steps=2, max_sequence_length=16, output_type="np")


def _pipe(layout="kontext", router="token_topk", seed=0):
    comps = tiny_kontext_components(seed) if layout == "kontext" else tiny_sentence_components(seed)
    pipe = X2EditPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    inject_adapters(pipe.transformer, AdapterConfig(rank=4, num_experts=3, top_k=2, router=router))
    randomize_adapters(pipe.transformer, std=0.2)
    return pipe


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("layout", ["kontext", "sentence"])
def test_edit_keeps_size_is_deterministic_and_routes_by_task(layout, source_image):
    pipe = _pipe(layout)
    a = pipe(source_image, "make it red", task="color_change", generator=_gen(0), **KW).images
    again = pipe(source_image, "make it red", task="color_change", generator=_gen(0), **KW).images
    other_seed = pipe(source_image, "make it red", task="color_change", generator=_gen(1), **KW).images
    other_task = pipe(source_image, "make it red", task="style_change", generator=_gen(0), **KW).images
    assert a.shape == (1, 20, 24, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, again)
    assert np.abs(a - other_seed).max() > 1e-3
    assert np.abs(a - other_task).max() > 1e-4  # the task embedding changes the experts' mix


def test_output_types_batches_and_images_per_prompt(source_image):
    pipe = _pipe()
    pil = pipe(source_image, "make it red", task="color_change", **{**KW, "output_type": "pil"}).images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (24, 20)
    pt = pipe(source_image, "make it red", task="color_change", **{**KW, "output_type": "pt"}).images
    assert pt.shape == (1, 3, 20, 24)
    latent = pipe(source_image, "make it red", task="color_change", **{**KW, "output_type": "latent"}).images
    assert latent.shape == (1, (20 // 4) * (24 // 4), 16)  # packed 2x2 latent tokens
    out = pipe([source_image, source_image], ["make it red", "remove the circle"],
               task=["color_change", "subject_deletion"], num_images_per_prompt=2, **KW).images
    assert out.shape == (4, 20, 24, 3)


def test_task_classifier_is_used_when_no_task_is_given(source_image):
    pipe = _pipe()
    seen = []

    def classifier(instructions):
        seen.extend(instructions)
        return ["color_change"] * len(instructions)

    pipe.set_task_classifier(classifier)
    a = pipe(source_image, "make it red", generator=_gen(0), **KW).images
    b = pipe(source_image, "make it red", task="color_change", generator=_gen(0), **KW).images
    assert seen == ["make it red"]
    np.testing.assert_array_equal(a, b)


def test_callback_on_step_end_sees_and_can_change_latents(source_image):
    pipe = _pipe()
    steps = []

    def callback(p, i, t, kwargs):
        steps.append(i)
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = pipe(source_image, "make it red", task=0, callback_on_step_end=callback,
               **{**KW, "num_inference_steps": 3, "output_type": "latent"}).images
    assert steps == [0, 1, 2]
    assert torch.count_nonzero(out) == 0


def test_save_and_load_round_trip_with_adapter(tmp_path, source_image):
    pipe = _pipe("sentence")
    a = pipe(source_image, "make it red", task="color_change", generator=_gen(0), **KW).images
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "x2edit_adapter" / "default.safetensors").is_file()
    loaded = X2EditPipeline.from_pretrained(tmp_path)
    assert adapter_names(loaded.transformer) == ["default"]
    b = loaded(source_image, "make it red", task="color_change", generator=_gen(0), **KW).images
    np.testing.assert_allclose(a, b, atol=1e-5)
    # The saved transformer is stock diffusers weights: no adapter keys leaked into it.
    from diffusers import FluxTransformer2DModel

    plain = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
    assert not any("adapters" in n or "base_layer" in n for n, _ in plain.named_parameters())


def test_exported_lora_loads_in_stock_kontext_pipeline_and_matches(tmp_path, source_image):
    pipe = _pipe(router="task")
    ours = pipe(source_image, "make it red", task="color_change", generator=_gen(0), **KW).images
    from x2edit.adapters import export_diffusers_lora

    export_diffusers_lora(pipe.transformer, tmp_path, task="color_change")
    stock = FluxKontextPipeline(**tiny_kontext_components(0))
    stock.set_progress_bar_config(disable=True)
    before = stock(image=source_image, prompt="make it red", height=20, width=24, max_area=480,
                   _auto_resize=False, generator=_gen(0), **KW).images
    stock.load_lora_weights(tmp_path)
    theirs = stock(image=source_image, prompt="make it red", height=20, width=24, max_area=480,
                   _auto_resize=False, generator=_gen(0), **KW).images
    np.testing.assert_allclose(theirs, ours, atol=2e-4)
    assert np.abs(before - ours).max() > 1e-3  # and the LoRA is what made the difference


@pytest.mark.parametrize("prompt,task,message", [
    ("", "color_change", "instruction is empty"),
    ("   ", None, "instruction is empty"),
    ("x" * 2001, "color_change", "limit is 2000"),
    ("make it red", "recolor", "unknown task"),
    (["a", "b"], ["color_change"], "got 1 tasks for 2 instructions"),
])
def test_bad_instructions_and_tasks(prompt, task, message, source_image):
    pipe = _pipe()
    with pytest.raises(ValueError, match=message):
        pipe([source_image] * (2 if isinstance(prompt, list) else 1), prompt, task=task, **KW)


def test_bad_images(source_image, tmp_path):
    pipe = _pipe()
    with pytest.raises(ValueError, match="at least 8 pixels"):
        pipe(Image.new("RGB", (4, 30)), "make it red", task=0, **KW)
    with pytest.raises(ValueError, match="uint8"):
        pipe(np.zeros((16, 16, 3), dtype=np.float32), "make it red", task=0, **KW)
    with pytest.raises(FileNotFoundError):
        pipe(str(tmp_path / "absent.png"), "make it red", task=0, **KW)
    # Non-RGB modes are converted, not refused.
    out = pipe(source_image.convert("CMYK"), "make it red", task=0, **KW).images
    assert out.shape == (1, 20, 24, 3)


def test_large_source_is_capped_at_max_area():
    pipe = _pipe()
    img = Image.new("RGB", (64, 48), (200, 10, 10))
    out = pipe(img, "make it red", task=0, max_area=32 * 24, **KW).images
    assert out.shape == (1, 24, 32, 3)


def test_triton_kernel_path_gives_the_same_edit(source_image):
    """The adapter layers reach the fused Triton kernels through the one dispatch point
    (interpreter on CPU, compiled on CUDA) and get the torch reference's result."""
    pytest.importorskip("triton")
    from x2edit import kernels

    pipe = _pipe()
    with kernels.use_backend("torch"):
        ref = pipe(source_image, "make it red", task="color_change", generator=_gen(0), **KW).images
    with kernels.use_backend("triton"):
        fused = pipe(source_image, "make it red", task="color_change", generator=_gen(0), **KW).images
    np.testing.assert_allclose(fused, ref, atol=1e-4)


def test_truncated_instructions_are_reported_once_with_a_count(caplog):
    pipe = _pipe("sentence")
    long, short = " ".join(["red"] * 40), "make it red"
    with caplog.at_level("WARNING", logger="x2edit.pipeline"):
        pipe.encode_prompt([short], device="cpu", max_sequence_length=8)
        assert not caplog.records  # nothing cut
        pipe.encode_prompt([long, short, long], device="cpu", max_sequence_length=8)
        pipe.encode_prompt([long], device="cpu", max_sequence_length=8)  # every training step would say it again
    assert [r.getMessage() for r in caplog.records] == [
        "2 of 3 instructions truncated to 8 tokens (reported once per pipeline)"]


# x2edit's defaults that differ from FluxKontextPipeline's, each on purpose (X2EditPipeline.__call__'s
# docstring): None = the pipeline's own default, which is stock's value on a stock-configured pipeline
# (checked below), and the source is encoded at its own size rather than a Kontext resolution.
OWN_DEFAULTS = {"num_inference_steps": None, "max_sequence_length": None, "max_area": None, "_auto_resize": False}


def test_call_takes_every_stock_kontext_parameter_in_order_with_its_default():
    stock = inspect.signature(FluxKontextPipeline.__call__).parameters
    ours = inspect.signature(X2EditPipeline.__call__).parameters
    assert list(ours)[:len(stock)] == list(stock)
    assert {n: ours[n].default for n in stock if ours[n].default != OWN_DEFAULTS.get(n, stock[n].default)} == {}
    extra = [n for n in ours if n not in stock]  # x2edit's own, keyword-only after stock's
    assert extra == ["task", "lora_index", "auto_lora_top_k", "auto_lora_fusion", "auto_lora_min_score"]
    assert all(ours[n].kind is inspect.Parameter.KEYWORD_ONLY for n in extra)
    undocumented = [n for n in ours if n != "self" and n not in X2EditPipeline.__call__.__doc__]
    assert undocumented == []
    pipe = X2EditPipeline(**tiny_kontext_components(0))
    assert (pipe.default_num_inference_steps, pipe.default_max_sequence_length, pipe.default_max_area) == (
        stock["num_inference_steps"].default, stock["max_sequence_length"].default, stock["max_area"].default)


def _other_image():
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8))


def _to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W) in [0, 1]


@pytest.mark.parametrize("form", ["pil", "tensor", "prompt_embeds"])
def test_each_source_goes_with_its_own_instruction_and_task(form, source_image):
    """Two sources, two instructions, two images each: with the same starting noise for every sample,
    output i must be exactly the single edit of pair i // 2 (stock repeats sources [A, B, A, B])."""
    pipe = _pipe()
    pairs = [(source_image, "make it red", "color_change"), (_other_image(), "remove the circle", "subject_deletion")]
    noise = torch.randn(1, 30, 16, generator=_gen(0))  # packed (B, (20/4)*(24/4) tokens, 4 x 4 channels)
    singles = [pipe(img, p, task=t, latents=noise, **KW).images[0] for img, p, t in pairs]
    assert np.abs(singles[0] - singles[1]).max() > 1e-2
    images, text = [img for img, _, _ in pairs], {"prompt": [p for _, p, _ in pairs]}
    if form == "tensor":
        images = torch.stack([_to_tensor(img) for img in images])  # (2, 3, 20, 24)
    if form == "prompt_embeds":  # one row per instruction, as encode_prompt gives them
        embeds, pooled, _ = pipe.encode_prompt(text["prompt"], max_sequence_length=KW["max_sequence_length"])
        text = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    out = pipe(images, **text, task=[t for _, _, t in pairs], num_images_per_prompt=2,
               latents=noise.expand(4, -1, -1).clone(), **KW).images
    assert out.shape == (4, 20, 24, 3)
    for i in range(4):
        np.testing.assert_allclose(out[i], singles[i // 2], atol=1e-5, err_msg=f"output {i}")


def test_a_tensor_source_keeps_its_size_and_edits_as_the_same_pil_image(source_image):
    pipe = _pipe()
    from_pil = pipe(source_image, "make it red", task=0, generator=_gen(0), **KW).images
    for tensor in (_to_tensor(source_image), _to_tensor(source_image)[None]):  # (3, H, W) and (1, 3, H, W)
        out = pipe(tensor, "make it red", task=0, generator=_gen(0), **KW).images
        assert out.shape == (1, 20, 24, 3)
        np.testing.assert_allclose(out, from_pil, atol=1e-5)


@pytest.mark.parametrize("image,message", [
    (torch.zeros(2, 4, 20, 24), "float \\(B, 3, H, W\\)"),
    (torch.zeros(1, 3, 20, 24, dtype=torch.uint8), "float \\(B, 3, H, W\\)"),
    (torch.full((1, 3, 20, 24), -1.0), "in \\[0, 1\\]"),
    (torch.zeros(1, 3, 4, 24), "at least 8 pixels"),
])
def test_bad_image_tensors(image, message):
    with pytest.raises(ValueError, match=message):
        _pipe()(image, "make it red", task=0, **KW)


def test_sources_and_instructions_must_pair_up(source_image):
    with pytest.raises(ValueError, match="got 2 source images for 3 instructions"):
        _pipe()([source_image] * 2, ["a", "b", "c"], task=0, **KW)


def _text_lengths(transformer_inputs, pipe, image, **kwargs):
    with transformer_inputs(pipe) as seen:
        pipe(image, "make it red", task=0, num_inference_steps=1, output_type="latent", **kwargs)
    return [kw["encoder_hidden_states"].shape[1] for kw in seen]


def test_instructions_are_encoded_to_the_length_the_adapter_was_trained_with(source_image, transformer_inputs):
    """T5 pads to max_sequence_length: 512 tokens unless the adapter records its trained length."""
    pipe = X2EditPipeline(**tiny_kontext_components(0))
    pipe.set_progress_bar_config(disable=True)
    assert _text_lengths(transformer_inputs, pipe, source_image) == [512]  # no adapter: stock's default
    inject_adapters(pipe.transformer, AdapterConfig(rank=4, num_experts=3, top_k=2, max_sequence_length=16))
    assert pipe.text_length() == 16
    assert _text_lengths(transformer_inputs, pipe, source_image) == [16]
    assert _text_lengths(transformer_inputs, pipe, source_image, max_sequence_length=24) == [24]  # the caller's wins
    inject_adapters(pipe.transformer, AdapterConfig(rank=4, num_experts=3, top_k=2, max_sequence_length=32), "other")
    with pytest.raises(ValueError, match=r"different text lengths .*\[16, 32\]"):
        _text_lengths(transformer_inputs, pipe, source_image)
    assert _text_lengths(transformer_inputs, pipe, source_image, max_sequence_length=24) == [24]
    pipe.set_adapters(["other"])  # only active adapters count
    assert _text_lengths(transformer_inputs, pipe, source_image) == [32]


@pytest.mark.gpu
def test_text_encoders_on_the_cpu_beside_a_gpu_transformer(source_image):
    """model.text_encoder_device: cpu keeps CLIP + T5 off the GPU; the pipeline encodes there and moves the result."""
    pipe = _pipe()
    pipe.to("cuda")
    pipe.text_encoder.to("cpu")
    pipe.text_encoder_2.to("cpu")
    out = pipe(source_image, "make it red", task="color_change", generator=_gen(0), **KW).images
    assert np.isfinite(out).all()
