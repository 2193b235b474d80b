"""Shared set-up for the bench/ scripts: the seed recipe, its data, timing helpers.

Nothing here is backend-specific: run any script under ``KERAS_BACKEND=jax``
or ``torch`` and it measures that backend.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

# TensorFlow's start-up chatter drowns the tables; users can still override.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]


def seed_recipe():
    """The recipe module ``recipes/mnist_tanh.py`` (``build_model``, ``load_data``)."""
    recipes = str(ROOT / "recipes")
    if recipes not in sys.path:
        sys.path.insert(0, recipes)
    import mnist_tanh

    return mnist_tanh


def seed_data(*, train_size: int | None = None):
    """(x, one-hot y, probes, probe labels) from the bundled MNIST digits (offline)."""
    import keras
    import numpy as np

    from layerwatch import one_per_class

    x, y, x_test, y_test = seed_recipe().load_data("bundled")
    if train_size is not None:
        x, y = x[:train_size], y[:train_size]
    probes, labels = one_per_class(x_test, y_test)
    return x, keras.utils.to_categorical(y, 10).astype(np.float32), probes, labels


def conv_outputs(model):
    """The seed model's conv-layer output tensors (what a naive recorder would tap)."""
    import keras

    return [layer.output for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def machine() -> str:
    """One line naming the machine and the software measured."""
    import keras

    try:
        import h5py
        h5 = f"h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version})"
    except ImportError:
        h5 = "h5py missing"
    backend = keras.backend.backend()
    backend_version = ""
    try:
        backend_version = " " + __import__({"tensorflow": "tensorflow", "jax": "jax",
                                           "torch": "torch"}[backend]).__version__
    except Exception:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpus} CPU cores ({platform.processor() or platform.machine()}), "
            f"Python {platform.python_version()}, keras {keras.__version__}, "
            f"backend {backend}{backend_version}, {h5}")


def load_average() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def fmt_ratio(values: list[float]) -> str:
    """Median, then the quartiles (from 4 values on), min, max and count."""
    med, lo, hi = median_spread(values)
    quartiles = ""
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4)
        quartiles = f"quartiles {q1:.3f}-{q3:.3f}, "
    return f"{med:.3f}  ({quartiles}min {lo:.3f}, max {hi:.3f}, n={len(values)})"


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
