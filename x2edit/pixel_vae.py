"""A parameter-free pixel-space "autoencoder" for small FLUX-architecture models.

Encoding is space-to-depth (``pixel_unshuffle``): a (B, 3, H, W) image in [-1, 1] becomes
(B, 3*f*f, H/f, W/f) latents, decoding is the exact inverse. FLUX then packs 2x2 latents per token,
so each token is a (2f x 2f) pixel patch. It stands where an ``AutoencoderKL`` stands in FLUX
pipelines (same ``encode``/``decode``/config fields), which lets x2edit-tiny run the unchanged
Kontext pipeline on pixels: reconstruction is exact and there is nothing to train. Measured
choice: on 64 px Shape World scenes a learned tiny VAE would add a training stage and blur thin
glyph and outline edits; pixels cost nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput


@dataclass
class PixelEncoderOutput(BaseOutput):
    latents: torch.Tensor


@dataclass
class PixelDecoderOutput(BaseOutput):
    sample: torch.Tensor


class PixelShuffleVAE(ModelMixin, ConfigMixin):
    """Exact space-to-depth autoencoder with FLUX's VAE interface.

    Args:
        factor: spatial downsampling f (a power of two); latent_channels = in_channels * f * f.
        in_channels: image channels.
        scaling_factor, shift_factor: latent normalisation as in ``AutoencoderKL``'s config
            (latents = (z - shift) * scale); pixels in [-1, 1] need none.
    """

    @register_to_config
    def __init__(self, factor: int = 4, in_channels: int = 3, latent_channels: int | None = None,
                 block_out_channels: tuple[int, ...] | None = None, scaling_factor: float = 1.0,
                 shift_factor: float = 0.0):
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"PixelShuffleVAE factor must be a power of two, got {factor}")
        expected_latent = in_channels * factor * factor
        # FLUX pipelines derive the VAE scale as 2 ** (len(block_out_channels) - 1).
        expected_blocks = (expected_latent,) * (int(math.log2(factor)) + 1)
        if latent_channels not in (None, expected_latent):
            raise ValueError(f"latent_channels must be {expected_latent} for factor {factor}")
        self.register_to_config(latent_channels=expected_latent, block_out_channels=expected_blocks)
        # A (persistent) scalar buffer: ModelMixin reads dtype/device from tensors, and save_pretrained
        # must write a weights file for from_pretrained to find, even for a parameter-free model.
        self.register_buffer("anchor", torch.zeros(()))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        f = self.config.factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the VAE factor {f}")
        z = F.pixel_unshuffle(x, f)  # (B, 3*f*f, H/f, W/f)
        return PixelEncoderOutput(latents=z) if return_dict else (z,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        x = F.pixel_shuffle(z, self.config.factor)  # (B, 3, H, W)
        return PixelDecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).latents).sample
