"""The residual reading: an editing adapter is read as the change it makes to the source."""

import numpy as np
import pytest
import torch
from PIL import Image

from x2edit import X2EditPipeline
from x2edit.adapters import (
    AdapterConfig,
    adapter_layers,
    adapters_disabled,
    export_diffusers_lora,
    inject_adapters,
    load_adapter,
    merge_adapter,
    read_adapter_header,
    residual_adapters,
    residual_reading,
    routing_context,
    save_adapter,
)
from x2edit.pixel_vae import PixelShuffleVAE
from x2edit.testing import randomize_adapters, tiny_flux_transformer, tiny_sentence_components

RESIDUAL = AdapterConfig(rank=4, num_experts=3, top_k=2, router="task", reading="residual")
KW = dict(max_sequence_length=16, guidance_scale=1.0)


def _pixel_pipe(config=RESIDUAL, randomize=False):
    """A tiny sentence-encoder pipeline on pixels (exact VAE), so 'returns the source' is exact."""
    comps = tiny_sentence_components(0)
    comps["vae"] = PixelShuffleVAE(factor=2)  # 3 x 2 x 2 = 12 latent channels, 48 per packed token
    comps["transformer"] = tiny_flux_transformer(0, in_channels=48, guidance_embeds=False)
    pipe = X2EditPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    inject_adapters(pipe.transformer, config)
    if randomize:
        randomize_adapters(pipe.transformer, std=0.2)
    return pipe


def _image(seed=0, size=16):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_a_fresh_residual_adapter_returns_the_source_exactly():
    pipe, src = _pixel_pipe(), _image()
    out = pipe(image=src, prompt="make it red", task="color_change", num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0), **KW).images[0]
    np.testing.assert_allclose(out, np.asarray(src) / 255.0, atol=1e-4)


def test_a_fresh_residual_adapter_returns_the_source_after_28_steps():
    """The last of 28 unshifted steps starts at sigma 1/28 < 0.05: the step must still land on x0 (a sigma
    floor in the sampled velocity stopped it short: max error 0.023)."""
    pipe, src = _pixel_pipe(), _image()
    out = pipe(image=src, prompt="make it red", task="color_change", num_inference_steps=28, output_type="np",
               generator=torch.Generator().manual_seed(0), **KW).images[0]
    np.testing.assert_allclose(out, np.asarray(src) / 255.0, atol=1e-4)


def test_a_fresh_direct_adapter_does_not(tmp_path):
    """The same call with the direct reading is the base's sample, far from the source (so the test above
    checks the reading, not a pipeline that copies its input)."""
    pipe, src = _pixel_pipe(AdapterConfig(rank=4, num_experts=3, top_k=2, router="task")), _image()
    out = pipe(image=src, prompt="make it red", task="color_change", num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0), **KW).images[0]
    assert np.abs(out - np.asarray(src) / 255.0).mean() > 0.05


def test_reading_is_source_plus_the_adapters_change():
    pipe = _pixel_pipe(randomize=True)
    tf = pipe.transformer
    g = torch.Generator().manual_seed(1)
    n, c = 16, 48
    xt, ref = torch.randn(2, n, c, generator=g), torch.randn(2, n, c, generator=g)
    ids = torch.zeros(2 * n, 3)
    ids[n:, 0] = 1
    sigma = torch.tensor([0.7, 0.02])
    call = dict(hidden_states=torch.cat([xt, ref], 1), timestep=sigma, guidance=None,
                pooled_projections=torch.randn(2, 32, generator=g), encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                txt_ids=torch.zeros(5, 3), img_ids=ids, return_dict=False)
    with torch.no_grad(), routing_context(tf, task_ids=[3, 4]):
        on = tf(**call)[0][:, :n]
        with adapters_disabled(tf, ["default"]):
            off = tf(**call)[0][:, :n]
        with residual_reading(tf):
            v = tf(**call)[0]
    assert (on - off).abs().max() > 1e-3  # the adapter does change the output
    x0 = ref + on - off
    expected = (xt - x0) / sigma.view(-1, 1, 1)  # no floor when sampling (sigma 0.02 is below training's 0.05)
    torch.testing.assert_close(v, expected)
    assert "forward" not in tf.__dict__  # the wrapper is gone after the block


