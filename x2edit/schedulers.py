"""A FLUX flow-matching scheduler for models that predict the clean sample instead of the velocity.

FLUX transformers predict the rectified-flow velocity v = noise - x0. In pixel space with large
patches (x2edit-tiny: 8x8x3 = 192 values per token, as wide as the model) that target is hard: the
network must carry the full-dimensional noise from input to output. Predicting the clean sample x0
("x-prediction", Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise") only asks for
points on the low-dimensional image manifold, and an editing model can copy unchanged reference
patches straight through. The transformer is the stock ``FluxTransformer2DModel``; only the meaning
of its output changes, which this scheduler (saved in the pipeline's ``scheduler/``) records as
``prediction_type="sample"`` and converts back to a velocity for the usual Euler step, so every Flux
pipeline samples such a model unchanged.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config

# diffusers' pipeline loader finds a custom component's load method by looking its base class up in
# the component's module (as pixel_vae.py's ModelMixin import serves the VAE).
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

PREDICTION_TYPES = ("flow", "sample")
# Training turns a predicted x0 into a velocity as (x_sigma - x0) / max(sigma, SIGMA_FLOOR); the floor
# keeps the loss weight 1/sigma^2 bounded near clean images (JiT clips the same way).
SIGMA_FLOOR = 0.05


def velocity_from_sample(x_sigma: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
                         floor: float = 0.0) -> torch.Tensor:
    """Velocity v = (x_sigma - x0) / sigma for x_sigma = (1 - sigma) x0 + sigma * noise.

    ``sigma`` is a scalar or per-sample (B,) tensor broadcast over the remaining dims of ``x_sigma``.
    """
    s = torch.as_tensor(sigma, dtype=x_sigma.dtype, device=x_sigma.device)
    if s.dim() == 1:
        s = s.view(-1, *([1] * (x_sigma.dim() - 1)))
    return (x_sigma - x0) / s.clamp(min=max(floor, 1e-6))


class FlowMatchSampleScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` whose ``step`` takes the model's x0 prediction.

    Euler on v = (x - x0) / sigma gives x_next = x0 + (sigma_next / sigma) (x - x0): exact along the
    straight path through the predicted x0, and well defined at every step since the current sigma of
    a step is never 0.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: float | None = 0.5, max_shift: float | None = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, invert_sigmas: bool = False, shift_terminal: float | None = None,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False,
                 prediction_type: str = "sample"):
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
            raise NotImplementedError("per-token timesteps are not supported with prediction_type='sample'")
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index].to(torch.float32)
        velocity = velocity_from_sample(sample.float(), model_output.float(), sigma).to(model_output.dtype)
        return super().step(velocity, timestep, sample, *args, **kwargs)


def prediction_type(scheduler) -> str:
    """What a pipeline's transformer predicts: "flow" (velocity, every FLUX checkpoint) or "sample"."""
    return getattr(scheduler.config, "prediction_type", None) or "flow"
