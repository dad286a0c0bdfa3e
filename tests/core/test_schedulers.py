"""FlowMatchSampleScheduler: x0-predicting FLUX models sampled by the stock Flux pipelines."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from x2edit.schedulers import (
    FlowMatchSampleScheduler,
    edm_coefficients,
    predicted_sample,
    prediction_type,
    unshifted_sigma,
    velocity_from_sample,
)


def _run(scheduler, model, x, steps=8):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, scheduler.sigmas[scheduler.step_index or 0]), t, x).prev_sample
    return x


def test_each_step_equals_the_stock_euler_step_on_the_implied_velocity():
    torch.manual_seed(0)
    x0_pred = torch.randn(2, 16, 12)
    stock, ours = FlowMatchEulerDiscreteScheduler(shift=3.0), FlowMatchSampleScheduler(shift=3.0)
    stock.set_timesteps(6)
    ours.set_timesteps(6)
    x = torch.randn(2, 16, 12)
    for i, t in enumerate(stock.timesteps):
        sigma = stock.sigmas[i]
        a = stock.step((x - x0_pred) / sigma, t, x).prev_sample
        b = ours.step(x0_pred, t, x).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        x = a


def test_an_exact_x0_model_lands_on_x0_from_any_noise():
    target = torch.linspace(-1, 1, 48).view(1, 4, 12)
    out = _run(FlowMatchSampleScheduler(), lambda x, s: target, torch.randn(1, 4, 12))
    torch.testing.assert_close(out, target, rtol=0, atol=1e-5)


def test_an_exact_edm_model_lands_on_x0_from_any_noise():
    """F = (x0 - c_skip x) / c_out at the current sigma: the preconditioned reading recovers x0 exactly."""
    target = torch.linspace(-1, 1, 48).view(1, 4, 12)

    def model(x, sigma):
        c_skip, c_out = edm_coefficients(sigma, 0.5)
        return (target - c_skip * x) / c_out

    out = _run(FlowMatchSampleScheduler(prediction_type="edm"), model, torch.randn(1, 4, 12))
    torch.testing.assert_close(out, target, rtol=0, atol=1e-4)


def test_edm_coefficients_pass_details_at_low_noise_and_predict_x0_at_high_noise():
    c_skip, c_out = edm_coefficients(torch.tensor([1e-4, 1.0]), 0.5)
    torch.testing.assert_close(c_skip, torch.tensor([1.0, 0.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(c_out, torch.tensor([0.0, 0.5]), atol=1e-3, rtol=0)
    torch.manual_seed(0)  # F's target has unit variance at every sigma for data of std sigma_data
    x0, noise = 0.5 * torch.randn(100_000), torch.randn(100_000)
    for sigma in (0.05, 0.5, 0.95):
        s = torch.tensor(sigma)
        c_skip, c_out = edm_coefficients(s, 0.5)
        assert abs(float(((x0 - c_skip * ((1 - s) * x0 + s * noise)) / c_out).std()) - 1) < 0.02
    x = torch.randn(2, 3)
    torch.testing.assert_close(predicted_sample(x, torch.zeros(2, 3), torch.tensor([0.3, 0.6]), "sample"), x)
    x_sigma, sigma = torch.randn(2, 3), torch.tensor([0.3, 0.6])
    torch.testing.assert_close(predicted_sample(x, x_sigma, sigma, "flow"), x_sigma - sigma[:, None] * x)
    with pytest.raises(ValueError, match="unknown prediction type"):
        predicted_sample(x, x, 0.5, "epsilon")


def test_flow_prediction_type_is_the_stock_scheduler():
    torch.manual_seed(1)
    v = torch.randn(1, 4, 12)
    noise = torch.randn(1, 4, 12)
    a = _run(FlowMatchEulerDiscreteScheduler(), lambda x, s: v, noise.clone())
    b = _run(FlowMatchSampleScheduler(prediction_type="flow"), lambda x, s: v, noise.clone())
    torch.testing.assert_close(a, b)


def test_config_round_trip_and_reading_a_stock_config(tmp_path):
    FlowMatchSampleScheduler(shift=2.0).save_pretrained(tmp_path)
    loaded = FlowMatchSampleScheduler.from_pretrained(tmp_path)
    assert (loaded.config.shift, prediction_type(loaded)) == (2.0, "sample")
    assert prediction_type(FlowMatchEulerDiscreteScheduler()) == "flow"
    converted = FlowMatchSampleScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert (converted.config.shift, prediction_type(converted)) == (3.0, "sample")


def test_bad_prediction_type_and_per_token_timesteps_are_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        FlowMatchSampleScheduler(prediction_type="epsilon")
    s = FlowMatchSampleScheduler()
    s.set_timesteps(4)
    with pytest.raises(NotImplementedError, match="per-token"):
        s.step(torch.zeros(1, 2, 3), s.timesteps[0], torch.zeros(1, 2, 3), per_token_timesteps=torch.ones(1, 2))


def test_velocity_from_sample_floors_sigma():
    x, x0 = torch.ones(2, 3), torch.zeros(2, 3)
    v = velocity_from_sample(x, x0, torch.tensor([0.5, 0.001]), floor=0.05)
    torch.testing.assert_close(v, torch.tensor([[2.0] * 3, [20.0] * 3]))


def test_pipeline_with_the_sample_scheduler_saves_and_loads(tmp_path):
    from x2edit import X2EditPipeline
    from x2edit.testing import tiny_kontext_components

    components = tiny_kontext_components()
    components["scheduler"] = FlowMatchSampleScheduler()
    pipe = X2EditPipeline(**components)
    kwargs = dict(prompt="make it red", height=32, width=32, num_inference_steps=2, output_type="np")
    first = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.save_pretrained(tmp_path)
    again = X2EditPipeline.from_pretrained(tmp_path)
    assert type(again.scheduler) is FlowMatchSampleScheduler
    torch.testing.assert_close(torch.from_numpy(again(generator=torch.Generator().manual_seed(0), **kwargs).images),
                               torch.from_numpy(first))


@pytest.mark.parametrize("config, mu", [
    (dict(), None),  # x2edit-tiny: no shift
    (dict(shift=3.0), None),  # SD3-style static shift
    (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), 0.8),  # FLUX.1
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), 1.7),
])
def test_unshifted_sigma_makes_the_schedulers_first_step_land_on_the_level(config, mu):
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    for level in (0.2, 0.5, 1.0):
        scheduler.set_timesteps(sigmas=[unshifted_sigma(scheduler, level, mu)], mu=mu)
        assert scheduler.sigmas[0].item() == pytest.approx(level, abs=1e-6)


def test_unshifted_sigma_refuses_reshaping_schedulers():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        unshifted_sigma(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), 0.5)
    with pytest.raises(ValueError, match="pass mu"):
        unshifted_sigma(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 0.5)
