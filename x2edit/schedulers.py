"""A FLUX flow-matching scheduler for transformers that do not predict the velocity.

FLUX transformers predict the rectified-flow velocity v = noise - x0 of x_sigma = (1 - sigma) x0 +
sigma * noise. In pixel space with large patches (x2edit-tiny: 8x8x3 = 192 values per token, as wide
as the model) that target is hard at high noise: the network must carry the full-dimensional noise
from input to output. Two other readings of the same stock ``FluxTransformer2DModel``'s output F:

- ``"sample"``: F is x0 ("x-prediction", Li & He 2025, "Back to Basics: Let Denoising Generative
  Models Denoise"): only points on the image manifold are predicted; but near sigma = 0 the network
  must rebuild every detail it is handed.
- ``"edm"``: x0 = c_skip(sigma) x_sigma + c_out(sigma) F, Karras et al. 2022's preconditioning
  written for the flow-matching path: c_skip -> 1 as sigma -> 0 (details pass through, as in
  velocity models) and -> 0 at sigma = 1 (F is then x0 / sigma_data, as in x-prediction), with
  F's target of unit variance at every sigma.

The scheduler records the reading as ``prediction_type`` in the pipeline's ``scheduler/`` and turns
the output back into a velocity for the usual Euler step, so every Flux pipeline samples such a
model unchanged. Training (``x2edit train``) reads the same setting from the base's scheduler.
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config

# diffusers' pipeline loader finds a custom component's load method by looking its base class up in
# the component's module (as pixel_vae.py's ModelMixin import serves the VAE).
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

PREDICTION_TYPES = ("flow", "sample", "edm")
# Training turns a predicted x0 into a velocity as (x_sigma - x0) / max(sigma, SIGMA_FLOOR); the floor
# keeps the loss weight 1/sigma^2 bounded near clean images (JiT clips the same way).
SIGMA_FLOOR = 0.05


def _per_sample(sigma, like: torch.Tensor) -> torch.Tensor:
    """sigma (scalar or (B,)) as a tensor that broadcasts over ``like`` (B, ...)."""
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return s.view(-1, *([1] * (like.dim() - 1))) if s.dim() == 1 else s


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) for x_sigma = (1 - sigma) x0 + sigma * noise and data of std ``sigma_data``.

    x0_hat = c_skip x_sigma + c_out F minimises the variance of F's target (EDM, with the signal
    scale a = 1 - sigma): c_skip = a sd^2 / (a^2 sd^2 + sigma^2), c_out = sigma sd / sqrt(a^2 sd^2 + sigma^2).
    """
    a, sd2 = 1 - sigma, sigma_data**2
    total = a * a * sd2 + sigma * sigma
    return a * sd2 / total, sigma * sigma_data / total.sqrt()


def predicted_sample(model_output: torch.Tensor, x_sigma: torch.Tensor, sigma, prediction: str,
                     sigma_data: float = 0.5) -> torch.Tensor:
    """x0 implied by the transformer's output F under each reading ("flow", "sample" or "edm")."""
    if prediction == "flow":
        return x_sigma - _per_sample(sigma, x_sigma) * model_output
    if prediction == "sample":
        return model_output
    if prediction == "edm":
        c_skip, c_out = edm_coefficients(_per_sample(sigma, x_sigma), sigma_data)
        return c_skip * x_sigma + c_out * model_output
    raise ValueError(f"unknown prediction type {prediction!r}: expected one of {PREDICTION_TYPES}")


def velocity_from_sample(x_sigma: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
                         floor: float = 0.0) -> torch.Tensor:
    """Velocity v = (x_sigma - x0) / sigma for x_sigma = (1 - sigma) x0 + sigma * noise.

    ``sigma`` is a scalar or per-sample (B,) tensor broadcast over the remaining dims of ``x_sigma``.
    """
    return (x_sigma - x0) / _per_sample(sigma, x_sigma).clamp(min=max(floor, 1e-6))


def unshifted_sigma(scheduler, sigma: float, mu: float | None = None) -> float:
    """The sigma to give ``scheduler.set_timesteps(sigmas=[...])`` so that its first step runs at ``sigma``.

    Flux pipelines pass custom sigmas through the scheduler's shift: the static ``shift`` k or, with
    ``use_dynamic_shifting``, the resolution-dependent k = exp(mu) ("exponential") or mu ("linear").
    Each maps t -> k t / (1 + (k - 1) t), whose inverse is s -> s / (k - (k - 1) s). An adapter
    trained at one fixed noise level (``AdapterConfig.source_start``) must run at exactly that level.
    """
    cfg = scheduler.config
    for key in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        if cfg.get(key):
            raise ValueError(f"the scheduler's {key} reshapes custom sigmas; a one-step adapter needs a "
                             "FlowMatchEulerDiscreteScheduler without it")
    if cfg.get("use_dynamic_shifting"):
        if mu is None:
            raise ValueError("this scheduler shifts by resolution: pass mu (diffusers' calculate_shift)")
        k = math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else mu
    else:
        k = cfg.get("shift", 1.0)
    return sigma / (k - (k - 1) * sigma)


class FlowMatchSampleScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` for x0-predicting ("sample") or preconditioned ("edm") models.

    Args (beyond the parent's):
        prediction_type: "sample", "edm" or "flow" (the parent's behaviour).
        sigma_data: the data's standard deviation for "edm" (0.5: EDM's choice for images in [-1, 1]).

    With the implied x0, Euler on v = (x - x0) / sigma gives x_next = x0 + (sigma_next / sigma) (x - x0): exact along the
    straight path through the predicted x0, and well defined at every step since the current sigma of
    a step is never 0.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: float | None = 0.5, max_shift: float | None = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, invert_sigmas: bool = False, shift_terminal: float | None = None,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False,
                 prediction_type: str = "sample", sigma_data: float = 0.5):
        # The parent's parameters are spelled out: diffusers reads a scheduler's config keys from its
        # __init__ signature when loading scheduler_config.json.
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        super().__init__(num_train_timesteps, shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len,
                         max_image_seq_len, invert_sigmas, shift_terminal, use_karras_sigmas, use_exponential_sigmas,
                         use_beta_sigmas, time_shift_type, stochastic_sampling)

    def step(self, model_output: torch.FloatTensor, timestep, sample: torch.FloatTensor, *args,
             per_token_timesteps: torch.Tensor | None = None, **kwargs):
        if self.config.prediction_type == "flow":
            return super().step(model_output, timestep, sample, *args, per_token_timesteps=per_token_timesteps,
                                **kwargs)
        if per_token_timesteps is not None:
            raise NotImplementedError(f"per-token timesteps are not supported with prediction_type="
                                      f"{self.config.prediction_type!r}")
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index].to(torch.float32)
        x0 = predicted_sample(model_output.float(), sample.float(), sigma, self.config.prediction_type,
                              self.config.sigma_data)
        velocity = velocity_from_sample(sample.float(), x0, sigma).to(model_output.dtype)
        return super().step(velocity, timestep, sample, *args, **kwargs)


def sigma_data_of(scheduler) -> float:
    """The data std an "edm" scheduler preconditions for (0.5 when it does not say)."""
    return getattr(scheduler.config, "sigma_data", None) or 0.5


def prediction_type(scheduler) -> str:
    """What a pipeline's transformer predicts: "flow" (velocity, every FLUX checkpoint), "sample" or "edm"."""
    return getattr(scheduler.config, "prediction_type", None) or "flow"