def test_adapters_disabled_restores_what_was_active():
    pipe = _pixel_pipe()
    before = [list(layer.active_adapters) for _, layer in adapter_layers(pipe.transformer)]
    with adapters_disabled(pipe.transformer, ["default"]):
        assert all(not layer.active_adapters for _, layer in adapter_layers(pipe.transformer))
        assert residual_adapters(pipe.transformer) == []
    assert [list(layer.active_adapters) for _, layer in adapter_layers(pipe.transformer)] == before
    assert residual_adapters(pipe.transformer) == ["default"]


def test_residual_adapter_needs_a_source_image():
    pipe = _pixel_pipe()
    with pytest.raises(ValueError, match="pass image="):
        pipe(prompt="a red square", task="color_change", height=16, width=16, num_inference_steps=2, **KW)


def test_residual_adapter_is_not_merged_or_exported(tmp_path):
    pipe = _pixel_pipe()
    with pytest.raises(ValueError, match="residual reading"):
        merge_adapter(pipe.transformer, "default", task="color_change")
    with pytest.raises(ValueError, match="residual reading"):
        export_diffusers_lora(pipe.transformer, tmp_path / "lora", task="color_change")
    assert not RESIDUAL.mergeable


def test_reading_survives_save_and_load(tmp_path):
    pipe = _pixel_pipe(randomize=True)
    path = save_adapter(pipe.transformer, tmp_path / "a.safetensors")
    assert read_adapter_header(path)["config"].reading == "residual"
    fresh = _pixel_pipe(AdapterConfig(rank=4, num_experts=3, top_k=2, router="task"))
    load_adapter(fresh.transformer, path, "edit")
    assert residual_adapters(fresh.transformer) == ["edit"]


def test_calls_without_steps_use_the_pipelines_default():
    pipe, seen = _pixel_pipe(), []
    pipe.default_num_inference_steps = 3

    def count(p, i, t, kw):
        seen.append(i)
        return kw

    pipe(image=_image(), prompt="make it red", task="color_change", callback_on_step_end=count, **KW)
    assert len(seen) == 3


def test_unknown_reading_is_refused():
    with pytest.raises(ValueError, match="unknown adapter reading 'delta'"):
        AdapterConfig(reading="delta")


ONE_STEP = AdapterConfig(rank=4, num_experts=3, top_k=2, router="task", reading="residual", source_start=0.5)


def test_a_fresh_one_step_adapter_returns_the_source_in_one_call():
    """source_start: the loop starts from the source tokens at s and takes one step, which with a fresh
    residual adapter lands exactly on the source; no generator is needed (nothing is random)."""
    pipe, src, calls = _pixel_pipe(ONE_STEP), _image(), []
    real = pipe.transformer.forward

    def spy(*a, **kw):
        calls.append((kw["hidden_states"].clone(), kw["timestep"].clone()))
        return real(*a, **kw)

    pipe.transformer.forward = spy
    out = pipe(image=src, prompt="make it red", task="color_change", output_type="np", **KW).images[0]
    np.testing.assert_allclose(out, np.asarray(src) / 255.0, atol=1e-4)
    assert len(calls) == 2  # one step, read residually: adapted + base
    hidden, t = calls[0]
    n = hidden.shape[1] // 2
    torch.testing.assert_close(hidden[:, :n], hidden[:, n:])  # the start is the source tokens themselves
    torch.testing.assert_close(t, torch.full_like(t, 0.5))  # at the adapter's noise level
    assert not pipe._start_from_source


