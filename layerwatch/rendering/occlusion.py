"""Occlusion maps drawn over the probes: ``occlusion.gif`` and ``occlusion.png``.

A run recorded with ``LayerWatch(..., occlusion_every=N)`` holds, at its
occlusion steps, per probe and patch position, how much the labelled output
drops when that patch is greyed out (``docs/FORMAT.md``, ``occlusion``). One
frame per occlusion step, drawn like the Grad-CAM maps
(:class:`~layerwatch.rendering.gradcam.OverProbePanel`): the probes on top, each
probe's grid of drops below, upsampled to the probe by nearest neighbour, blue
where hiding the patch lowers the output, red where it raises it, the probe
faint beneath where the drop is near 0. The grid is the patch positions, so
with a stride smaller than the patch a cell stands for its patch's corner.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from layerwatch.rendering.gradcam import OverProbePanel, map_layer
from layerwatch.rendering.panel import robust_max
from layerwatch.store import LayerInfo, Run

#: What the occlusion panel and its files are called.
NAME = "occlusion"


def occlusion_layer(run: Run) -> LayerInfo | None:
    """The occlusion maps as a one-channel "layer", or None when there are none yet."""
    if not run.has_occlusion or not len(run.occlusion_steps):
        return None
    return map_layer(run, NAME, NAME, run.occlusion(0).shape[1:], "output drop per patch")


class OcclusionPanel(OverProbePanel):
    """The occlusion frames of a run, one per occlusion step; colour range ±(99.9th
    percentile of |drop| over the run)."""

    def __init__(self, run: Run, layer: LayerInfo, *, n: int | None = None):
        steps = run.occlusion_steps
        count = len(steps)
        m = robust_max(run, NAME, count, read=lambda indices: (
            run.occlusion(i) for i in indices))
        super().__init__(run, layer, max_channels=None, value_range=(-m, m), n=count)
        self.measured_range = True
        # Captions and indices follow the occlusion steps, not the snapshots.
        epoch_of = dict(zip(run.steps.tolist(), run.epochs.tolist()))
        self.steps = steps
        self.epochs = np.array([epoch_of.get(int(s), 0) for s in steps], dtype=np.int64)
        self._index = {int(s): i for i, s in enumerate(steps)}

    def _maps(self, index: Any) -> np.ndarray:
        return self.run.occlusion(index)

    def note(self) -> str:
        settings = self.run.occlusion_settings or {}
        return (f"{NAME}: colour range ±{self.vmax:.3g} (99.9th percentile of |output drop|; "
                f"patch {settings.get('patch')}, stride {settings.get('stride')}, grey "
                f"{settings.get('fill', float('nan')):.3g}).")
