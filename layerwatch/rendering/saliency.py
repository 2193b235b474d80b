"""Saliency maps drawn like a layer: ``saliency.gif`` and ``saliency.png``.

A run recorded with ``LayerWatch(..., saliency=True)`` holds, per snapshot and
probe, the gradient of the model's output at the label with respect to the
input (``docs/FORMAT.md``, dataset ``saliency``). It is drawn by the layer
machinery (:class:`~layerwatch.rendering.panel.LayerPanel`): the probe row on
top, then one row with each probe's map averaged over the input channels
(signed), on the diverging palette, with one colour range for the whole run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from layerwatch.rendering.panel import LayerPanel, robust_max
from layerwatch.store import LayerInfo, Run

#: What the saliency panel and its files are called.
NAME = "saliency"


def saliency_layer(run: Run) -> LayerInfo | None:
    """The saliency maps as a one-channel "layer" of the input's spatial shape,
    or None when the input has no channel axis to average over (rank < 2)."""
    shape = tuple(run.probes_x().shape[1:])
    if len(shape) < 2:
        return None
    first = run.attrs.get("image_data_format") == "channels_first"
    axis = 0 if first else len(shape) - 1
    display = tuple(1 if i == axis else d for i, d in enumerate(shape))
    return LayerInfo(key=NAME, shape=display, layer_name=NAME, layer_class="saliency",
                     activation="linear", tensor="d output[label] / d input",
                     value_range=None, channel_axis=axis)


class SaliencyPanel(LayerPanel):
    """The saliency frames of one run: each probe's map, mean over input channels.

    The colour range is ±(99.9th percentile of |map| over the run) — the
    render's ``value_range`` is for activations, so it is not used here.
    """

    def __init__(self, run: Run, layer: LayerInfo, *, n: int | None = None):
        # Averaged over the input's channel axis, counted from the end, so the
        # same axis serves one snapshot (probes, ...) and a block (T, probes, ...).
        self._mean_axis = layer.channel_axis - len(layer.shape)
        n = run.num_snapshots if n is None else n
        m = robust_max(run, NAME, n, read=lambda indices: (
            self._mean(a) for a in run.iter_saliency(indices)))
        super().__init__(run, layer, max_channels=None, value_range=(-m, m), n=n)
        self.measured_range = True

    def _mean(self, maps: np.ndarray) -> np.ndarray:
        return maps.mean(axis=self._mean_axis, keepdims=True)

    def _values(self, index: Any) -> np.ndarray:
        return self._mean(self.run.saliency(index))
