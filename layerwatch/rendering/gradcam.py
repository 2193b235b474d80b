"""Grad-CAM maps drawn over the probes: ``gradcam_<layer>.gif`` and ``.png``.

A run recorded with ``LayerWatch(..., gradcam=True)`` holds, per snapshot,
layer and probe, a Grad-CAM map at the layer's spatial size (``docs/FORMAT.md``,
``gradcam/<key>``). It is drawn as saliency is
(:mod:`~layerwatch.rendering.saliency`): the probe row on top, below it one
row with each probe's map, upsampled to the probe's size by nearest neighbour,
on the diverging palette (0 white, the run's 99.9th percentile deep blue; the
maps are ≥ 0). Where a map is close to 0 the probe shows through faintly (light
grey strokes on white), so one sees *where on the digit* the layer looks.
:class:`OverProbePanel` does that underlay; the occlusion maps
(:mod:`~layerwatch.rendering.occlusion`) use it too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from layerwatch.rendering import colormap
from layerwatch.rendering.panel import HOLD, LayerPanel, robust_max
from layerwatch.store import LayerInfo, Run

#: Prefix of the Grad-CAM panels' names and files (``gradcam_<layer>``).
PREFIX = "gradcam_"
#: How strongly the probe shows beneath a map: its strokes' darkness on white, 0..1.
UNDERLAY_INK = 0.3
#: Map cells within this many colour levels of 0 show the probe beneath.
UNDERLAY_LEVELS = 2


def map_layer(run: Run, name: str, key: str, shape: tuple[int, int], tensor: str) -> LayerInfo:
    """A per-probe 2-D map as a one-channel "layer", channels placed like the input's."""
    first = run.attrs.get("image_data_format") == "channels_first"
    display = (1,) + tuple(shape) if first else tuple(shape) + (1,)
    return LayerInfo(key=key, shape=display, layer_name=name, layer_class=name,
                     activation="linear", tensor=tensor, value_range=None,
                     channel_axis=0 if first else 2)


def gradcam_layers(run: Run) -> list[LayerInfo]:
    """One map "layer" per layer with Grad-CAM maps, named ``gradcam_<layer name>``."""
    out = []
    for key in run.gradcam_layers:
        shape = run.gradcam(key, 0).shape[1:] if run.num_snapshots else (1, 1)
        name = next((layer.layer_name for layer in run.layers if layer.key == key), key)
        out.append(map_layer(run, PREFIX + name, key, shape, f"Grad-CAM of {key}"))
    return out


class OverProbePanel(LayerPanel):
    """A one-row map panel whose near-zero cells show the probe faintly beneath.

    Subclasses give :meth:`_maps` (rows of ``(probes, h, w)`` maps) and the colour
    range; the probes must be grey images (RGB probes get no underlay).
    """

    def _maps(self, index: Any) -> np.ndarray:
        raise NotImplementedError

    def _values(self, index: Any) -> np.ndarray:
        maps = self._maps(index)
        return np.expand_dims(maps, -3 if self.layer.channel_axis == 0 else -1)

    def still(self, index: int, scale: int) -> np.ndarray:
        return self._underlay(super().still(index, scale), scale)

    def frames_and_values(self, indices: Sequence[int], scale: int, *, hold: float = HOLD
                          ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for frame, values in super().frames_and_values(indices, scale, hold=hold):
            yield self._underlay(frame, scale), values

    def _underlay(self, frame: np.ndarray, scale: int) -> np.ndarray:
        found = self._faint(scale)
        if found is None:
            return frame
        (r0, r1), faint = found
        region = frame[r0:r1]
        zero = (colormap.LEVELS - 1) // 2
        near = (region >= zero - UNDERLAY_LEVELS) & (region <= zero + UNDERLAY_LEVELS)
        show = near & (faint != 0)
        region[show] = faint[show]
        return frame

    def _faint(self, scale: int) -> tuple[tuple[int, int], np.ndarray] | None:
        """(rows of the map row, the faint probe's palette indices there; 0 = none)."""
        cache = self.__dict__.setdefault("_faint_cache", {})
        if scale not in cache:
            layout = self.layout(scale)
            top, h = layout.grid_top, layout.cell_height
            probe = layout._base[top:top + h]
            start, levels = colormap.INPUT_START, colormap.INPUT_LEVELS
            ramp = (probe >= start) & (probe < start + levels)
            rgb = self._probes.ndim == 4 and self._probes.shape[
                1 if self.layer.channel_axis == 0 else -1] >= 3
            if rgb or not ramp.any():
                cache[scale] = None
            else:
                level = probe.astype(np.float64) - start  # 0 black .. levels-1 white
                # the probe's brightness becomes ink on white: its brightest pixels
                # (MNIST strokes) the darkest grey, at most UNDERLAY_INK dark
                faint = np.rint((levels - 1) * (1 - UNDERLAY_INK * level / (levels - 1)))
                faint = np.where(ramp, faint + start, 0).astype(np.uint8)
                row = top + h + layout.gap
                cache[scale] = ((row, row + h), faint)
        return cache[scale]


class GradCamPanel(OverProbePanel):
    """The Grad-CAM frames of one layer of a run; colour range 0 … the 99.9th
    percentile of the maps over the run (drawn as ±, so 0 is white)."""

    def __init__(self, run: Run, layer: LayerInfo, *, n: int | None = None):
        n = run.num_snapshots if n is None else n
        m = robust_max(run, layer.key, n, read=lambda indices: run.iter_gradcam(
            layer.key, indices))
        super().__init__(run, layer, max_channels=None, value_range=(-m, m), n=n)
        self.measured_range = True

    def _maps(self, index: Any) -> np.ndarray:
        return self.run.gradcam(self.layer.key, index)

    def note(self) -> str:
        return (f"{self.name}: colour range 0..{self.vmax:.3g} (99.9th percentile of the "
                "Grad-CAM maps over the run).")
