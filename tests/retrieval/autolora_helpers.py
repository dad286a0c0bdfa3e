"""Helpers of the AutoLoRA tests: a tiny pixel-space base (1 double + 1 single block, inner dim 32, the
x2edit-tiny layout at 16 px) and LoRA factors on its modules."""

import torch

from x2edit import X2EditPipeline
from x2edit.pixel_vae import PixelShuffleVAE
from x2edit.testing import tiny_flux_transformer, tiny_sentence_components

RES = 16  # pixels; PixelShuffleVAE(2) + 2x2 packing: 4 x 4 = 16 tokens of 48 channels


def tiny_pipe(seed: int = 0) -> X2EditPipeline:
    comps = tiny_sentence_components(seed)
    comps["vae"] = PixelShuffleVAE(factor=2)
    comps["transformer"] = tiny_flux_transformer(seed, in_channels=48, guidance_embeds=False)
    pipe = X2EditPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_factors(modules: dict[str, tuple[int, int]], rank: int = 3, seed: int = 0, scale: float = 0.7,
                   std: float = 0.3) -> dict:
    """{module: (A (r, K), B (N, r), scale)} with random values (non-zero: a fresh LoRA is a no-op)."""
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(rank, k, generator=g) * std, torch.randn(n, rank, generator=g) * std, scale)
            for m, (k, n) in modules.items()}


# Modules of the tiny transformer a kohya file can name: q/k/v of the double block (one fused key), its
# output projection, the single block's linear2, the patch embedding and the output head.
KOHYA_MODULES = {"transformer_blocks.0.attn.to_q": (32, 32), "transformer_blocks.0.attn.to_k": (32, 32),
                 "transformer_blocks.0.attn.to_v": (32, 32), "transformer_blocks.0.attn.to_out.0": (32, 32),
                 "single_transformer_blocks.0.proj_out": (160, 32), "x_embedder": (48, 32), "proj_out": (32, 48)}
