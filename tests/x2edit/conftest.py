"""Fixtures for the x2edit tests."""

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def source_image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
