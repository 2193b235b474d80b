"""Rendering: a recording becomes pictures — GIFs, stills, curves, side-by-side comparisons.

The stages, leaf first: :mod:`~layerwatch.rendering.colormap` (the palette),
:mod:`~layerwatch.rendering.layout` (a frame's layout as palette indices),
:mod:`~layerwatch.rendering.gif` (encoding), :mod:`~layerwatch.rendering.panel` (one
layer of one run, drawn: shared by everything below),
:mod:`~layerwatch.rendering.run` (``render``), :mod:`~layerwatch.rendering.compare`,
:mod:`~layerwatch.rendering.curves` and :mod:`~layerwatch.rendering.watch`.
"""

from .names import safe_stem
from .panel import HOLD, LayerPanel, color_range, robust_max
from .run import render
from .selection import select_frames

__all__ = ["HOLD", "LayerPanel", "color_range", "render", "robust_max", "safe_stem",
           "select_frames"]