def test_a_trained_one_step_adapter_is_deterministic():
    pipe, src = _pixel_pipe(ONE_STEP, randomize=True), _image()
    a, b = (pipe(image=src, prompt="make it red", task="color_change", output_type="np",
                 generator=torch.Generator().manual_seed(seed), **KW).images[0] for seed in (0, 1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - np.asarray(src) / 255.0).mean() > 1e-3  # and it does edit


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
    (dict(sigmas=[0.9]), "sigmas= cannot be given"),
])
def test_one_step_adapter_refuses_other_schedules(kwargs, match):
    pipe = _pixel_pipe(ONE_STEP)
    with pytest.raises(ValueError, match=match):
        pipe(image=_image(), prompt="make it red", task="color_change", **kwargs, **KW)
    with pytest.raises(ValueError, match="pass image="):
        pipe(prompt="make it red", task="color_change", height=16, width=16, **KW)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "half", True])
def test_source_start_must_be_a_noise_level(bad):
    with pytest.raises(ValueError, match="source_start must be a noise level"):
        AdapterConfig(source_start=bad)


def test_one_step_adapter_runs_at_its_level_under_a_resolution_shifted_scheduler():
    """FLUX's scheduler shifts sigmas by image size; the pipeline undoes that so the transformer still sees s."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe, seen = _pixel_pipe(ONE_STEP), []
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4,
                                                     max_image_seq_len=256, base_shift=0.5, max_shift=1.5)
    real = pipe.transformer.forward

    def spy(*a, **kw):
        seen.append(kw["timestep"].clone())
        return real(*a, **kw)

    pipe.transformer.forward = spy
    pipe(image=_image(size=32), prompt="make it red", task="color_change", output_type="np", **KW)
    torch.testing.assert_close(seen[0], torch.full_like(seen[0], 0.5))


def _community_lora(pipe, tmp_path, seed=3):
    """A random diffusers-format LoRA file for the pixel pipe's transformer, loaded as a community LoRA."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_v",
                 "transformer_blocks.0.ff.net.2"):
        layer = pipe.transformer.get_submodule(name)
        k = layer.in_features
        n = layer.out_features
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(2, k, generator=g) * 0.3
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(n, 2, generator=g) * 0.3
    save_file(state, str(tmp_path / "style.safetensors"))
    pipe.load_lora_weights(tmp_path / "style.safetensors", adapter_name="style")


def test_community_loras_act_beside_a_residual_adapter(tmp_path):
    """A fresh one-step residual adapter returns the source; a community LoRA beside it must change the result by
    its own (direct) reading: x0 = source - sigma * (F_with_lora - F_base) (it used to cancel exactly)."""
    pipe, src = _pixel_pipe(ONE_STEP), _image()
    _community_lora(pipe, tmp_path)
    calls, real = [], pipe.transformer.forward

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    pipe.transformer.forward = spy
    out = pipe(image=src, prompt="make it red", task="color_change", output_type="latent", **KW).images
    del pipe.transformer.forward
    assert len(calls) == 3  # adapted, without the residual adapter, bare base
    call = dict(calls[0])
    n = call["hidden_states"].shape[1] // 2
    source = call["hidden_states"][:, n:]
    with torch.no_grad():
        with adapters_disabled(pipe.transformer, ["default"]):
            with_lora = pipe.transformer(**call)[0][:, :n]
            with adapters_disabled(pipe.transformer, ["style"]):
                bare = pipe.transformer(**call)[0][:, :n]
    assert (with_lora - bare).abs().max() > 1e-3
    torch.testing.assert_close(out, source - 0.5 * (with_lora - bare))
    pipe.set_adapters(["default", "style"], [1.0, 0.0])  # weight 0: the LoRA is off, the source comes back
    off = pipe(image=src, prompt="make it red", task="color_change", output_type="latent", **KW).images
    torch.testing.assert_close(off, source)


def test_community_loras_are_not_fused_under_a_residual_adapter(tmp_path):
    """Fused into the base, a LoRA is in both terms of the residual reading and cancels: refused."""
    pipe = _pixel_pipe(ONE_STEP)
    _community_lora(pipe, tmp_path)
    with pytest.raises(ValueError, match="would cancel there: keep community LoRAs unfused"):
        pipe.fuse_lora()
    assert pipe.num_fused_loras == 0
