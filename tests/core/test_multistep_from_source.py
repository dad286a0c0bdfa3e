"""Several steps on a base that edits from the source: n Euler steps of the stock loop from sigma = s to 0.

Two layouts of a one-step model, on the tiny pixel pipe of test_residual.py: x2edit-tiny's (the base records
``default_source_start``, has no reference tokens, and a direct-reading adapter edits) and a residual-reading
adapter that sets its own ``source_start`` beside Kontext reference tokens.
"""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from test_residual import KW, ONE_STEP, _community_lora, _image, _pixel_pipe

from x2edit.adapters import AdapterConfig
from x2edit.adapters.fusion import Gated

S = 0.5  # the noise level both layouts edit from


def _pipe(layout: str, scheduler: str = "stock"):
    if layout == "residual":
        pipe = _pixel_pipe(ONE_STEP, randomize=True)
    else:  # x2edit-tiny's layout
        pipe = _pixel_pipe(AdapterConfig(kind="lora", rank=4), randomize=True)
        pipe.default_source_start, pipe.reference_tokens = S, False
    if scheduler == "shifted":  # FLUX's: shifted by the token count, so each sigma must be passed unshifted
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4,
                                                         max_image_seq_len=256, base_shift=0.5, max_shift=1.5)
    elif scheduler == "static":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return pipe


def _edit(pipe, **kwargs):
    return pipe(image=_image(size=32), prompt="make it red", task="color_change", output_type="latent", **KW,
                **kwargs).images


@pytest.mark.parametrize("scheduler", ["stock", "shifted", "static"])
@pytest.mark.parametrize("layout", ["tiny", "residual"])
def test_n_steps_run_at_s_and_down_by_s_over_n(layout, scheduler, transformer_inputs):
    pipe = _pipe(layout, scheduler)
    with transformer_inputs(pipe) as calls:  # one call per step (the residual reading's inner calls are not seen)
        _edit(pipe, num_inference_steps=3)
    levels = torch.stack([c["timestep"][0] for c in calls])
    torch.testing.assert_close(levels, torch.tensor([S, 2 * S / 3, S / 3]))
    torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor([S, 2 * S / 3, S / 3, 0.0]))
    n = calls[0]["hidden_states"].shape[1] // (1 if layout == "tiny" else 2)
    source = pipe._source_tokens(pipe.image_processor.resize(_image(size=32), 32, 32), 1)
    torch.testing.assert_close(calls[0]["hidden_states"][:, :n], source)  # the first step starts at the source
    assert not torch.equal(calls[1]["hidden_states"][:, :n], source)  # and the later ones from where it went


def test_n_steps_are_euler_steps_of_the_models_velocity(transformer_inputs):
    """x2edit-tiny's layout: the model's output is the velocity, x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i."""
    pipe = _pipe("tiny")
    with transformer_inputs(pipe) as calls:
        out = _edit(pipe, num_inference_steps=4)
    x, sigmas = calls[0]["hidden_states"], [S * (4 - i) / 4 for i in range(4)] + [0.0]
    with torch.no_grad():
        for i in range(4):
            v = pipe.transformer(**{**calls[i], "hidden_states": x, "timestep": torch.full((1,), sigmas[i])})[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    torch.testing.assert_close(out, x)
    assert (out - calls[0]["hidden_states"]).abs().max() > 1e-2  # the steps do edit


class _RecordingGate(torch.nn.Module):
    """A gate for ``Gated`` that records the noise level of each call and opens with it: g = sigma / s."""

    def __init__(self):
        super().__init__()
        self.sigmas = []

    def slots(self, layer_names):
        return torch.arange(len(layer_names))

    def forward(self, slots, sigma, embeddings, instruction):
        self.sigmas.append(float(sigma[0]))
        return (sigma / S)[None, :, None].expand(len(slots), len(sigma), len(embeddings))


class _RecordingGated(Gated):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def layer_gates(self, sigma, step):
        self.steps.append(step)
        return super().layer_gates(sigma, step)


def test_a_gated_fusion_sees_each_steps_noise_level(tmp_path):
    """AutoLoRA's gate reads the timestep: in an n-step call it gates each step at that step's sigma."""
    pipe = _pipe("residual")
    _community_lora(pipe, tmp_path)
    gate = _RecordingGate()
    fusion = pipe.fuse_loras(["style"], fusion=lambda tf, names, w: _RecordingGated(names, gate, torch.zeros(1, 4), w))
    _edit(pipe, num_inference_steps=3)
    assert sorted(set(fusion.steps)) == [0, 1, 2]  # counted by distinct noise levels
    assert sorted(set(gate.sigmas), reverse=True) == pytest.approx([S, 2 * S / 3, S / 3])


@pytest.mark.parametrize("steps", [0, -2, 1.5, True])
def test_a_step_count_below_one_is_refused_in_one_line(steps):
    pipe = _pipe("tiny")
    with pytest.raises(ValueError, match=r"^num_inference_steps must be a positive integer, got .*$"):
        _edit(pipe, num_inference_steps=steps)


@pytest.mark.parametrize("kwargs", [dict(sigmas=[0.9]), dict(latents=torch.zeros(1, 16, 48))])
def test_sigmas_and_latents_stay_refused_with_several_steps(kwargs):
    pipe = _pipe("residual")
    with pytest.raises(ValueError, match="cannot be given to a one-step adapter"):
        _edit(pipe, num_inference_steps=3, **kwargs)


@pytest.mark.parametrize("layout", ["tiny", "residual"])
def test_one_step_is_the_default(layout, transformer_inputs):
    pipe = _pipe(layout, "shifted")
    with transformer_inputs(pipe) as calls:
        one = _edit(pipe, num_inference_steps=1)
    assert torch.equal(one, _edit(pipe)) and len(calls) == 1
    torch.testing.assert_close(calls[0]["timestep"], torch.full((1,), S))
