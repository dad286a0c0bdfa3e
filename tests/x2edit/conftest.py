"""Fixtures for the x2edit tests: tiny seeded FLUX transformers, adapters started non-zero."""

import numpy as np
import pytest
import torch
from PIL import Image

from x2edit.adapters import adapter_layers


def randomize_adapters(model, adapter_name="default", std=0.1, seed=0):
    """Give every adapter parameter random values so 'with adapter == without' cannot pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.adapters[adapter_name].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def flux_inputs(batch=2, img_tokens=16, txt_tokens=8, seed=0):
    """Keyword arguments for a tiny FluxTransformer2DModel forward."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, img_tokens, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, txt_tokens, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.full((batch,), 0.5), guidance=torch.full((batch,), 3.5),
        img_ids=torch.zeros(img_tokens, 3), txt_ids=torch.zeros(txt_tokens, 3), return_dict=False,
    )


@pytest.fixture
def source_image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
