"""Rendering: a recording becomes pictures — GIFs, stills, curves, side-by-side comparisons.

The stages, leaf first: :mod:`~layerwatch.render.colormap` (the palette),
:mod:`~layerwatch.render.layout` (a frame's layout as palette indices),
:mod:`~layerwatch.render.gif` (encoding), :mod:`~layerwatch.render.panel` (one
layer of one run, drawn: shared by everything below),
:mod:`~layerwatch.render.run` (``render``), :mod:`~layerwatch.render.compare`,
:mod:`~layerwatch.render.curves` and :mod:`~layerwatch.render.watch`.
"""

from .names import safe_stem
from .panel import HOLD, LayerPanel, color_range, robust_max
from .run import render
from .selection import select_frames

__all__ = ["HOLD", "LayerPanel", "color_range", "render", "robust_max", "safe_stem",
           "select_frames"]
