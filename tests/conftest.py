"""Shared pytest setup: quiet backends, deterministic tiny data."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def tiny_data():
    """48 random 8×8×1 images in 3 classes, every class present."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8, 8, 1)).astype("float32")
    y = np.arange(48) % 3
    return x, y
