"""Fixtures for the x2edit tests."""

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def source_image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))


@pytest.fixture
def transformer_inputs():
    """``with transformer_inputs(pipe) as seen:`` collects the keyword arguments of each transformer call."""
    import contextlib

    @contextlib.contextmanager
    def record(pipe):
        seen = []
        hook = pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs),
                                                          with_kwargs=True)
        try:
            yield seen
        finally:
            hook.remove()

    return record
